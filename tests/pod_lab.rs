//! Two nodes whose pods are real pods as far as the kernel goes: each pod is a network
//! namespace with a veth to its node and a cgroup v2 directory its processes run in.
//! Pods are created the way a node does it: namespace, link, IP and cgroup first, then
//! the chained CNI plugin (`cairn-cni ADD`), then the pod's process. Each node runs
//! the real `ztunnel` with in-pod capture; node A also runs the `controller`.
//!
//! Processes enter a namespace with `nsenter --net` (not `ip netns exec`, which
//! remounts /sys and would hide the cgroup tree and the bpffs the pins live on).
//! Each node's pins live on a bpffs mounted in the lab's directory.
//!
//! Addresses: node A 10.77.1.1, its pods 10.77.1.x; node B 10.77.2.1, pods 10.77.2.x;
//! pods route everything through their node.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::lab::{binary, controller_command};

pub const NODE_A: usize = 0;
pub const NODE_B: usize = 1;
const NODE_IPS: [&str; 2] = ["10.77.1.1", "10.77.2.1"];
const NODE_NAMES: [&str; 2] = ["node-a", "node-b"];
/// Tests' namespaces and cgroups are `cairn-cap-<pid>-...`.
const PREFIX: &str = "cairn-cap-";

/// How a lab is named and where it keeps its files.
#[derive(Clone, Debug)]
pub struct Options {
    /// Network namespaces and cgroups are `<prefix><pid>-...`.
    pub prefix: &'static str,
    /// Config, CA, tokens, pins, pod state and logs; a fresh temporary directory
    /// when None. A given directory is created, and removed on drop.
    pub dir: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            prefix: PREFIX,
            dir: None,
        }
    }
}

enum LabDir {
    Temp(tempfile::TempDir),
    Fixed(PathBuf),
}

impl LabDir {
    fn path(&self) -> &Path {
        match self {
            LabDir::Temp(t) => t.path(),
            LabDir::Fixed(p) => p,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: &'static str,
    pub name: &'static str,
    pub node: usize,
    pub ip: &'static str,
}

struct PodState {
    spec: PodSpec,
    netns: String,
    cgroup: PathBuf,
}

pub struct PodLab {
    prefix: &'static str,
    tag: u32,
    nodes: [String; 2],
    pods: Vec<PodState>,
    ztunnels: [Option<Child>; 2],
    children: Vec<Child>,
    cgroup_root: PathBuf,
    dir: LabDir,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Why this machine cannot run the pod lab, if it cannot.
pub fn can_run() -> Result<(), String> {
    crate::lab::can_run()?;
    if cairn_capture::cgroup2_mount().is_none() {
        return Err("needs a cgroup v2 mount".into());
    }
    if Command::new("nsenter").arg("--version").output().is_err() {
        return Err("needs nsenter (util-linux)".into());
    }
    Ok(())
}

/// Removes what labs of dead processes left behind (namespaces, cgroups).
fn remove_stale(prefix: &str) {
    let dead = |name: &str| {
        name.strip_prefix(prefix)
            .and_then(|r| r.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if dead(name) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    if let Some(root) = cairn_capture::cgroup2_mount() {
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                for pod in std::fs::read_dir(entry.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let _ = std::fs::remove_dir(pod.path());
                }
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}

impl Drop for PodLab {
    fn drop(&mut self) {
        for child in self.ztunnels.iter_mut().flatten().chain(&mut self.children) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Processes left in pod cgroups (children of killed shells).
        for pod in &self.pods {
            if let Ok(procs) = std::fs::read_to_string(pod.cgroup.join("cgroup.procs")) {
                for pid in procs.lines() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        for pod in &self.pods {
            let _ = std::fs::remove_dir(&pod.cgroup);
            let _ = Command::new("ip")
                .args(["netns", "del", &pod.netns])
                .status();
        }
        let _ = std::fs::remove_dir(
            self.cgroup_root
                .join(format!("{}{}", self.prefix, self.tag)),
        );
        for node in &self.nodes {
            let _ = Command::new("ip").args(["netns", "del", node]).status();
        }
        for i in 0..2 {
            let _ = Command::new("umount")
                .arg(self.pin_root(i))
                .stderr(Stdio::null())
                .status();
        }
        if let LabDir::Fixed(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl PodLab {
    /// Both nodes and the controller (config: `manifests`); no pods, no ztunnels yet.
    pub fn new(manifests: &str) -> PodLab {
        PodLab::with(manifests, Options::default())
    }

    /// [`PodLab::new`] named and placed as `options` say.
    pub fn with(manifests: &str, options: Options) -> PodLab {
        let prefix = options.prefix;
        remove_stale(prefix);
        let tag = std::process::id();
        let dir = match options.dir {
            Some(d) => {
                std::fs::create_dir_all(&d).expect("lab directory");
                LabDir::Fixed(d)
            }
            None => LabDir::Temp(tempfile::tempdir().expect("tempdir")),
        };
        let mut lab = PodLab {
            prefix,
            tag,
            nodes: [format!("{prefix}{tag}-a"), format!("{prefix}{tag}-b")],
            pods: Vec::new(),
            ztunnels: [None, None],
            children: Vec::new(),
            cgroup_root: cairn_capture::cgroup2_mount().expect("cgroup2"),
            dir,
        };
        lab.nodes_network().expect("node namespaces");
        for i in 0..2 {
            let root = lab.pin_root(i);
            std::fs::create_dir_all(&root).expect("pin root");
            sh(&["mount", "-t", "bpf", "bpf", &root.display().to_string()]).expect("bpffs");
        }
        std::fs::create_dir_all(lab.cgroup_root.join(format!("{prefix}{tag}"))).expect("cgroup");
        let dir = lab.dir.path().to_owned();
        std::fs::create_dir_all(dir.join("config")).expect("mkdir");
        lab.set_config(manifests);
        let controller = controller_command(&dir);
        let controller: Vec<&str> = controller.iter().map(String::as_str).collect();
        let child = lab.node_command(NODE_A, &controller, &[], "controller.log");
        lab.children.push(child);
        lab.wait_for("the mesh root", |_| dir.join("ca/root-cert.pem").exists());
        lab
    }

    fn pin_root(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("bpf-{}", NODE_NAMES[node]))
    }

    fn state_dir(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("pods-{}", NODE_NAMES[node]))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces the controller's config (it rescans the directory).
    pub fn set_config(&self, manifests: &str) {
        let path = self.dir.path().join("config/lab.yaml");
        let tmp = self.dir.path().join("lab.yaml.tmp");
        std::fs::write(&tmp, manifests).expect("manifests");
        std::fs::rename(&tmp, path).expect("manifests");
    }

    fn nodes_network(&self) -> Result<(), String> {
        let (a, b) = (&self.nodes[0], &self.nodes[1]);
        let (va, vb) = (format!("cna{}", self.tag), format!("cnb{}", self.tag));
        for ns in [a, b] {
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])?;
        }
        sh(&[
            "ip", "link", "add", &va, "netns", a, "type", "veth", "peer", "name", &vb, "netns", b,
        ])?;
        for (ns, dev, ip, peer, peer_net) in [
            (a, &va, NODE_IPS[0], NODE_IPS[1], "10.77.2.0/24"),
            (b, &vb, NODE_IPS[1], NODE_IPS[0], "10.77.1.0/24"),
        ] {
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
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
            sh(&[
                "ip",
                "-n",
                ns,
                "route",
                "add",
                &format!("{peer}/32"),
                "dev",
                dev,
            ])?;
            sh(&[
                "ip", "-n", ns, "route", "add", peer_net, "via", peer, "dev", dev,
            ])?;
        }
        Ok(())
    }

    fn pod(&self, name: &str) -> &PodState {
        self.pods
            .iter()
            .find(|p| p.spec.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Creates a pod as a node would: namespace, veth, address and routes, cgroup,
    /// then `cairn-cni ADD`. Returns the plugin's stderr.
    pub fn add_pod(&mut self, spec: PodSpec) -> String {
        let n = self.pods.len();
        let netns = format!("{}{}-p{n}", self.prefix, self.tag);
        let node = &self.nodes[spec.node];
        let (host, inner) = (
            format!("cph{}x{n}", self.tag),
            format!("cpp{}x{n}", self.tag),
        );
        let run = || -> Result<(), String> {
            sh(&["ip", "netns", "add", &netns])?;
            sh(&["ip", "-n", &netns, "link", "set", "lo", "up"])?;
            sh(&[
                "ip", "link", "add", &host, "netns", node, "type", "veth", "peer", "name", &inner,
                "netns", &netns,
            ])?;
            sh(&["ip", "-n", &netns, "link", "set", &inner, "name", "eth0"])?;
            sh(&[
                "ip",
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{}/32", spec.ip),
                "dev",
                "eth0",
            ])?;
            sh(&["ip", "-n", &netns, "link", "set", "eth0", "up"])?;
            let gw = NODE_IPS[spec.node];
            sh(&[
                "ip",
                "-n",
                &netns,
                "route",
                "add",
                &format!("{gw}/32"),
                "dev",
                "eth0",
            ])?;
            sh(&[
                "ip", "-n", &netns, "route", "add", "default", "via", gw, "dev", "eth0",
            ])?;
            sh(&["ip", "-n", node, "link", "set", &host, "up"])?;
            sh(&[
                "ip",
                "-n",
                node,
                "route",
                "add",
                &format!("{}/32", spec.ip),
                "dev",
                &host,
            ])?;
            Ok(())
        };
        run().expect("pod network");
        let cgroup_rel = format!("{}{}/{}", self.prefix, self.tag, spec.name);
        let cgroup = self.cgroup_root.join(&cgroup_rel);
        std::fs::create_dir_all(&cgroup).expect("pod cgroup");
        let config = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "lab",
            "type": "cairn-cni",
            "config_dir": self.dir.path().join("config"),
            "state_dir": self.state_dir(spec.node),
            "pin_root": self.pin_root(spec.node),
            "cgroup_root": self.cgroup_root,
            "probe_ip": NODE_IPS[spec.node],
            "runtimeConfig": {"cgroupPath": cgroup_rel},
            "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": format!("{}/32", spec.ip)}]},
        });
        let out = self.cni("ADD", &spec, &netns, &config.to_string());
        self.pods.push(PodState {
            spec,
            netns,
            cgroup,
        });
        out
    }

    fn cni(&self, command: &str, spec: &PodSpec, netns: &str, config: &str) -> String {
        use std::io::Write;
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.nodes[spec.node]))
            .arg("--")
            .arg(binary("cairn-cni"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", spec.name)
            .env("CNI_NETNS", format!("/var/run/netns/{netns}"))
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!(
                    "K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                    spec.namespace, spec.name
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cairn-cni");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(config.as_bytes())
            .expect("config");
        let out = child.wait_with_output().expect("cairn-cni");
        assert!(
            out.status.success(),
            "cairn-cni {command} {}: {}{}",
            spec.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn node_command(
        &self,
        node: usize,
        args: &[&str],
        envs: &[(&str, String)],
        log: &str,
    ) -> Child {
        let log = std::fs::File::create(self.dir.path().join(log)).expect("log file");
        Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.nodes[node]))
            .arg("--")
            .args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn")
    }

    pub fn admin(&self, node: usize) -> String {
        format!("{}:15020", NODE_IPS[node])
    }

    /// Starts (or restarts) a node's ztunnel with in-pod capture; `log` appends.
    pub fn start_ztunnel(&mut self, node: usize) {
        assert!(self.ztunnels[node].is_none(), "ztunnel already running");
        let d = |p: &str| self.dir.path().join(p).display().to_string();
        let token = ["tok-a", "tok-b"][node];
        let log = format!("ztunnel-{}.log", NODE_NAMES[node]);
        let previous = std::fs::read_to_string(self.dir.path().join(&log)).unwrap_or_default();
        std::fs::write(self.dir.path().join(format!("{log}.prev")), previous).expect("log");
        let child = self.node_command(
            node,
            &[&binary("ztunnel").display().to_string()],
            &[
                ("CAIRN_NODE_NAME", NODE_NAMES[node].into()),
                ("CAIRN_CONTROLLER", "https://10.77.1.1:15012".into()),
                ("CAIRN_CONTROLLER_NAME", "localhost".into()),
                ("CAIRN_ROOT_CERT", d("ca/root-cert.pem")),
                ("CAIRN_TOKEN_FILE", d(token)),
                ("CAIRN_ADMIN_ADDR", self.admin(node)),
                ("CAIRN_CAPTURE", "true".into()),
                (
                    "CAIRN_CAPTURE_PIN_ROOT",
                    self.pin_root(node).display().to_string(),
                ),
                (
                    "CAIRN_CAPTURE_STATE_DIR",
                    self.state_dir(node).display().to_string(),
                ),
                ("CAIRN_WORKER_THREADS", "1".into()),
                ("CAIRN_DRAIN", "1s".into()),
                ("RUST_LOG", "info".into()),
            ],
            &log,
        );
        self.ztunnels[node] = Some(child);
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn stop_ztunnel(&mut self, node: usize) {
        if let Some(mut child) = self.ztunnels[node].take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    /// Pod IPs a node's ztunnel serves (`cairn_capture_pods{state="adopted"}`).
    pub fn adopted(&self, node: usize) -> f64 {
        self.metric(node, "cairn_capture_pods", "state=\"adopted\"")
    }

    /// Sum of a metric's samples whose labels contain `filter`, from a node's ztunnel.
    pub fn metric(&self, node: usize, name: &str, filter: &str) -> f64 {
        let text = self.fetch(node, &format!("http://{}/metrics", self.admin(node)));
        sum_metric(&text, name, &[filter])
    }

    /// GETs `url` from a node's network namespace (as a scraper there would); the
    /// body, or `ERR <why>`.
    pub fn fetch(&self, node: usize, url: &str) -> String {
        get_in(&self.netns_path(node), url).unwrap_or_else(|e| format!("ERR {e}"))
    }

    /// The path of a node's network namespace.
    pub fn netns_path(&self, node: usize) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.nodes[node]))
    }

    /// Starts the `waypoint` binary in `pod` as the demo namespace's waypoint (token
    /// `tok-waypoint`), talking to the controller on node A; returns its pid.
    pub fn start_waypoint(&mut self, pod: &str) -> u32 {
        let d = |p: &str| self.dir.path().join(p).display().to_string();
        let env = [
            format!("CAIRN_IDENTITY={}", crate::lab::DEMO_WAYPOINT),
            "CAIRN_CONTROLLER=https://10.77.1.1:15012".into(),
            "CAIRN_CONTROLLER_NAME=localhost".into(),
            format!("CAIRN_ROOT_CERT={}", d("ca/root-cert.pem")),
            format!("CAIRN_TOKEN_FILE={}", d("tok-waypoint")),
            "CAIRN_WORKER_THREADS=1".into(),
            "CAIRN_DRAIN=1s".into(),
            // `CAIRN_LAB_WAYPOINT_LOG=info,access=off` measures without access logs.
            format!(
                "RUST_LOG={}",
                std::env::var("CAIRN_LAB_WAYPOINT_LOG").unwrap_or_else(|_| "info".into())
            ),
        ];
        let bin = binary("waypoint").display().to_string();
        let mut args = vec!["env"];
        args.extend(env.iter().map(String::as_str));
        args.push(&bin);
        // sh, nsenter and env exec in turn: the pid is the waypoint's.
        self.spawn_in_pod(pod, &args, "waypoint.log")
    }
}

/// A TCP connection made from inside the network namespace at `netns` (a socket
/// belongs to the namespace it was created in, whichever thread uses it later).
pub fn connect_in(
    netns: &Path,
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> std::io::Result<std::net::TcpStream> {
    let netns = std::fs::File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            std::net::TcpStream::connect_timeout(&addr, timeout)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("connect thread panicked")))
    })
}

/// GETs `http://ip:port/path` from inside the network namespace at `netns`; the body,
/// or an error for a failed connection or a status other than 200.
pub fn get_in(netns: &Path, url: &str) -> std::io::Result<String> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad URL {url}"));
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr: std::net::SocketAddr = authority.parse().map_err(|_| bad())?;
    let stream = connect_in(netns, addr, Duration::from_secs(2))?;
    let path = if path.is_empty() { "/" } else { path };
    match cairn_controller::inspect::http_get(stream, authority, path)? {
        (200, body) => Ok(body),
        (status, _) => Err(std::io::Error::other(format!("{url}: status {status}"))),
    }
}

/// Sum of the samples of metric `name` in Prometheus text whose labels contain every
/// one of `filters` (0 when there is none).
pub fn sum_metric(text: &str, name: &str, filters: &[&str]) -> f64 {
    cairn_controller::inspect::sum_metric(text, name, filters).unwrap_or(0.0)
}

impl PodLab {
    /// Runs python3 `script` in a node's network namespace (as the kubelet would run).
    pub fn python_on_node(&self, node: usize, script: &str, args: &[&str]) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.nodes[node]))
            .args(["--", "python3", "-c", script])
            .args(args)
            .output()
            .expect("python");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A command run as a process of `pod` (its cgroup, then its network namespace).
    fn pod_command(&self, pod: &str, args: &[&str]) -> Command {
        let p = self.pod(pod);
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec nsenter --net=/var/run/netns/{} -- \"$@\"",
            p.cgroup.display(),
            p.netns
        );
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script, "sh"]).args(args);
        cmd
    }

    /// Runs python3 `script` in `pod` and returns its stdout and stderr.
    pub fn python(&self, pod: &str, script: &str, args: &[&str]) -> String {
        let mut all = vec!["python3", "-c", script];
        all.extend_from_slice(args);
        self.run_in_pod(pod, &all)
    }

    /// Runs a command as a process of `pod`; returns its stdout and stderr.
    pub fn run_in_pod(&self, pod: &str, args: &[&str]) -> String {
        let out = self.pod_command(pod, args).output().expect("run in pod");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Starts a long-running process in `pod`.
    pub fn spawn_in_pod(&mut self, pod: &str, args: &[&str], log: &str) -> u32 {
        let log = std::fs::File::create(self.dir.path().join(log)).expect("log file");
        let child = self
            .pod_command(pod, args)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Every process log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in [
            "controller.log",
            "waypoint.log",
            "ztunnel-node-a.log.prev",
            "ztunnel-node-a.log",
            "ztunnel-node-b.log.prev",
            "ztunnel-node-b.log",
        ] {
            let log = self.log(name);
            if !log.is_empty() {
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                out += &format!("--- {name} (last lines) ---\n");
                for line in tail.iter().rev() {
                    out += line;
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Waits up to 30 s for `ok`; on timeout panics with the logs.
    pub fn wait_for(&self, what: &str, mut ok: impl FnMut(&PodLab) -> bool) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if ok(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for {what}\n{}", self.logs());
    }
}
