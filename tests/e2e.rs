//! The end-to-end suite on the local cluster (`kube_lab`): a real kube-apiserver and
//! etcd with `deploy/` applied, the controller in Kubernetes mode, two nodes whose
//! agents run pods (the real CNI plugin, eBPF capture, one ztunnel pod per node),
//! and the scenarios a user of the mesh runs with `kubectl` and `cairn`:
//!
//! 1. labelling a namespace ambient turns its running pods' traffic into mTLS (the
//!    destination ztunnel reports the client's principal); removing the label turns
//!    it back; no pod restarts;
//! 2. AuthorizationPolicy DENY by principal; an ALLOW list admits only the listed;
//! 3. PeerAuthentication STRICT refuses a client outside the mesh; PERMISSIVE admits;
//! 4. `cairn waypoint apply --kube -n shop --enroll-namespace --wait`: the waypoint's
//!    Deployment runs, traffic goes through it;
//! 5. an 80/20 canary measured; a 50% abort measured; retries hide a flaky pod; a
//!    timeout answers 504;
//! 6. a ztunnel restart: pods re-adopted, nothing in plaintext meanwhile;
//! 7. a controller restart and an API-server restart: the data plane keeps its
//!    config, then resyncs.
//!
//! The steps are `e2e/steps.rs`, their vocabulary `e2e/support.rs`. Each measured
//! figure is printed (`E2E ...` lines; docs/kubernetes.md lists them). The same
//! scenarios run on kind with `cargo xtask e2e --kind` where Docker exists.
//!
//! Needs root and the Kubernetes binaries (`CAIRN_K8S_BIN`); without them it says
//! why and stops.

use std::time::{Duration, Instant};

use cairn_tests::{
    backend::Backend,
    cluster, kind,
    kube_lab::{KubeLab, Options},
    pod_lab, prometheus,
};

#[path = "e2e/steps.rs"]
mod steps;
#[path = "e2e/support.rs"]
mod support;

use support::eventually;

#[test]
fn e2e_scenarios() {
    // `cargo xtask e2e --kind` runs the same scenarios on kind.
    if std::env::var_os("CAIRN_E2E_KIND").is_some() {
        let mut cluster = kind::KindCluster::create().expect("kind cluster");
        scenarios(&mut cluster);
        return;
    }
    if let Some(why) = cluster::unavailable() {
        eprintln!("SKIP e2e_scenarios: {why}");
        return;
    }
    if let Err(why) = pod_lab::can_run() {
        eprintln!("SKIP e2e_scenarios: {why}");
        return;
    }
    let mut dir = tempfile::tempdir().expect("tempdir");
    // CAIRN_E2E_KEEP=1 keeps every log (the cluster's directory) for a post-mortem.
    if std::env::var_os("CAIRN_E2E_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("E2E keeping {}", dir.path().display());
    }
    let began = Instant::now();
    let mut lab = KubeLab::up(
        dir.path(),
        &Options {
            // `ce<pid>`: a later run sweeps what a killed one left.
            prefix: format!("ce{}", std::process::id()),
            nodes: 2,
        },
    )
    .expect("local cluster up");
    println!(
        "E2E local cluster up in {:.1} s",
        began.elapsed().as_secs_f64()
    );
    // Prometheus scrapes the cluster through the shipped scrape config for the whole
    // run; afterwards every dashboard query must have data.
    let prometheus = match prometheus::unavailable() {
        Some(why) => {
            eprintln!("SKIP the dashboards' queries: {why}");
            None
        }
        None => {
            let dir = dir.path().join("prometheus");
            std::fs::create_dir_all(&dir).expect("prometheus dir");
            let targets = dir.join("targets.json");
            let config = prometheus::config(&targets).expect("prometheus config");
            let kubectl = lab.cluster.kubectl_fn();
            let discovery = prometheus::Discovery::start(
                move || kubectl(&["get", "pods", "-A", "-o", "json"]),
                targets,
            );
            prometheus::check_shipped(&dir, &config).expect("promtool on what ships");
            let server = prometheus::Prometheus::start(&dir, &config).expect("prometheus");
            Some((server, discovery))
        }
    };
    scenarios(&mut lab);
    if let Some((prometheus, _discovery)) = &prometheus {
        dashboards_have_data(&lab, prometheus);
    }
}

fn scenarios(lab: &mut dyn Backend) {
    let mut m = steps::setup(lab);
    steps::ambient(lab, &m);
    steps::authorization(lab, &m);
    steps::policy_status(lab, &m);
    steps::peer_authentication(lab, &m);
    steps::waypoint(lab, &mut m);
    steps::l7(lab, &m);
    steps::ztunnel_restart(lab, &m);
    steps::controller_restart(lab, &m);
    steps::apiserver_restart(lab, &m);
}

/// Every query of the shipped dashboards returns data for the traffic the scenarios
/// made, and names only labels something exports.
fn dashboards_have_data(lab: &dyn Backend, prometheus: &prometheus::Prometheus) {
    let started = Instant::now();
    // The scrape targets: both ztunnels and the waypoint, found through the API.
    eventually(
        lab,
        "Prometheus scraping the ztunnels and the waypoint",
        Duration::from_secs(30),
        || {
            let up = prometheus.up_pods().unwrap_or_default();
            up.iter().filter(|p| p.starts_with("ztunnel-")).count() >= 2
                && up.iter().any(|p| p.starts_with("waypoint-"))
        },
    );
    let labels = prometheus.label_names().expect("label names");
    let queries = prometheus::dashboard_queries().expect("dashboards");
    assert!(
        queries.len() >= 30,
        "the dashboards hold {} queries",
        queries.len()
    );
    let mut failures = Vec::new();
    for q in &queries {
        let expr = prometheus::instantiate(&q.expr);
        for label in prometheus::labels_used(&expr) {
            if !labels.contains(&label) {
                failures.push(format!(
                    "{} / {}: label {label} is exported by nothing: {}",
                    q.dashboard, q.panel, q.expr
                ));
            }
        }
        match prometheus.query(&expr) {
            Ok(result) if !result.is_empty() => {}
            Ok(_) => failures.push(format!("{} / {}: no data: {expr}", q.dashboard, q.panel)),
            Err(e) => failures.push(format!("{} / {}: {e:#}", q.dashboard, q.panel)),
        }
    }
    assert!(
        failures.is_empty(),
        "dashboard queries without data:\n{}\n--- prometheus ---\n{}",
        failures.join("\n"),
        prometheus.log_text()
    );
    println!(
        "E2E dashboards: all {} queries of deploy/grafana have data in Prometheus (checked in {:.1} s)",
        queries.len(),
        started.elapsed().as_secs_f64()
    );
}
