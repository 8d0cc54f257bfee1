//! Cairn's traffic capture, userspace side: loads the eBPF programs embedded at build
//! time, enrolls pods (attaches the programs to the pod's cgroup and network namespace
//! and pins the links under `/sys/fs/bpf/cairn/`), and answers ztunnel's questions
//! (a captured connection's original destination; where to register its per-pod
//! listeners; the programs' event counters). docs/capture.md has the model.

mod bpffs;
mod loader;
mod netns;
mod pods;

pub use cairn_capture_common::{
    Counter, HBONE_PORT, INBOUND_PLAINTEXT_PORT, ListenerKind, OUTBOUND_PORT,
};
pub use loader::{Capture, CaptureError, Lookups, PodNet};
pub use netns::{Netns, NetnsError, netns_cookie};
pub use pods::{PodRecord, PodRecordError, PodRecords};

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones), from `/proc/self/mounts`.
pub fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, path, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| path.into())
    })
}

/// Where programs, maps and links are pinned.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/cairn";
/// Where the CNI plugin records the pods of this node for ztunnel.
pub const DEFAULT_STATE_DIR: &str = "/var/run/cairn/pods";
