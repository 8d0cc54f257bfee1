//! One pod on this node, as a kubelet + container runtime would make it: a network
//! namespace with `eth0` (a veth to the node's namespace), an address from the
//! node's range and routes, a cgroup, the CNI plugin's ADD, and the container's
//! process inside all of that. Undone in reverse by [`Sandbox::remove`].

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// What the agent needs to know of the node to place a pod on it.
pub struct NodeNet {
    /// The node's network namespace (a name under /var/run/netns).
    pub netns: String,
    /// The node's address: pods route everything through it.
    pub gateway: Ipv4Addr,
    /// The cgroup v2 directory pods' cgroups go under.
    pub cgroup_parent: PathBuf,
    /// `cgroup_parent` relative to the cgroup v2 mount (what CNI's cgroupPath is).
    pub cgroup_parent_rel: String,
}

/// The CNI plugin to call for each pod, and its network configuration (JSON).
pub struct Cni {
    pub plugin: PathBuf,
    pub config: serde_json::Value,
}

pub struct Sandbox {
    pub netns: String,
    pub ip: Ipv4Addr,
    pub cgroup: PathBuf,
    cgroup_rel: String,
    host_veth: String,
    /// (namespace, name, uid): the CNI arguments.
    pod: (String, String, String),
    /// `hostNetwork: true`: the pod runs in the node's own namespace (no veth, no
    /// CNI), as kubelet runs a DaemonSet like ztunnel.
    host_network: bool,
    pub process: Option<Child>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Sandbox {
    /// Names derive from the pod's uid: the same pod always gets the same ones, so
    /// a restarted agent finds what it made.
    /// The network namespace is [`cairn_tests::kube_lab::pod_netns`] (the suite
    /// enters pods by it).
    pub fn names(node: &str, uid: &str) -> (String, String, String) {
        let short: String = uid.chars().filter(|c| *c != '-').take(10).collect();
        (
            cairn_tests::kube_lab::pod_netns(node, uid),
            format!("cv{short}"),
            format!("cp{short}"),
        )
    }

    /// Namespace, veth, address, routes and cgroup; then the CNI plugin's ADD.
    pub fn create(
        node: &NodeNet,
        node_name: &str,
        pod: (&str, &str, &str),
        address: Ipv4Addr,
        cni: Option<&Cni>,
    ) -> Result<Sandbox> {
        let (netns, host, peer) = Sandbox::names(node_name, pod.2);
        let cgroup_rel = format!("{}/{}", node.cgroup_parent_rel, pod.2);
        let mut sandbox = Sandbox {
            netns,
            ip: address,
            cgroup: node.cgroup_parent.join(pod.2),
            cgroup_rel,
            host_veth: host,
            pod: (pod.0.to_owned(), pod.1.to_owned(), pod.2.to_owned()),
            host_network: false,
            process: None,
        };
        // Half-made sandboxes are removed: the next attempt starts clean.
        if let Err(e) = sandbox.network(node, &peer) {
            sandbox.remove(node, None);
            return Err(e);
        }
        if let Err(e) = std::fs::create_dir_all(&sandbox.cgroup)
            .with_context(|| format!("creating cgroup {}", sandbox.cgroup.display()))
            .and_then(|()| match cni {
                Some(cni) => sandbox.cni(cni, "ADD"),
                None => Ok(()),
            })
        {
            sandbox.remove(node, None);
            return Err(e);
        }
        Ok(sandbox)
    }

    /// A host-network pod: only its cgroup; it runs in the node's namespace with the
    /// node's address.
    pub fn create_host(node: &NodeNet, pod: (&str, &str, &str)) -> Result<Sandbox> {
        let sandbox = Sandbox {
            netns: node.netns.clone(),
            ip: node.gateway,
            cgroup: node.cgroup_parent.join(pod.2),
            cgroup_rel: format!("{}/{}", node.cgroup_parent_rel, pod.2),
            host_veth: String::new(),
            pod: (pod.0.to_owned(), pod.1.to_owned(), pod.2.to_owned()),
            host_network: true,
            process: None,
        };
        std::fs::create_dir_all(&sandbox.cgroup)
            .with_context(|| format!("creating cgroup {}", sandbox.cgroup.display()))?;
        Ok(sandbox)
    }

    fn network(&self, node: &NodeNet, peer: &str) -> Result<()> {
        let (ns, host, n) = (&self.netns, &self.host_veth, &node.netns);
        let addr = format!("{}/32", self.ip);
        let gw = node.gateway.to_string();
        // A namespace's end goes with it, but the kernel destroys namespaces
        // asynchronously: the node's end of an earlier sandbox of this pod (a
        // crashed agent's) may still be there. Deleting it removes the pair now.
        let _ = ip(&["-n", n, "link", "del", host]);
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", host, "netns", n, "type", "veth", "peer", "name", peer, "netns", ns,
        ])?;
        ip(&["-n", ns, "link", "set", peer, "name", "eth0"])?;
        ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "route", "add", &format!("{gw}/32"), "dev", "eth0"])?;
        ip(&[
            "-n", ns, "route", "add", "default", "via", &gw, "dev", "eth0",
        ])?;
        ip(&["-n", n, "link", "set", host, "up"])?;
        ip(&["-n", n, "route", "add", &addr, "dev", host])?;
        Ok(())
    }

    fn cni(&self, cni: &Cni, command: &str) -> Result<()> {
        use std::io::Write;
        let mut config = cni.config.clone();
        if let Some(c) = config.as_object_mut() {
            c.insert(
                "runtimeConfig".into(),
                serde_json::json!({"cgroupPath": self.cgroup_rel}),
            );
            c.insert(
                "prevResult".into(),
                serde_json::json!({"cniVersion": "1.0.0", "ips": [{"address": format!("{}/32", self.ip)}]}),
            );
        }
        let (namespace, name, uid) = &self.pod;
        // Where the agent runs, as kubelet runs the plugin in the node's own
        // namespace (the plugin talks to the API server from there).
        let mut child = Command::new(&cni.plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", uid)
            .env("CNI_NETNS", format!("/var/run/netns/{}", self.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", cni.plugin.parent().unwrap_or(Path::new("/")))
            .env(
                "CNI_ARGS",
                format!("K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", cni.plugin.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(config.to_string().as_bytes())
                .context("writing the CNI config")?;
        }
        let out = child
            .wait_with_output()
            .context("waiting for the CNI plugin")?;
        if !out.status.success() {
            bail!(
                "CNI {command} failed: {}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let said = String::from_utf8_lossy(&out.stderr);
        tracing::info!(netns = %self.netns, command, plugin = %said.trim(), "CNI done");
        Ok(())
    }

    /// Starts `argv` in the pod: its cgroup first (a shell joins it, then execs),
    /// so the process and everything it starts are the pod's from the first
    /// instruction (capture attaches to the cgroup); then, with volumes, a mount
    /// namespace of its own where they are bound at their paths (slave propagation:
    /// the host's later mounts, such as new network namespaces under
    /// /var/run/netns, still show, as HostToContainer does); then its network
    /// namespace.
    pub fn start(
        &mut self,
        argv: &[String],
        env: &[(String, String)],
        mounts: &[crate::volumes::Mount],
        log: &Path,
    ) -> Result<()> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let procs = self.cgroup.join("cgroup.procs");
        let netns = format!("/var/run/netns/{}", self.netns);
        let mut cmd = Command::new("sh");
        if mounts.is_empty() {
            cmd.arg("-c")
                .arg("echo $$ > \"$0\" && n=\"$1\" && shift && exec nsenter --net=\"$n\" -- \"$@\"")
                .arg(&procs)
                .arg(&netns);
        } else {
            let inner = format!(
                "{}exec nsenter --net=\"$0\" -- \"$@\"",
                crate::volumes::mount_script(mounts)
            );
            cmd.arg("-c")
                .arg("echo $$ > \"$0\" && n=\"$1\" && i=\"$2\" && shift 2 && exec unshare --mount --propagation slave sh -c \"$i\" \"$n\" \"$@\"")
                .arg(&procs)
                .arg(&netns)
                .arg(inner);
        }
        let child = cmd
            .args(argv)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", argv.join(" ")))?;
        self.process = Some(child);
        Ok(())
    }

    /// Stops the process, then CNI DEL, the namespace (its veth goes with it) and
    /// the cgroup. Best effort: what cannot be removed is logged and left.
    pub fn remove(&mut self, node: &NodeNet, cni: Option<&Cni>) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        // Anything the process started is in its cgroup.
        let _ = std::fs::write(self.cgroup.join("cgroup.kill"), "1");
        if self.host_network {
            crate::remove_cgroup(&self.cgroup);
            return;
        }
        if let Some(cni) = cni
            && let Err(e) = self.cni(cni, "DEL")
        {
            tracing::warn!(netns = %self.netns, error = %e, "CNI DEL failed");
        }
        let _ = ip(&["-n", &node.netns, "link", "del", &self.host_veth]);
        if let Err(e) = ip(&["netns", "del", &self.netns]) {
            tracing::debug!(netns = %self.netns, error = %e, "no namespace to remove");
        }
        crate::remove_cgroup(&self.cgroup);
    }
}
