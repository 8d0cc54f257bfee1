//! Two "nodes" as network namespaces joined by a veth pair; "pods" are addresses on
//! their node (`10.77.1.x` on A, `10.77.2.x` on B). Node A runs the controller; each
//! node runs its ztunnel with the explicit outbound entry. Everything is torn down on
//! drop (processes killed, namespaces deleted).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const GET: &str = r#"
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())
except Exception as e:
    print("ERR", e)
"#;

pub const NODE_A: usize = 0;
pub const NODE_B: usize = 1;
pub const ADMIN: [&str; 2] = ["10.77.1.1:15020", "10.77.2.1:15020"];

/// Lab namespaces are `cairn-lab-<pid>-a|b`.
const NS_PREFIX: &str = "cairn-lab-";

/// Deletes lab namespaces left by processes that were killed before they could clean
/// up (their pid no longer exists).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some((pid, _)) = name.strip_prefix(NS_PREFIX).and_then(|r| r.split_once('-')) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

pub struct Lab {
    pub ns: [String; 2],
    children: Vec<Child>,
    /// PIDs of the two ztunnels (A, B).
    pub ztunnels: [u32; 2],
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

fn sh(args: &[&str]) -> Result<(), String> {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{args:?} failed ({status})"))
    }
}

/// Why this machine cannot run the lab, if it cannot.
pub fn can_run() -> Result<(), String> {
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

/// A binary of this workspace: next to the running binary (the demo), or one level
/// up from the running test or bench executable (`target/<profile>/deps/`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let here = exe.parent().expect("target dir");
    let dir = if here.ends_with("deps") {
        here.parent().expect("target dir")
    } else {
        here
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --bins` first (cargo xtask test does)",
        path.display()
    );
    path
}

/// The identity `tok-waypoint` authenticates: the waypoint of the `demo` namespace.
pub const DEMO_WAYPOINT: &str = "spiffe://cluster.local/ns/demo/sa/waypoint";

/// Writes the two nodes' tokens (`tok-a`, `tok-b`) and the demo waypoint's
/// (`tok-waypoint`) into `dir` and returns the
/// controller's command line: config from `dir/config`, CA in `dir/ca`, listening on
/// node A's address.
pub fn controller_command(dir: &Path) -> Vec<String> {
    std::fs::write(
        dir.join("tokens.yaml"),
        format!(
            "- {{token: tok-a, node: node-a}}\n- {{token: tok-b, node: node-b}}\n- {{token: tok-waypoint, identity: \"{DEMO_WAYPOINT}\"}}\n"
        ),
    )
    .expect("tokens");
    std::fs::write(dir.join("tok-waypoint"), "tok-waypoint").expect("token");
    std::fs::write(dir.join("tok-a"), "tok-a").expect("token");
    std::fs::write(dir.join("tok-b"), "tok-b").expect("token");
    let d = |p: &str| dir.join(p).display().to_string();
    vec![
        binary("controller").display().to_string(),
        "--config-dir".into(),
        d("config"),
        "--tokens".into(),
        d("tokens.yaml"),
        "--ca-dir".into(),
        d("ca"),
        "--listen".into(),
        "10.77.1.1:15012".into(),
    ]
}

impl Lab {
    /// Builds the topology and starts the controller on A (with `manifests` as its
    /// config) and a ztunnel per node; returns once each ztunnel has `certs[i]`
    /// certificates available.
    pub fn start(manifests: &str, pods_a: &[&str], pods_b: &[&str], certs: [usize; 2]) -> Lab {
        remove_stale_namespaces();
        let tag = std::process::id();
        let mut lab = Lab {
            ns: [format!("{NS_PREFIX}{tag}-a"), format!("{NS_PREFIX}{tag}-b")],
            children: Vec::new(),
            ztunnels: [0, 0],
            dir: tempfile::tempdir().expect("tempdir"),
        };
        lab.network(pods_a, pods_b).expect("network namespaces");
        let dir = lab.dir.path().to_owned();
        std::fs::create_dir(dir.join("config")).expect("mkdir");
        std::fs::write(dir.join("config/lab.yaml"), manifests).expect("manifests");
        let d = |p: &str| dir.join(p).display().to_string();
        let ztunnel = binary("ztunnel").display().to_string();
        let controller = controller_command(&dir);
        let controller: Vec<&str> = controller.iter().map(String::as_str).collect();
        lab.spawn(NODE_A, &controller, &[], "controller.log");
        lab.wait_for("the mesh root", |_| dir.join("ca/root-cert.pem").exists());
        for (i, node, token, log) in [
            (NODE_A, "node-a", "tok-a", "ztunnel-a.log"),
            (NODE_B, "node-b", "tok-b", "ztunnel-b.log"),
        ] {
            let pid = lab.spawn(
                i,
                &[&ztunnel],
                &[
                    ("CAIRN_NODE_NAME", node.into()),
                    ("CAIRN_CONTROLLER", "https://10.77.1.1:15012".into()),
                    ("CAIRN_CONTROLLER_NAME", "localhost".into()),
                    ("CAIRN_ROOT_CERT", d("ca/root-cert.pem")),
                    ("CAIRN_TOKEN_FILE", d(token)),
                    ("CAIRN_ADMIN_ADDR", ADMIN[i].into()),
                    ("CAIRN_EXPLICIT_OUTBOUND", "true".into()),
                    // Two simulated nodes share this machine: each ztunnel gets one
                    // core's worth, as a DaemonSet pod with a 1-CPU limit would.
                    ("CAIRN_WORKER_THREADS", "1".into()),
                    ("RUST_LOG", "info".into()),
                ],
                log,
            );
            lab.ztunnels[i] = pid;
        }
        for i in [NODE_A, NODE_B] {
            lab.wait_for("ztunnel ready with certificates", |lab| {
                let dump = lab.get(i, &format!("http://{}/config_dump", ADMIN[i]));
                dump.matches("\"state\": \"available\"").count() == certs[i]
            });
        }
        lab
    }

    fn network(&self, pods_a: &[&str], pods_b: &[&str]) -> Result<(), String> {
        let (a, b) = (&self.ns[0], &self.ns[1]);
        let tag = std::process::id();
        let (va, vb) = (format!("cva{tag}"), format!("cvb{tag}"));
        for ns in [a, b] {
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        sh(&[
            "ip", "link", "add", &va, "netns", a, "type", "veth", "peer", "name", &vb, "netns", b,
        ])?;
        for (ns, dev, node_ip, pods, peer_net) in [
            (a, &va, "10.77.1.1", pods_a, "10.77.2.0/24"),
            (b, &vb, "10.77.2.1", pods_b, "10.77.1.0/24"),
        ] {
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            for ip in std::iter::once(&node_ip).chain(pods.iter()) {
                sh(&[
                    "ip",
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{ip}/32"),
                    "dev",
                    dev,
                ])?;
            }
            sh(&["ip", "-n", ns, "route", "add", peer_net, "dev", dev])?;
        }
        Ok(())
    }

    pub fn exec(&self, node: usize, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[node]]).args(args);
        c
    }

    /// Starts a long-running process on a node; returns its pid.
    pub fn spawn(&mut self, node: usize, args: &[&str], envs: &[(&str, String)], log: &str) -> u32 {
        let log = std::fs::File::create(self.dir.path().join(log)).expect("log file");
        let mut cmd = self.exec(node, args);
        cmd.envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd.spawn().expect("spawn");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    pub fn python(&self, node: usize, script: &str, args: &[&str]) -> String {
        let out = self
            .exec(node, &["python3", "-c", script])
            .args(args)
            .output()
            .expect("python");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn get(&self, node: usize, url: &str) -> String {
        self.python(node, GET, &[url])
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Waits up to 30 s for `ok`; on timeout panics with every process log.
    pub fn wait_for(&self, what: &str, mut ok: impl FnMut(&Lab) -> bool) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if ok(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "timed out waiting for {what}\ncontroller:\n{}\nztunnel a:\n{}\nztunnel b:\n{}",
            self.log("controller.log"),
            self.log("ztunnel-a.log"),
            self.log("ztunnel-b.log")
        );
    }
}
