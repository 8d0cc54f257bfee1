//! The e2e suite's vocabulary: the app's manifests, the load the client pods send,
//! and what the suite reads back (metrics, status conditions, config dumps).

use std::time::{Duration, Instant};

use cairn_tests::{
    backend::{APP_IMAGE, Backend},
    pod_lab::sum_metric,
};
use serde_json::Value;

pub const NS: &str = "shop";
pub const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
pub const WAYPOINT: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";

pub fn pod(ns: &str, name: &str, sa: &str, labels: &str, node: &str, args: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{{labels}}}\nspec:\n  serviceAccountName: {sa}\n  nodeName: {node}\n  containers: [{{name: app, image: {APP_IMAGE}, args: [app, {args}], ports: [{{name: http, containerPort: 9080}}]}}]\n"
    )
}

pub fn service(name: &str, app: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  selector: {{app: {app}}}\n  ports: [{{name: http, port: 9080, targetPort: 9080}}]\n"
    )
}

pub fn app(lab: &dyn Backend) -> String {
    let nodes = lab.node_names();
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let mut out = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: legacy}}\n"
    );
    for sa in ["client", "other", "reviews", "flaky", "slow"] {
        out += &format!(
            "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {NS}}}\n"
        );
    }
    out += &pod(NS, "client", "client", "app: client", n1, "ratings");
    out += &pod(NS, "other", "other", "app: other", n1, "ratings");
    out += &pod(
        "legacy",
        "outsider",
        "default",
        "app: outsider",
        n1,
        "ratings",
    );
    for v in ["v1", "v2"] {
        out += &pod(
            NS,
            &format!("reviews-{v}"),
            "reviews",
            &format!("app: reviews, version: {v}"),
            n2,
            &format!("reviews, --version, {v}"),
        );
    }
    out += &pod(
        NS,
        "flaky",
        "flaky",
        "app: flaky",
        n2,
        "reviews, --version, flaky, --fail-every, \"3\"",
    );
    out += &pod(
        NS,
        "slow",
        "slow",
        "app: slow",
        n2,
        "reviews, --version, slow, --delay-ms, \"1500\"",
    );
    out += &service("reviews", "reviews");
    out += &service("flaky", "flaky");
    out += &service("slow", "slow");
    out
}

/// What `cairn-demo app load` printed: requests per status code and per version.
pub struct Tally(Value);

impl Tally {
    pub fn code(&self, code: &str) -> u64 {
        self.0["codes"][code].as_u64().unwrap_or(0)
    }
    pub fn version(&self, v: &str) -> u64 {
        self.0["versions"][v].as_u64().unwrap_or(0)
    }
    pub fn requests(&self) -> u64 {
        self.0["requests"].as_u64().unwrap_or(0)
    }
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `count` requests from pod `from` to `target` (ip:port), through whatever the mesh
/// does to them.
pub fn load(
    lab: &dyn Backend,
    ns: &str,
    from: &str,
    target: &str,
    host: &str,
    count: u64,
) -> Tally {
    load_with(lab, (ns, from), target, host, count, 8)
}

/// [`load`] with `concurrency` requests in flight.
pub fn load_with(
    lab: &dyn Backend,
    (ns, from): (&str, &str),
    target: &str,
    host: &str,
    count: u64,
    concurrency: u64,
) -> Tally {
    let (count, concurrency) = (count.to_string(), concurrency.to_string());
    let mut args = lab.app_command();
    args.extend(
        [
            "app",
            "load",
            "--target",
            target,
            "--host",
            host,
            "--count",
            &count,
            "--concurrency",
            &concurrency,
        ]
        .map(str::to_owned),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.exec(ns, from, &args).expect("exec load");
    let text = String::from_utf8_lossy(&out.stdout);
    let value: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "load from {from} to {target}: {e}: {text}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            lab.logs()
        )
    });
    Tally(value)
}

pub fn eventually(
    lab: &dyn Backend,
    what: &str,
    within: Duration,
    mut ok: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    while start.elapsed() < within {
        if ok() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "timed out after {within:?} waiting for: {what}\n{}",
        lab.logs()
    );
}

/// Connections node `i`'s ztunnel terminated with `filters` (destination reporter).
pub fn inbound(lab: &dyn Backend, i: usize, filters: &[&str]) -> f64 {
    let mut all = vec!["reporter=\"destination\""];
    all.extend_from_slice(filters);
    sum_metric(&lab.metrics(i), "istio_tcp_connections_opened_total", &all)
}

pub fn adopted(lab: &dyn Backend, i: usize) -> f64 {
    sum_metric(
        &lab.metrics(i),
        "cairn_capture_pods",
        &["state=\"adopted\""],
    )
}

pub fn cluster_ip(lab: &dyn Backend, name: &str) -> String {
    lab.kubectl(&[
        "-n",
        NS,
        "get",
        "svc",
        name,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])
    .expect("cluster IP")
}

pub fn uids(lab: &dyn Backend) -> String {
    lab.kubectl(&[
        "-n",
        NS,
        "get",
        "pods",
        "-o",
        "jsonpath={.items[*].metadata.uid}",
    ])
    .expect("uids")
}

/// The waypoint pod's `/config_dump`.
pub fn waypoint_dump(lab: &dyn Backend, pod: &str) -> String {
    lab.admin_get(NS, pod, "/config_dump").unwrap_or_default()
}

/// Waits up to `within` until the waypoint pod holds route rule `rule`
/// (`namespace/virtualservice/rule-name`), as its `/config_dump` lists it.
pub fn rule_at_waypoint(lab: &dyn Backend, pod: &str, rule: &str, within: Duration) {
    eventually(lab, &format!("rule {rule} at the waypoint"), within, || {
        waypoint_dump(lab, pod).contains(rule)
    });
}

/// The `Accepted` condition Cairn wrote on an object: (status, reason, message).
pub fn condition(lab: &dyn Backend, kind: &str, name: &str) -> (String, String, String) {
    let field = |f: &str| {
        lab.kubectl(&[
            "-n",
            NS,
            "get",
            kind,
            name,
            "-o",
            &format!("jsonpath={{.status.conditions[?(@.type==\"Accepted\")].{f}}}"),
        ])
        .unwrap_or_default()
    };
    (field("status"), field("reason"), field("message"))
}

pub fn share(part: u64, all: u64) -> f64 {
    100.0 * part as f64 / all.max(1) as f64
}
