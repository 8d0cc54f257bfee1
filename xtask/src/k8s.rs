//! The local cluster's Kubernetes binaries: kube-apiserver and kubectl from the
//! `k8s.io/kubernetes` Go module and etcd from `go.etcd.io/etcd/server/v3`, at pinned
//! versions, built with the machine's Go toolchain and cached between runs
//! (docs/kubernetes.md, "Local cluster").
//!
//! `go install module@version` refuses both modules (their go.mod files carry
//! `replace` directives), so each is built inside a small wrapper module of ours that
//! requires it as a tool and pins the Kubernetes staging modules to the matching
//! `v0.x` release.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// Kubernetes release built for the local cluster.
pub const KUBERNETES: &str = "1.34.4";
/// etcd release (the one the Kubernetes release above was tested with, or newer
/// within its minor version).
pub const ETCD: &str = "3.6.8";

/// Kubernetes' staging modules: `k8s.io/kubernetes` requires them at `v0.0.0` and
/// replaces them with its own tree, which a module that depends on it must redo with
/// the published `v0.<minor>.<patch>` releases.
const STAGING: &[&str] = &[
    "api",
    "apiextensions-apiserver",
    "apimachinery",
    "apiserver",
    "cli-runtime",
    "client-go",
    "cloud-provider",
    "cluster-bootstrap",
    "code-generator",
    "component-base",
    "component-helpers",
    "controller-manager",
    "cri-api",
    "cri-client",
    "csi-translation-lib",
    "dynamic-resource-allocation",
    "endpointslice",
    "externaljwt",
    "kms",
    "kube-aggregator",
    "kube-controller-manager",
    "kube-proxy",
    "kube-scheduler",
    "kubectl",
    "kubelet",
    "metrics",
    "mount-utils",
    "pod-security-admission",
    "sample-apiserver",
    "sample-cli-plugin",
    "sample-controller",
];

/// Where the binaries live: `$CAIRN_CACHE` (default `~/.cache/cairn`) under
/// `k8s/<kubernetes>-etcd<etcd>/bin`.
pub fn bin_dir() -> PathBuf {
    let cache = std::env::var_os("CAIRN_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/cairn")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/cairn"));
    cache
        .join("k8s")
        .join(format!("{KUBERNETES}-etcd{ETCD}"))
        .join("bin")
}

/// Builds whatever of kube-apiserver, kubectl and etcd is missing; returns their
/// directory.
pub fn ensure_binaries() -> Result<PathBuf> {
    let bin = bin_dir();
    let missing = |names: &[&str]| names.iter().any(|n| !bin.join(n).is_file());
    if !missing(&["kube-apiserver", "kubectl", "etcd"]) {
        return Ok(bin);
    }
    if Command::new("go").arg("version").output().is_err() {
        bail!(
            "the local cluster's kube-apiserver and etcd are built with Go: install Go 1.24 or newer"
        );
    }
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let work = bin.parent().context("bin dir has a parent")?.join("src");
    if missing(&["kube-apiserver", "kubectl"]) {
        let dir = work.join("kubernetes");
        let replaces: String = STAGING
            .iter()
            .map(|m| {
                let minor = KUBERNETES.split_once('.').map_or(KUBERNETES, |(_, r)| r);
                format!("\tk8s.io/{m} => k8s.io/{m} v0.{minor}\n")
            })
            .collect();
        let go_mod = format!(
            "module cairn.local/kubernetes\n\ngo 1.24.0\n\nrequire k8s.io/kubernetes v{KUBERNETES}\n\nreplace (\n{replaces})\n"
        );
        build(
            &dir,
            &go_mod,
            &format!("k8s.io/kubernetes v{KUBERNETES}"),
            &format!("v{KUBERNETES}"),
            &[
                ("k8s.io/kubernetes/cmd/kube-apiserver", "kube-apiserver"),
                ("k8s.io/kubernetes/cmd/kubectl", "kubectl"),
            ],
            &bin,
        )?;
    }
    if missing(&["etcd"]) {
        let dir = work.join("etcd");
        let go_mod = format!(
            "module cairn.local/etcd\n\ngo 1.24.0\n\nrequire go.etcd.io/etcd/server/v3 v{ETCD}\n"
        );
        build(
            &dir,
            &go_mod,
            &format!("etcd v{ETCD}"),
            &format!("v{ETCD}"),
            &[("go.etcd.io/etcd/server/v3", "etcd")],
            &bin,
        )?;
    }
    Ok(bin)
}

/// Writes the wrapper module, resolves it and builds each `(package, binary)`.
fn build(
    dir: &Path,
    go_mod: &str,
    what: &str,
    version: &str,
    packages: &[(&str, &str)],
    bin: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("go.mod"), go_mod)
        .with_context(|| format!("writing {}", dir.join("go.mod").display()))?;
    let go = |args: &[&str]| -> Result<()> {
        let status = Command::new("go")
            .args(args)
            .current_dir(dir)
            // Reproducible and independent of the caller's Go settings.
            .env("GOFLAGS", "-mod=mod -buildvcs=false")
            .env("CGO_ENABLED", "0")
            .status()
            .with_context(|| format!("running go {}", args.join(" ")))?;
        if !status.success() {
            bail!(
                "go {} failed ({status}) in {}",
                args.join(" "),
                dir.display()
            );
        }
        Ok(())
    };
    eprintln!("==> fetching {what} (Go modules)");
    // `@version`: without it `go get` would move the module to its newest release.
    for (package, _) in packages {
        go(&["get", "-tool", &format!("{package}@{version}")])?;
    }
    for (package, name) in packages {
        eprintln!("==> go build {package} (a first build takes several minutes; cached after)");
        let out = bin.join(format!("{name}.partial"));
        // Without these the Kubernetes binaries report v0.0.0 (set by its release
        // scripts from git, which a module download has not got).
        let (major, minor) = KUBERNETES.split_once('.').unwrap_or((KUBERNETES, ""));
        let minor = minor.split('.').next().unwrap_or(minor);
        let v = "k8s.io/component-base/version";
        let ldflags = format!(
            "-ldflags=-s -w -X {v}.gitVersion=v{KUBERNETES} -X {v}.gitMajor={major} -X {v}.gitMinor={minor}"
        );
        go(&[
            "build",
            "-trimpath",
            &ldflags,
            "-o",
            out.to_str().context("cache path is UTF-8")?,
            package,
        ])?;
        std::fs::rename(&out, bin.join(name))
            .with_context(|| format!("installing {}", bin.join(name).display()))?;
    }
    Ok(())
}
