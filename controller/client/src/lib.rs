//! The proxies' side of the controller's APIs, shared by ztunnel and the waypoint:
//!
//! - [`xds`]: the delta ADS client (subscribe, ACK/NACK, reconnect with backoff and
//!   `initial_resource_versions`); what the resources mean is the proxy's business,
//!   behind [`xds::Subscriber`].
//! - [`ca`]: certificates from the mesh CA, rotated at half life; [`certs`] is the
//!   seam the proxy paths ask for TLS configurations.
//! - [`health`]: the metrics both report about the two.

pub mod ca;
pub mod certs;
pub mod health;
pub mod xds;

/// Allocator settings both proxies start with (call first thing in `main`, before
/// any other thread). glibc's malloc defaults cost the data path dearly: h2 reads each DATA frame into a
/// fresh buffer that lives until the bytes are written out, and with the default
/// (dynamic) thresholds glibc hands the freed heap tops back to the kernel and faults
/// them in again on the next frame. Measured in the two-namespace bench: 1-stream
/// CPU per GB 2.8 -> 2.1 CPU-s with fixed thresholds. Two arenas (one per worker
/// thread) instead of eight per core keep idle and loaded RSS down.
#[cfg(target_env = "gnu")]
#[allow(unsafe_code)]
pub fn tune_malloc() {
    // SAFETY: mallopt only sets allocator parameters; it is called before any other
    // thread exists and the return values (0 = rejected) leave the defaults in place.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

#[cfg(not(target_env = "gnu"))]
pub fn tune_malloc() {}

/// A duration as the proxies' settings write it: `500ms`, `30s`, `5m`, `24h`.
pub fn duration(value: &str) -> Option<std::time::Duration> {
    let (num, scale) = if let Some(n) = value.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = value.strip_suffix('h') {
        (n, 3600.0)
    } else {
        return None;
    };
    num.parse::<f64>()
        .ok()
        .filter(|v| *v >= 0.0)
        .and_then(|v| std::time::Duration::try_from_secs_f64(v * scale).ok())
}
