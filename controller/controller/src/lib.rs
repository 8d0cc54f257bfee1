//! The Cairn controller: the mesh's source of truth and its certificate authority.
//!
//! Config flows in one direction: manifests ([`local`], later Kubernetes) ->
//! [`decode`] and [`validate`] -> the typed [`store`] -> the pure [`compile`] step ->
//! the versioned [`xds`] cache -> each subscribed proxy over delta ADS.

pub mod apply;
pub mod auth;
pub mod ca;
pub mod ca_secret;
pub mod compile;
pub mod crds;
pub mod decode;
pub mod inspect;
pub mod kubernetes;
pub mod leader;
pub mod local;
pub mod policy_status;
pub mod resources;
pub mod runtime;
pub mod server;
pub mod store;
pub mod token_review;
pub mod validate;
pub mod waypoint;
pub mod waypoint_deploy;
pub mod waypoint_kube;
pub mod xds;
