//! The BPF filesystem the pins live on.

use std::path::Path;

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

/// Mounts bpffs at `/sys/fs/bpf` when `root` is under it and nothing is mounted there
/// (a bare node or test machine; a DaemonSet mounts the host's).
pub fn ensure_mounted(root: &Path) -> std::io::Result<()> {
    let base = Path::new("/sys/fs/bpf");
    if !root.starts_with(base) {
        return Ok(());
    }
    // Check and mount under one lock: two loaders in one process (parallel tests)
    // would otherwise both mount, and the second mount hides the first one's pins.
    static MOUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = MOUNTING.lock().unwrap_or_else(|e| e.into_inner());
    let is_bpffs = statfs(base)
        .map(|s| s.filesystem_type() == BPF_FS_MAGIC)
        .unwrap_or(false);
    if is_bpffs {
        return Ok(());
    }
    mount(
        Some("bpf"),
        base,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(std::io::Error::from)?;
    tracing::info!(path = %base.display(), "mounted bpffs");
    Ok(())
}
