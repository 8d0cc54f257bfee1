//! Compiles Cairn's `.proto` files with `protox` (pure Rust, no system `protoc`).

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "istio/workload.proto",
    "istio/authorization.proto",
    "istio/ca.proto",
    "envoy/service/discovery/v3/discovery.proto",
    "cairn/l7/v1/routes.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    let descriptors = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Transports belong to the binaries; this crate stays runtime-free.
        .build_transport(false)
        // Deterministic encoding: resource versions are hashes of the encoded bytes.
        .btree_map(".")
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
