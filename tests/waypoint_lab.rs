//! The pod lab with a waypoint, as the waypoint test and the mesh-path L7 benchmark
//! use it: namespace `demo` (ambient) with a client pod on node A, `reviews` v1 and v2
//! on node B behind the service `reviews` (VIP 10.96.0.12) with a 90/10
//! VirtualService, and the waypoint declared with `cairn waypoint apply
//! --enroll-namespace --wait`, placed by the runner (a pod on node A, VIP 10.96.0.20)
//! and started with both ztunnels.

use std::process::{Command, Stdio};

use cairn_controller::waypoint::{Placement, local_deployment};

use crate::{
    lab::binary,
    pod_lab::{NODE_A, NODE_B, PodLab, PodSpec},
};

pub const WAYPOINT_POD_IP: &str = "10.77.1.20";
pub const WAYPOINT_VIP: &str = "10.96.0.20";
pub const REVIEWS_VIP: &str = "10.96.0.12";
pub const CLIENT_IP: &str = "10.77.1.10";

/// A pod of namespace `ns` (`labels` in flow style, without braces).
pub fn pod(ns: &str, name: &str, labels: &str, node: &str, ip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{{labels}}}\nspec:\n  serviceAccountName: {name}\n  nodeName: {node}\n  containers: [{{name: app, image: test, ports: [{{name: http, containerPort: 9080}}]}}]\nstatus:\n  phase: Running\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"True\"}}]\n"
    )
}

/// The demo namespace, its pods, `reviews` with its DestinationRule and 90/10
/// VirtualService, then `extra`.
pub fn manifests(extra: &str) -> String {
    let mut out =
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels: {istio.io/dataplane-mode: ambient}\n"
            .to_string();
    out += &pod("demo", "client", "app: client", "node-a", CLIENT_IP);
    out += &pod(
        "demo",
        "reviews-v1",
        "app: reviews, version: v1",
        "node-b",
        "10.77.2.12",
    );
    out += &pod(
        "demo",
        "reviews-v2",
        "app: reviews, version: v2",
        "node-b",
        "10.77.2.13",
    );
    out += &format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: demo}}\nspec:\n  clusterIP: {REVIEWS_VIP}\n  selector: {{app: reviews}}\n  ports: [{{name: http, port: 9080, targetPort: http}}]\n"
    );
    out += "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: demo}\nspec:\n  host: reviews\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n";
    out += "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: demo}\nspec:\n  hosts: [reviews]\n  http:\n  - name: canary\n    route:\n    - {destination: {host: reviews, subset: v1}, weight: 90}\n    - {destination: {host: reviews, subset: v2}, weight: 10}\n";
    out + extra
}

pub fn spec(namespace: &'static str, name: &'static str, node: usize, ip: &'static str) -> PodSpec {
    PodSpec {
        namespace,
        name,
        node,
        ip,
    }
}

/// `cairn waypoint apply -n demo --enroll-namespace --wait`, while the runner places
/// the waypoint (its pod and Service in the config directory, the pod's namespace,
/// the `waypoint` process); returns what the CLI printed and the waypoint's pid.
/// Panics if it fails.
pub fn apply_and_place(lab: &mut PodLab) -> (String, u32) {
    let config = lab.dir().join("config");
    let apply = Command::new(binary("cairn"))
        .args([
            "waypoint",
            "apply",
            "-n",
            "demo",
            "--enroll-namespace",
            "--wait",
        ])
        .args(["--timeout", "30"])
        .arg("--config-dir")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cairn");
    lab.wait_for("the Gateway written", |_| {
        config.join("waypoint-demo-waypoint.yaml").exists()
    });
    std::fs::write(
        config.join("waypoint-demo-waypoint-deployment.yaml"),
        local_deployment(
            "demo",
            "waypoint",
            &Placement {
                node: "node-a",
                pod_ip: WAYPOINT_POD_IP,
                cluster_ip: WAYPOINT_VIP,
            },
        ),
    )
    .expect("deployment");
    let out = apply.wait_with_output().expect("cairn");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "cairn waypoint apply --wait: {said}");
    let cni = lab.add_pod(spec("demo", "waypoint", NODE_A, WAYPOINT_POD_IP));
    assert!(
        cni.contains("is not in the mesh"),
        "the waypoint's own pod is never captured: {cni}"
    );
    let pid = lab.start_waypoint("waypoint");
    (said, pid)
}

/// Creates the client and reviews pods, runs `server(version)` in each reviews pod,
/// starts both ztunnels and waits until traffic to `reviews` goes through the
/// waypoint (its route served, ztunnel A sending the service there, pods adopted).
pub fn start_mesh(lab: &mut PodLab, server: &dyn Fn(&str) -> Vec<String>) {
    for (name, node, ip) in [
        ("client", NODE_A, CLIENT_IP),
        ("reviews-v1", NODE_B, "10.77.2.12"),
        ("reviews-v2", NODE_B, "10.77.2.13"),
    ] {
        let cni = lab.add_pod(spec("demo", name, node, ip));
        assert!(cni.contains("enrolled"), "{name}: {cni}");
    }
    for v in ["v1", "v2"] {
        let args = server(v);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.spawn_in_pod(&format!("reviews-{v}"), &args, &format!("{v}.log"));
    }
    lab.start_ztunnel(NODE_A);
    lab.start_ztunnel(NODE_B);
    wait_for_waypoint(lab);
    lab.wait_for("both nodes' pods adopted", |l| {
        l.adopted(NODE_A) >= 1.0 && l.adopted(NODE_B) >= 2.0
    });
}

/// Waits until the waypoint is ready with the reviews canary route and ztunnel A
/// sends the reviews service through it.
pub fn wait_for_waypoint(lab: &PodLab) {
    let admin = format!("http://{WAYPOINT_POD_IP}:15020");
    lab.wait_for("the waypoint ready", |l| {
        l.fetch(NODE_A, &format!("{admin}/healthz/ready")).trim() == "ready"
    });
    lab.wait_for("the canary route at the waypoint", |l| {
        let dump = l.fetch(NODE_A, &format!("{admin}/config_dump"));
        dump.contains(&format!("\"{REVIEWS_VIP}:9080\"")) && dump.contains("demo/reviews/canary")
    });
    lab.wait_for("ztunnel A sending reviews through the waypoint", |l| {
        let dump = l.fetch(NODE_A, &format!("http://{}/config_dump", l.admin(NODE_A)));
        serde_json::from_str::<serde_json::Value>(&dump).is_ok_and(|d| {
            d["services"].as_array().is_some_and(|s| {
                s.iter().any(|s| {
                    s["hostname"] == "reviews.demo.svc.cluster.local" && !s["waypoint"].is_null()
                })
            })
        })
    });
}

/// The waypoint's admin URL prefix.
pub fn waypoint_admin() -> String {
    format!("http://{WAYPOINT_POD_IP}:15020")
}
