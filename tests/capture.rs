//! eBPF capture end to end (docs/capture.md): pods are network namespaces + veth +
//! cgroups, enrolled by the real `cairn-cni` plugin, captured by the real programs,
//! served by the real `ztunnel` binaries of two nodes and configured by the real
//! `controller`. Applications open plain sockets to plain addresses; nothing in them
//! knows about the mesh.
//!
//! Needs root, iproute2, nsenter, python3, cgroup v2 and a kernel with BPF links for
//! cgroups and sk_lookup (CI has all of them); without them it says why and stops.

use std::time::Duration;

use cairn_tests::pod_lab::{NODE_A, NODE_B, PodLab, PodSpec, can_run};

/// Echoes every chunk back as `<name>:<port>:<chunk>` on each port given.
const ECHO: &str = r#"
import socket, sys, threading
name, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
def serve(c, port):
    try:
        while True:
            d = c.recv(65536)
            if not d: break
            c.sendall(f"{name}:{port}:".encode() + d)
    except OSError:
        pass
    c.close()
def listen(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(128)
    while True:
        c, _ = s.accept(); threading.Thread(target=serve, args=(c, port), daemon=True).start()
for p in ports[1:]:
    threading.Thread(target=listen, args=(p,), daemon=True).start()
listen(ports[0])
"#;

/// `n` sequential connections to dst:port; one line per answer ("-" when refused).
const CONNECT: &str = r#"
import socket, sys
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    out = b""
    try:
        s = socket.create_connection((dst, port), timeout=5)
        s.sendall(b"hi")
        s.shutdown(socket.SHUT_WR)
        while True:
            d = s.recv(65536)
            if not d: break
            out += d
        s.close()
    except OSError:
        pass
    print(out.decode() or "-", flush=True)
"#;

/// Opens one connection per port, all at once, and checks each answer names its own
/// port: a mixed-up original destination shows as "BAD".
const CONCURRENT: &str = r#"
import socket, sys, threading
dst, tag, ports = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3:]]
results = {}
barrier = threading.Barrier(len(ports))
def one(port):
    want = f"legacy:{port}:{tag}{port}"
    try:
        barrier.wait()
        s = socket.create_connection((dst, port), timeout=10)
        s.sendall(f"{tag}{port}".encode()); s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            d = s.recv(65536)
            if not d: break
            out += d
        results[port] = "ok" if out.decode() == want else f"BAD {port} got {out!r}"
    except Exception as e:
        results[port] = f"ERR {port} {e}"
ts = [threading.Thread(target=one, args=(p,)) for p in ports]
[t.start() for t in ts]; [t.join() for t in ts]
print("\n".join(results[p] for p in ports))
"#;

/// Holds one connection open across a ztunnel restart: answers before, then whether
/// the connection still carries bytes after.
const HOLD: &str = r#"
import os, socket, sys, time
dst, port, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((dst, port), timeout=5)
s.sendall(b"a"); print("before", s.recv(100).decode(), flush=True)
open(marker + ".ready", "w").close()
while not os.path.exists(marker + ".go"): time.sleep(0.05)
try:
    s.sendall(b"b"); d = s.recv(100)
    print("after", d.decode() or "closed", flush=True)
except OSError as e:
    print("after closed", e, flush=True)
"#;

const VIP: &str = "10.96.0.12";

fn manifests(toggle_ambient: bool) -> String {
    let pod = |ns: &str, name: &str, app: &str, node: &str, ip: &str, extra: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{app: {app}{extra}}}\nspec:\n  serviceAccountName: {name}\n  nodeName: {node}\n  containers: [{{name: app, image: test, ports: [{{name: http, containerPort: 9080}}]}}]\nstatus:\n  phase: Running\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"True\"}}]\n"
        )
    };
    let toggle = if toggle_ambient { "ambient" } else { "none" };
    let mut out = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels: {{istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: toggle\n  labels: {{istio.io/dataplane-mode: {toggle}}}\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: legacy\n"
    );
    out += &pod("demo", "client", "client", "node-a", "10.77.1.10", "");
    out += &pod("demo", "ratings", "ratings", "node-a", "10.77.1.12", "");
    out += &pod(
        "demo",
        "optout",
        "optout",
        "node-a",
        "10.77.1.13",
        ", istio.io/dataplane-mode: none",
    );
    out += &pod("toggle", "toggler", "toggler", "node-a", "10.77.1.14", "");
    out += &pod("demo", "late", "late", "node-a", "10.77.1.15", "");
    out += &pod("demo", "reviews-v1", "reviews", "node-b", "10.77.2.12", "");
    out += &pod("demo", "reviews-v2", "reviews", "node-b", "10.77.2.13", "");
    out += &pod("legacy", "legacy", "legacy", "node-b", "10.77.2.20", "");
    out += "---\napiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: demo}\nspec:\n  clusterIP: 10.96.0.12\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080, targetPort: http}]\n";
    out += "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: reviews-strict, namespace: demo}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  mtls: {mode: STRICT}\n";
    out += "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: reviews-viewers, namespace: demo}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/demo/sa/client, cluster.local/ns/toggle/sa/toggler, cluster.local/ns/demo/sa/late]}}]\n";
    out
}

fn spec(namespace: &'static str, name: &'static str, node: usize, ip: &'static str) -> PodSpec {
    PodSpec {
        namespace,
        name,
        node,
        ip,
    }
}

fn answers(lab: &PodLab, pod: &str, dst: &str, port: u16, n: usize) -> Vec<String> {
    lab.python(pod, CONNECT, &[dst, &port.to_string(), &n.to_string()])
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn pods_are_captured_enrolled_released_and_readopted() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED pods_are_captured_enrolled_released_and_readopted: {why}");
        return;
    }
    let mut lab = PodLab::new(&manifests(false));
    for (ns, name, node, ip) in [
        ("demo", "client", NODE_A, "10.77.1.10"),
        ("demo", "ratings", NODE_A, "10.77.1.12"),
        ("demo", "optout", NODE_A, "10.77.1.13"),
        ("toggle", "toggler", NODE_A, "10.77.1.14"),
        ("demo", "reviews-v1", NODE_B, "10.77.2.12"),
        ("demo", "reviews-v2", NODE_B, "10.77.2.13"),
        ("legacy", "legacy", NODE_B, "10.77.2.20"),
    ] {
        let cni = lab.add_pod(spec(ns, name, node, ip));
        let want = if matches!(name, "optout" | "toggler" | "legacy") {
            "is not in the mesh"
        } else {
            "enrolled"
        };
        assert!(cni.contains(want), "{name}: {cni}");
    }
    lab.spawn_in_pod(
        "reviews-v1",
        &["python3", "-c", ECHO, "v1", "9080"],
        "v1.log",
    );
    lab.spawn_in_pod(
        "reviews-v2",
        &["python3", "-c", ECHO, "v2", "9080"],
        "v2.log",
    );
    lab.spawn_in_pod(
        "ratings",
        &["python3", "-c", ECHO, "ratings", "9080"],
        "ratings.log",
    );
    let legacy_ports: Vec<String> = (9080..9096).map(|p| p.to_string()).collect();
    let mut legacy_args = vec!["python3", "-c", ECHO, "legacy"];
    legacy_args.extend(legacy_ports.iter().map(String::as_str));
    lab.spawn_in_pod("legacy", &legacy_args, "legacy.log");

    // Enrolled before any ztunnel runs: nothing gets out in plaintext.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        answers(&lab, "client", "10.77.2.20", 9080, 1),
        ["-"],
        "no ztunnel: refused"
    );

    lab.start_ztunnel(NODE_A);
    lab.start_ztunnel(NODE_B);
    // A adopts client + ratings; B adopts both reviews pods.
    lab.wait_for("both nodes adopt their mesh pods", |lab| {
        lab.adopted(NODE_A) == 2.0 && lab.adopted(NODE_B) == 2.0
    });

    // Outbound to the service VIP: captured, original destination = the VIP, load
    // balanced over both endpoints over HBONE; the STRICT destination accepts it.
    let vip = answers(&lab, "client", VIP, 9080, 12);
    assert_eq!(vip.len(), 12, "{vip:?}");
    assert!(
        vip.iter().all(|a| a == "v1:9080:hi" || a == "v2:9080:hi"),
        "{vip:?}\n{}",
        lab.logs()
    );
    assert!(
        vip.iter().any(|a| a.starts_with("v1")) && vip.iter().any(|a| a.starts_with("v2")),
        "{vip:?}"
    );
    // Outbound to a pod IP: exactly that pod.
    assert_eq!(
        answers(&lab, "client", "10.77.2.13", 9080, 3),
        ["v2:9080:hi"; 3]
    );
    let mtls = lab.metric(
        NODE_B,
        "istio_tcp_connections_opened_total",
        "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
    );
    assert!(
        mtls >= 15.0,
        "B saw the client's identity over mTLS: {mtls}\n{}",
        lab.logs()
    );
    // Passthrough to a pod outside the mesh still works from a captured pod.
    assert_eq!(
        answers(&lab, "client", "10.77.2.20", 9081, 1),
        ["legacy:9081:hi"]
    );

    // Inbound plaintext: STRICT refuses, PERMISSIVE accepts (from a pod outside the mesh).
    assert_eq!(
        answers(&lab, "legacy", "10.77.2.12", 9080, 2),
        ["-", "-"],
        "STRICT"
    );
    assert_eq!(
        answers(&lab, "legacy", "10.77.1.12", 9080, 2),
        ["ratings:9080:hi"; 2],
        "PERMISSIVE"
    );
    lab.wait_for(
        "A's sk_lookup counts the steered plaintext connections",
        |lab| {
            lab.metric(
                NODE_A,
                "cairn_capture_events_total",
                "event=\"inbound_steered\"",
            ) >= 2.0
        },
    );

    // Kubelet probes come from the node's address, which the CNI plugin recorded as
    // the pods' probe address: they reach a STRICT pod's application directly.
    let probe = lab.python_on_node(NODE_B, CONNECT, &["10.77.2.12", "9080", "1"]);
    assert_eq!(probe.trim(), "v1:9080:hi", "probe from the node");

    // Opt-out: not captured (A's redirect counter does not move), so its plaintext
    // reaches a non-mesh pod directly and a STRICT pod refuses it.
    let redirected = |lab: &PodLab| {
        lab.metric(
            NODE_A,
            "cairn_capture_events_total",
            "event=\"outbound_redirected\"",
        )
    };
    std::thread::sleep(Duration::from_millis(300));
    let before = redirected(&lab);
    assert_eq!(
        answers(&lab, "optout", "10.77.2.20", 9080, 1),
        ["legacy:9080:hi"]
    );
    assert_eq!(answers(&lab, "optout", "10.77.2.12", 9080, 1), ["-"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(redirected(&lab), before, "opted-out pod was captured");

    // Two pods opening connections at the same moment to many ports of one address
    // never get each other's (or another connection's) original destination.
    let ports: Vec<String> = (9080..9096).map(|p| p.to_string()).collect();
    let mut a_args = vec!["10.77.2.20", "c"];
    a_args.extend(ports.iter().map(String::as_str));
    let mut b_args = vec!["10.77.2.20", "r"];
    b_args.extend(ports.iter().map(String::as_str));
    let (from_client, from_ratings) = std::thread::scope(|s| {
        let a = s.spawn(|| lab.python("client", CONCURRENT, &a_args));
        let b = s.spawn(|| lab.python("ratings", CONCURRENT, &b_args));
        (a.join().expect("client"), b.join().expect("ratings"))
    });
    for out in [&from_client, &from_ratings] {
        assert_eq!(
            out.lines().filter(|l| *l == "ok").count(),
            ports.len(),
            "{out}\n{}",
            lab.logs()
        );
    }

    // Label on at runtime: the toggle namespace joins the mesh, its running pod is
    // enrolled and adopted without a restart; label off: released again.
    assert_eq!(
        answers(&lab, "toggler", "10.77.2.12", 9080, 1),
        ["-"],
        "plaintext to STRICT"
    );
    lab.set_config(&manifests(true));
    lab.wait_for("toggler adopted", |lab| lab.adopted(NODE_A) == 3.0);
    assert_eq!(
        answers(&lab, "toggler", "10.77.2.12", 9080, 1),
        ["v1:9080:hi"],
        "{}",
        lab.logs()
    );
    lab.set_config(&manifests(false));
    lab.wait_for("toggler released", |lab| lab.adopted(NODE_A) == 2.0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        answers(&lab, "toggler", "10.77.2.12", 9080, 1),
        ["-"],
        "released: plaintext again"
    );
    assert_eq!(
        answers(&lab, "toggler", "10.77.2.20", 9080, 1),
        ["legacy:9080:hi"]
    );

    // ztunnel restart. An in-flight connection through it ends (ztunnel holds both
    // halves); while it is down the pods' connections fail and a pod created now
    // cannot get out either; once it is back, every pod is re-adopted.
    let marker = lab.dir().join("hold").display().to_string();
    lab.spawn_in_pod(
        "client",
        &["python3", "-c", HOLD, "10.77.2.20", "9082", &marker],
        "hold.log",
    );
    lab.wait_for("held connection", |_| {
        std::path::Path::new(&format!("{marker}.ready")).exists()
    });
    lab.stop_ztunnel(NODE_A);
    std::fs::write(format!("{marker}.go"), "").expect("go");
    lab.wait_for("held connection outcome", |lab| {
        lab.log("hold.log").contains("after")
    });
    let hold = lab.log("hold.log");
    assert!(hold.contains("before legacy:9082:a"), "{hold}");
    assert!(
        hold.contains("after closed"),
        "in-flight connections end with ztunnel: {hold}"
    );
    assert_eq!(
        answers(&lab, "client", VIP, 9080, 1),
        ["-"],
        "ztunnel down: refused"
    );
    let cni = lab.add_pod(spec("demo", "late", NODE_A, "10.77.1.15"));
    assert!(cni.contains("enrolled"), "{cni}");
    assert_eq!(
        answers(&lab, "late", "10.77.2.20", 9080, 1),
        ["-"],
        "new pod, no ztunnel: refused"
    );
    assert_eq!(
        answers(&lab, "legacy", "10.77.1.12", 9080, 1),
        ["-"],
        "inbound refused too"
    );

    lab.start_ztunnel(NODE_A);
    lab.wait_for("re-adoption after restart", |lab| {
        lab.adopted(NODE_A) == 3.0
    });
    assert_eq!(answers(&lab, "client", VIP, 9080, 1).len(), 1);
    assert!(
        answers(&lab, "client", VIP, 9080, 1)[0].ends_with(":9080:hi"),
        "{}",
        lab.logs()
    );
    assert_eq!(
        answers(&lab, "late", "10.77.2.12", 9080, 1),
        ["v1:9080:hi"],
        "{}",
        lab.logs()
    );
    assert_eq!(
        answers(&lab, "late", "10.77.2.20", 9080, 1),
        ["legacy:9080:hi"]
    );
    assert_eq!(
        answers(&lab, "legacy", "10.77.1.12", 9080, 1),
        ["ratings:9080:hi"]
    );

    // Drop and error counters are exported (and none fired on this happy path, apart
    // from the refusals above, which sk_lookup counts as "no listener").
    lab.wait_for(
        "the refused inbound while ztunnel was down is counted",
        |lab| {
            lab.metric(
                NODE_A,
                "cairn_capture_events_total",
                "event=\"inbound_no_listener\"",
            ) >= 1.0
        },
    );
    for event in [
        "outbound_pending_full",
        "outbound_conns_full",
        "inbound_assign_failed",
    ] {
        let v = lab.metric(
            NODE_A,
            "cairn_capture_events_total",
            &format!("event=\"{event}\""),
        );
        assert_eq!(v, 0.0, "{event}");
    }
}
