//! The programs in a real kernel: a "pod" (network namespace + veth + cgroup v2) and a
//! "peer" namespace. Needs root, bpffs and cgroup v2; skips with a message otherwise.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use cairn_capture::{Capture, ListenerKind, Netns, PodNet, netns_cookie};

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

fn sh(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("spawn");
    assert!(status.success(), "{args:?} failed");
}

fn skip_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !root {
        return Some("needs root".into());
    }
    if cairn_capture::cgroup2_mount().is_none() {
        return Some("needs a cgroup v2 mount".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("needs iproute2".into());
    }
    None
}

struct Pod {
    ns: String,
    peer: String,
    cgroup: PathBuf,
    root: PathBuf,
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Ok(mut capture) = Capture::open(&self.root) {
            let _ = capture.release(POD_IP);
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        for ns in [&self.ns, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn pod(tag: &str) -> Pod {
    let id = format!("{}-{tag}", std::process::id());
    let pod = Pod {
        ns: format!("cairn-kt-{id}"),
        peer: format!("cairn-kp-{id}"),
        cgroup: cairn_capture::cgroup2_mount()
            .expect("cgroup2")
            .join(format!("cairn-kt-{id}")),
        root: PathBuf::from(format!("/sys/fs/bpf/cairn-test-{id}")),
    };
    let (va, vb) = (
        format!("ckt{}", std::process::id() % 100_000),
        format!("ckp{}", std::process::id() % 100_000),
    );
    let (va, vb) = (format!("{va}{tag}"), format!("{vb}{tag}"));
    sh(&["ip", "netns", "add", &pod.ns]);
    sh(&["ip", "netns", "add", &pod.peer]);
    sh(&[
        "ip", "link", "add", &va, "netns", &pod.ns, "type", "veth", "peer", "name", &vb, "netns",
        &pod.peer,
    ]);
    sh(&[
        "ip",
        "-n",
        &pod.ns,
        "addr",
        "add",
        "10.99.0.2/24",
        "dev",
        &va,
    ]);
    sh(&[
        "ip",
        "-n",
        &pod.peer,
        "addr",
        "add",
        "10.99.0.1/24",
        "dev",
        &vb,
    ]);
    for (ns, dev) in [(&pod.ns, &va), (&pod.peer, &vb)] {
        sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    std::fs::create_dir_all(&pod.cgroup).expect("cgroup");
    pod
}

impl Pod {
    fn net(&self) -> PodNet {
        PodNet {
            ip: POD_IP,
            netns: format!("/var/run/netns/{}", self.ns).into(),
            cgroup: self.cgroup.clone(),
            probe_ip: None,
        }
    }

    /// [`CONNECT`] as a process of the pod.
    fn connect(&self, host: &str, port: u16) -> std::process::Child {
        self.run_in_pod(CONNECT, &[host, &port.to_string()])
    }

    /// Runs python3 `code` as a process of the pod (its netns and cgroup).
    fn run_in_pod(&self, code: &str, args: &[&str]) -> std::process::Child {
        // Joins the cgroup before `ip netns exec`, which remounts /sys for the namespace.
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} python3 -c \"$0\" \"$@\"",
            self.cgroup.display(),
            self.ns
        );
        Command::new("sh")
            .args(["-c", &script, code])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pod process")
    }

    fn netns(&self) -> Netns {
        Netns::open(Path::new(&format!("/var/run/netns/{}", self.ns))).expect("open netns")
    }
}

fn output(child: std::process::Child) -> String {
    let out = child.wait_with_output().expect("wait");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Connects to argv[1]:argv[2] (an IPv6 socket when the address has a colon), sends
/// "hi", prints `OK <answer>` or `ERR <why>`.
const CONNECT: &str = r#"
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.sendall(b"hi")
    print("OK", s.recv(16).decode())
except Exception as e:
    print("ERR", e)
"#;

#[test]
fn outbound_connections_reach_the_pod_listener_with_their_original_destination() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP kernel capture test: {why}");
        return;
    }
    let pod = pod("o");
    let mut capture = Capture::open(&pod.root).expect("load programs");
    let lookups = capture.lookups();
    // Before ztunnel listens, an enrolled pod's connections fail (nothing bypasses).
    capture.enroll(&pod.net()).expect("enroll");
    let refused = output(pod.connect("10.99.0.1", 80));
    assert!(refused.starts_with("ERR"), "{refused}");

    let netns = pod.netns();
    let listener = netns
        .run(|| TcpListener::bind("127.0.0.1:15001"))
        .expect("enter netns")
        .expect("bind outbound listener");
    let cookie = netns_cookie(listener.as_fd()).expect("cookie");
    assert_eq!(cookie, netns.cookie());
    let mut clients = Vec::new();
    for port in [80u16, 8080, 9090] {
        clients.push((port, pod.connect("10.20.30.40", port)));
    }
    let mut seen = Vec::new();
    listener.set_nonblocking(false).expect("blocking");
    for _ in 0..3 {
        let (mut stream, peer) = listener.accept().expect("accept");
        let std::net::SocketAddr::V4(peer) = peer else {
            panic!("v6 peer")
        };
        let dst = lookups
            .original_destination(cookie, peer)
            .expect("original destination recorded");
        let mut buf = [0u8; 2];
        stream.read_exact(&mut buf).expect("read");
        stream
            .write_all(format!("{}", dst.port()).as_bytes())
            .expect("write");
        seen.push(dst);
    }
    for (port, child) in clients {
        let out = output(child);
        assert_eq!(out.trim(), format!("OK {port}"), "client to port {port}");
    }
    seen.sort_by_key(|d| d.port());
    assert_eq!(
        seen,
        [80, 8080, 9090].map(|p| SocketAddrV4::new(Ipv4Addr::new(10, 20, 30, 40), p))
    );
    // Loopback is not captured.
    let local = netns
        .run(|| TcpListener::bind("127.0.0.1:7000"))
        .expect("netns")
        .expect("bind");
    let child = pod.connect("127.0.0.1", 7000);
    let (mut s, _) = local.accept().expect("loopback accept");
    let mut buf = [0u8; 2];
    s.read_exact(&mut buf).expect("read");
    s.write_all(b"lo").expect("write");
    assert_eq!(output(child).trim(), "OK lo");
    let counters = lookups.counters();
    let redirected = counters
        .iter()
        .find(|(c, _)| c.name() == "outbound_redirected")
        .map(|c| c.1);
    assert!(redirected >= Some(4), "{counters:?}");
}

#[test]
fn inbound_connections_are_steered_to_the_listener_or_refused() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP kernel capture test: {why}");
        return;
    }
    let pod = pod("i");
    let mut capture = Capture::open(&pod.root).expect("load programs");
    let netns = pod.netns();
    // The application listens on 8080 in the pod.
    let app = netns
        .run(|| TcpListener::bind("0.0.0.0:8080"))
        .expect("netns")
        .expect("bind app");
    app.set_nonblocking(true).expect("nonblocking");
    let peer_connect = |port: u16| {
        Command::new("ip")
            .args(["netns", "exec", &pod.peer, "python3", "-c", CONNECT])
            .args([POD_IP.to_string(), port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn peer")
    };
    capture.enroll(&pod.net()).expect("enroll");
    // Enrolled, no ztunnel listener: refused, and the app never sees it.
    let out = output(peer_connect(8080));
    assert!(out.starts_with("ERR"), "{out}");
    assert!(
        app.accept().is_err(),
        "the app must not get a connection while ztunnel is away"
    );

    let plaintext = netns
        .run(|| TcpListener::bind("0.0.0.0:15006"))
        .expect("netns")
        .expect("bind");
    let hbone = netns
        .run(|| TcpListener::bind("0.0.0.0:15008"))
        .expect("netns")
        .expect("bind");
    capture
        .register_listener(POD_IP, ListenerKind::Plaintext, &plaintext)
        .expect("register");
    capture
        .register_listener(POD_IP, ListenerKind::Hbone, &hbone)
        .expect("register");
    for (port, listener) in [(8080u16, &plaintext), (15008, &hbone)] {
        let child = peer_connect(port);
        let (mut s, from) = listener.accept().expect("steered accept");
        assert_eq!(from.ip(), PEER_IP);
        assert_eq!(
            s.local_addr().expect("local"),
            SocketAddrV4::new(POD_IP, port).into(),
            "original destination kept"
        );
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).expect("read");
        s.write_all(b"zt").expect("write");
        assert_eq!(output(child).trim(), "OK zt");
    }
    // ztunnel's own connection to the app (from the pod's address) is not captured.
    let direct = netns
        .run(|| {
            std::net::TcpStream::connect_timeout(
                &SocketAddrV4::new(POD_IP, 8080).into(),
                Duration::from_secs(2),
            )
        })
        .expect("netns");
    assert!(direct.is_ok(), "{direct:?}");
    std::thread::sleep(Duration::from_millis(50));
    assert!(app.accept().is_ok(), "the app gets ztunnel's connection");

    // Released: the app is reachable directly again.
    capture.release(POD_IP).expect("release");
    let child = peer_connect(8080);
    app.set_nonblocking(false).expect("blocking");
    let (mut s, _) = app.accept().expect("direct accept after release");
    let mut buf = [0u8; 2];
    s.read_exact(&mut buf).expect("read");
    s.write_all(b"ap").expect("write");
    assert_eq!(output(child).trim(), "OK ap");
}

#[test]
fn release_leaves_other_attachments_alone_and_ipv6_cannot_bypass() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP kernel capture test: {why}");
        return;
    }
    let pod = pod("m");
    // Someone else's programs on the same cgroup and namespace first (as a CNI's
    // would be): here a second, independent set of ours with its own maps.
    let other_root = PathBuf::from(format!("{}-other", pod.root.display()));
    let mut other = Capture::open(&other_root).expect("load other");
    other.enroll(&pod.net()).expect("other enroll");
    let mut ours = Capture::open(&pod.root).expect("load ours");
    ours.enroll(&pod.net()).expect("enroll");
    ours.release(POD_IP).expect("release");
    assert!(!pod.root.join("pods/10-99-0-2").exists(), "our pins gone");
    assert!(
        other_root.join("pods/10-99-0-2/cairn_connect4").exists(),
        "theirs kept"
    );

    // The other attachment still captures: nothing of it was detached.
    let netns = pod.netns();
    let listener = netns
        .run(|| TcpListener::bind("127.0.0.1:15001"))
        .expect("netns")
        .expect("bind");
    let cookie = netns.cookie();
    let lookups = other.lookups();
    let serve_one = |want_port: u16| {
        let (mut s, peer) = listener.accept().expect("accept");
        let std::net::SocketAddr::V4(peer) = peer else {
            panic!("v6 peer")
        };
        let dst = lookups
            .original_destination(cookie, peer)
            .expect("recorded");
        assert_eq!(
            dst,
            SocketAddrV4::new(Ipv4Addr::new(10, 20, 30, 40), want_port)
        );
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).expect("read");
        s.write_all(b"ok").expect("write");
    };
    let child = pod.connect("10.20.30.40", 80);
    serve_one(80);
    assert_eq!(output(child).trim(), "OK ok");

    // A dual-stack socket to an IPv4-mapped address is captured like IPv4 ...
    let child = pod.connect("::ffff:10.20.30.40", 81);
    serve_one(81);
    assert_eq!(output(child).trim(), "OK ok");
    // ... and any other IPv6 destination is refused, never let through.
    let refused = output(pod.connect("2001:db8::1", 80));
    assert!(
        refused.contains("ERR") && refused.contains("not permitted"),
        "{refused}"
    );
    let v6 = lookups
        .counters()
        .into_iter()
        .find(|(c, _)| c.name() == "outbound_ipv6_refused")
        .map(|c| c.1);
    assert_eq!(v6, Some(1));

    other.release(POD_IP).expect("release other");
    let _ = std::fs::remove_dir_all(&other_root);
}
