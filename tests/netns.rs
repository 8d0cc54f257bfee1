//! Two nodes in network namespaces, joined by a veth pair; each node runs the real
//! `ztunnel` binary, node A also the `controller`. Pods are addresses on their node.
//! A client pod on A reaches the `reviews` service VIP through both ztunnels (explicit
//! outbound entry, HBONE to B, policy at B), traffic spreads over both endpoints, the
//! server side reports the client's SPIFFE id over mTLS, and a pod whose identity the
//! policy does not allow is refused.
//!
//! Needs root and iproute2 (CI has both); without them it says why and stops.

use std::time::Duration;

const APP: &str = r#"
import socket, sys, threading
name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(128)
def serve(c):
    data = b""
    while True:
        d = c.recv(65536)
        if not d: break
        data += d
    c.sendall(name.encode() + b":" + data); c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Sends `n` requests from `pod_ip` to `dst` through the explicit outbound entry; prints
/// one line per answer ("" when refused).
const CLIENT: &str = r#"
import socket, sys
pod, dst, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for i in range(n):
    s = socket.create_connection((pod, 15001), timeout=10)
    s.sendall(f"PROXY TCP4 {pod} {dst} 40000 {port}\r\n".encode() + b"hi")
    s.shutdown(socket.SHUT_WR)
    out = b""
    try:
        while True:
            d = s.recv(65536)
            if not d: break
            out += d
    except (ConnectionResetError, socket.timeout):
        pass
    print(out.decode() or "-", flush=True)
    s.close()
"#;

fn manifests() -> String {
    let pod = |name: &str, app: &str, sa: &str, node: &str, ip: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\n  labels: {{app: {app}}}\nspec:\n  serviceAccountName: {sa}\n  nodeName: {node}\n  containers: [{{name: app, image: test, ports: [{{name: http, containerPort: 9080}}]}}]\nstatus:\n  phase: Running\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"True\"}}]\n"
        )
    };
    let mut out = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels: {istio.io/dataplane-mode: ambient}\n",
    );
    out += &pod("client", "client", "client", "node-a", "10.77.1.10");
    out += &pod("other", "other", "other", "node-a", "10.77.1.11");
    out += &pod("reviews-v1", "reviews", "reviews", "node-b", "10.77.2.12");
    out += &pod("reviews-v2", "reviews", "reviews", "node-b", "10.77.2.13");
    out += "---\napiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: demo}\nspec:\n  clusterIP: 10.96.0.12\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080, targetPort: http}]\n";
    out += "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: reviews-viewer, namespace: demo}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]\n";
    out
}

use cairn_tests::lab::{ADMIN, Lab, NODE_A, NODE_B, can_run};

#[test]
fn two_nodes_service_vip_through_both_ztunnels() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED two_nodes_service_vip_through_both_ztunnels: {why}");
        return;
    }
    let mut lab = Lab::start(
        &manifests(),
        &["10.77.1.10", "10.77.1.11"],
        &["10.77.2.12", "10.77.2.13"],
        [2, 1],
    );
    lab.spawn(
        NODE_B,
        &["python3", "-c", APP, "v1", "10.77.2.12", "9080"],
        &[],
        "app-v1.log",
    );
    lab.spawn(
        NODE_B,
        &["python3", "-c", APP, "v2", "10.77.2.13", "9080"],
        &[],
        "app-v2.log",
    );
    std::thread::sleep(Duration::from_millis(300));

    let answers = lab.python(NODE_A, CLIENT, &["10.77.1.10", "10.96.0.12", "9080", "20"]);
    let lines: Vec<&str> = answers.lines().collect();
    assert_eq!(lines.len(), 20, "{answers}\n{}", lab.log("ztunnel-a.log"));
    assert!(
        lines.iter().all(|l| *l == "v1:hi" || *l == "v2:hi"),
        "{answers}\n{}",
        lab.log("ztunnel-b.log")
    );
    assert!(
        lines.contains(&"v1:hi") && lines.contains(&"v2:hi"),
        "both endpoints: {answers}"
    );

    // The pod whose identity the policy does not name is refused at the destination.
    let denied = lab.python(NODE_A, CLIENT, &["10.77.1.11", "10.96.0.12", "9080", "3"]);
    assert_eq!(
        denied.lines().collect::<Vec<_>>(),
        ["-", "-", "-"],
        "{denied}"
    );

    // Node B saw the client's identity over mutual TLS.
    let metrics = lab.get(NODE_B, &format!("http://{}/metrics", ADMIN[NODE_B]));
    let count = metric(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[
            "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
            "connection_security_policy=\"mutual_tls\"",
            "reporter=\"destination\"",
        ],
    );
    assert!(count >= 1.0, "no inbound metric at node B:\n{metrics}");
    // The three denials are counted on both sides, flagged DENY (summed over the
    // endpoints they were spread across).
    let other = "source_principal=\"spiffe://cluster.local/ns/demo/sa/other\"";
    let deny = "response_flags=\"DENY\"";
    for (node, reporter) in [(NODE_B, "destination"), (NODE_A, "source")] {
        let metrics = lab.get(node, &format!("http://{}/metrics", ADMIN[node]));
        let reporter = format!("reporter=\"{reporter}\"");
        assert_eq!(
            metric(
                &metrics,
                "istio_tcp_connections_failed_total",
                &[other, deny, &reporter]
            ),
            3.0,
            "denials at {reporter}:\n{metrics}"
        );
    }
    // Control-plane and certificate health.
    assert_eq!(
        metric(&metrics, "cairn_xds_connected", &[]),
        1.0,
        "{metrics}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let expiry = metric(
        &metrics,
        "cairn_certificate_earliest_expiry_timestamp_seconds",
        &[],
    );
    assert!(expiry > now, "certificate expiry {expiry} not after {now}");
    let log_b = lab.log("ztunnel-b.log");
    assert!(
        log_b.contains("denied: no ALLOW policy matched")
            && log_b.contains("spiffe://cluster.local/ns/demo/sa/other"),
        "denial logged at node B:\n{log_b}"
    );
}

/// The sum of the samples of `name` whose labels contain every one of `labels`
/// (0 when there is none).
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
