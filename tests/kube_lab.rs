//! The local cluster (`cargo xtask cluster up`, the e2e suite): a real kube-apiserver
//! and etcd ([`LocalCluster`]), `deploy/` applied to it, the controller in Kubernetes
//! mode as its own service account, and nodes made of network namespaces. Each node
//! runs `cairn-node` (kubelet + runtime stand-in) with the real `cairn-cni` chained,
//! and its ztunnel as a host-network pod the node agent runs, as the DaemonSet's pod
//! would run (pod-bound `istio-ca` token, the mesh root from its ConfigMap).
//!
//! ```text
//!  host namespace: etcd, kube-apiserver (127.0.0.1), controller (10.79.0.1:15012),
//!  |               cairn-node per node (talks to the API server, runs CNI)
//!  | <prefix>r 10.79.0.1
//!  fabric namespace (router, 10.79.0.254)
//!  |-- node 1 namespace 10.79.1.1: ztunnel pod; pods 10.79.1.x on veths
//!  `-- node 2 namespace 10.79.2.1: ztunnel pod; pods 10.79.2.x on veths
//! ```
//!
//! The host gets one veth and a route to 10.79.0.0/16, both removed on drop.
//! Nothing here has DNS or kube-proxy: clients dial cluster IPs, which ztunnel
//! resolves for captured pods; the controller is dialled at 10.79.0.1.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{cluster::LocalCluster, lab::binary, pod_lab};

/// The controller's address as nodes and pods dial it.
pub const CONTROLLER_IP: &str = "10.79.0.1";
const FABRIC_IP: &str = "10.79.0.254";
/// The controller's TLS name (its Service's DNS name, as in a cluster).
pub const CONTROLLER_NAME: &str = "cairn-controller.cairn-system.svc";

/// How a lab is named and how big it is.
#[derive(Clone, Debug)]
pub struct Options {
    /// Network namespaces, links and node names start with it (at most 10 bytes:
    /// link names `<prefix>n<i>` must stay within Linux's 15).
    pub prefix: String,
    pub nodes: usize,
}

pub struct KubeNode {
    /// The Node's name (also its network namespace's).
    pub name: String,
    pub ip: Ipv4Addr,
    /// The node's pod range (`10.79.<i>.0/24`).
    pub pod_cidr: String,
    agent: Option<Child>,
}

impl KubeNode {
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    pub fn admin(&self) -> String {
        format!("{}:15020", self.ip)
    }
}

pub struct KubeLab {
    pub cluster: LocalCluster,
    prefix: String,
    dir: PathBuf,
    pub nodes: Vec<KubeNode>,
    controller: Option<Child>,
    cgroup_root: PathBuf,
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))
}

/// The network namespace `cairn-node` makes for pod `uid` on `node` (a name under
/// /var/run/netns): the same pod always gets the same one.
pub fn pod_netns(node: &str, uid: &str) -> String {
    let short: String = uid.chars().filter(|c| *c != '-').take(10).collect();
    format!("{node}-{short}")
}

/// Removes what a lab with `prefix` left behind (a killed test, a crashed
/// `cairn-cluster up`): its node agents' pods, namespaces, the host link, pins.
pub fn sweep(prefix: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name.starts_with(&format!("{prefix}-")) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    let _ = Command::new("ip")
        .args(["link", "del", &format!("{prefix}r")])
        .stderr(Stdio::null())
        .status();
    if let Some(root) = cairn_capture::cgroup2_mount() {
        let base = root.join("cairn-node");
        for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{prefix}-")) {
                let _ = std::fs::write(entry.path().join("cgroup.kill"), "1");
                std::thread::sleep(Duration::from_millis(100));
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
        let _ = std::fs::remove_dir(&base);
    }
}

/// Makes 10.79.0.0/16 ours: a lab of a test process that died (`ce<pid>`) or of this
/// prefix is swept; one that is alive is an error saying which.
fn claim_addresses(prefix: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(["-o", "addr", "show", "to", &format!("{CONTROLLER_IP}/32")])
        .output()
        .context("running ip")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "7: ce1234r    inet 10.79.0.1/32 scope global ce1234r ..."
        let Some(link) = line.split_whitespace().nth(1) else {
            continue;
        };
        let link = link.split('@').next().unwrap_or(link);
        let Some(owner) = link.strip_suffix('r') else {
            continue;
        };
        let dead_test = owner
            .strip_prefix("ce")
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if owner == prefix || dead_test {
            sweep(owner);
        } else {
            bail!(
                "{CONTROLLER_IP} is held by link {link}: another local cluster is running \
                 (`cargo xtask cluster down` stops one started by `cluster up`)"
            );
        }
    }
    Ok(())
}

impl KubeLab {
    /// Brings the whole cluster up under `dir`: API server, `deploy/`, the fabric
    /// and nodes, node agents, ztunnel pods, the controller; returns once every
    /// ztunnel is connected to the controller.
    pub fn up(dir: &Path, options: &Options) -> Result<KubeLab> {
        pod_lab::can_run().map_err(|e| anyhow::anyhow!(e))?;
        if options.prefix.is_empty() || options.prefix.len() > 10 {
            bail!("a lab prefix has 1 to 10 bytes, not {:?}", options.prefix);
        }
        if options.nodes == 0 || options.nodes > 9 {
            bail!("a local cluster has 1 to 9 nodes, not {}", options.nodes);
        }
        sweep(&options.prefix);
        claim_addresses(&options.prefix)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let cluster = LocalCluster::start(&dir.join("cluster"))?;
        let mut lab = KubeLab {
            cluster,
            prefix: options.prefix.clone(),
            dir: dir.to_owned(),
            nodes: Vec::new(),
            controller: None,
            cgroup_root: cairn_capture::cgroup2_mount().context("no cgroup v2 mount")?,
        };
        lab.install()?;
        lab.fabric()?;
        for i in 1..=options.nodes {
            lab.add_node(i)?;
        }
        lab.start_controller()?;
        for i in 0..lab.nodes.len() {
            lab.create_ztunnel_pod(i)?;
        }
        for i in 0..lab.nodes.len() {
            crate::backend::Backend::wait_ztunnel_connected(&lab, i)?;
        }
        Ok(lab)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.cluster.kubeconfig
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.cluster.kubectl(args)
    }

    /// `kubectl apply` of a manifest given as text.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        let file = self.dir.join("apply.yaml");
        std::fs::write(&file, yaml).context("writing the manifest")?;
        self.kubectl(&["apply", "-f", &file.display().to_string()])
            .map(drop)
    }

    /// What ships: CRDs (Gateway API's too, the cluster has none), namespace, RBAC,
    /// the controller's and ztunnel's service accounts.
    fn install(&self) -> Result<()> {
        self.cluster.install_deploy()?;
        // The controller runs on the host (the API server listens on the host's
        // loopback, which pods cannot reach), so its shipped Deployment is scaled
        // to none, or the node agent standing in for the Deployment controller
        // would try to run its image. Nothing here acts on DaemonSets: the lab makes
        // each node's ztunnel pod itself (`create_ztunnel_pod`).
        self.kubectl(&[
            "-n",
            "cairn-system",
            "scale",
            "deployment/cairn-controller",
            "--replicas=0",
        ])?;
        Ok(())
    }

    /// The fabric namespace routing between the host and the nodes.
    fn fabric(&self) -> Result<()> {
        let fabric = format!("{}-fab", self.prefix);
        let host = format!("{}r", self.prefix);
        sh(&["ip", "netns", "add", &fabric])?;
        sh(&["ip", "-n", &fabric, "link", "set", "lo", "up"])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            &fabric,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        sh(&[
            "ip", "link", "add", &host, "type", "veth", "peer", "name", "host", "netns", &fabric,
        ])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{CONTROLLER_IP}/32"),
            "dev",
            &host,
        ])?;
        sh(&["ip", "link", "set", &host, "up"])?;
        sh(&[
            "ip",
            "route",
            "add",
            &format!("{FABRIC_IP}/32"),
            "dev",
            &host,
        ])?;
        sh(&[
            "ip",
            "route",
            "add",
            "10.79.0.0/16",
            "via",
            FABRIC_IP,
            "dev",
            &host,
        ])?;
        sh(&[
            "ip",
            "-n",
            &fabric,
            "addr",
            "add",
            &format!("{FABRIC_IP}/32"),
            "dev",
            "host",
        ])?;
        sh(&["ip", "-n", &fabric, "link", "set", "host", "up"])?;
        sh(&[
            "ip",
            "-n",
            &fabric,
            "route",
            "add",
            &format!("{CONTROLLER_IP}/32"),
            "dev",
            "host",
        ])?;
        Ok(())
    }

    fn pin_root(&self, node: &str) -> PathBuf {
        self.dir.join(format!("bpf-{node}"))
    }

    fn state_dir(&self, node: &str) -> PathBuf {
        self.dir.join(format!("pods-{node}"))
    }

    /// Node `i` (1-based): its namespace on the fabric, bpffs, the Node object, and
    /// its agent with the CNI plugin chained.
    fn add_node(&mut self, i: usize) -> Result<()> {
        let name = format!("{}-n{i}", self.prefix);
        let ip = Ipv4Addr::new(10, 79, i as u8, 1);
        let pod_cidr = format!("10.79.{i}.0/24");
        let fabric = format!("{}-fab", self.prefix);
        let link = format!("{}n{i}", self.prefix);
        sh(&["ip", "netns", "add", &name])?;
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            &name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        sh(&[
            "ip", "link", "add", &link, "netns", &fabric, "type", "veth", "peer", "name", "eth0",
            "netns", &name,
        ])?;
        sh(&[
            "ip",
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ip}/32"),
            "dev",
            "eth0",
        ])?;
        sh(&["ip", "-n", &name, "link", "set", "eth0", "up"])?;
        sh(&[
            "ip",
            "-n",
            &name,
            "route",
            "add",
            &format!("{FABRIC_IP}/32"),
            "dev",
            "eth0",
        ])?;
        sh(&[
            "ip", "-n", &name, "route", "add", "default", "via", FABRIC_IP, "dev", "eth0",
        ])?;
        sh(&["ip", "-n", &fabric, "link", "set", &link, "up"])?;
        sh(&[
            "ip",
            "-n",
            &fabric,
            "route",
            "add",
            &format!("{ip}/32"),
            "dev",
            &link,
        ])?;
        sh(&[
            "ip",
            "-n",
            &fabric,
            "route",
            "add",
            &pod_cidr,
            "via",
            &ip.to_string(),
            "dev",
            &link,
        ])?;
        let pins = self.pin_root(&name);
        std::fs::create_dir_all(&pins)?;
        sh(&["mount", "-t", "bpf", "bpf", &pins.display().to_string()])?;
        std::fs::create_dir_all(self.state_dir(&name))?;
        self.apply(&format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{kubernetes.io/hostname: {name}}}\nspec:\n  podCIDR: {pod_cidr}\n"
        ))?;
        let cni_config = self.dir.join(format!("cni-{name}.json"));
        std::fs::write(
            &cni_config,
            serde_json::json!({
                "cniVersion": "1.0.0", "name": "k8s", "type": "cairn-cni",
                "kubeconfig": self.cluster.kubeconfig,
                "state_dir": self.state_dir(&name),
                "pin_root": pins,
                "cgroup_root": self.cgroup_root,
                "probe_ip": ip.to_string(),
            })
            .to_string(),
        )?;
        let mut node = KubeNode {
            name,
            ip,
            pod_cidr,
            agent: None,
        };
        node.agent = Some(self.start_agent(&node, i == 1, &cni_config)?);
        self.nodes.push(node);
        Ok(())
    }

    fn start_agent(&self, node: &KubeNode, deployments: bool, cni_config: &Path) -> Result<Child> {
        // Pods of the test app give its role as args (`app reviews --version v1`).
        let app = format!(
            "{}={}",
            crate::backend::APP_IMAGE,
            binary("cairn-demo").display()
        );
        let ztunnel = format!("cairn/ztunnel={}", binary("ztunnel").display());
        let waypoint = format!("cairn/waypoint={}", binary("waypoint").display());
        let mut cmd = Command::new(binary("cairn-node"));
        cmd.arg("--kubeconfig")
            .arg(&self.cluster.kubeconfig)
            .args(["--node", &node.name, "--node-netns", &node.name])
            .args(["--gateway", &node.ip.to_string()])
            .args(["--pod-cidr", &node.pod_cidr])
            .arg("--dir")
            .arg(self.dir.join(format!("logs-{}", node.name)))
            .args(["--image", &app, "--image", &ztunnel, "--image", &waypoint])
            .arg("--cni-plugin")
            .arg(binary("cairn-cni"))
            .arg("--cni-config")
            .arg(cni_config)
            .env("RUST_LOG", "info");
        if deployments {
            cmd.arg("--run-deployments");
        }
        spawn_logged(&mut cmd, &self.dir.join(format!("agent-{}.log", node.name)))
    }

    /// The controller in Kubernetes mode with a token of its own service account.
    pub fn start_controller(&mut self) -> Result<()> {
        if self.controller.is_some() {
            bail!("the controller is running");
        }
        let token = self.cluster.kubectl(&[
            "-n",
            "cairn-system",
            "create",
            "token",
            "cairn-controller",
            "--duration=24h",
        ])?;
        let kubeconfig = self.dir.join("controller.kubeconfig");
        self.cluster
            .kubeconfig_with_token(token.trim(), &kubeconfig)?;
        let mut cmd = Command::new(binary("controller"));
        cmd.arg("--kube")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--ca-dir")
            .arg(self.dir.join("ca"))
            .args(["--listen", &format!("{CONTROLLER_IP}:15012")])
            .args(["--serving-name", CONTROLLER_NAME])
            .args(["--waypoint-image", "cairn/waypoint"])
            .args([
                "--waypoint-controller-url",
                &format!("https://{CONTROLLER_IP}:15012"),
            ])
            .args(["--leader-id", "controller-0"])
            .env("RUST_LOG", "info");
        self.controller = Some(spawn_logged(&mut cmd, &self.dir.join("controller.log"))?);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect_timeout(
            &format!("{CONTROLLER_IP}:15012").parse()?,
            Duration::from_millis(200),
        )
        .is_err()
        {
            if let Some(Ok(Some(status))) = self.controller.as_mut().map(Child::try_wait) {
                bail!(
                    "the controller exited ({status}):\n{}",
                    self.log_tail("controller.log")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the controller did not serve within 60 s:\n{}",
                    self.log_tail("controller.log")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// SIGKILL (a crash, no drain).
    pub fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The DaemonSet's pod for node `i`: host network, the node's pins and pod
    /// records, a pod-bound `istio-ca` token and the mesh root as volumes.
    pub fn create_ztunnel_pod(&self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let name = &node.name;
        let env = [
            ("CAIRN_NODE_NAME", name.clone()),
            ("CAIRN_CONTROLLER", format!("https://{CONTROLLER_IP}:15012")),
            ("CAIRN_CONTROLLER_NAME", CONTROLLER_NAME.into()),
            (
                "CAIRN_ROOT_CERT",
                "/var/run/cairn/root/root-cert.pem".into(),
            ),
            (
                "CAIRN_TOKEN_FILE",
                "/var/run/secrets/tokens/istio-token".into(),
            ),
            ("CAIRN_ADMIN_ADDR", node.admin()),
            ("CAIRN_CAPTURE", "true".into()),
            (
                "CAIRN_CAPTURE_PIN_ROOT",
                self.pin_root(name).display().to_string(),
            ),
            (
                "CAIRN_CAPTURE_STATE_DIR",
                self.state_dir(name).display().to_string(),
            ),
            ("CAIRN_WORKER_THREADS", "1".into()),
            ("CAIRN_DRAIN", "1s".into()),
            ("RUST_LOG", "info".into()),
        ];
        let env: Vec<serde_json::Value> = env
            .iter()
            .map(|(k, v)| serde_json::json!({"name": k, "value": v}))
            .collect();
        // The DaemonSet's template's labels and annotations (Prometheus finds the
        // pod by them).
        let template = |what: &str| -> Result<serde_json::Value> {
            let text = self.kubectl(&[
                "-n",
                "cairn-system",
                "get",
                "daemonset",
                "ztunnel",
                "-o",
                &format!("jsonpath={{.spec.template.metadata.{what}}}"),
            ])?;
            serde_json::from_str(&text).with_context(|| format!("the DaemonSet's {what}"))
        };
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("ztunnel-{name}"), "namespace": "cairn-system",
                         "labels": template("labels")?,
                         "annotations": template("annotations")?},
            "spec": {
                "nodeName": name, "hostNetwork": true, "serviceAccountName": "ztunnel",
                "containers": [{
                    "name": "ztunnel", "image": "cairn/ztunnel", "env": env,
                    "volumeMounts": [
                        {"name": "root-cert", "mountPath": "/var/run/cairn/root", "readOnly": true},
                        {"name": "token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
                    ],
                }],
                "volumes": [
                    {"name": "root-cert", "configMap": {"name": "cairn-ca-root-cert"}},
                    {"name": "token", "projected": {"sources": [{"serviceAccountToken":
                        {"audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}},
                ],
            },
        });
        self.apply(&serde_json::to_string(&pod)?)
    }

    /// A command run as a process of pod `namespace/name` (its cgroup, then its
    /// network namespace): `kubectl exec` for the local cluster.
    pub fn exec(&self, namespace: &str, name: &str, args: &[&str]) -> Result<std::process::Output> {
        let (uid, node) = self.pod_on_node(namespace, name, "metadata.uid")?;
        let (uid, node) = (uid.as_str(), node.as_str());
        let cgroup = self
            .cgroup_root
            .join(format!("cairn-node/{node}/{uid}/cgroup.procs"));
        let netns = format!("/var/run/netns/{}", pod_netns(node, uid));
        let script = format!(
            "echo $$ > {} && exec nsenter --net={netns} -- \"$@\"",
            cgroup.display()
        );
        Command::new("sh")
            .args(["-c", &script, "sh"])
            .args(args)
            .output()
            .context("exec in pod")
    }

    /// A field of pod `namespace/name` (a jsonpath below the pod, e.g.
    /// `status.podIP`) and the node it is bound to.
    pub fn pod_on_node(
        &self,
        namespace: &str,
        name: &str,
        field: &str,
    ) -> Result<(String, String)> {
        let out = self.kubectl(&[
            "-n",
            namespace,
            "get",
            "pod",
            name,
            "-o",
            &format!("jsonpath={{.{field}}} {{.spec.nodeName}}"),
        ])?;
        let (value, node) = out
            .split_once(' ')
            .filter(|(v, n)| !v.is_empty() && !n.is_empty())
            .with_context(|| format!("pod {namespace}/{name} has no {field} or node yet"))?;
        Ok((value.to_owned(), node.to_owned()))
    }

    /// Runs the CLI (`cairn ... --kube`) against this cluster.
    pub fn cairn(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("cairn"))
            .args(args)
            .arg("--kube")
            .arg("--kubeconfig")
            .arg(&self.cluster.kubeconfig)
            .output()
            .expect("cairn")
    }

    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The last lines of every component's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut names = vec!["controller.log".to_owned()];
        for n in &self.nodes {
            names.push(format!("agent-{}.log", n.name));
            names.push(format!(
                "logs-{}/cairn-system_ztunnel-{}.log",
                n.name, n.name
            ));
        }
        for name in names {
            out += &format!("--- {name} ---\n{}\n", self.log_tail(&name));
        }
        out
    }
}

impl Drop for KubeLab {
    fn drop(&mut self) {
        self.kill_controller();
        // SIGTERM: each agent removes its pods (CNI DEL, namespaces, cgroups).
        for node in &mut self.nodes {
            if let Some(agent) = &node.agent {
                let _ = Command::new("kill").arg(agent.id().to_string()).status();
            }
        }
        let pins: Vec<PathBuf> = self.nodes.iter().map(|n| self.pin_root(&n.name)).collect();
        for (node, pins) in self.nodes.iter_mut().zip(pins) {
            if let Some(mut agent) = node.agent.take() {
                let deadline = Instant::now() + Duration::from_secs(10);
                while matches!(agent.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = agent.kill();
                let _ = agent.wait();
            }
            let _ = Command::new("umount")
                .arg(pins)
                .stderr(Stdio::null())
                .status();
        }
        sweep(&self.prefix);
    }
}
