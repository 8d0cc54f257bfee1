//! Builds the capture programs for `bpfel-unknown-none` and leaves the object in
//! `OUT_DIR`, where `src/object.rs` embeds it. Needs the `rust-src` component and
//! `bpf-linker` (`.ci/run` installs both; docs/capture.md says how).

fn main() -> anyhow::Result<()> {
    // The stable toolchain builds `core` for the BPF target only with bootstrap mode
    // (`-Z build-std=core`); aya-build passes that flag when this is set. Scoped to the
    // nested cargo that builds the programs, not the workspace.
    #[allow(unsafe_code)]
    // SAFETY: a build script is single-threaded at this point.
    unsafe {
        std::env::set_var("RUSTC_BOOTSTRAP", "1");
        // aya-build turns every line the nested cargo prints into a `cargo:warning`;
        // quiet, it prints only what matters (errors, real warnings).
        std::env::set_var("CARGO_TERM_QUIET", "true");
    };
    // aya-build watches the programs crate; the layout they share lives here too.
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../common")
    );
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "cairn-capture-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../programs"),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
