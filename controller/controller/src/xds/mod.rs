//! Delta xDS: the resource cache with its subscribers, and the ADS gRPC service.

pub mod cache;
pub mod server;
mod stream;

pub use cache::Cache;
pub use server::AdsService;
