//! `cargo xtask demo --kube` end to end: the real `cairn-demo up --kube` brings the
//! local Kubernetes cluster and the app up, the frontend sees the 90/10 canary with
//! every answer 200 (no request lost to a pod starting before its ztunnel took it in),
//! the printed `kubectl` step changes the split, and Ctrl-C leaves nothing of the
//! cluster behind.
//!
//! Needs root and the Kubernetes binaries (`CAIRN_K8S_BIN`); without them it says why
//! and stops.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use cairn_tests::{cluster, demo_env, lab::binary, pod_lab::can_run, workspace_root};
use serde_json::Value;

const DIR: &str = "/run/cairn-cluster";

struct Demo {
    child: Child,
    out: PathBuf,
}

impl Demo {
    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// The frontend's stats: (requests, v2 share, 200s) in total or in the last 5 s.
    fn stats(&self, window: &str) -> Option<(u64, f64, u64)> {
        let v: Value = serde_json::from_slice(
            &std::fs::read(Path::new(DIR).join("frontend-stats.json")).ok()?,
        )
        .ok()?;
        let t = &v[window];
        let n = t["requests"].as_u64()?;
        let v2 = t["versions"]["v2"].as_u64().unwrap_or(0);
        let ok = t["codes"]["200"].as_u64().unwrap_or(0);
        Some((n, v2 as f64 / n.max(1) as f64, ok))
    }

    fn wait(
        &mut self,
        what: &str,
        secs: u64,
        window: &str,
        ok: impl Fn((u64, f64, u64)) -> bool,
    ) -> (u64, f64, u64) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the demo exited ({status}) waiting for {what}:\n{}",
                    self.output()
                );
            }
            if let Some(s) = self.stats(window).filter(|s| ok(*s)) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "timed out waiting for {what}; last {:?}\n{}",
            self.stats(window),
            self.output()
        );
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        demo_env::interrupt(&mut self.child, Duration::from_secs(30));
        cairn_tests::kube_lab::sweep("cairn");
    }
}

/// What the local cluster could leave: its namespaces, host link, directory.
fn leftovers() -> Vec<String> {
    let mut left = Vec::new();
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.starts_with("cairn-") {
            left.push(format!("netns {line}"));
        }
    }
    let out = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip");
    if String::from_utf8_lossy(&out.stdout).contains(" cairnr") {
        left.push("link cairnr".into());
    }
    if Path::new(DIR).exists() {
        left.push(DIR.into());
    }
    left
}

#[test]
fn the_kubernetes_demo_shows_the_canary_and_reacts_to_kubectl() {
    if let Some(why) = cluster::unavailable() {
        eprintln!("SKIP the_kubernetes_demo_shows_the_canary_and_reacts_to_kubectl: {why}");
        return;
    }
    if let Err(why) = can_run() {
        eprintln!("SKIP the_kubernetes_demo_shows_the_canary_and_reacts_to_kubectl: {why}");
        return;
    }
    let out = std::env::temp_dir().join(format!("cairn-demo-kube-{}.out", std::process::id()));
    let log = std::fs::File::create(&out).expect("output file");
    let child = Command::new(binary("cairn-demo"))
        .args(["up", "--kube", "--rate", "300"])
        .current_dir(workspace_root())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("cairn-demo up --kube");
    let mut demo = Demo { child, out };

    let (n, v2, ok) = demo.wait("2,000 requests", 180, "total", |(n, _, _)| n >= 2000);
    eprintln!(
        "kube demo canary: {:.1}% to v2 after {n} requests, {ok} answered 200",
        v2 * 100.0
    );
    assert!(
        (0.07..=0.13).contains(&v2),
        "v2 got {:.1}% of {n}",
        v2 * 100.0
    );
    assert_eq!(ok, n, "every request answered 200\n{}", demo.output());

    // The even-split step, run exactly as printed.
    let output = demo.output();
    let line = output
        .lines()
        .find(|l| l.contains("$ ") && l.ends_with("apply -f deploy/demo/steps/reviews-50-50.yaml"))
        .unwrap_or_else(|| panic!("no printed 50/50 step:\n{output}"));
    let command = line.split_once("$ ").expect("command").1;
    let ran = Command::new("sh")
        .args(["-c", command])
        .current_dir(workspace_root())
        .output()
        .expect("sh");
    assert!(ran.status.success(), "{command}: {ran:?}");
    let (n, v2, _) = demo.wait(
        "the 50/50 split in the last 5 s",
        60,
        "recent",
        |(n, v2, _)| n >= 500 && (0.4..=0.6).contains(&v2),
    );
    eprintln!(
        "kube demo after the step: {:.1}% to v2 of {n} in 5 s",
        v2 * 100.0
    );

    assert!(
        demo_env::interrupt(&mut demo.child, Duration::from_secs(60)),
        "the demo did not stop after Ctrl-C\n{}",
        demo.output()
    );
    let left = leftovers();
    assert!(left.is_empty(), "after Ctrl-C: {left:?}\n{}", demo.output());
    let _ = std::fs::remove_file(&demo.out);
}
