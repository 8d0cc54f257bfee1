//! The Cairn ztunnel: the per-node L4 proxy.
//!
//! Request order: [`state`] (the config snapshot) -> [`policy`] (L4 authorization).
//! Config reaches this crate only as `cairn_api::model` values.

pub mod policy;
pub mod state;
