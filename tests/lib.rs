//! Helpers for cross-component tests and benchmarks: the controller in process, and a
//! two-node lab in network namespaces running the real `controller` and `ztunnel`
//! binaries.

pub mod in_process;
pub mod lab;
