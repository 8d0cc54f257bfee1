//! `cairn-demo up --kube` (`cargo xtask demo --kube`): the same app and live view on
//! the local Kubernetes cluster (`kube_lab`, the cluster `cargo xtask cluster up`
//! makes): everything goes through the API server as on a real cluster — the app's
//! pods and Services with `kubectl`, the waypoint with `cairn waypoint apply --kube`,
//! the steps with `kubectl apply`. `cargo xtask cluster down` removes what a crashed
//! one left.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use cairn_tests::{
    backend::{APP_IMAGE, Backend},
    kube_lab::{KubeLab, Options},
    lab::binary,
    pod_lab::sum_metric,
};

use crate::{NAMESPACE, step, view_loop};

/// The local cluster's directory and prefix: `cargo xtask cluster down` cleans up.
const DIR: &str = "/run/cairn-cluster";
const PREFIX: &str = "cairn";

fn pod(name: &str, sa: &str, labels: &str, node: &str, args: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n  labels: {{{labels}}}\nspec:\n  serviceAccountName: {sa}\n  nodeName: {node}\n  containers: [{{name: app, image: {APP_IMAGE}, args: [{args}], ports: [{{name: http, containerPort: 9080}}]}}]\n"
    )
}

/// Namespace, service accounts, Services and the subsets of reviews.
fn base() -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  labels: {{istio.io/dataplane-mode: ambient}}\n"
    );
    for sa in ["frontend", "reviews", "ratings"] {
        out += &format!(
            "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {NAMESPACE}}}\n"
        );
    }
    for svc in ["reviews", "ratings"] {
        out += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: {NAMESPACE}}}\nspec:\n  selector: {{app: {svc}}}\n  ports: [{{name: http, port: 9080, targetPort: 9080}}]\n"
        );
    }
    out += &format!(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: {NAMESPACE}}}\nspec:\n  host: reviews\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n"
    );
    out
}

fn cluster_ip(lab: &KubeLab, svc: &str) -> Result<String> {
    let ip = lab.kubectl(&[
        "-n",
        NAMESPACE,
        "get",
        "svc",
        svc,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    if ip.is_empty() {
        bail!("Service {svc} has no cluster IP");
    }
    Ok(ip)
}

/// Runs the CLI against the cluster as the user would, echoing the command.
fn cairn(lab: &KubeLab, args: &[&str]) -> Result<()> {
    println!(
        "$ {} {} --kube --kubeconfig {}",
        binary("cairn").display(),
        args.join(" "),
        lab.kubeconfig().display()
    );
    let out = lab.cairn(args);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("cairn {} failed", args.join(" "));
    }
    Ok(())
}

pub fn up(rate: u32, stop: &AtomicBool) -> Result<()> {
    if cairn_tests::cluster::unavailable().is_some() {
        bail!(
            "no kube-apiserver/etcd: run the Kubernetes demo with `cargo xtask demo --kube` (it builds them)"
        );
    }
    let stopped = || stop.load(Ordering::SeqCst);
    step(
        "the local cluster: kube-apiserver, etcd, deploy/, the controller (--kube), two nodes with their ztunnel pods",
    );
    let dir = Path::new(DIR);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {DIR}"))?;
    // `cargo xtask cluster down` stops whoever holds this.
    std::fs::write(
        dir.join("cairn-cluster.pid"),
        std::process::id().to_string(),
    )?;
    let lab = KubeLab::up(
        dir,
        &Options {
            prefix: PREFIX.into(),
            nodes: 2,
        },
    )?;
    let (n1, n2) = (lab.nodes[0].name.clone(), lab.nodes[1].name.clone());
    let kubectl = cairn_tests::cluster::bin_dir()
        .map(|d| d.join("kubectl"))
        .unwrap_or_else(|| "kubectl".into());
    let k = format!(
        "{} --kubeconfig {}",
        kubectl.display(),
        lab.kubeconfig().display()
    );

    step(
        "the app: namespace demo (ambient), Services, reviews v1/v2 and ratings pods, a 90/10 canary",
    );
    lab.apply(&base())?;
    let ratings = format!("{}:9080", cluster_ip(&lab, "ratings")?);
    let reviews = format!("{}:9080", cluster_ip(&lab, "reviews")?);
    let mut pods = pod("ratings", "ratings", "app: ratings", &n1, "app, ratings");
    pods += &pod(
        "reviews-v1",
        "reviews",
        "app: reviews, version: v1",
        &n2,
        "app, reviews, --version, v1",
    );
    pods += &pod(
        "reviews-v2",
        "reviews",
        "app: reviews, version: v2",
        &n2,
        &format!("app, reviews, --version, v2, --ratings, \"{ratings}\""),
    );
    lab.apply(&pods)?;
    println!("$ {k} apply -f deploy/demo/reviews-canary.yaml");
    lab.kubectl(&["apply", "-f", "deploy/demo/reviews-canary.yaml"])?;
    for name in ["ratings", "reviews-v1", "reviews-v2"] {
        lab.wait_pod(NAMESPACE, name)?;
    }
    if stopped() {
        return Ok(());
    }

    step("the waypoint: the controller makes its Deployment, node 1's agent runs it");
    cairn(
        &lab,
        &[
            "waypoint",
            "apply",
            "-n",
            NAMESPACE,
            "--enroll-namespace",
            "--wait",
            "--timeout",
            "90",
        ],
    )?;
    let waypoint = lab.kubectl(&[
        "-n",
        NAMESPACE,
        "get",
        "pods",
        "-l",
        "gateway.networking.k8s.io/gateway-name=waypoint",
        "-o",
        "jsonpath={.items[0].status.podIP}",
    ])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while sum_metric(
        &lab.metrics(1),
        "cairn_capture_pods",
        &["state=\"adopted\""],
    ) < 2.0
    {
        if Instant::now() > deadline {
            bail!("node 2's pods not adopted within 60 s\n{}", lab.logs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if stopped() {
        return Ok(());
    }

    step("the frontend");
    let stats = dir.join("frontend-stats.json");
    lab.apply(&pod(
        "frontend",
        "frontend",
        "app: frontend",
        &n1,
        &format!(
            "app, frontend, --target, \"{reviews}\", --host, reviews.{NAMESPACE}.svc.cluster.local:9080, --rate, \"{rate}\", --stats, {}",
            stats.display()
        ),
    ))?;
    lab.wait_pod(NAMESPACE, "frontend")?;

    let admin = |ip: &str| format!("http://{ip}:15020/metrics");
    let scrapes = [
        (
            lab.nodes[0].netns_path(),
            admin(&lab.nodes[0].ip.to_string()),
            "ztunnel node 1",
        ),
        (
            lab.nodes[1].netns_path(),
            admin(&lab.nodes[1].ip.to_string()),
            "ztunnel node 2",
        ),
        (lab.nodes[0].netns_path(), admin(&waypoint), "waypoint"),
    ];
    let footer = footer(&k, &scrapes);
    println!("\n{footer}\n");
    let header = format!(
        "Cairn demo on Kubernetes (local cluster): namespace {NAMESPACE} on {n1} and {n2}, waypoint at {waypoint}, frontend at {rate} req/s"
    );
    view_loop(&header, &scrapes, &stats, &footer, stop);
    step("stopping: removing the cluster, every pod, namespace, link, cgroup and pin");
    drop(lab);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

fn footer(k: &str, scrapes: &[(PathBuf, String, &str); 3]) -> String {
    let urls: String = scrapes
        .iter()
        .map(|(_, url, who)| format!("\n  {who:<15} {url}"))
        .collect();
    format!(
        "try it (in another terminal, from this directory; the view changes within seconds):\n  even split   $ {k} apply -f deploy/demo/steps/reviews-50-50.yaml\n  50% aborts   $ {k} apply -f deploy/demo/steps/reviews-abort-50.yaml\n  deny jason   $ {k} apply -f deploy/demo/steps/deny-jason.yaml\n  undo         $ {k} apply -f deploy/demo/reviews-canary.yaml\n               $ {k} delete -f deploy/demo/steps/deny-jason.yaml\n  look around  $ {k} get pods -A -o wide\nmetrics (from this machine):{urls}\nlogs: {DIR}/    stop: Ctrl-C here, or `cargo xtask cluster down` from anywhere"
    )
}
