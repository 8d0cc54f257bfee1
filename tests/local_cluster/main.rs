//! `cairn-cluster` (`cargo xtask cluster up|down`): the local cluster of the e2e
//! suite (`kube_lab`) for a person to use: a real kube-apiserver and etcd with
//! `deploy/` applied, the controller in Kubernetes mode, nodes as network
//! namespaces running their agents, CNI and ztunnel pods. `up` runs in the
//! foreground and removes everything on Ctrl-C or SIGTERM; `down` stops a running
//! one and removes what a crashed one left.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result, bail};
use cairn_tests::kube_lab::{self, KubeLab, Options};
use clap::{Parser, Subcommand};

/// Names of this tool's namespaces, links and nodes start with it.
const PREFIX: &str = "cairn";
const DEFAULT_DIR: &str = "/run/cairn-cluster";

#[derive(Parser)]
#[command(
    name = "cairn-cluster",
    about = "The local Kubernetes cluster of Cairn's e2e suite"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring the cluster up and keep it until Ctrl-C.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Stop a running cluster and remove what any left behind.
    Down {
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Up { nodes, dir } => up(nodes, &dir),
        Cmd::Down { dir } => down(&dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pid_file(dir: &Path) -> PathBuf {
    dir.join("cairn-cluster.pid")
}

fn running(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(dir))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

fn up(nodes: usize, dir: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the local cluster needs root (network namespaces, cgroups, eBPF)");
    }
    if let Some(pid) = running(dir) {
        bail!("a local cluster already runs (pid {pid}): `cargo xtask cluster down` first");
    }
    // What a crashed one left (its processes died with it; namespaces did not).
    remove(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(pid_file(dir), std::process::id().to_string())?;
    eprintln!("==> starting etcd, kube-apiserver, {nodes} nodes, the controller (about 20 s)");
    let lab = KubeLab::up(
        dir,
        &Options {
            prefix: PREFIX.into(),
            nodes,
        },
    )?;
    let kubectl = cairn_tests::cluster::bin_dir()
        .map(|d| d.join("kubectl").display().to_string())
        .unwrap_or_else(|| "kubectl".into());
    let kubeconfig = lab.kubeconfig().display();
    println!(
        "\nThe local cluster is up: {nodes} nodes ({}).",
        lab.nodes
            .iter()
            .map(|n| format!("{} at {}", n.name, n.ip))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("\n  export KUBECONFIG={kubeconfig}");
    println!("  {kubectl} get pods -A");
    println!(
        "  cargo run -q -p cairn-controller --bin cairn -- waypoint apply --kube -n NS --enroll-namespace --wait"
    );
    println!(
        "\nPods run image {} (args: app reviews --version v1 | app ratings | app load ...),",
        cairn_tests::backend::APP_IMAGE
    );
    println!(
        "bound to a node with spec.nodeName. Logs: {}",
        dir.display()
    );
    println!("Ctrl-C removes everything (after a crash: cargo xtask cluster down).");
    wait_for_signal()?;
    eprintln!("==> removing the cluster");
    drop(lab);
    remove(dir);
    Ok(())
}

fn wait_for_signal() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    })?;
    Ok(())
}

fn down(dir: &Path) -> Result<()> {
    if let Some(pid) = running(dir) {
        eprintln!("==> stopping the running cluster (pid {pid})");
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
        for _ in 0..300 {
            if running(dir).is_none() || !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    remove(dir);
    eprintln!("==> nothing of the local cluster is left");
    Ok(())
}

/// Everything a cluster under `dir` may have left: namespaces, the host link,
/// cgroups (and their processes), bpffs mounts, the directory.
fn remove(dir: &Path) {
    kill_processes_of(dir);
    kube_lab::sweep(PREFIX);
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
        let prefix = dir.display().to_string();
        for line in mounts.lines() {
            if let Some(target) = line.split_whitespace().nth(1)
                && target.starts_with(&prefix)
            {
                let _ = std::process::Command::new("umount").arg(target).status();
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// SIGKILLs the processes whose command line names `dir` (etcd, kube-apiserver, the
/// controller, node agents of a crashed `up`), except this one.
fn kill_processes_of(dir: &Path) {
    let me = std::process::id();
    let needle = dir.display().to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
}
