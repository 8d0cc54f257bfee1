//! Cairn's wire API and config model.
//!
//! - [`proto`]: generated types for Istio's workload discovery (`istio.workload`,
//!   `istio.security`), Istio's CA service (`istio.v1.auth`) and Envoy's delta ADS
//!   (`envoy.service.discovery.v3`), with the original package names and field numbers.
//! - [`model`]: the validated domain model proxies read. Protos are converted into it at
//!   the edge with `TryFrom`; nothing past that edge sees a proto.

pub mod model;
pub mod proto;

/// xDS type URL of `istio.workload.Address` resources.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// xDS type URL of `istio.security.Authorization` resources.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

/// xDS type URL of `cairn.l7.v1.RouteConfig` resources (for waypoints).
pub const ROUTE_CONFIG_TYPE_URL: &str = "type.googleapis.com/cairn.l7.v1.RouteConfig";

/// The HBONE port every mesh workload and waypoint listens on.
pub const HBONE_PORT: u16 = 15008;
