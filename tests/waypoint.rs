//! The waypoint end to end in the pod lab (tests/pod_lab.rs): real pods (network
//! namespaces, veth, cgroups, captured by the real eBPF programs), two real ztunnels,
//! the real controller, the `cairn waypoint apply` CLI and the real `waypoint` binary.
//!
//! client (node A) -> ztunnel A -> HBONE -> waypoint (its own pod on node A) ->
//! HBONE -> ztunnel B -> reviews v1 / v2 (node B), with a 90/10 VirtualService.
//!
//! Needs what tests/capture.rs needs (root, iproute2, nsenter, python3, cgroup v2,
//! BPF links); without them it says why and stops.

use std::process::{Command, Stdio};

use cairn_controller::waypoint::{Placement, local_deployment};
use cairn_tests::{
    lab::{DEMO_WAYPOINT, binary},
    pod_lab::{NODE_A, NODE_B, PodLab, PodSpec, can_run},
};

/// HTTP/1.1 with keep-alive; answers every GET with `<name>`. The response leaves
/// in one write (buffered, flushed per request): head and body written apart would
/// meet Nagle and the peer's delayed ACK, 40 ms a request, mesh or not.
const HTTP_SERVER: &str = r#"
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name = sys.argv[1].encode()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 65536
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", str(len(name)))
        self.end_headers()
        self.wfile.write(name)
    def log_message(self, *a): pass
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), H).serve_forever()
"#;

/// `n` GETs to host:port over `conns` keep-alive connections, round robin; prints
/// one `<status> <body>` line per answer (`ERR <why>` on a failure).
const LOAD: &str = r#"
import http.client, sys
host, port, n, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cs = [http.client.HTTPConnection(host, port, timeout=10) for _ in range(conns)]
for i in range(n):
    c = cs[i % conns]
    try:
        c.request("GET", f"/reviews/{i}", headers={"host": "reviews:9080"})
        r = c.getresponse()
        print(r.status, r.read().decode(), flush=True)
    except Exception as e:
        print("ERR", repr(e), flush=True)
        cs[i % conns] = http.client.HTTPConnection(host, port, timeout=10)
"#;

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const REVIEWS_V1: &str = "spiffe://cluster.local/ns/demo/sa/reviews-v1";
const REVIEWS_V2: &str = "spiffe://cluster.local/ns/demo/sa/reviews-v2";
const WAYPOINT_POD_IP: &str = "10.77.1.20";

fn manifests() -> String {
    let pod = |name: &str, labels: &str, node: &str, ip: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\n  labels: {{{labels}}}\nspec:\n  serviceAccountName: {name}\n  nodeName: {node}\n  containers: [{{name: app, image: test, ports: [{{name: http, containerPort: 9080}}]}}]\nstatus:\n  phase: Running\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"True\"}}]\n"
        )
    };
    let mut out =
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels: {istio.io/dataplane-mode: ambient}\n"
            .to_string();
    out += &pod("client", "app: client", "node-a", "10.77.1.10");
    out += &pod(
        "reviews-v1",
        "app: reviews, version: v1",
        "node-b",
        "10.77.2.12",
    );
    out += &pod(
        "reviews-v2",
        "app: reviews, version: v2",
        "node-b",
        "10.77.2.13",
    );
    out += "---\napiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: demo}\nspec:\n  clusterIP: 10.96.0.12\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080, targetPort: http}]\n";
    out += "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: demo}\nspec:\n  host: reviews\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n";
    out += "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: demo}\nspec:\n  hosts: [reviews]\n  http:\n  - name: canary\n    route:\n    - {destination: {host: reviews, subset: v1}, weight: 90}\n    - {destination: {host: reviews, subset: v2}, weight: 10}\n";
    out
}

/// Sum of `name`'s samples whose labels contain every one of `filters`.
fn sum(text: &str, name: &str, filters: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn spec(name: &'static str, node: usize, ip: &'static str) -> PodSpec {
    PodSpec {
        namespace: "demo",
        name,
        node,
        ip,
    }
}

#[test]
fn a_canary_through_the_waypoint_splits_traffic_with_mtls_at_every_hop() {
    if let Err(why) = can_run() {
        eprintln!(
            "SKIPPED a_canary_through_the_waypoint_splits_traffic_with_mtls_at_every_hop: {why}"
        );
        return;
    }
    let mut lab = PodLab::new(&manifests());
    let config = lab.dir().join("config");

    // The operator's step: declare the waypoint, send the namespace through it, and
    // wait for it to be Programmed...
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
    // ...which happens once the runner (the node agent, in a cluster) has placed its
    // pod and Service.
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
                cluster_ip: "10.96.0.20",
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
    assert!(
        said.contains("Programmed  True") && said.contains("address     10.96.0.20"),
        "{said}"
    );
    let cni = lab.add_pod(spec("waypoint", NODE_A, WAYPOINT_POD_IP));
    assert!(
        cni.contains("is not in the mesh"),
        "the waypoint's own pod is never captured: {cni}"
    );
    for (name, node, ip) in [
        ("client", NODE_A, "10.77.1.10"),
        ("reviews-v1", NODE_B, "10.77.2.12"),
        ("reviews-v2", NODE_B, "10.77.2.13"),
    ] {
        let cni = lab.add_pod(spec(name, node, ip));
        assert!(cni.contains("enrolled"), "{name}: {cni}");
    }
    lab.spawn_in_pod(
        "reviews-v1",
        &["python3", "-c", HTTP_SERVER, "v1", "9080"],
        "v1.log",
    );
    lab.spawn_in_pod(
        "reviews-v2",
        &["python3", "-c", HTTP_SERVER, "v2", "9080"],
        "v2.log",
    );
    lab.start_waypoint("waypoint");
    lab.start_ztunnel(NODE_A);
    lab.start_ztunnel(NODE_B);

    let admin = format!("http://{WAYPOINT_POD_IP}:15020");
    lab.wait_for("the waypoint ready", |l| {
        l.fetch(NODE_A, &format!("{admin}/healthz/ready")).trim() == "ready"
    });
    lab.wait_for("the canary route at the waypoint", |l| {
        let dump = l.fetch(NODE_A, &format!("{admin}/config_dump"));
        dump.contains("\"10.96.0.12:9080\"") && dump.contains("demo/reviews/canary")
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
    lab.wait_for("both nodes' pods adopted", |l| {
        l.adopted(NODE_A) >= 1.0 && l.adopted(NODE_B) >= 2.0
    });

    const N: usize = 2000;
    let answers = lab.python("client", LOAD, &["10.96.0.12", "9080", &N.to_string(), "4"]);
    let count = |line: &str| answers.lines().filter(|l| *l == line).count();
    let (v1, v2) = (count("200 v1"), count("200 v2"));
    assert_eq!(
        v1 + v2,
        N,
        "every request answered 200 by v1 or v2:\n{}\n{}",
        answers
            .lines()
            .filter(|l| !l.starts_with("200 "))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n"),
        lab.logs()
    );
    let share = v2 as f64 / N as f64;
    // 10% of 2,000: a standard deviation of 0.67 points; ±3 points is over 4 of them.
    assert!(
        (0.07..=0.13).contains(&share),
        "v2 got {:.1}% (v1 {v1}, v2 {v2}); the VirtualService says 10%",
        share * 100.0
    );
    eprintln!(
        "canary through the waypoint: v1 {v1}, v2 {v2} ({:.1}% to v2)",
        share * 100.0
    );

    // Hop 1: ztunnel A tunnelled the client to the waypoint as the client.
    let a = lab.fetch(NODE_A, &format!("http://{}/metrics", lab.admin(NODE_A)));
    let to_waypoint = sum(
        &a,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"source\"",
            &format!("source_principal=\"{CLIENT}\""),
            &format!("destination_principal=\"{DEMO_WAYPOINT}\""),
        ],
    );
    assert!(
        to_waypoint >= 4.0,
        "client -> waypoint over mTLS at ztunnel A: {to_waypoint}"
    );

    // Hop 2: the waypoint saw the client's identity and routed per version.
    let w = lab.fetch(NODE_A, &format!("{admin}/metrics"));
    let seen = |version: &str| {
        sum(
            &w,
            "istio_requests_total",
            &[
                "reporter=\"waypoint\"",
                &format!("source_principal=\"{CLIENT}\""),
                "destination_service=\"reviews.demo.svc.cluster.local\"",
                &format!("destination_version=\"{version}\""),
                "response_code=\"200\"",
                "connection_security_policy=\"mutual_tls\"",
            ],
        )
    };
    assert_eq!(
        (seen("v1"), seen("v2")),
        (v1 as f64, v2 as f64),
        "the waypoint's metrics count what the client saw"
    );
    assert!(
        w.contains("istio_request_duration_milliseconds_bucket"),
        "the duration is a histogram with buckets"
    );

    // Hop 3: ztunnel B received the waypoint's tunnels, as the waypoint, for each version.
    let b = lab.fetch(NODE_B, &format!("http://{}/metrics", lab.admin(NODE_B)));
    for dest in [REVIEWS_V1, REVIEWS_V2] {
        let from_waypoint = sum(
            &b,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"destination\"",
                &format!("source_principal=\"{DEMO_WAYPOINT}\""),
                &format!("destination_principal=\"{dest}\""),
                "connection_security_policy=\"mutual_tls\"",
            ],
        );
        assert!(
            from_waypoint >= 1.0,
            "waypoint -> {dest} over mTLS at ztunnel B: {from_waypoint}\n{b}"
        );
    }
    let direct = sum(
        &b,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            &format!("source_principal=\"{CLIENT}\""),
        ],
    );
    assert_eq!(direct, 0.0, "no client connection bypassed the waypoint");
}
