//! What a `cargo xtask demo` run leaves on the machine, and removing it: network
//! namespaces and cgroups named `cairn-demo-<pid>-...`, the processes in them, the
//! bpffs mounts and files under the demo's directory. Links live only inside the
//! demo's namespaces, so deleting those deletes them.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

/// The demo's namespaces and cgroups start with this.
pub const PREFIX: &str = "cairn-demo-";

/// The default directory: config, CA, pins, pod state, logs, the pid file.
pub const DEFAULT_DIR: &str = "/run/cairn-demo";

/// Names a pod lab with the demo's prefix gives its links (in its namespaces only).
const LINK_PREFIXES: [&str; 3] = ["cna", "cnb", "cph"];

/// The file holding the running demo's pid.
pub fn pid_file(dir: &Path) -> PathBuf {
    dir.join("demo.pid")
}

/// The pid of a live demo recorded in `dir`, if there is one.
pub fn running(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(dir))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let alive = Path::new(&format!("/proc/{pid}")).exists() && pid != std::process::id();
    alive.then_some(pid)
}

fn demo_netns() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect()
}

fn demo_cgroups() -> Vec<PathBuf> {
    let Some(root) = cairn_capture::cgroup2_mount() else {
        return Vec::new();
    };
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX))
        .map(|e| e.path())
        .collect()
}

fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut out: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    // Deepest first, for unmounting.
    out.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    out
}

/// Processes in a namespace or cgroup of the demo.
fn demo_processes() -> Vec<u32> {
    let mut pids = Vec::new();
    for ns in demo_netns() {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
            pids.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| l.trim().parse::<u32>().ok()),
            );
        }
    }
    for cgroup in demo_cgroups() {
        for dir in cgroup_tree(&cgroup) {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
    }
    pids.retain(|p| *p != std::process::id());
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// `dir` and the cgroups below it, children first.
fn cgroup_tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(cgroup_tree(&e.path()));
        }
    }
    out.push(dir.to_owned());
    out
}

/// Links with the lab's names in this (the root) namespace: there should never be any.
fn root_links() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| LINK_PREFIXES.iter().any(|p| n.starts_with(p)))
        .collect()
}

/// Everything a demo left: one line per item; empty when the machine is clean.
pub fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    out.extend(
        demo_netns()
            .into_iter()
            .map(|n| format!("network namespace {n}")),
    );
    out.extend(
        demo_cgroups()
            .into_iter()
            .map(|c| format!("cgroup {}", c.display())),
    );
    out.extend(
        mounts_under(dir)
            .into_iter()
            .map(|m| format!("mount {}", m.display())),
    );
    out.extend(demo_processes().into_iter().map(|p| format!("process {p}")));
    out.extend(root_links().into_iter().map(|l| format!("link {l}")));
    if dir.exists() {
        out.push(format!("directory {}", dir.display()));
    }
    out
}

/// Removes what every demo left (processes, namespaces, cgroups, mounts, `dir`);
/// returns what it removed, one line per item.
pub fn sweep(dir: &Path) -> Vec<String> {
    let found = leftovers(dir);
    for pid in demo_processes() {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
    }
    // Killed processes leave their cgroups a moment later.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !demo_processes().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for ns in demo_netns() {
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    }
    for cgroup in demo_cgroups() {
        for d in cgroup_tree(&cgroup) {
            let _ = std::fs::remove_dir(d);
        }
    }
    for m in mounts_under(dir) {
        let _ = Command::new("umount").arg(&m).output();
    }
    let _ = std::fs::remove_dir_all(dir);
    found
}

/// Asks the demo recorded in `dir` to stop (SIGTERM: it cleans up after itself) and
/// waits up to `timeout`; true if it had one and it exited.
pub fn stop_running(dir: &Path, timeout: Duration) -> bool {
    let Some(pid) = running(dir) else {
        return false;
    };
    let _ = Command::new("kill").arg(pid.to_string()).output();
    let deadline = Instant::now() + timeout;
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Ctrl-C (SIGINT) for a demo the caller started, then up to `within` for it to
/// clean up and exit; killed after that. Whether it exited by itself.
pub fn interrupt(child: &mut std::process::Child, within: Duration) -> bool {
    if child.try_wait().ok().flatten().is_some() {
        return true;
    }
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + within;
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}
