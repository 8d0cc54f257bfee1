//! `cargo xtask e2e --kind`: the e2e scenarios on a kind cluster, for machines with
//! a Docker engine (Cairn's CI machines have none: there the same scenarios run on
//! the local cluster, `cargo xtask e2e`).
//!
//! 1. renders what will be installed (`kubectl kustomize deploy/`) into
//!    `target/kind/cairn.yaml` — this step needs no Docker;
//! 2. checks for a running Docker engine, and says so clearly when there is none;
//! 3. installs `kind` with Go (`go install sigs.k8s.io/kind@KIND`) when missing;
//! 4. creates cluster `cairn-e2e` (one control plane, two workers:
//!    `tests/kind/cluster.yaml`);
//! 5. builds the images (`deploy/docker/Dockerfile`, one per binary, tagged as
//!    `deploy/kustomization.yaml` names them, plus the test app `cairn/app:e2e`)
//!    and loads them into the nodes;
//! 6. installs Gateway API's CRDs and `kubectl apply -k deploy/`, waits for the
//!    controller and the ztunnel DaemonSet;
//! 7. runs `tests/e2e.rs` against it (`CAIRN_E2E_KIND=1`);
//! 8. deletes the cluster, whatever happened (`--keep` keeps it).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The kind release installed when `kind` is not on the PATH.
const KIND: &str = "v0.30.0";
const CLUSTER: &str = "cairn-e2e";

/// (image tag, binary): the images `deploy/` and the e2e suite run.
const IMAGES: &[(&str, &str)] = &[
    ("ghcr.io/cairn-mesh/controller:0.1.0", "controller"),
    ("ghcr.io/cairn-mesh/ztunnel:0.1.0", "ztunnel"),
    ("ghcr.io/cairn-mesh/cni:0.1.0", "cairn-cni"),
    ("ghcr.io/cairn-mesh/waypoint:0.1.0", "waypoint"),
    ("cairn/app:e2e", "cairn-demo"),
];

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("==> {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed ({status})", cmd.get_program());
    }
    Ok(())
}

/// Renders `deploy/` with the local cluster's kubectl; the file written.
pub fn render(root: &Path, kubectl: &Path) -> Result<PathBuf> {
    let out = Command::new(kubectl)
        .args(["kustomize", "deploy"])
        .current_dir(root)
        .output()
        .context("running kubectl kustomize")?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize deploy/ failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = root.join("target/kind");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("cairn.yaml");
    std::fs::write(&file, &out.stdout)?;
    let objects = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("kind: "))
        .count();
    eprintln!(
        "==> rendered deploy/ ({objects} objects) into {}",
        file.display()
    );
    Ok(file)
}

/// Why kind cannot run here, if it cannot: no Docker client, or no engine.
pub fn docker_missing() -> Option<String> {
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
    {
        Err(e) => Some(format!("no `docker` command ({e})")),
        Ok(out) if !out.status.success() => Some(format!(
            "`docker info` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => None,
    }
}

fn kind_binary() -> Result<PathBuf> {
    if Command::new("kind")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok("kind".into());
    }
    let gobin = crate::k8s::bin_dir().join("../kind-bin");
    std::fs::create_dir_all(&gobin)?;
    let gobin = gobin.canonicalize()?;
    let kind = gobin.join("kind");
    if !kind.is_file() {
        run(Command::new("go")
            .args(["install", &format!("sigs.k8s.io/kind@{KIND}")])
            .env("GOBIN", &gobin))?;
    }
    Ok(kind)
}

pub fn e2e(root: &Path, kubectl: &Path, keep: bool) -> Result<()> {
    render(root, kubectl)?;
    if let Some(why) = docker_missing() {
        bail!(
            "the kind suite needs a running Docker engine ({why})\n\
             Rendered manifests are in target/kind/cairn.yaml. On machines without Docker \
             (Cairn's CI) the same scenarios run on the local cluster: cargo xtask e2e"
        );
    }
    let kind = kind_binary()?;
    let kubeconfig = root.join("target/kind/kubeconfig");
    let _ = Command::new(&kind)
        .args(["delete", "cluster", "--name", CLUSTER])
        .status();
    run(Command::new(&kind)
        .args(["create", "cluster", "--name", CLUSTER, "--config"])
        .arg(root.join("tests/kind/cluster.yaml"))
        .arg("--kubeconfig")
        .arg(&kubeconfig))?;
    let result = install_and_test(root, &kind, kubectl, &kubeconfig);
    if keep {
        eprintln!(
            "==> kept cluster {CLUSTER} (KUBECONFIG={})",
            kubeconfig.display()
        );
    } else {
        let _ = run(Command::new(&kind).args(["delete", "cluster", "--name", CLUSTER]));
    }
    result
}

fn install_and_test(root: &Path, kind: &Path, kubectl: &Path, kubeconfig: &Path) -> Result<()> {
    for (tag, bin) in IMAGES {
        run(Command::new("docker")
            .args(["build", "-f", "deploy/docker/Dockerfile", "--build-arg"])
            .arg(format!("BIN={bin}"))
            .args(["-t", tag, "."])
            .current_dir(root))?;
        run(Command::new(kind).args(["load", "docker-image", tag, "--name", CLUSTER]))?;
    }
    let k = |args: &[&str]| {
        run(Command::new(kubectl)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .current_dir(root))
    };
    k(&["apply", "-f", "deploy/crds/gateway-api.yaml"])?;
    k(&["apply", "-k", "deploy"])?;
    k(&[
        "-n",
        "cairn-system",
        "rollout",
        "status",
        "deployment/cairn-controller",
        "--timeout=300s",
    ])?;
    k(&[
        "-n",
        "cairn-system",
        "rollout",
        "status",
        "daemonset/ztunnel",
        "--timeout=300s",
    ])?;
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "test",
                "-p",
                "cairn-tests",
                "--test",
                "e2e",
                "--",
                "--nocapture",
            ])
            .env("CAIRN_E2E_KIND", "1")
            .env("KUBECONFIG", kubeconfig)
            .env("CAIRN_KUBECTL", kubectl)
            .current_dir(root),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_owned()
    }

    /// Every image `deploy/` runs, and the controller's default waypoint image, is
    /// one the kind suite builds and loads (a renamed image would leave kind pods in
    /// ImagePullBackOff).
    #[test]
    fn the_kind_suite_builds_every_image_deploy_runs() {
        let kustomization = std::fs::read_to_string(root().join("deploy/kustomization.yaml"))
            .expect("kustomization");
        let mut names = Vec::new();
        let mut tags = Vec::new();
        for line in kustomization.lines().map(str::trim) {
            if let Some(n) = line.strip_prefix("newName:") {
                names.push(n.trim().to_owned());
            }
            if let Some(t) = line.strip_prefix("newTag:") {
                tags.push(t.trim().to_owned());
            }
        }
        assert_eq!(names.len(), tags.len());
        assert!(names.len() >= 3, "{kustomization}");
        let built: Vec<&str> = IMAGES.iter().map(|(tag, _)| *tag).collect();
        for (n, t) in names.iter().zip(&tags) {
            let image = format!("{n}:{t}");
            assert!(
                built.contains(&image.as_str()),
                "{image} is not built for kind"
            );
        }
        let controller = std::fs::read_to_string(root().join("controller/controller/src/main.rs"))
            .expect("controller main");
        let waypoint = controller
            .split("default_value = \"")
            .filter_map(|s| s.split('"').next())
            .find(|v| v.contains("/waypoint:"))
            .expect("the controller's default waypoint image");
        assert!(
            built.contains(&waypoint),
            "{waypoint} is not built for kind"
        );
        let cluster =
            std::fs::read_to_string(root().join("tests/kind/cluster.yaml")).expect("kind config");
        assert!(cluster.contains(&format!("name: {CLUSTER}")));
        assert_eq!(
            cluster.matches("role: worker").count(),
            2,
            "the scenarios use two workers"
        );
    }
}
