//! `cairn-node` against a real API server: pods bound to its node get a network
//! namespace, an address from the node's range, their process (serving HTTP here)
//! and a status saying so; a deleted pod is torn down and its deletion confirmed;
//! a pod of an image the node does not run stays pending with a clear log line.
//!
//! Needs root (network namespaces, cgroups) and the Kubernetes binaries
//! (`CAIRN_K8S_BIN`, set by `cargo xtask test`); without them it says why and stops.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use cairn_tests::{cluster, cluster::LocalCluster, lab::binary, pod_lab};

struct Node {
    netns: String,
    agent: Option<Child>,
    bpffs: Option<std::path::PathBuf>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        // A killed agent leaves its pods' processes: kill them by their cgroups.
        if let Some(root) = cairn_capture::cgroup2_mount() {
            let node = root.join("cairn-node/node-t");
            let _ = std::fs::write(node.join("cgroup.kill"), "1");
            std::thread::sleep(Duration::from_millis(200));
            for e in std::fs::read_dir(&node).into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir(e.path());
            }
            let _ = std::fs::remove_dir(&node);
            let _ = std::fs::remove_dir(root.join("cairn-node"));
        }
        if let Some(pins) = &self.bpffs {
            let _ = Command::new("umount").arg(pins).status();
        }
        // What a killed agent could not remove.
        if let Ok(dir) = std::fs::read_dir("/var/run/netns") {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("node-t-") || name == self.netns {
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                }
            }
        }
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("command");
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool, log: &Path) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}\nagent log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent's pod namespaces (it names them `<node>-<uid>`).
fn pod_namespaces() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .expect("netns dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("node-t-"))
        .collect()
}

fn pod(namespace: &str, name: &str, image: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{app: web}}}}\nspec:\n  nodeName: node-t\n  containers: [{{name: app, image: {image}, args: [\"8080\"]}}]\n"
    )
}

#[test]
fn the_node_agent_runs_the_pods_bound_to_its_node() {
    if let Some(why) = cluster::unavailable() {
        eprintln!("SKIP the_node_agent_runs_the_pods_bound_to_its_node: {why}");
        return;
    }
    if let Err(why) = pod_lab::can_run() {
        eprintln!("SKIP the_node_agent_runs_the_pods_bound_to_its_node: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = LocalCluster::start(&dir.path().join("cluster")).expect("local cluster");
    let kubectl = |args: &[&str]| cluster.kubectl(args).expect("kubectl");

    // The node: a network namespace whose address pods route through.
    let mut node = Node {
        netns: format!("cnt{}", std::process::id()),
        agent: None,
        bpffs: None,
    };
    let ns = node.netns.clone();
    sh(&["ip", "netns", "add", &ns]);
    sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
    sh(&["ip", "-n", &ns, "addr", "add", "10.78.1.1/32", "dev", "lo"]);
    // The real CNI plugin, in Kubernetes mode (membership from the API server), with
    // the node's bpffs for the capture programs of ambient pods.
    let pins = dir.path().join("pins");
    std::fs::create_dir_all(&pins).expect("pins");
    sh(&["mount", "-t", "bpf", "bpf", &pins.display().to_string()]);
    node.bpffs = Some(pins.clone());
    let cni_config = dir.path().join("cni.json");
    std::fs::write(
        &cni_config,
        serde_json::json!({
            "cniVersion": "1.0.0", "name": "k8s", "type": "cairn-cni",
            "kubeconfig": cluster.kubeconfig,
            "state_dir": dir.path().join("state"),
            "pin_root": pins,
            "cgroup_root": cairn_capture::cgroup2_mount().expect("cgroup2"),
            "probe_ip": "10.78.1.1",
        })
        .to_string(),
    )
    .expect("cni config");
    let log = dir.path().join("agent.log");
    let start_agent = |log: &Path| {
        let out = std::fs::File::create(log).expect("log");
        Command::new(binary("cairn-node"))
            .args(["--kubeconfig"])
            .arg(&cluster.kubeconfig)
            .args(["--node", "node-t", "--node-netns", &ns])
            .args(["--gateway", "10.78.1.1", "--pod-cidr", "10.78.1.0/24"])
            .arg("--dir")
            .arg(dir.path().join("pods"))
            .args([
                "--image",
                "cairn/http=python3 -m http.server --bind 0.0.0.0",
            ])
            .arg("--cni-plugin")
            .arg(binary("cairn-cni"))
            .arg("--cni-config")
            .arg(&cni_config)
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("cairn-node")
    };
    node.agent = Some(start_agent(&log));

    kubectl(&["create", "namespace", "shop"]);
    kubectl(&["create", "namespace", "mesh"]);
    kubectl(&[
        "label",
        "namespace",
        "mesh",
        "istio.io/dataplane-mode=ambient",
    ]);
    let manifests = dir.path().join("pods.yaml");
    std::fs::write(
        &manifests,
        format!(
            "{}---\n{}---\n{}---\n{}",
            pod("shop", "web-1", "cairn/http"),
            pod("shop", "web-2", "cairn/http"),
            pod("shop", "odd", "cairn/unknown"),
            pod("mesh", "app-1", "cairn/http"),
        ),
    )
    .expect("manifests");
    kubectl(&["apply", "-f", &manifests.display().to_string()]);

    let status = |name: &str, path: &str| {
        cluster
            .kubectl(&[
                "-n",
                "shop",
                "get",
                "pod",
                name,
                "-o",
                &format!("jsonpath={path}"),
            ])
            .unwrap_or_default()
    };
    let ready = |name: &str| {
        status(name, "{.status.conditions[?(@.type==\"Ready\")].status}").trim() == "True"
    };
    wait_for(
        "both pods Ready",
        Duration::from_secs(30),
        || ready("web-1") && ready("web-2"),
        &log,
    );
    let ip1 = status("web-1", "{.status.podIP}");
    let ip2 = status("web-2", "{.status.podIP}");
    assert_ne!(ip1, ip2, "each pod its own address");
    for ip in [&ip1, &ip2] {
        assert!(ip.starts_with("10.78.1."), "from the node's range: {ip}");
    }
    assert_eq!(status("web-1", "{.status.phase}"), "Running");

    // Each pod serves from its own namespace, reachable from the node at its IP.
    let node_ns = Path::new("/var/run/netns").join(&ns);
    for ip in [&ip1, &ip2] {
        let url = format!("http://{ip}:8080/");
        let mut body = String::new();
        wait_for(
            &format!("{url} answering"),
            Duration::from_secs(15),
            || match pod_lab::get_in(&node_ns, &url) {
                Ok(b) => {
                    body = b;
                    true
                }
                Err(_) => false,
            },
            &log,
        );
        assert!(body.contains("Directory listing"), "{body}");
    }

    // The plugin ran for each pod, as on a real node: the ambient pod enrolled (its
    // capture programs attached to its cgroup), the others not in the mesh.
    let app_ready = || {
        cluster
            .kubectl(&[
                "-n",
                "mesh",
                "get",
                "pod",
                "app-1",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .is_ok_and(|s| s.trim() == "True")
    };
    wait_for(
        "the ambient pod Ready",
        Duration::from_secs(30),
        app_ready,
        &log,
    );
    let agent_log = std::fs::read_to_string(&log).unwrap_or_default();
    let plugin_said = |pod: &str, what: &str| {
        agent_log
            .lines()
            .any(|l| l.contains("CNI done") && l.contains(pod) && l.contains(what))
    };
    assert!(plugin_said("mesh/app-1", "enrolled"), "{agent_log}");
    assert!(
        plugin_said("shop/web-1", "is not in the mesh"),
        "{agent_log}"
    );

    // An image this node does not run: the pod stays Pending and the log says why.
    assert_eq!(status("odd", "{.status.podIP}"), "");
    let agent_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        agent_log.contains("is not one this node runs"),
        "{agent_log}"
    );
    // ...and is tried again, later each time (1 s, then 2 s, ...).
    wait_for(
        "odd tried again",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    l.contains("shop/odd") && l.contains("failures=2") && l.contains("retry_in=2s")
                })
        },
        &log,
    );

    // Deleted: the agent tears the pod down and confirms the deletion.
    let running = pod_namespaces();
    assert_eq!(
        running.len(),
        3,
        "one namespace per running pod: {running:?}"
    );
    kubectl(&["-n", "shop", "delete", "pod", "web-1", "--wait=false"]);
    wait_for(
        "web-1 gone from the API server",
        Duration::from_secs(30),
        || {
            cluster
                .kubectl(&["-n", "shop", "get", "pods", "-o", "name"])
                .is_ok_and(|out| !out.contains("pod/web-1"))
        },
        &log,
    );
    let left: Vec<String> = pod_namespaces();
    assert_eq!(left.len(), 2, "web-1's namespace removed: {left:?}");
    assert!(
        pod_lab::get_in(&node_ns, &format!("http://{ip1}:8080/")).is_err(),
        "web-1 no longer serves"
    );

    // A crashed agent (SIGKILL) leaves its pods running; the next one removes them
    // and makes the node's pods again, each once.
    if let Some(mut agent) = node.agent.take() {
        let _ = agent.kill();
        let _ = agent.wait();
    }
    let processes = || {
        let root = cairn_capture::cgroup2_mount().expect("cgroup2");
        std::fs::read_dir(root.join("cairn-node/node-t"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                std::fs::read_to_string(e.path().join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .count()
            })
            .sum::<usize>()
    };
    assert_eq!(processes(), 2, "the killed agent's pods still run");
    let log2 = dir.path().join("agent-2.log");
    node.agent = Some(start_agent(&log2));
    wait_for(
        "web-2 and app-1 made again",
        Duration::from_secs(30),
        || {
            let said = std::fs::read_to_string(&log2).unwrap_or_default();
            said.matches("pod running").count() == 2
        },
        &log2,
    );
    // Each pod's shell joins its cgroup a moment after it starts.
    wait_for(
        "each pod's process in its cgroup",
        Duration::from_secs(10),
        || processes() == 2,
        &log2,
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(processes(), 2, "one process per pod, none left over");
    assert_eq!(pod_namespaces().len(), 2);
    let said = std::fs::read_to_string(&log2).unwrap_or_default();
    assert!(said.contains("removed an earlier agent's pod"), "{said}");

    // SIGTERM: the agent removes every pod it runs.
    if let Some(agent) = node.agent.take() {
        sh(&["kill", "-TERM", &agent.id().to_string()]);
        let mut agent = agent;
        let _ = agent.wait();
    }
    let left: Vec<String> = pod_namespaces();
    assert!(
        left.is_empty(),
        "the agent removed its pods on SIGTERM: {left:?}"
    );
    let cgroups = cairn_capture::cgroup2_mount()
        .expect("cgroup2")
        .join("cairn-node/node-t");
    assert!(!cgroups.exists(), "the node's cgroups removed");
}
