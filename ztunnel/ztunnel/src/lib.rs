//! The Cairn ztunnel: the per-node L4 proxy.
//!
//! A connection's path, in order: [`outbound`] (route the captured connection: service
//! VIP -> endpoint, waypoint, HBONE or passthrough) -> HBONE (`cairn-hbone`) ->
//! [`inbound`] (terminate HBONE, [`policy`], connect to the application). [`state`] is
//! the config snapshot both read; [`certs`] supplies mTLS configs per identity.
//! Config reaches this crate only as `cairn_api::model` values.

pub mod admin;
pub mod balance;
pub use cairn_client::{ca, certs};
pub mod config;
pub mod explicit;
pub mod inbound;
pub mod inpod;
pub mod local;
pub mod metrics;
pub mod node;
pub mod outbound;
pub mod policy;
pub mod relay;
pub mod state;
pub mod xds;

/// The shared, atomically swapped config snapshot.
pub type SharedState = std::sync::Arc<arc_swap::ArcSwap<state::ProxyState>>;
