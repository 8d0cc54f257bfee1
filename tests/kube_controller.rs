//! The controller in Kubernetes mode against a real kube-apiserver and etcd
//! (`cluster.rs`), read by the ztunnel's own xDS client presenting a pod-bound
//! service-account token (TokenReview; a token for another audience is refused):
//! objects created through the API reach the proxy; the ambient label turns HBONE on and off; a rejected update
//! keeps the last good policy; the mesh root lives in a Secret; a waypoint Gateway
//! becomes its Deployment, Service, ServiceAccount and status; a controller restart
//! (with an empty CA directory) and an API-server restart lose nothing and resync; a
//! second replica takes the lease when the leader dies.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use cairn_api::model::TunnelProtocol;
use cairn_controller::resources::istio;
use cairn_tests::{
    cluster::{self, LocalCluster},
    lab::binary,
};
use cairn_ztunnel::{
    SharedState,
    state::ProxyState,
    xds::{StateSink, XdsClient, XdsConfig},
};
use k8s_openapi::api::{
    apps::v1::Deployment,
    authentication::v1::TokenRequest,
    core::v1::{Namespace, Node, Pod, Service, ServiceAccount},
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::sync::watch;

async fn eventually(what: &str, within: Duration, f: impl FnMut() -> bool) -> Duration {
    match within_time(within, f).await {
        Some(took) => took,
        None => panic!("timed out after {within:?} waiting for: {what}"),
    }
}

async fn within_time(within: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if f() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

struct Controller {
    child: std::process::Child,
    args: Vec<String>,
    log: std::path::PathBuf,
}

impl Controller {
    fn start(args: Vec<String>, log: std::path::PathBuf) -> Controller {
        let child = Self::spawn(&args, &log);
        Controller { child, args, log }
    }

    fn spawn(args: &[String], log: &std::path::Path) -> std::process::Child {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("controller log");
        std::process::Command::new(binary("controller"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("start controller")
    }

    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.args, &self.log);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "web",
                 "containers": [{"name": "app", "image": "cairn/test-app"}]},
    }))
    .expect("pod")
}

/// Creates a pod and reports it running at `ip`, as the node's kubelet would.
async fn run_pod(pods: &Api<Pod>, name: &str, ip: &str) {
    pods.create(&PostParams::default(), &pod(name))
        .await
        .expect("create pod");
    let status = json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("pod status");
}

fn workload_ips(state: &SharedState) -> Vec<String> {
    let mut ips: Vec<String> = state
        .load()
        .workloads()
        .filter(|w| w.namespace == "shop")
        .flat_map(|w| w.addresses.iter().map(|a| a.to_string()))
        .collect();
    ips.sort();
    ips
}

fn hbone(state: &SharedState) -> bool {
    state
        .load()
        .workloads()
        .filter(|w| w.namespace == "shop")
        .all(|w| w.tunnel_protocol == TunnelProtocol::Hbone)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_on_a_real_api_server() {
    if let Some(why) = cluster::unavailable() {
        eprintln!("SKIP controller_on_a_real_api_server: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster =
        tokio::task::block_in_place(|| LocalCluster::start(&dir.path().join("cluster")))
            .expect("local cluster");
    let client = cluster.client().await.expect("kube client");

    // What ships: the Gateway API CRDs and `kubectl apply -k deploy/` (CRDs generated
    // from Cairn's types, namespace, RBAC, controller, ztunnel DaemonSet), on the real
    // API server.
    let root_dir = cairn_tests::workspace_root();
    let repo = |p: &str| root_dir.join(p).display().to_string();
    tokio::task::block_in_place(|| {
        cluster.install_deploy()?;
        // The demo's manifests and steps are valid against those CRDs.
        cluster.kubectl(&["apply", "-f", &repo("deploy/demo/bookinfo.yaml")])?;
        for f in [
            "deploy/demo/reviews-canary.yaml",
            "deploy/demo/steps/reviews-50-50.yaml",
            "deploy/demo/steps/reviews-abort-50.yaml",
            "deploy/demo/steps/deny-jason.yaml",
        ] {
            cluster.kubectl(&["apply", "--dry-run=server", "-f", &repo(f)])?;
        }
        anyhow::Ok(())
    })
    .expect("deploy/ applies");

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "shop",
                "labels": {"istio.io/dataplane-mode": "ambient"}}}))
            .expect("namespace"),
        )
        .await
        .expect("create namespace");
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "shop");
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "web"}})).expect("sa"),
        )
        .await
        .expect("create service account");
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "web"},
                "spec": {"clusterIP": "10.96.0.50", "selector": {"app": "web"},
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))
            .expect("service"),
        )
        .await
        .expect("create service");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    run_pod(&pods, "web-1", "10.1.0.5").await;

    // The ztunnel of node-a, as its DaemonSet pod: a service account and a pod bound
    // to the node, whose projected token (audience istio-ca) the controller reviews.
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "node-a"}})).expect("node"),
        )
        .await
        .expect("create node");
    let system_accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "cairn-system");
    let system_pods: Api<Pod> = Api::namespaced(client.clone(), "cairn-system");
    let ztunnel_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "ztunnel-node-a"},
        "spec": {"nodeName": "node-a", "serviceAccountName": "ztunnel",
                 "containers": [{"name": "ztunnel", "image": "cairn/ztunnel"}]},
    }))
    .expect("ztunnel pod");
    let ztunnel_pod = system_pods
        .create(&PostParams::default(), &ztunnel_pod)
        .await
        .expect("create ztunnel pod");
    let token = |audience: &'static str| {
        let accounts = system_accounts.clone();
        let uid = ztunnel_pod.metadata.uid.clone();
        async move {
            let request: TokenRequest = serde_json::from_value(json!({"spec": {
                "audiences": [audience], "expirationSeconds": 3600,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                                   "name": "ztunnel-node-a", "uid": uid},
            }}))
            .expect("token request");
            accounts
                .create_token_request("ztunnel", &PostParams::default(), &request)
                .await
                .expect("token request")
                .status
                .expect("token status")
                .token
                .expect("token")
        }
    };
    let node_token = token("istio-ca").await;
    // The API server's own audience: refused by the controller, good for the API.
    let wrong_audience = token("https://kubernetes.default.svc.cluster.local").await;

    // The controller, in Kubernetes mode, as its own service account: the shipped
    // RBAC must be enough for everything below.
    let controller_token: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))
            .expect("token request");
    let controller_token = system_accounts
        .create_token_request(
            "cairn-controller",
            &PostParams::default(),
            &controller_token,
        )
        .await
        .expect("controller token")
        .status
        .and_then(|s| s.token)
        .expect("token");
    let controller_kubeconfig = dir.path().join("controller.kubeconfig");
    cluster
        .kubeconfig_with_token(&controller_token, &controller_kubeconfig)
        .expect("controller kubeconfig");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    std::fs::write(
        dir.path().join("tokens.yaml"),
        "- {token: tok-a, node: node-a}\n",
    )
    .expect("tokens");
    let d = |p: &str| dir.path().join(p).display().to_string();
    let mut controller = Controller::start(
        vec![
            "--kube".into(),
            "--kubeconfig".into(),
            controller_kubeconfig.display().to_string(),
            "--ca-dir".into(),
            d("ca"),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--leader-id=controller-a".into(),
        ],
        dir.path().join("controller.log"),
    );
    let root = dir.path().join("ca/root-cert.pem");
    eventually("the mesh root", Duration::from_secs(30), || root.exists()).await;

    let subscribe = |token: String| {
        let state: SharedState = Arc::new(ArcSwap::from_pointee(ProxyState::default()));
        let xds = XdsClient::new(
            XdsConfig {
                address: format!("https://127.0.0.1:{port}"),
                root_pem: std::fs::read_to_string(&root).expect("root"),
                server_name: "localhost".into(),
                token: token.into(),
                node_id: "node-a".into(),
                initial_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(400),
            },
            StateSink::new(state.clone()),
        );
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(xds.run(stop_rx));
        (state, stop)
    };
    // A token for another audience is refused (TokenReview with audience istio-ca).
    let (refused, _stop_refused) = subscribe(wrong_audience.clone());
    let (state, _stop) = subscribe(node_token);

    let first = eventually("web-1 and its service", Duration::from_secs(30), || {
        workload_ips(&state) == ["10.1.0.5"] && state.load().services().count() >= 1
    })
    .await;
    assert!(hbone(&state), "an ambient namespace's pod speaks HBONE");
    let svc = state
        .load()
        .services()
        .find(|s| s.name == "web")
        .cloned()
        .expect("service web");
    assert_eq!(svc.namespace, "shop");
    eprintln!("initial sync after controller start: {first:?}");
    // The proxies' root, published for the DaemonSet's CAIRN_ROOT_CERT.
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), "cairn-system");
    let published = maps
        .get("cairn-ca-root-cert")
        .await
        .expect("root ConfigMap");
    assert_eq!(
        published.data.and_then(|d| d.get("root-cert.pem").cloned()),
        Some(std::fs::read_to_string(&root).expect("root"))
    );
    assert!(
        refused.load().workloads().next().is_none(),
        "a token for another audience gets nothing"
    );
    // The refused stream races the accepted one: wait for its log line.
    let logged = within_time(Duration::from_secs(30), || {
        controller.log().contains("refused xDS stream")
    })
    .await;
    assert!(
        logged.is_some(),
        "the refusal is logged:\n{}",
        controller.log()
    );
    assert!(
        refused.load().workloads().next().is_none(),
        "a refused token still gets nothing"
    );

    // An Istio object through its CRD.
    let policies: Api<istio::AuthorizationPolicy> = Api::namespaced(client.clone(), "shop");
    let policy: istio::AuthorizationPolicy = serde_json::from_value(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-intruder", "namespace": "shop"},
        "spec": {"action": "DENY", "rules": [{"from": [{"source":
            {"principals": ["cluster.local/ns/other/sa/intruder"]}}]}]},
    }))
    .expect("policy");
    policies
        .create(&PostParams::default(), &policy)
        .await
        .expect("create policy");
    eventually("the policy", Duration::from_secs(10), || {
        state.load().policies().any(|p| p.name == "deny-intruder")
    })
    .await;

    // An update the decoder rejects (the API server's schema cannot see it: a
    // principal is not a SPIFFE-shaped id) keeps the last good policy.
    let bad = json!({"spec": {"rules": [{"from": [{"source": {"principals": ["*/ns/*/sa/*/extra*"]}}]}],
                              "action": "DENY"}});
    policies
        .patch(
            "deny-intruder",
            &PatchParams::default(),
            &Patch::Merge(&bad),
        )
        .await
        .expect("the API server's schema accepts what Cairn's decoder rejects");
    let log_has = |c: &Controller, what: &str| c.log().contains(what);
    eventually(
        "the controller rejecting it",
        Duration::from_secs(10),
        || log_has(&controller, "rejected object"),
    )
    .await;
    assert!(
        state.load().policies().any(|p| p.name == "deny-intruder"),
        "the last good policy stays"
    );
    // Fixed again. (A controller started while it is bad has no last good version to
    // keep: docs/kubernetes.md, "Rejected objects".)
    let good = json!({"spec": {"rules": [{"from": [{"source":
        {"principals": ["cluster.local/ns/other/sa/intruder"]}}]}]}});
    policies
        .patch(
            "deny-intruder",
            &PatchParams::default(),
            &Patch::Merge(&good),
        )
        .await
        .expect("fix the policy");

    // Taking the namespace out of ambient takes its pods out of the mesh (they are
    // no longer workloads: ztunnels pass their traffic as plain TCP); putting it
    // back brings them in, over HBONE.
    let label = |v: Option<&str>| json!({"metadata": {"labels": {"istio.io/dataplane-mode": v}}});
    namespaces
        .patch("shop", &PatchParams::default(), &Patch::Merge(&label(None)))
        .await
        .expect("unlabel");
    eventually("web-1 out of the mesh", Duration::from_secs(10), || {
        workload_ips(&state).is_empty()
    })
    .await;
    namespaces
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(&label(Some("ambient"))),
        )
        .await
        .expect("label");
    eventually("web-1 back over HBONE", Duration::from_secs(10), || {
        workload_ips(&state) == ["10.1.0.5"] && hbone(&state)
    })
    .await;

    // The CNI plugin in Kubernetes mode asks the API server whether a starting pod is
    // in the mesh, with the ztunnel service account's API token (what install-cni
    // writes; ClusterRole cairn-cni: get on pods and namespaces).
    let cni_kubeconfig = dir.path().join("cni.kubeconfig");
    cluster
        .kubeconfig_with_token(&wrong_audience, &cni_kubeconfig)
        .expect("cni kubeconfig");
    let cni = |pod: &str| {
        let work = dir.path().join(format!("cni-{pod}"));
        std::fs::create_dir_all(work.join("cgroup/pod")).expect("cni dirs");
        let config = json!({
            "cniVersion": "1.0.0", "name": "k8s", "type": "cairn-cni",
            "kubeconfig": cni_kubeconfig,
            "state_dir": work.join("state"), "pin_root": work.join("pins"),
            "cgroup_root": work.join("cgroup"),
            "runtimeConfig": {"cgroupPath": "pod"},
            "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.20/24"}]},
        });
        let mut child = std::process::Command::new(binary("cairn-cni"))
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", "c1")
            .env("CNI_NETNS", "/var/run/netns/cni-test")
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!("K8S_POD_NAMESPACE=shop;K8S_POD_NAME={pod}"),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("cairn-cni");
        std::io::Write::write_all(
            child.stdin.as_mut().expect("stdin"),
            config.to_string().as_bytes(),
        )
        .expect("config");
        let out = child.wait_with_output().expect("cairn-cni output");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    // web-1's namespace is ambient: the plugin goes on to enroll it (which needs the
    // node's bpffs and programs this test does not set up).
    let (_, enrolling) = tokio::task::block_in_place(|| cni("web-1"));
    assert!(
        enrolling.contains("enrolled") || enrolling.contains("loading the capture programs"),
        "ambient pod: {enrolling}"
    );
    // An unknown pod is not in the mesh.
    let (ok, unknown) = tokio::task::block_in_place(|| cni("no-such-pod"));
    assert!(ok && unknown.contains("is not in the mesh"), "{unknown}");

    // A waypoint Gateway becomes its ServiceAccount, Service, Deployment and root
    // ConfigMap, owned by the Gateway; its status follows its pods.
    let gateway = cairn_controller::waypoint::manifest("shop", "waypoint", "service");
    let gateway_file = dir.path().join("waypoint.yaml");
    std::fs::write(&gateway_file, gateway).expect("gateway manifest");
    tokio::task::block_in_place(|| {
        cluster.kubectl(&["apply", "-f", &gateway_file.display().to_string()])
    })
    .expect("apply the waypoint Gateway");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "shop");
    let mut deployment = None;
    for _ in 0..100 {
        if let Some(d) = deployments
            .get_opt("waypoint")
            .await
            .expect("get deployment")
        {
            deployment = Some(d);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deployment = deployment.expect("the waypoint's Deployment");
    let owner = &deployment
        .metadata
        .owner_references
        .as_ref()
        .expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Gateway", "waypoint")
    );
    let template = deployment.spec.template.spec.expect("pod spec");
    assert_eq!(template.service_account_name.as_deref(), Some("waypoint"));
    accounts
        .get("waypoint")
        .await
        .expect("the waypoint's ServiceAccount");
    let wp_service = services
        .get("waypoint")
        .await
        .expect("the waypoint's Service");
    let wp_ip = wp_service
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("the API server assigns a cluster IP");
    let shop_maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), "shop");
    shop_maps
        .get("cairn-ca-root-cert")
        .await
        .expect("the root next to the waypoint");
    let gateways: Api<cairn_controller::resources::gateway::Gateway> =
        Api::namespaced(client.clone(), "shop");
    let condition = |gw: &cairn_controller::resources::gateway::Gateway, t: &str| {
        gw.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == t))
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    let mut seen = None;
    for _ in 0..100 {
        let gw = gateways.get("waypoint").await.expect("gateway");
        seen = condition(&gw, "Programmed");
        if seen == Some(("False".into(), "NoReadyPods".into())) {
            let addresses = gw.status.map(|s| s.addresses).unwrap_or_default();
            assert_eq!(
                addresses.first().map(|a| a.value.clone()),
                Some(wp_ip.clone())
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, Some(("False".into(), "NoReadyPods".into())));
    // The waypoint's pod running (what the node agent reports for the Deployment).
    let wp_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "waypoint-0", "namespace": "shop",
                     "labels": {"gateway.networking.k8s.io/gateway-name": "waypoint",
                                "istio.io/dataplane-mode": "none"}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "waypoint",
                 "containers": [{"name": "waypoint", "image": "cairn/waypoint"}]},
    }))
    .expect("waypoint pod");
    pods.create(&PostParams::default(), &wp_pod)
        .await
        .expect("create waypoint pod");
    let ready = json!({"status": {"phase": "Running", "podIP": "10.1.0.9",
        "podIPs": [{"ip": "10.1.0.9"}], "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status("waypoint-0", &PatchParams::default(), &Patch::Merge(&ready))
        .await
        .expect("waypoint pod status");
    let mut programmed = None;
    for _ in 0..100 {
        let gw = gateways.get("waypoint").await.expect("gateway");
        programmed = condition(&gw, "Programmed");
        if programmed.as_ref().is_some_and(|(s, _)| s == "True") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(programmed, Some(("True".into(), "Programmed".into())));
    // Back to the workloads of this test: the waypoint's pod is not one of `web`.
    pods.delete(
        "waypoint-0",
        &kube::api::DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .expect("delete waypoint pod");
    eventually("the waypoint pod gone", Duration::from_secs(10), || {
        workload_ips(&state) == ["10.1.0.5"]
    })
    .await;

    // Controller restart: the proxy keeps its config; a change made while the
    // controller is down arrives once it is back.
    let _ = controller.child.kill();
    let _ = controller.child.wait();
    run_pod(&pods, "web-2", "10.1.0.6").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(workload_ips(&state), ["10.1.0.5"], "last config kept");
    // The restarted controller starts from an empty CA directory (an emptyDir in its
    // pod): the mesh root comes back from its Secret, or the proxy's TLS would fail.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), "cairn-system");
    let stored = secrets.get("cairn-ca-root").await.expect("root Secret");
    assert!(
        stored
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key("root-key.pem"))
    );
    for arg in controller.args.iter_mut() {
        if *arg == d("ca") {
            *arg = d("ca-after-restart");
        }
    }
    let restarted = Instant::now();
    controller.restart();
    eventually(
        "web-2 after the controller restart",
        Duration::from_secs(30),
        || workload_ips(&state) == ["10.1.0.5", "10.1.0.6"],
    )
    .await;
    eprintln!("resync after controller restart: {:?}", restarted.elapsed());
    assert_eq!(
        std::fs::read(dir.path().join("ca-after-restart/root-cert.pem")).expect("root again"),
        std::fs::read(&root).expect("first root"),
        "same mesh root after the restart"
    );
    assert!(state.load().policies().any(|p| p.name == "deny-intruder"));

    // API server restart (SIGKILL): the controller's watches reconnect, nothing is
    // dropped, and changes after it arrive.
    tokio::task::block_in_place(|| cluster.restart_apiserver()).expect("restart kube-apiserver");
    let back = Instant::now();
    assert_eq!(workload_ips(&state), ["10.1.0.5", "10.1.0.6"]);
    // Grace period 0: no kubelet here confirms a graceful termination.
    let now = kube::api::DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    pods.delete("web-1", &now).await.expect("delete web-1");
    run_pod(&pods, "web-3", "10.1.0.7").await;
    let resynced = within_time(Duration::from_secs(60), || {
        workload_ips(&state) == ["10.1.0.6", "10.1.0.7"]
    })
    .await;
    assert!(
        resynced.is_some(),
        "web-1 gone, web-3 in, after the API-server restart; proxy has {:?}; controller log:\n{}",
        workload_ips(&state),
        controller.log()
    );
    eprintln!("resync after kube-apiserver restart: {:?}", back.elapsed());
    assert!(state.load().policies().any(|p| p.name == "deny-intruder"));
    // Leader election: a second replica serves but follows; when the leader dies,
    // the second takes the lease once it expires (15 s) and starts writing.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "cairn-system");
    let holder = |lease: k8s_openapi::api::coordination::v1::Lease| {
        lease
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default()
    };
    assert_eq!(
        holder(leases.get("cairn-controller").await.expect("lease")),
        "controller-a"
    );
    let port_b = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let second = Controller::start(
        vec![
            "--kube".into(),
            "--kubeconfig".into(),
            controller_kubeconfig.display().to_string(),
            "--ca-dir".into(),
            d("ca-b"),
            "--listen".into(),
            format!("127.0.0.1:{port_b}"),
            "--leader-id=controller-b".into(),
        ],
        dir.path().join("controller-b.log"),
    );
    eventually(
        "the second replica serving",
        Duration::from_secs(30),
        || second.log().contains("serving delta ADS"),
    )
    .await;
    assert!(
        !second.log().contains("became leader"),
        "the second replica follows while controller-a renews"
    );
    let _ = controller.child.kill();
    let _ = controller.child.wait();
    let killed = Instant::now();
    let mut took_over = None;
    while killed.elapsed() < Duration::from_secs(40) {
        let lease = leases.get("cairn-controller").await.expect("lease");
        if holder(lease) == "controller-b" {
            took_over = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let took_over = took_over.expect("controller-b takes the lease");
    eprintln!("leader failover after the leader's death: {took_over:?}");
    eventually("controller-b leading", Duration::from_secs(5), || {
        second.log().contains("became leader")
    })
    .await;
    assert!(
        controller.log().contains("every kind listed"),
        "controller log:\n{}",
        controller.log()
    );
}
