//! What the e2e scenarios (`tests/e2e.rs`) need of a cluster, so one set of scenarios
//! runs on two backends: the local cluster of this machine ([`KubeLab`]: a real API
//! server, network namespaces as nodes and pods) and kind where Docker exists
//! ([`crate::kind::KindCluster`]).

use std::{
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    kube_lab::KubeLab,
    lab::binary,
    pod_lab::{self, sum_metric},
};

/// The test app's image in pod specs (`cairn-demo`, args `app ROLE ...`): the local
/// node agents map it to the built binary; kind loads an image of that name.
pub const APP_IMAGE: &str = "cairn/app:e2e";

pub trait Backend {
    /// Where this backend runs, for messages ("local cluster", "kind").
    fn describe(&self) -> &'static str;
    fn kubectl(&self, args: &[&str]) -> Result<String>;
    /// `kubectl apply` of a manifest given as text.
    fn apply(&self, yaml: &str) -> Result<()>;
    /// The nodes pods may be bound to, in order.
    fn node_names(&self) -> Vec<String>;
    /// A command as a process of pod `namespace/name` (`kubectl exec`).
    fn exec(&self, namespace: &str, pod: &str, args: &[&str]) -> Result<Output>;
    /// The test app's binary inside a pod (`cairn-demo`; its roles are `app ...`).
    fn app_command(&self) -> Vec<String>;
    /// `GET path` on port 15020 of pod `namespace/name`.
    fn admin_get(&self, namespace: &str, pod: &str, path: &str) -> Result<String>;
    /// The ztunnel pod serving node `i`.
    fn ztunnel_pod(&self, i: usize) -> Result<String>;
    /// Removes node `i`'s ztunnel pod and waits until it is gone.
    fn delete_ztunnel(&self, i: usize) -> Result<()>;
    /// Brings node `i`'s ztunnel back (the DaemonSet's job) and waits until its pod
    /// exists.
    fn restore_ztunnel(&self, i: usize) -> Result<()>;
    /// Stops every controller replica (a crash: no graceful stop).
    fn stop_controller(&mut self) -> Result<()>;
    fn start_controller(&mut self) -> Result<()>;
    /// Restarts the API server; `Ok(false)` where the backend cannot.
    fn restart_apiserver(&mut self) -> Result<bool>;
    /// Runs `cairn` against this cluster (`--kube`).
    fn cairn(&self, args: &[&str]) -> Result<Output>;
    /// The components' recent logs, for failure messages.
    fn logs(&self) -> String;

    /// Node `i`'s ztunnel `/metrics` (empty when it does not answer).
    fn metrics(&self, i: usize) -> String {
        self.ztunnel_pod(i)
            .and_then(|pod| self.admin_get("cairn-system", &pod, "/metrics"))
            .unwrap_or_default()
    }

    /// Waits until node `i`'s ztunnel has its xDS stream up.
    fn wait_ztunnel_connected(&self, i: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        while sum_metric(&self.metrics(i), "cairn_xds_connected", &[]) < 1.0 {
            if Instant::now() > deadline {
                bail!(
                    "node {i}'s ztunnel not connected within 90 s\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Waits until pod `namespace/name` is Ready; its IP.
    fn wait_pod(&self, namespace: &str, name: &str) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = self
                .kubectl(&[
                    "-n",
                    namespace,
                    "get",
                    "pod",
                    name,
                    "-o",
                    "jsonpath={.status.podIP} {.status.conditions[?(@.type==\"Ready\")].status}",
                ])
                .unwrap_or_default();
            if let Some(ip) = out.strip_suffix(" True") {
                return Ok(ip.to_owned());
            }
            if Instant::now() > deadline {
                bail!(
                    "pod {namespace}/{name} not Ready within 120 s ({out})\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Backend for KubeLab {
    fn describe(&self) -> &'static str {
        "local cluster"
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        KubeLab::kubectl(self, args)
    }

    fn apply(&self, yaml: &str) -> Result<()> {
        KubeLab::apply(self, yaml)
    }

    fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    fn exec(&self, namespace: &str, pod: &str, args: &[&str]) -> Result<Output> {
        KubeLab::exec(self, namespace, pod, args)
    }

    fn app_command(&self) -> Vec<String> {
        vec![binary("cairn-demo").display().to_string()]
    }

    fn admin_get(&self, namespace: &str, pod: &str, path: &str) -> Result<String> {
        let (ip, node) = self.pod_on_node(namespace, pod, "status.podIP")?;
        let node = self
            .nodes
            .iter()
            .find(|n| n.name == node)
            .with_context(|| format!("no node {node}"))?;
        // From the pod's node: host-network pods listen on the node's address.
        Ok(pod_lab::get_in(
            &node.netns_path(),
            &format!("http://{ip}:15020{path}"),
        )?)
    }

    fn ztunnel_pod(&self, i: usize) -> Result<String> {
        Ok(format!("ztunnel-{}", self.nodes[i].name))
    }

    fn delete_ztunnel(&self, i: usize) -> Result<()> {
        let pod = self.ztunnel_pod(i)?;
        self.kubectl(&[
            "-n",
            "cairn-system",
            "delete",
            "pod",
            &pod,
            "--wait=true",
            "--timeout=60s",
        ])
        .map(drop)
    }

    fn restore_ztunnel(&self, i: usize) -> Result<()> {
        self.create_ztunnel_pod(i)
    }

    fn stop_controller(&mut self) -> Result<()> {
        self.kill_controller();
        Ok(())
    }

    fn start_controller(&mut self) -> Result<()> {
        KubeLab::start_controller(self)
    }

    fn restart_apiserver(&mut self) -> Result<bool> {
        self.cluster.restart_apiserver()?;
        Ok(true)
    }

    fn cairn(&self, args: &[&str]) -> Result<Output> {
        Ok(KubeLab::cairn(self, args))
    }

    fn logs(&self) -> String {
        KubeLab::logs(self)
    }
}
