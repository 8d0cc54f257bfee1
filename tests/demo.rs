//! `cargo xtask demo` end to end: the real `cairn-demo` binary brings the mesh up, the
//! canary split it shows after 2,000 requests is within 3 points of the
//! VirtualService, each step it prints (run exactly as printed) changes what it
//! shows, Ctrl-C leaves nothing behind, and after a crash `down` removes what the
//! crashed demo left.
//!
//! Needs what tests/capture.rs needs (root, iproute2, nsenter, cgroup v2, BPF links);
//! without them it says why and stops.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use cairn_tests::{demo_env, pod_lab::can_run, workspace_root};

#[derive(serde::Deserialize, Default, Debug)]
struct Tally {
    requests: u64,
    versions: std::collections::BTreeMap<String, u64>,
    codes: std::collections::BTreeMap<String, u64>,
}

#[derive(serde::Deserialize, Debug)]
struct Stats {
    total: Tally,
    recent: Tally,
}

struct Demo {
    child: Child,
    dir: PathBuf,
    out: PathBuf,
}

impl Demo {
    fn start(dir: &Path) -> Demo {
        let out = dir.with_extension("out");
        let log = std::fs::File::create(&out).expect("output file");
        let child = Command::new(cairn_tests::lab::binary("cairn-demo"))
            .args(["up", "--rate", "300", "--dir"])
            .arg(dir)
            .current_dir(workspace_root())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("cairn-demo up");
        Demo {
            child,
            dir: dir.to_owned(),
            out,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// The warnings and errors the mesh's processes logged and the frontend's failed
    /// requests (last 60 lines), so a failure says what the proxies saw, not only
    /// what the client did.
    fn warnings(&self) -> String {
        let mut lines = Vec::new();
        let mut logs: Vec<_> = std::fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.sort();
        for log in logs
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
        {
            let name = log.file_name().unwrap_or_default().to_string_lossy();
            for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
                // The frontend logs only its failed requests.
                if line.contains("WARN") || line.contains("ERROR") || name == "frontend.log" {
                    lines.push(format!("{name}: {line}"));
                }
            }
        }
        let skip = lines.len().saturating_sub(60);
        lines[skip..].join("\n")
    }

    fn stats(&self) -> Option<Stats> {
        serde_json::from_slice(&std::fs::read(self.dir.join("frontend-stats.json")).ok()?).ok()
    }

    /// Waits up to `secs` for `ok` on the frontend's stats; panics with the output.
    fn wait(&mut self, what: &str, secs: u64, ok: impl Fn(&Stats) -> bool) -> Stats {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the demo exited ({status}) waiting for {what}:\n{}",
                    self.output()
                );
            }
            if let Some(s) = self.stats().filter(|s| ok(s)) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "timed out waiting for {what}; last stats {:?}\n{}",
            self.stats(),
            self.output()
        );
    }

    /// Runs the step command the demo printed as `cairn <verb> -f <file> ...`.
    fn run_step(&self, verb: &str, file: &str) -> String {
        let output = self.output();
        let line = output
            .lines()
            .find(|l| l.contains(&format!(" {verb} -f {file} ")) && l.contains("$ "))
            .unwrap_or_else(|| panic!("the demo printed no step for {file}:\n{output}"));
        let command = line.split_once("$ ").expect("command").1;
        let out = Command::new("sh")
            .args(["-c", command])
            .current_dir(workspace_root())
            .output()
            .expect("sh");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{command}: {said}");
        said
    }
}

impl Drop for Demo {
    /// A failed assertion must not leave a demo running: Ctrl-C, then `down`'s sweep.
    fn drop(&mut self) {
        demo_env::interrupt(&mut self.child, Duration::from_secs(20));
        demo_env::sweep(&self.dir);
    }
}

fn share(t: &Tally, map: &std::collections::BTreeMap<String, u64>, key: &str) -> f64 {
    map.get(key).copied().unwrap_or(0) as f64 / t.requests.max(1) as f64
}

fn version_share(t: &Tally, v: &str) -> f64 {
    share(t, &t.versions, v)
}

fn code_share(t: &Tally, c: &str) -> f64 {
    share(t, &t.codes, c)
}

#[test]
fn the_demo_shows_the_canary_reacts_to_each_step_and_leaves_nothing_behind() {
    if let Err(why) = can_run() {
        eprintln!(
            "SKIPPED the_demo_shows_the_canary_reacts_to_each_step_and_leaves_nothing_behind: {why}"
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("cairn-demo-test-{}", std::process::id()));
    let mut demo = Demo::start(&dir);

    // The split after 2,000 requests (10% of 2,000: one standard deviation is 0.67
    // points, ±3 points is over four).
    let s = demo.wait("2,000 requests", 120, |s| s.total.requests >= 2000);
    let v2 = version_share(&s.total, "v2");
    assert!(
        (0.07..=0.13).contains(&v2),
        "v2 got {:.1}% of {} requests; the VirtualService says 10%: {s:?}",
        v2 * 100.0,
        s.total.requests
    );
    assert_eq!(
        s.total.codes.get("200").copied(),
        Some(s.total.requests),
        "every request answered 200: {s:?}\n{}\nwarnings logged:\n{}",
        demo.output(),
        demo.warnings()
    );
    eprintln!(
        "demo canary: {:.1}% to v2 after {} requests",
        v2 * 100.0,
        s.total.requests
    );
    let view = demo.output();
    for hop in [
        "out spiffe://cluster.local/ns/demo/sa/frontend -> spiffe://cluster.local/ns/demo/sa/waypoint  mutual_tls",
        "in  spiffe://cluster.local/ns/demo/sa/waypoint -> spiffe://cluster.local/ns/demo/sa/reviews  mutual_tls",
    ] {
        assert!(view.contains(hop), "the view shows the hop {hop}:\n{view}");
    }

    // The printed inspection commands show the mesh as the proxies hold it.
    let output = demo.output();
    let printed = |what: &str| {
        output
            .lines()
            .find(|l| l.contains(what) && l.contains("$ "))
            .and_then(|l| l.split_once("$ "))
            .map(|(_, c)| c.to_owned())
            .unwrap_or_else(|| panic!("the demo printed no `{what}` command:\n{output}"))
    };
    let run = |command: String| {
        let out = Command::new("sh")
            .args(["-c", &command])
            .current_dir(workspace_root())
            .output()
            .expect("sh");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{command}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let config = run(printed("ztunnel-config"));
    for row in [
        "demo         frontend             10.77.1.10      node-a   HBONE",
        "demo         waypoint             10.77.1.20      node-a   HBONE*",
        "available",
    ] {
        assert!(
            config.contains(row),
            "ztunnel-config shows {row:?}:\n{config}"
        );
    }
    let status = run(printed("proxy-status"));
    assert_eq!(
        status.matches("CONNECTED").count(),
        3,
        "both ztunnels and the waypoint connected:\n{status}"
    );

    // Each printed step shows in the view's recent window (the last 5 s).
    demo.run_step("apply", "deploy/demo/steps/reviews-50-50.yaml");
    demo.wait("an even split", 30, |s| {
        s.recent.requests > 500 && (0.4..=0.6).contains(&version_share(&s.recent, "v2"))
    });
    demo.run_step("apply", "deploy/demo/steps/reviews-abort-50.yaml");
    demo.wait("half the requests aborted with 503", 30, |s| {
        s.recent.requests > 500 && (0.4..=0.6).contains(&code_share(&s.recent, "503"))
    });
    demo.run_step("apply", "deploy/demo/reviews-canary.yaml");
    demo.run_step("apply", "deploy/demo/steps/deny-jason.yaml");
    let s = demo.wait("jason's quarter denied with 403", 30, |s| {
        s.recent.requests > 500
            && (0.2..=0.3).contains(&code_share(&s.recent, "403"))
            && code_share(&s.recent, "503") < 0.02
    });
    eprintln!("demo deny step: {:?}", s.recent.codes);
    let deadline = Instant::now() + Duration::from_secs(15);
    let counts_denials = |out: String| {
        out.rsplit("----- view -----")
            .next()
            .is_some_and(|frame| !frame.contains("(403 RBAC: access denied): 0 "))
    };
    while !counts_denials(demo.output()) {
        assert!(
            Instant::now() < deadline,
            "the view counts the waypoint's denials:\n{}",
            demo.output()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let said = demo.run_step("delete", "deploy/demo/steps/deny-jason.yaml");
    assert!(said.contains("deleted"), "{said}");
    demo.wait("the undo: no denials, 90/10 again", 30, |s| {
        s.recent.requests > 500
            && code_share(&s.recent, "200") == 1.0
            && (0.05..=0.15).contains(&version_share(&s.recent, "v2"))
    });

    // Ctrl-C: the demo removes everything it made.
    let _ = Command::new("kill")
        .args(["-INT", &demo.child.id().to_string()])
        .status();
    let status = demo.child.wait().expect("wait");
    assert!(
        status.success(),
        "exit after Ctrl-C: {status}\n{}",
        demo.output()
    );
    let left = demo_env::leftovers(&dir);
    assert!(left.is_empty(), "after Ctrl-C: {left:?}\n{}", demo.output());

    // A crash (SIGKILL) leaves the mesh behind; `down` removes it.
    let mut demo = Demo::start(&dir);
    demo.wait("traffic", 120, |s| s.total.requests > 0);
    demo.child.kill().expect("kill");
    let _ = demo.child.wait();
    assert!(
        !demo_env::leftovers(&dir).is_empty(),
        "a killed demo leaves things for `down` to remove"
    );
    let down = Command::new(cairn_tests::lab::binary("cairn-demo"))
        .args(["down", "--dir"])
        .arg(&dir)
        .output()
        .expect("cairn-demo down");
    assert!(
        down.status.success(),
        "down: {}{}",
        String::from_utf8_lossy(&down.stdout),
        String::from_utf8_lossy(&down.stderr)
    );
    let left = demo_env::leftovers(&dir);
    assert!(left.is_empty(), "after down: {left:?}");
    let _ = std::fs::remove_file(dir.with_extension("out"));
}
