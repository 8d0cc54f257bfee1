//! `cairn-node`: the local cluster's stand-in for kubelet and the container runtime
//! on one node. It watches the Pods the API server binds to its node, makes each a
//! sandbox (network namespace, veth, address, cgroup, the CNI plugin's ADD), runs
//! the pod's process in it (images are names for our own binaries, given with
//! `--image`), and writes the pod's status back (IP, Running, Ready). A pod being
//! deleted is stopped, torn down, and then removed from the API server, as a
//! kubelet confirms a deletion. See docs/kubernetes.md.
//!
//! Volumes (configMap, secret, emptyDir, projected service-account tokens) are
//! materialised and bound at their mount paths (`volumes.rs`); with
//! `--run-deployments` the agent also makes Deployments' pods (`workloads.rs`).
//!
//! Not a kubelet: no probes (a pod is Ready once its process runs), no restarts,
//! one container per pod. On start it removes what an earlier agent of this node
//! left and makes the node's pods again.

mod pod;
mod volumes;
mod workloads;

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use pod::{Cni, NodeNet, Sandbox};
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "cairn-node",
    about = "kubelet + runtime stand-in for the local cluster"
)]
struct Cli {
    /// Kubeconfig for the API server.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// This node's name: pods with this `spec.nodeName` are ours.
    #[arg(long)]
    node: String,
    /// The node's network namespace (a name under /var/run/netns).
    #[arg(long)]
    node_netns: String,
    /// The node's address; pods route through it.
    #[arg(long)]
    gateway: Ipv4Addr,
    /// Pod addresses, a /24 (the node's podCIDR in a cluster).
    #[arg(long, value_parser = parse_cidr)]
    pod_cidr: (Ipv4Addr, u8),
    /// Where pods' logs go.
    #[arg(long)]
    dir: PathBuf,
    /// `IMAGE=COMMAND ARGS...`: what to run for a container of that image (the
    /// container's own `args` are appended). Repeat for each image.
    #[arg(long = "image", value_parser = parse_image)]
    images: Vec<(String, Vec<String>)>,
    /// The CNI plugin to call for each pod...
    #[arg(long, requires = "cni_config")]
    cni_plugin: Option<PathBuf>,
    /// ...with this network configuration (JSON).
    #[arg(long, requires = "cni_plugin")]
    cni_config: Option<PathBuf>,
    /// Also stand in for the Deployment controller and the scheduler: make the
    /// pods of every Deployment, bound to this node (one agent of the cluster).
    #[arg(long)]
    run_deployments: bool,
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, len) = s.split_once('/').ok_or("expected ADDRESS/24")?;
    let ip: Ipv4Addr = ip.parse().map_err(|e| format!("{ip}: {e}"))?;
    let len: u8 = len.parse().map_err(|e| format!("{len}: {e}"))?;
    if len != 24 {
        return Err(format!("pod ranges are /24 here, not /{len}"));
    }
    Ok((ip, len))
}

fn parse_image(s: &str) -> Result<(String, Vec<String>), String> {
    let (image, command) = s.split_once('=').ok_or("expected IMAGE=COMMAND")?;
    let argv: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
    if image.is_empty() || argv.is_empty() {
        return Err(format!("{s}: expected IMAGE=COMMAND"));
    }
    Ok((image.to_owned(), argv))
}

/// A pod to start again: its latest state, how many attempts failed, and when.
struct Retry {
    pod: Pod,
    failures: u32,
    at: tokio::time::Instant,
}

/// Waits between attempts to start a pod: 1 s, doubling, at most 30 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

/// A container's environment: (name, value).
type Env = Vec<(String, String)>;

struct Agent {
    cli: Cli,
    node: NodeNet,
    cni: Option<Cni>,
    images: HashMap<String, Vec<String>>,
    pods: Api<Pod>,
    /// Running pods by uid.
    running: HashMap<String, Sandbox>,
    /// Pods that failed to start, by uid: tried again at their time.
    retries: HashMap<String, Retry>,
}

fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("?")
    )
}

impl Agent {
    fn next_address(&self) -> Result<Ipv4Addr> {
        let used: HashSet<Ipv4Addr> = self.running.values().map(|s| s.ip).collect();
        let [a, b, c, _] = self.cli.pod_cidr.0.octets();
        (2..255)
            .map(|d| Ipv4Addr::new(a, b, c, d))
            .find(|ip| !used.contains(ip) && *ip != self.node.gateway)
            .context("the node's pod range is full")
    }

    /// The command for the pod's (first) container, and its environment.
    fn command(&self, pod: &Pod) -> Result<(Vec<String>, Env)> {
        let spec = pod.spec.as_ref().context("pod without a spec")?;
        let container = spec.containers.first().context("pod without containers")?;
        let image = container.image.as_deref().unwrap_or_default();
        let Some(base) = self.images.get(image) else {
            bail!("image {image:?} is not one this node runs (--image)");
        };
        let mut argv = base.clone();
        argv.extend(container.args.iter().flatten().cloned());
        let env = container
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect();
        Ok((argv, env))
    }

    async fn start(&mut self, pod: &Pod) -> Result<()> {
        let uid = pod.metadata.uid.clone().context("pod without a uid")?;
        let (argv, env) = self.command(pod)?;
        let volumes_dir = self.volumes_dir(&uid);
        let mounts =
            volumes::materialise(&self.pods.clone().into_client(), pod, &volumes_dir).await?;
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let mut sandbox = if host_network {
            Sandbox::create_host(&self.node, (&namespace, &name, &uid))?
        } else {
            let address = self.next_address()?;
            Sandbox::create(
                &self.node,
                &self.cli.node,
                (&namespace, &name, &uid),
                address,
                self.cni.as_ref(),
            )?
        };
        let address = sandbox.ip;
        let log = self.cli.dir.join(format!("{namespace}_{name}.log"));
        if let Err(e) = sandbox.start(&argv, &env, &mounts, &log) {
            sandbox.remove(&self.node, self.cni.as_ref());
            return Err(e);
        }
        info!(pod = %key(pod), ip = %address, netns = %sandbox.netns, command = %argv.join(" "), "pod running");
        self.running.insert(uid, sandbox);
        let now = now();
        // One status per container, as kubelet writes (kubectl's READY column).
        let containers: Vec<serde_json::Value> = pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .map(|c| {
                serde_json::json!({
                    "name": c.name, "image": c.image, "imageID": "", "ready": true,
                    "restartCount": 0, "started": true,
                    "state": {"running": {"startedAt": now}},
                })
            })
            .collect();
        let status = serde_json::json!({"status": {
            "containerStatuses": containers,
            "phase": "Running",
            "podIP": address.to_string(),
            "podIPs": [{"ip": address.to_string()}],
            "hostIP": self.node.gateway.to_string(),
            "startTime": now,
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
            ],
        }});
        let api = self.api(pod);
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .context("writing the pod's status")?;
        Ok(())
    }

    fn api(&self, pod: &Pod) -> Api<Pod> {
        match pod.metadata.namespace.as_deref() {
            Some(ns) => Api::namespaced(self.pods.clone().into_client(), ns),
            None => self.pods.clone(),
        }
    }

    fn stop(&mut self, uid: &str, why: &str) {
        if let Some(mut sandbox) = self.running.remove(uid) {
            sandbox.remove(&self.node, self.cni.as_ref());
            info!(netns = %sandbox.netns, ip = %sandbox.ip, why, "pod stopped and removed");
        }
        let _ = std::fs::remove_dir_all(self.volumes_dir(uid));
    }

    /// Where a pod's volumes are materialised.
    fn volumes_dir(&self, uid: &str) -> PathBuf {
        self.cli.dir.join("volumes").join(uid)
    }

    /// Brings one pod in line: started if it should run, torn down (and its
    /// deletion confirmed) if it is being deleted.
    async fn reconcile(&mut self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            self.retries.remove(&uid);
            self.stop(&uid, "deleted");
            // As kubelet does: the pod is gone from the node, so it may go.
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            let name = pod.metadata.name.clone().unwrap_or_default();
            match self.api(pod).delete(&name, &params).await {
                Ok(_) => info!(pod = %key(pod), "deletion confirmed"),
                // Already confirmed (the watch shows a pod's last states again).
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => warn!(pod = %key(pod), error = %e, "could not confirm the deletion"),
            }
            return;
        }
        let finished = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if self.running.contains_key(&uid) || finished {
            self.retries.remove(&uid);
            return;
        }
        match self.start(pod).await {
            Ok(()) => {
                self.retries.remove(&uid);
            }
            Err(e) => {
                self.stop(&uid, "failed to start");
                let failures = self.retries.get(&uid).map_or(0, |r| r.failures) + 1;
                let wait = backoff(failures);
                warn!(pod = %key(pod), error = format!("{e:#}"), failures, retry_in = ?wait, "pod not started");
                self.retries.insert(
                    uid,
                    Retry {
                        pod: pod.clone(),
                        failures,
                        at: tokio::time::Instant::now() + wait,
                    },
                );
            }
        }
    }

    /// Tries again the pods whose retry time came.
    async fn retry_due(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<Pod> = self
            .retries
            .values()
            .filter(|r| r.at <= now)
            .map(|r| r.pod.clone())
            .collect();
        for pod in due {
            self.reconcile(&pod).await;
        }
    }

    /// Pods whose process ended: Succeeded or Failed, no longer Ready.
    async fn reap(&mut self) {
        let mut ended = Vec::new();
        for (uid, sandbox) in &mut self.running {
            if let Some(p) = sandbox.process.as_mut()
                && let Ok(Some(status)) = p.try_wait()
            {
                ended.push((uid.clone(), status.success()));
            }
        }
        for (uid, ok) in ended {
            let phase = if ok { "Succeeded" } else { "Failed" };
            let Ok(list) = self.pods.list(&Default::default()).await else {
                continue;
            };
            if let Some(pod) = list
                .items
                .iter()
                .find(|p| p.metadata.uid.as_deref() == Some(&uid))
            {
                warn!(pod = %key(pod), phase, "pod's process ended");
                let now = now();
                let status = serde_json::json!({"status": {"phase": phase, "conditions": [
                    {"type": "Ready", "status": "False", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "False", "lastTransitionTime": now},
                ]}});
                let name = pod.metadata.name.clone().unwrap_or_default();
                if let Err(e) = self
                    .api(pod)
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                {
                    warn!(pod = %key(pod), error = %e, "could not write the pod's status");
                }
            }
            self.stop(&uid, phase);
        }
    }
}

/// RFC 3339 UTC, seconds precision (what the API server stores).
fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Removes what an earlier agent of this node left (it may have been killed): the
/// pods' processes (their cgroups killed) and cgroups, and their namespaces (named
/// `<node>-...`).
fn sweep(node: &str, cgroups: &std::path::Path) {
    if cgroups.exists() {
        // cgroup.kill on the node's cgroup kills every process below it.
        let _ = std::fs::write(cgroups.join("cgroup.kill"), "1");
        for entry in std::fs::read_dir(cgroups).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                remove_cgroup(&entry.path());
                info!(cgroup = %entry.path().display(), "removed an earlier agent's pod cgroup");
            }
        }
    }
    sweep_namespaces(node);
}

/// Removes an emptied cgroup, waiting (up to a second) for its last process to go.
pub fn remove_cgroup(path: &std::path::Path) {
    for _ in 0..50 {
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    warn!(cgroup = %path.display(), "cgroup still busy; left");
}

fn sweep_namespaces(node: &str) {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    let prefix = format!("{node}-");
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .status();
            info!(netns = %name, "removed an earlier agent's pod namespace");
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let root = cairn_capture::cgroup2_mount().context("no cgroup v2 mount")?;
    let cgroup_parent_rel = format!("cairn-node/{}", cli.node);
    let node = NodeNet {
        netns: cli.node_netns.clone(),
        gateway: cli.gateway,
        cgroup_parent: root.join(&cgroup_parent_rel),
        cgroup_parent_rel,
    };
    std::fs::create_dir_all(&node.cgroup_parent)
        .with_context(|| format!("creating {}", node.cgroup_parent.display()))?;
    std::fs::create_dir_all(&cli.dir).with_context(|| format!("creating {}", cli.dir.display()))?;
    let cni = match (&cli.cni_plugin, &cli.cni_config) {
        (Some(plugin), Some(config)) => Some(Cni {
            plugin: plugin.clone(),
            config: serde_json::from_slice(
                &std::fs::read(config).with_context(|| format!("reading {}", config.display()))?,
            )
            .with_context(|| format!("{} is not JSON", config.display()))?,
        }),
        _ => None,
    };
    sweep(&cli.node, &node.cgroup_parent);
    let kubeconfig = Kubeconfig::read_from(&cli.kubeconfig)
        .with_context(|| format!("reading {}", cli.kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("kubeconfig")?;
    let client = Client::try_from(config).context("API client")?;
    if cli.run_deployments {
        tokio::spawn(workloads::run(
            client.clone(),
            cli.node.clone(),
            Duration::from_secs(1),
        ));
    }
    let pods: Api<Pod> = Api::all(client);
    let selector = format!("spec.nodeName={}", cli.node);
    let images = cli.images.iter().cloned().collect();
    let mut agent = Agent {
        node,
        cni,
        images,
        pods: pods.clone(),
        running: HashMap::new(),
        retries: HashMap::new(),
        cli,
    };
    info!(node = %agent.cli.node, "watching pods bound to this node");
    let mut events = std::pin::pin!(
        watcher(pods, watcher::Config::default().fields(&selector)).default_backoff()
    );
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut seen = HashSet::new();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => {
                    if let Some(uid) = &pod.metadata.uid {
                        seen.insert(uid.clone());
                    }
                    agent.reconcile(&pod).await;
                }
                Some(Ok(watcher::Event::Delete(pod))) => {
                    if let Some(uid) = &pod.metadata.uid {
                        agent.retries.remove(uid);
                        agent.stop(uid, "deleted");
                    }
                }
                Some(Ok(watcher::Event::Init)) => seen.clear(),
                // A relist: pods that went while we were not watching are gone.
                Some(Ok(watcher::Event::InitDone)) => {
                    let gone: Vec<String> = agent.running.keys().filter(|u| !seen.contains(*u)).cloned().collect();
                    for uid in gone {
                        agent.stop(&uid, "deleted");
                    }
                    agent.retries.retain(|uid, _| seen.contains(uid));
                }
                Some(Err(e)) => warn!(error = %e, "pod watch failed; retrying"),
                None => bail!("the pod watch ended"),
            },
            _ = tick.tick() => {
                agent.reap().await;
                agent.retry_due().await;
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    let uids: Vec<String> = agent.running.keys().cloned().collect();
    for uid in uids {
        agent.stop(&uid, "agent stopping");
    }
    // The node's cgroup and, if no other node's is left, their common parent.
    let _ = std::fs::remove_dir(&agent.node.cgroup_parent);
    if let Some(parent) = agent.node.cgroup_parent.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    info!("stopped; every pod removed");
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "cairn-node failed");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_and_ranges_parse_or_say_why_not() {
        assert_eq!(
            parse_image("cairn/http=python3 -m http.server 8080").expect("image"),
            (
                "cairn/http".to_owned(),
                vec![
                    "python3".into(),
                    "-m".into(),
                    "http.server".into(),
                    "8080".into()
                ]
            )
        );
        assert!(parse_image("cairn/http=").is_err());
        assert!(parse_image("no-command").is_err());
        assert_eq!(
            parse_cidr("10.78.1.0/24").expect("cidr"),
            (Ipv4Addr::new(10, 78, 1, 0), 24)
        );
        assert!(parse_cidr("10.78.0.0/16").is_err());
        assert!(parse_cidr("10.78.1.0").is_err());
    }

    #[test]
    fn retries_back_off_to_thirty_seconds() {
        let waits: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
        assert!(t.starts_with("20"), "{t}");
    }

    #[test]
    fn sandbox_names_fit_linux_limits() {
        let (netns, host, peer) = Sandbox::names("node-a", "5f1c7a52-3b0e-4d6f-9a1b-2c3d4e5f6a7b");
        assert_eq!(netns, "node-a-5f1c7a523b");
        // Interface names: at most 15 bytes.
        assert!(host.len() <= 15 && peer.len() <= 15, "{host} {peer}");
        assert_ne!(host, peer);
    }
}
