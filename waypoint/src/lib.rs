//! Cairn's waypoint: the L7 proxy that serves the services and workloads that asked
//! for one (`cairn waypoint apply`). See docs/waypoint.md for what exists and what the
//! waypoint issue still adds (HBONE ingress, config over xDS, resilience, policy,
//! telemetry).
//!
//! Config arrives as `cairn.l7.v1.RouteConfig` protos and becomes a
//! [`route::RouteTable`] at the edge ([`config`]), or is refused whole.
//!
//! A request's path: [`route::RouteTable::select`] (first matching rule) ->
//! [`fault`] (delay / abort) -> the rule's action: a direct response, a redirect, or a
//! weighted choice of backend ([`router::Router`]) sent through an [`router::Upstream`].

pub mod admin;
pub mod authz;
pub mod cluster;
pub mod config;
pub mod cors;
pub mod detect;
pub mod fault;
pub mod h1_pool;
pub mod hbone_upstream;
pub mod head_timer;
pub mod ingress;
pub mod jwt;
pub mod matching;
pub mod redirect;
pub mod retry;
pub mod route;
pub mod router;
pub mod telemetry;
pub mod trace;
pub mod xds;
