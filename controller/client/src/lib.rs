//! The proxies' side of the controller's APIs, shared by ztunnel and the waypoint:
//!
//! - [`xds`]: the delta ADS client (subscribe, ACK/NACK, reconnect with backoff and
//!   `initial_resource_versions`); what the resources mean is the proxy's business,
//!   behind [`xds::Subscriber`].
//! - [`ca`]: certificates from the mesh CA, rotated at half life; [`certs`] is the
//!   seam the proxy paths ask for TLS configurations.
//! - [`health`]: the metrics both report about the two.
//! - [`token`]: the bearer token, re-read from its file at each use (projected
//!   service-account tokens rotate).
//! - [`process`] and [`admin`]: what both binaries do alike around that (allocator
//!   settings, SIGTERM and drain, the admin HTTP listener).

pub mod admin;
pub mod ca;
pub mod certs;
pub mod health;
pub mod process;
pub mod token;
pub mod xds;

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
