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
