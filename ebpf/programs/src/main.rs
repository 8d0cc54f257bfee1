//! Cairn's capture programs. One module per hook; every outcome that redirects, passes
//! on purpose, drops or fails bumps a per-CPU counter (`CAIRN_COUNTERS`), which ztunnel
//! exports as `cairn_capture_events_total{event}`. See docs/capture.md for the model.
//!
//! On the host this crate builds to an empty binary, so `cargo clippy --workspace`
//! works; the programs exist only for `target_arch = "bpf"` (built by
//! `cairn-capture`'s build script).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The BPF side talks to the kernel through raw context pointers and helpers.
#![cfg_attr(target_arch = "bpf", allow(unsafe_code))]

#[cfg(target_arch = "bpf")]
mod bpf;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
