//! `cargo xtask`: project chores that need more than one cargo command.
//!
//! - `cargo xtask test`: format check, clippy (warnings are errors), every test.
//! - `cargo xtask bench [name]`: runs the benchmarks at full scale and rewrites
//!   their tables in `docs/benchmarks.md`.
//! - `cargo xtask demo [up | down] [--kube]`: builds the mesh and runs the
//!   one-machine demo (`tests/demo/`; `--kube` on the local Kubernetes cluster), or
//!   removes what a demo left behind.
//!
//! - `cargo xtask cluster build`: builds (once, cached) the local cluster's
//!   kube-apiserver, kubectl and etcd from their Go modules (`k8s.rs`).
//! - `cargo xtask cluster up [--nodes N] | down`: the e2e suite's local cluster
//!   (API server, controller, nodes as network namespaces) for a person to use.
//! - `cargo xtask e2e [--kind [--keep]]`: the e2e scenarios on the local cluster, or
//!   on kind where Docker runs (`kind.rs`).
//! - `cargo xtask toolchain`: installs only the eBPF toolchain (image builds).
//! - `cargo xtask codegen [--check]`: writes `deploy/crds/` from the Rust types (or
//!   checks it is up to date).
//!
//! All first install the eBPF build's toolchain if it is missing (`ebpf.rs`); `test`
//! also builds the Kubernetes binaries and hands them to the tests in `CAIRN_K8S_BIN`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

mod ebpf;
mod k8s;
mod kind;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root()?;
    match args.first().map(String::as_str) {
        Some("test") => {
            ebpf::ensure_toolchain()?;
            let k8s_bin = k8s::ensure_binaries()?;
            test(&root, &k8s_bin)
        }
        Some("cluster") => match args.get(1).map(String::as_str) {
            Some("build") => {
                let bin = k8s::ensure_binaries()?;
                println!("{}", bin.display());
                Ok(())
            }
            Some(cmd @ ("up" | "down")) => {
                if !is_root() {
                    bail!(
                        "the local cluster needs root (network namespaces, cgroups, eBPF): run it as root"
                    );
                }
                ebpf::ensure_toolchain()?;
                let k8s_bin = k8s::ensure_binaries()?;
                cluster(&root, &k8s_bin, cmd, &args[2..])
            }
            _ => bail!("usage: cargo xtask cluster <build | up [--nodes N] | down>"),
        },
        Some("e2e") => {
            let kind = args.iter().any(|a| a == "--kind");
            let keep = args.iter().any(|a| a == "--keep");
            let k8s_bin = k8s::ensure_binaries()?;
            if kind {
                // The cairn CLI the scenarios run, built here (not in an image).
                cargo(&root, &["build", "--bin", "cairn"])?;
                kind::e2e(&root, &k8s_bin.join("kubectl"), keep)
            } else {
                if !is_root() {
                    bail!(
                        "the e2e suite needs root (network namespaces, cgroups, eBPF): run it as root"
                    );
                }
                ebpf::ensure_toolchain()?;
                cargo(&root, &["build", "--workspace", "--bins"])?;
                let (passed, failed) = cargo_test(
                    &root,
                    &[
                        "test",
                        "-p",
                        "cairn-tests",
                        "--test",
                        "e2e",
                        "--",
                        "--nocapture",
                    ],
                    &[("CAIRN_K8S_BIN", &k8s_bin)],
                )?;
                println!("{passed} passed, {failed} failed");
                Ok(())
            }
        }
        Some("toolchain") => ebpf::ensure_toolchain(),
        Some("codegen") => codegen(&root, args.get(1).map(String::as_str) == Some("--check")),
        Some("bench") => {
            ebpf::ensure_toolchain()?;
            bench(&root, args.get(1).map(String::as_str))
        }
        Some("demo") => {
            // Checked before the long build: namespaces, cgroups and eBPF need root.
            if !is_root() {
                bail!("the demo needs root (network namespaces, cgroups, eBPF): run it as root");
            }
            ebpf::ensure_toolchain()?;
            demo(&root, &args[1..])
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <test | bench [controller|l4|capture|l4-loopback|lb|l7] | demo [up|down] [--kube] | cluster build|up|down | e2e [--kind [--keep]] | codegen [--check] | toolchain>"
            );
            bail!("unknown or missing command")
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_owned)
        .context("xtask lives one level below the workspace root")
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    eprintln!("==> cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The generated files under `deploy/`: (path, `cairn` arguments that print it).
const GENERATED: &[(&str, &[&str])] = &[
    ("deploy/crds/istio.yaml", &["crds"]),
    ("deploy/crds/gateway-api.yaml", &["crds", "--gateway-api"]),
];

fn codegen(root: &Path, check: bool) -> Result<()> {
    let mut stale = Vec::new();
    for (path, args) in GENERATED {
        let mut cmd = vec![
            "run",
            "-q",
            "-p",
            "cairn-controller",
            "--bin",
            "cairn",
            "--",
        ];
        cmd.extend_from_slice(args);
        eprintln!("==> cargo {}", cmd.join(" "));
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(&cmd)
            .current_dir(root)
            .output()
            .context("running cairn")?;
        if !out.status.success() {
            bail!(
                "cairn {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let file = root.join(path);
        let current = std::fs::read(&file).unwrap_or_default();
        if current == out.stdout {
            continue;
        }
        if check {
            stale.push(*path);
        } else {
            std::fs::create_dir_all(file.parent().context("generated file has a parent")?)?;
            std::fs::write(&file, &out.stdout).with_context(|| format!("writing {path}"))?;
            eprintln!("wrote {path}");
        }
    }
    if !stale.is_empty() {
        bail!(
            "generated files are out of date: {}; run `cargo xtask codegen` and commit them",
            stale.join(", ")
        );
    }
    Ok(())
}

fn test(root: &Path, k8s_bin: &Path) -> Result<()> {
    cargo(root, &["fmt", "--all", "--check"])?;
    codegen(root, true)?;
    cargo(
        root,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // The labs run the workspace's binaries (controller, ztunnel, cairn-cni); cargo
    // builds a binary for `cargo test` only where its own package has integration tests.
    cargo(root, &["build", "--workspace", "--bins"])?;
    let (passed, failed) = cargo_test(
        root,
        &["test", "--workspace", "--all-targets"],
        &[("CAIRN_K8S_BIN", k8s_bin)],
    )?;
    // One closing line for the whole workspace (cargo's own last line is often a
    // doc-test binary with nothing in it).
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} tests failed");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and sums its `test result:` lines.
fn cargo_test(root: &Path, args: &[&str], envs: &[(&str, &Path)]) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    eprintln!("==> cargo {}", args.join(" "));
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(root)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .map(str::trim)
                    .find_map(|part| part.strip_suffix(word))
                    .and_then(|n| n.trim().rsplit(' ').next().map(str::to_owned))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok((passed, failed))
}

const BENCHES: &[(&str, &str, &str)] = &[
    ("controller", "cairn-controller", "controller"),
    ("l4", "cairn-tests", "l4"),
    ("capture", "cairn-tests", "capture"),
    ("l4-loopback", "cairn-ztunnel", "l4"),
    ("lb", "cairn-ztunnel", "lb"),
    ("l7", "cairn-waypoint", "l7"),
    ("l7-mesh", "cairn-tests", "l7_mesh"),
];

/// (package, binary, Cargo profile) of each proxy, as `deploy/docker/Dockerfile`
/// builds its image.
const PROXY_BUILDS: &[(&str, &str, &str)] = &[
    ("cairn-ztunnel", "ztunnel", "release-small"),
    ("cairn-waypoint", "waypoint", "release"),
];

fn bench(root: &Path, only: Option<&str>) -> Result<()> {
    let doc_path = root.join("docs/benchmarks.md");
    // Benchmarks that run the binaries (the l4 lab) find them next to themselves.
    cargo(root, &["build", "--release", "--bins"])?;
    // The proxies again as the images build them: each with only its own package's
    // features (with the whole workspace's, kube-client turns on tracing's `log`
    // bridge in every crate that logs: ~1 MB more ztunnel, and more of it resident),
    // and with its image's profile, put where the benchmarks look.
    // (A relative CARGO_TARGET_DIR is relative to the workspace cargo runs in.)
    let target = root.join(std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into()));
    for (package, bin, profile) in PROXY_BUILDS {
        cargo(
            root,
            &["build", "--profile", profile, "-p", package, "--bin", bin],
        )?;
        if *profile != "release" {
            let built = target.join(profile).join(bin);
            let benched = target.join("release").join(bin);
            std::fs::copy(&built, &benched)
                .with_context(|| format!("copying {} to {}", built.display(), benched.display()))?;
        }
    }
    // (markers, stamped table) per benchmark run; written into the doc at the end.
    let mut tables = Vec::new();
    for (name, package, target) in BENCHES {
        // `l7` runs `l7` and `l7-mesh`: a name selects its family.
        if only.is_some_and(|o| o != *name && !name.starts_with(&format!("{o}-"))) {
            continue;
        }
        eprintln!("==> benchmark {name}");
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["bench", "-p", package, "--bench", target, "--", "--bench"])
            .current_dir(root)
            .output()
            .with_context(|| format!("running benchmark {name}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            bail!("benchmark {name} failed");
        }
        let begin = format!("<!-- {name}:begin -->");
        let end = format!("<!-- {name}:end -->");
        let table = section(&stdout, &begin, &end)
            .with_context(|| format!("benchmark {name} printed no table"))?;
        println!("{table}");
        let stamped = format!("{begin}\n{}\n{}\n{end}", machine()?, table.trim());
        tables.push((begin, end, stamped));
    }
    if tables.is_empty() {
        bail!("no benchmark named {}", only.unwrap_or_default());
    }
    // Read only now: edits made to the doc while the benchmarks ran are kept.
    let mut doc = std::fs::read_to_string(&doc_path)
        .with_context(|| format!("reading {}", doc_path.display()))?;
    for (begin, end, stamped) in &tables {
        doc = replace_section(&doc, begin, end, stamped)
            .with_context(|| format!("docs/benchmarks.md lacks the {begin} markers"))?;
    }
    std::fs::write(&doc_path, doc).with_context(|| format!("writing {}", doc_path.display()))?;
    eprintln!("updated {}", doc_path.display());
    Ok(())
}

/// The binaries the demo runs, built with the `demo` profile (optimised, without the
/// release profile's whole-program LTO: a fresh build in minutes).
const DEMO_BINS: &[&str] = &[
    "cairn-demo",
    "cairn",
    "controller",
    "ztunnel",
    "waypoint",
    "cairn-cni",
    // `--kube`: the local cluster's node agent.
    "cairn-node",
];

fn demo(root: &Path, args: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let down = args.first().is_some_and(|a| a == "down");
    let bin = root.join("target/demo/cairn-demo");
    // `down` after a crash needs no build when the demo binary is there.
    if !(down && bin.exists()) {
        eprintln!(
            "==> building the mesh ({}; a first build takes several minutes)",
            DEMO_BINS.join(", ")
        );
        let mut build = vec!["build", "--profile", "demo"];
        for b in DEMO_BINS {
            build.extend(["--bin", b]);
        }
        cargo(root, &build)?;
    }
    // `demo --kube` is `cairn-demo up --kube` on the local cluster, whose API server
    // and etcd are built (once) here.
    let kube = args.iter().any(|a| a == "--kube");
    let mut args = args.to_vec();
    if kube && args.first().is_some_and(|a| a.starts_with("--")) {
        args.insert(0, "up".into());
    }
    let mut cmd = Command::new(&bin);
    if kube {
        cmd.env("CAIRN_K8S_BIN", k8s::ensure_binaries()?);
    }
    // The demo replaces this process: Ctrl-C reaches it, not a parent that would
    // exit before the demo has cleaned up.
    let err = cmd.args(&args).current_dir(root).exec();
    Err(err).with_context(|| format!("running {}", bin.display()))
}

/// `cargo xtask cluster up|down`: builds the binaries, then runs `cairn-cluster`
/// in place of this process (Ctrl-C reaches it).
fn cluster(root: &Path, k8s_bin: &Path, cmd: &str, rest: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    cargo(root, &["build", "--workspace", "--bins"])?;
    let bin = root.join("target/debug/cairn-cluster");
    let err = Command::new(&bin)
        .arg(cmd)
        .args(rest)
        .env("CAIRN_K8S_BIN", k8s_bin)
        .current_dir(root)
        .exec();
    Err(err).with_context(|| format!("running {}", bin.display()))
}

fn section<'a>(text: &'a str, begin: &str, end: &str) -> Option<&'a str> {
    let start = text.find(begin)? + begin.len();
    let stop = text[start..].find(end)? + start;
    Some(&text[start..stop])
}

fn replace_section(doc: &str, begin: &str, end: &str, with: &str) -> Option<String> {
    let start = doc.find(begin)?;
    let stop = doc[start..].find(end)? + start + end.len();
    Some(format!("{}{with}{}", &doc[..start], &doc[stop..]))
}

fn machine() -> Result<String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    Ok(format!(
        "Measured {date} on {cores} cores ({cpu}) by `cargo xtask bench`.\n"
    ))
}
