//! Two nodes in network namespaces, joined by a veth pair; each node runs the real
//! `ztunnel` binary, node A also the `controller`. Pods are addresses on their node.
//! A client pod on A reaches the `reviews` service VIP through both ztunnels (explicit
//! outbound entry, HBONE to B, policy at B), traffic spreads over both endpoints, the
//! server side reports the client's SPIFFE id over mTLS, and a pod whose identity the
//! policy does not allow is refused.
//!
//! Needs root and iproute2 (CI has both); without them it says why and stops.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

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

const GET: &str = r#"
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())
except Exception as e:
    print("ERR", e)
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

struct Lab {
    ns: [String; 2],
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn sh(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("run ip");
    assert!(status.success(), "{args:?} failed");
}

fn can_run() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0");
    if !root {
        return Err("needs root (network namespaces)".into());
    }
    for tool in ["ip", "python3"] {
        if Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Err(format!("needs {tool}"));
        }
    }
    Ok(())
}

fn binary(name: &str) -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/<name>
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo test --workspace --all-targets` (or `cargo build --bins`)",
        path.display()
    );
    path
}

impl Lab {
    fn exec(&self, ns: usize, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[ns]]).args(args);
        c
    }

    fn spawn(&mut self, ns: usize, args: &[&str], envs: &[(&str, String)], log: &str) {
        let log = std::fs::File::create(self.dir.path().join(log)).expect("log file");
        let mut cmd = self.exec(ns, args);
        cmd.envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.children.push(cmd.spawn().expect("spawn"));
    }

    fn python(&self, ns: usize, script: &str, args: &[&str]) -> String {
        let out = self
            .exec(ns, &["python3", "-c", script])
            .args(args)
            .output()
            .expect("python");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn get(&self, ns: usize, url: &str) -> String {
        self.python(ns, GET, &[url])
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

fn wait_for(what: &str, lab: &Lab, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "timed out waiting for {what}\ncontroller:\n{}\nztunnel a:\n{}\nztunnel b:\n{}",
        lab.log("controller.log"),
        lab.log("ztunnel-a.log"),
        lab.log("ztunnel-b.log")
    );
}

#[test]
fn two_nodes_service_vip_through_both_ztunnels() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED two_nodes_service_vip_through_both_ztunnels: {why}");
        return;
    }
    let (controller, ztunnel) = (binary("controller"), binary("ztunnel"));
    let tag = std::process::id();
    let mut lab = Lab {
        ns: [format!("cairn-{tag}-a"), format!("cairn-{tag}-b")],
        children: Vec::new(),
        dir: tempfile::tempdir().expect("tempdir"),
    };
    let (a, b) = (lab.ns[0].clone(), lab.ns[1].clone());
    let (va, vb) = (format!("cva{tag}"), format!("cvb{tag}"));
    for ns in [&a, &b] {
        sh(&["ip", "netns", "add", ns]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    sh(&[
        "ip", "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
    ]);
    for (ns, dev, addrs, peer_net) in [
        (
            &a,
            &va,
            ["10.77.1.1", "10.77.1.10", "10.77.1.11"].as_slice(),
            "10.77.2.0/24",
        ),
        (
            &b,
            &vb,
            ["10.77.2.1", "10.77.2.12", "10.77.2.13"].as_slice(),
            "10.77.1.0/24",
        ),
    ] {
        sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        for ip in addrs {
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/32"),
                "dev",
                dev,
            ]);
        }
        sh(&["ip", "-n", ns, "route", "add", peer_net, "dev", dev]);
    }

    let dir = lab.dir.path().to_owned();
    std::fs::create_dir(dir.join("config")).expect("mkdir");
    std::fs::write(dir.join("config/demo.yaml"), manifests()).expect("manifests");
    std::fs::write(
        dir.join("tokens.yaml"),
        "- {token: tok-a, node: node-a}\n- {token: tok-b, node: node-b}\n",
    )
    .expect("tokens");
    std::fs::write(dir.join("tok-a"), "tok-a").expect("token");
    std::fs::write(dir.join("tok-b"), "tok-b").expect("token");
    let d = |p: &str| dir.join(p).display().to_string();

    lab.spawn(
        0,
        &[
            &controller.display().to_string(),
            "--config-dir",
            &d("config"),
            "--tokens",
            &d("tokens.yaml"),
            "--ca-dir",
            &d("ca"),
            "--listen",
            "10.77.1.1:15012",
        ],
        &[],
        "controller.log",
    );
    wait_for("the mesh root", &lab, || {
        dir.join("ca/root-cert.pem").exists()
    });
    for (i, node, admin, token) in [
        (0, "node-a", "10.77.1.1:15020", "tok-a"),
        (1, "node-b", "10.77.2.1:15020", "tok-b"),
    ] {
        lab.spawn(
            i,
            &[&ztunnel.display().to_string()],
            &[
                ("CAIRN_NODE_NAME", node.into()),
                ("CAIRN_CONTROLLER", "https://10.77.1.1:15012".into()),
                ("CAIRN_CONTROLLER_NAME", "localhost".into()),
                ("CAIRN_ROOT_CERT", d("ca/root-cert.pem")),
                ("CAIRN_TOKEN_FILE", d(token)),
                ("CAIRN_ADMIN_ADDR", admin.into()),
                ("CAIRN_EXPLICIT_OUTBOUND", "true".into()),
            ],
            if i == 0 {
                "ztunnel-a.log"
            } else {
                "ztunnel-b.log"
            },
        );
    }
    lab.spawn(
        1,
        &["python3", "-c", APP, "v1", "10.77.2.12", "9080"],
        &[],
        "app-v1.log",
    );
    lab.spawn(
        1,
        &["python3", "-c", APP, "v2", "10.77.2.13", "9080"],
        &[],
        "app-v2.log",
    );

    for (ns, admin, certs) in [(0, "10.77.1.1:15020", 2), (1, "10.77.2.1:15020", 1)] {
        wait_for("ztunnel ready with certificates", &lab, || {
            let dump = lab.get(ns, &format!("http://{admin}/config_dump"));
            dump.matches("\"state\": \"available\"").count() == certs
        });
    }

    let answers = lab.python(0, CLIENT, &["10.77.1.10", "10.96.0.12", "9080", "20"]);
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
    let denied = lab.python(0, CLIENT, &["10.77.1.11", "10.96.0.12", "9080", "3"]);
    assert_eq!(
        denied.lines().collect::<Vec<_>>(),
        ["-", "-", "-"],
        "{denied}"
    );

    // Node B saw the client's identity over mutual TLS.
    let metrics = lab.get(1, "http://10.77.2.1:15020/metrics");
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains("reporter=\"destination\"")
        })
        .unwrap_or_else(|| panic!("no inbound metric at node B:\n{metrics}"));
    let count: f64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(count >= 1.0, "{line}");
    let log_b = lab.log("ztunnel-b.log");
    assert!(
        log_b.contains("denied: no ALLOW policy matched")
            && log_b.contains("spiffe://cluster.local/ns/demo/sa/other"),
        "denial logged at node B:\n{log_b}"
    );
}
