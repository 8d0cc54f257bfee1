//! The waypoint end to end in the pod lab (tests/pod_lab.rs): real pods (network
//! namespaces, veth, cgroups, captured by the real eBPF programs), two real ztunnels,
//! the real controller, the `cairn waypoint apply` CLI and the real `waypoint` binary.
//!
//! client (node A) -> ztunnel A -> HBONE -> waypoint (its own pod on node A) ->
//! HBONE -> ztunnel B -> reviews v1 / v2 (node B), with a 90/10 VirtualService.
//!
//! Needs what tests/capture.rs needs (root, iproute2, nsenter, python3, cgroup v2,
//! BPF links); without them it says why and stops.

use cairn_tests::{
    lab::DEMO_WAYPOINT,
    pod_lab::{NODE_A, NODE_B, PodLab, can_run, sum_metric},
    waypoint_lab::{
        REVIEWS_VIP, WAYPOINT_VIP, apply_and_place, manifests, start_mesh, waypoint_admin,
    },
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

#[test]
fn a_canary_through_the_waypoint_splits_traffic_with_mtls_at_every_hop() {
    if let Err(why) = can_run() {
        eprintln!(
            "SKIPPED a_canary_through_the_waypoint_splits_traffic_with_mtls_at_every_hop: {why}"
        );
        return;
    }
    let mut lab = PodLab::new(&manifests(""));
    // The operator declares the waypoint (--wait returns once the runner placed it).
    let (said, _) = apply_and_place(&mut lab);
    assert!(
        said.contains("Programmed  True") && said.contains(&format!("address     {WAYPOINT_VIP}")),
        "{said}"
    );
    start_mesh(&mut lab, &|v| {
        ["python3", "-c", HTTP_SERVER, v, "9080"]
            .map(str::to_owned)
            .to_vec()
    });
    let admin = waypoint_admin();

    const N: usize = 2000;
    let answers = lab.python("client", LOAD, &[REVIEWS_VIP, "9080", &N.to_string(), "4"]);
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
    let to_waypoint = sum_metric(
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
        sum_metric(
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
        let from_waypoint = sum_metric(
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
    let direct = sum_metric(
        &b,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            &format!("source_principal=\"{CLIENT}\""),
        ],
    );
    assert_eq!(direct, 0.0, "no client connection bypassed the waypoint");
}
