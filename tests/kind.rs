//! The e2e scenarios' kind backend: a kind cluster that `cargo xtask e2e --kind`
//! created, with Cairn installed from `deploy/` and the images loaded
//! (`xtask/src/kind.rs`). Everything goes through `kubectl` as a user would:
//! `kubectl exec` into pods, the API server's pod proxy for admin pages, the
//! DaemonSet and the Deployment bringing pods back.
//!
//! It cannot run on machines without a container engine (Cairn's CI): there the
//! same scenarios run on the local cluster ([`crate::kube_lab`]).

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::backend::Backend;

pub struct KindCluster {
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    cairn: PathBuf,
}

impl KindCluster {
    /// Attaches to the cluster `cargo xtask e2e --kind` made: `KUBECONFIG`, the
    /// `kubectl` in `CAIRN_KUBECTL` (else on the PATH) and `CAIRN_CLI` (the `cairn`
    /// binary).
    pub fn create() -> Result<KindCluster> {
        let kubeconfig =
            PathBuf::from(std::env::var_os("KUBECONFIG").context(
                "KUBECONFIG is not set: run the kind suite with `cargo xtask e2e --kind`",
            )?);
        let kubectl = std::env::var_os("CAIRN_KUBECTL")
            .map(PathBuf::from)
            .unwrap_or_else(|| "kubectl".into());
        let cairn = std::env::var_os("CAIRN_CLI")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::lab::binary("cairn"));
        let cluster = KindCluster {
            kubeconfig,
            kubectl,
            cairn,
        };
        cluster
            .kubectl(&["get", "--raw", "/readyz"])
            .context("the kind cluster's API server does not answer")?;
        for i in 0..cluster.node_names().len() {
            cluster.wait_ztunnel_connected(i)?;
        }
        Ok(cluster)
    }

    fn wait_rollout(&self, what: &str) -> Result<()> {
        self.kubectl(&[
            "-n",
            "cairn-system",
            "rollout",
            "status",
            what,
            "--timeout=180s",
        ])
        .map(drop)
    }
}

impl Backend for KindCluster {
    fn describe(&self) -> &'static str {
        "kind"
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.kubectl.display()))?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn apply(&self, yaml: &str) -> Result<()> {
        let file = tempfile::NamedTempFile::new().context("temporary manifest")?;
        std::fs::write(file.path(), yaml).context("writing the manifest")?;
        self.kubectl(&["apply", "-f", &file.path().display().to_string()])
            .map(drop)
    }

    fn node_names(&self) -> Vec<String> {
        self.kubectl(&[
            "get",
            "nodes",
            "-l",
            "!node-role.kubernetes.io/control-plane",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
    }

    fn exec(&self, namespace: &str, pod: &str, args: &[&str]) -> Result<Output> {
        Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["-n", namespace, "exec", pod, "--"])
            .args(args)
            .output()
            .context("kubectl exec")
    }

    fn app_command(&self) -> Vec<String> {
        // The app image's binary (deploy/docker/Dockerfile, BIN=cairn-demo).
        vec!["/usr/local/bin/cairn-demo".into()]
    }

    fn admin_get(&self, namespace: &str, pod: &str, path: &str) -> Result<String> {
        self.kubectl(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/{namespace}/pods/{pod}:15020/proxy{path}"),
        ])
    }

    fn ztunnel_pod(&self, i: usize) -> Result<String> {
        let node = self
            .node_names()
            .get(i)
            .cloned()
            .with_context(|| format!("no node {i}"))?;
        let name = self.kubectl(&[
            "-n",
            "cairn-system",
            "get",
            "pods",
            "-l",
            "app=ztunnel",
            "--field-selector",
            &format!("spec.nodeName={node},status.phase=Running"),
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])?;
        if name.is_empty() {
            bail!("no running ztunnel pod on {node}");
        }
        Ok(name)
    }

    fn delete_ztunnel(&self, i: usize) -> Result<()> {
        let pod = self.ztunnel_pod(i)?;
        self.kubectl(&["-n", "cairn-system", "delete", "pod", &pod, "--wait=true"])
            .map(drop)
    }

    fn restore_ztunnel(&self, i: usize) -> Result<()> {
        // The DaemonSet makes the pod again by itself.
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.ztunnel_pod(i).is_err() {
            if Instant::now() > deadline {
                bail!("the DaemonSet did not bring node {i}'s ztunnel back within 120 s");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(())
    }

    fn stop_controller(&mut self) -> Result<()> {
        self.kubectl(&[
            "-n",
            "cairn-system",
            "scale",
            "deployment/cairn-controller",
            "--replicas=0",
        ])?;
        self.kubectl(&[
            "-n",
            "cairn-system",
            "delete",
            "pods",
            "-l",
            "app=cairn-controller",
            "--grace-period=0",
            "--force",
            "--wait=true",
        ])
        .map(drop)
    }

    fn start_controller(&mut self) -> Result<()> {
        self.kubectl(&[
            "-n",
            "cairn-system",
            "scale",
            "deployment/cairn-controller",
            "--replicas=2",
        ])?;
        self.wait_rollout("deployment/cairn-controller")
    }

    fn restart_apiserver(&mut self) -> Result<bool> {
        // kind's API server is a static pod in the control-plane container; the
        // local cluster covers this scenario.
        Ok(false)
    }

    fn cairn(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.cairn)
            .args(args)
            .arg("--kube")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .output()
            .with_context(|| format!("running {}", self.cairn.display()))
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for (what, selector) in [
            ("controller", "app=cairn-controller"),
            ("ztunnel", "app=ztunnel"),
        ] {
            let text = self
                .kubectl(&[
                    "-n",
                    "cairn-system",
                    "logs",
                    "-l",
                    selector,
                    "--all-containers",
                    "--tail=40",
                    "--prefix",
                ])
                .unwrap_or_else(|e| format!("{e:#}"));
            out += &format!("--- {what} ---\n{text}\n");
        }
        out
    }
}
