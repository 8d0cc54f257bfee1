//! SPIFFE identities (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`) and the rustls
//! certificate verifiers that check a peer against the mesh roots and yield its identity.

mod spiffe;
pub mod verify;

pub use spiffe::{ParseError, SpiffeId};
