//! `cairn` CLI: exit codes and messages of `analyze`, run as a user would.

use std::process::Command;

fn cairn(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .output()
        .expect("run cairn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().expect("exit code"), text)
}

fn fixtures(p: &str) -> String {
    format!("{}/tests/fixtures/{p}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn version_prints_the_version() {
    let (code, out) = cairn(&["version"]);
    assert_eq!(code, 0);
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");
}

#[test]
fn analyze_accepts_the_corpus() {
    let (code, out) = cairn(&["analyze", "-f", &fixtures("bookinfo.yaml")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 errors"), "{out}");
    let (code, out) = cairn(&["analyze", "-f", &fixtures("policies.yaml")]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn analyze_reports_errors_and_warnings_with_paths() {
    let (code, out) = cairn(&["analyze", "-f", &fixtures("broken")]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("warning: ")
            && out.contains(
                "mixed.yaml: document 0 (DestinationRule/bookinfo/reviews): spec.trafficPolicy.tls"
            ),
        "{out}"
    );
    assert!(
        out.contains("error: ")
            && out.contains("mixed.yaml: document 1 (AuthorizationPolicy broken): spec.rules[0].from[0].source.principals[0]"),
        "{out}"
    );
    assert!(
        out.contains("1 objects valid, 1 errors, 1 warnings"),
        "{out}"
    );
}

#[test]
fn analyze_of_nothing_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, out) = cairn(&["analyze", "-f", &dir.path().display().to_string()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no *.yaml"), "{out}");
}

#[test]
fn waypoint_apply_list_delete_on_a_config_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(fixtures("bookinfo.yaml"), dir.path().join("bookinfo.yaml")).expect("copy");
    let d = dir.path().display().to_string();
    let (code, out) = cairn(&[
        "waypoint",
        "apply",
        "-n",
        "bookinfo",
        "--enroll-namespace",
        "--config-dir",
        &d,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("waypoint bookinfo/waypoint applied (for service)"),
        "{out}"
    );
    assert!(
        out.contains("namespace bookinfo labelled istio.io/use-waypoint=waypoint"),
        "{out}"
    );
    // What was written is what the controller accepts.
    let (code, out) = cairn(&["analyze", "-f", &d]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(" 0 errors"), "{out}");
    let (code, out) = cairn(&["waypoint", "list", "--config-dir", &d]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("bookinfo") && l.contains("waypoint")),
        "{out}"
    );
    let (code, out) = cairn(&["waypoint", "apply", "-n", "missing", "--config-dir", &d]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("error: namespace missing does not exist"),
        "{out}"
    );
    let (code, out) = cairn(&["waypoint", "delete", "-n", "bookinfo", "--config-dir", &d]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning: namespace bookinfo still has istio.io/use-waypoint=waypoint"),
        "{out}"
    );
    let (code, out) = cairn(&["waypoint", "delete", "-n", "bookinfo", "--config-dir", &d]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no waypoint bookinfo/waypoint"), "{out}");
}
