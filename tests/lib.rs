//! Helpers for cross-component tests and benchmarks: the controller in process, and a
//! two-node lab in network namespaces running the real `controller` and `ztunnel`
//! binaries, and a two-node lab whose pods are namespaces + cgroups enrolled by the
//! real CNI plugin and captured by the eBPF programs, with a waypoint when asked
//! (`waypoint_lab`), and a local Kubernetes control plane (`cluster`).

pub mod backend;
pub mod cluster;
pub mod demo_env;
pub mod in_process;
pub mod kind;
pub mod kube_lab;
pub mod lab;
pub mod pod_lab;
pub mod prometheus;
pub mod waypoint_lab;

/// The workspace's root directory (`deploy/`, `docs/`, the README), found from this
/// crate's own.
pub fn workspace_root() -> std::path::PathBuf {
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    tests.parent().unwrap_or(tests).to_owned()
}
