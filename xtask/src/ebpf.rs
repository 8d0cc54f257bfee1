//! The eBPF build's toolchain (docs/capture.md, "Building"): the `rust-src` component
//! (the stable toolchain builds `core` for `bpfel-unknown-none`) and `bpf-linker`
//! linked against the toolchain's own LLVM. Installed when missing, so `cargo xtask
//! test` works as written on a fresh machine.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

fn output(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn ensure_toolchain() -> Result<()> {
    let installed = output("rustup", &["component", "list", "--installed"])?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("==> rustup component add rust-src (eBPF build)");
        output("rustup", &["component", "add", "rust-src"])?;
    }
    let have_linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if have_linker {
        return Ok(());
    }
    let sysroot = PathBuf::from(output("rustc", &["--print", "sysroot"])?.trim());
    let version = output("rustc", &["--version", "--verbose"])?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc --version --verbose names no LLVM version")?
        .to_owned();
    let libllvm = std::fs::read_dir(sysroot.join("lib"))
        .context("reading the toolchain's lib directory")?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .context("the toolchain ships no libLLVM.so.*")?;
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let prefix = PathBuf::from(home).join(format!(".cache/cairn/llvm-{major}"));
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {}", link.display()))?;
    eprintln!(
        "==> cargo install bpf-linker (llvm-{major}, against {})",
        libllvm.display()
    );
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["install", "bpf-linker", "--locked", "--no-default-features"])
        .args(["--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed ({status})");
    }
    Ok(())
}
