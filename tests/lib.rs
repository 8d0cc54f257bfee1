//! Helpers for cross-component tests and benchmarks: a two-node lab in network
//! namespaces running the real `controller` and `ztunnel` binaries.

pub mod lab;
