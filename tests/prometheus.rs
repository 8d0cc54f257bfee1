//! Prometheus (Debian's package) scraping a local cluster with the scrape config
//! Cairn ships (`deploy/prometheus/scrape-config.yaml`), and the check that every
//! PromQL query of the shipped Grafana dashboards (`deploy/grafana/*.json`) returns
//! data for the traffic a test made: a query naming a metric or a label nobody
//! exports fails it.
//!
//! Debian builds Prometheus without Kubernetes service discovery, so the shipped
//! job's `kubernetes_sd_configs` is swapped for a file the test keeps current from
//! the API server's pods, with the meta labels Kubernetes discovery gives a pod
//! (`__meta_kubernetes_pod_*`, `__address__` = pod IP): the shipped relabelling is
//! what turns them into targets, as it would on a cluster.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Why Prometheus cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    match Command::new("prometheus").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some(
            "no `prometheus` on the PATH (Debian: apt-get install prometheus; .ci/run installs it)"
                .into(),
        ),
    }
}

fn repo(path: &str) -> PathBuf {
    crate::workspace_root().join(path)
}

pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped scrape config, scraping every second, with its Kubernetes discovery
/// replaced by `targets` (see [`pod_targets`]).
pub fn config(targets: &Path) -> Result<String> {
    let path = repo("deploy/prometheus/scrape-config.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&text).context("scrape config YAML")?;
    let jobs = config["scrape_configs"]
        .as_sequence_mut()
        .context("scrape-config.yaml has no scrape_configs list")?;
    for job in jobs {
        let map = job.as_mapping_mut().context("a job is not a mapping")?;
        if map.remove("kubernetes_sd_configs").is_none() {
            bail!("a shipped job without kubernetes_sd_configs");
        }
        map.insert("scrape_interval".into(), "1s".into());
        map.insert(
            "file_sd_configs".into(),
            serde_yaml::from_str(&format!(
                "[{{files: ['{}'], refresh_interval: 1s}}]",
                targets.display()
            ))?,
        );
    }
    Ok(serde_yaml::to_string(&config)?)
}

/// `kubectl get pods -A -o json` as file discovery groups carrying the labels
/// Kubernetes pod discovery sets (those the shipped relabelling reads).
pub fn pod_targets(pods: &Value) -> Value {
    let groups: Vec<Value> = pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|pod| {
            let ip = pod["status"]["podIP"].as_str()?;
            let mut labels = serde_json::Map::new();
            let mut put = |k: String, v: &Value| {
                if let Some(v) = v.as_str() {
                    labels.insert(k, Value::String(v.to_owned()));
                }
            };
            put(
                "__meta_kubernetes_namespace".into(),
                &pod["metadata"]["namespace"],
            );
            put(
                "__meta_kubernetes_pod_name".into(),
                &pod["metadata"]["name"],
            );
            put(
                "__meta_kubernetes_pod_node_name".into(),
                &pod["spec"]["nodeName"],
            );
            put(
                "__meta_kubernetes_pod_phase".into(),
                &pod["status"]["phase"],
            );
            put("__meta_kubernetes_pod_ip".into(), &pod["status"]["podIP"]);
            for (k, v) in pod["metadata"]["annotations"]
                .as_object()
                .into_iter()
                .flatten()
            {
                put(
                    format!("__meta_kubernetes_pod_annotation_{}", sanitize(k)),
                    v,
                );
            }
            Some(serde_json::json!({"targets": [ip], "labels": labels}))
        })
        .collect();
    Value::Array(groups)
}

/// Prometheus's label-name sanitising: anything but `[a-zA-Z0-9_]` becomes `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Keeps `targets` current from the cluster's pods every second until dropped.
pub struct Discovery {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Discovery {
    pub fn start(
        kubectl: impl Fn() -> Result<String> + Send + 'static,
        targets: PathBuf,
    ) -> Discovery {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(text) = kubectl()
                    && let Ok(pods) = serde_json::from_str::<Value>(&text)
                {
                    let tmp = targets.with_extension("tmp");
                    let written = std::fs::write(&tmp, pod_targets(&pods).to_string())
                        .and_then(|()| std::fs::rename(&tmp, &targets));
                    if let Err(e) = written {
                        eprintln!("writing {}: {e}", targets.display());
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        Discovery {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `promtool check` of the shipped rules and of `config` (the shipped scrape job as
/// this test runs it).
pub fn check_shipped(dir: &Path, config: &str) -> Result<()> {
    let file = dir.join("check.yml");
    std::fs::write(&file, config)?;
    for args in [
        vec![
            "check".to_owned(),
            "rules".into(),
            repo("deploy/prometheus/rules.yaml").display().to_string(),
        ],
        vec![
            "check".to_owned(),
            "config".into(),
            file.display().to_string(),
        ],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .output()
            .context("running promtool")?;
        if !out.status.success() {
            bail!(
                "promtool {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port with `config`, its data in `dir`.
    pub fn start(dir: &Path, config: &str) -> Result<Prometheus> {
        std::fs::create_dir_all(dir)?;
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config)?;
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting prometheus")?;
        let mut prometheus = Prometheus { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while prometheus.get("/-/ready").is_err() {
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                bail!("prometheus exited ({status}):\n{}", prometheus.log_text());
            }
            if Instant::now() > deadline {
                bail!(
                    "prometheus not ready within 30 s:\n{}",
                    prometheus.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(prometheus)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Result<String> {
        let stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))?;
        match cairn_controller::inspect::http_get(stream, &self.addr.to_string(), path)? {
            (200, body) => Ok(body),
            (status, body) => bail!("GET {path}: {status}: {body}"),
        }
    }

    /// An instant query's `data.result`.
    pub fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let body = self.get(&format!("/api/v1/query?query={}", encode(promql)))?;
        let v: Value = serde_json::from_str(&body).context("query answer")?;
        if v["status"] != "success" {
            bail!("{promql}: {body}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Every label name in the TSDB.
    pub fn label_names(&self) -> Result<BTreeSet<String>> {
        let v: Value = serde_json::from_str(&self.get("/api/v1/labels")?)?;
        Ok(v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str().map(str::to_owned))
            .collect())
    }

    /// Scrape targets that are up, by `pod` label.
    pub fn up_pods(&self) -> Result<Vec<String>> {
        Ok(self
            .query("up == 1")?
            .iter()
            .filter_map(|s| s["metric"]["pod"].as_str().map(str::to_owned))
            .collect())
    }
}

/// Percent-encoding for a query string value.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

/// One PromQL query of a shipped dashboard.
#[derive(Debug, Clone)]
pub struct DashboardQuery {
    pub dashboard: String,
    pub panel: String,
    pub expr: String,
}

/// Every panel target's `expr` and every query variable (as `label_values`) of the
/// dashboards in `deploy/grafana`.
pub fn dashboard_queries() -> Result<Vec<DashboardQuery>> {
    let dir = repo("deploy/grafana");
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for file in files {
        let d: Value = serde_json::from_slice(&std::fs::read(&file)?)
            .with_context(|| format!("{} is not JSON", file.display()))?;
        let dashboard = d["title"].as_str().unwrap_or_default().to_owned();
        for panel in d["panels"].as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(DashboardQuery {
                        dashboard: dashboard.clone(),
                        panel: panel["title"].as_str().unwrap_or_default().to_owned(),
                        expr: expr.to_owned(),
                    });
                }
            }
        }
        for var in d["templating"]["list"].as_array().into_iter().flatten() {
            if var["type"] == "query"
                && let Some(q) = var["query"]["query"].as_str().or(var["query"].as_str())
            {
                out.push(DashboardQuery {
                    dashboard: dashboard.clone(),
                    panel: format!("variable ${}", var["name"].as_str().unwrap_or_default()),
                    expr: label_values(q)
                        .with_context(|| format!("{}: variable query {q}", file.display()))?,
                });
            }
        }
    }
    Ok(out)
}

/// `label_values(metric{...}, label)` as the PromQL that has data exactly when the
/// variable has values: `count by (label) (metric{...})`.
fn label_values(q: &str) -> Result<String> {
    let inner = q
        .trim()
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
        .context("only label_values(metric, label) variables are supported")?;
    let (metric, label) = inner
        .rsplit_once(',')
        .context("label_values needs a label")?;
    Ok(format!("count by ({}) ({})", label.trim(), metric.trim()))
}

/// A dashboard query as Grafana would send it with every variable at "All" and a
/// rate interval covering a whole test run.
pub fn instantiate(expr: &str) -> String {
    expr.replace("$__rate_interval", "15m")
        .replace("$__interval", "15m")
        .replace("$__range", "15m")
        .replace("$service", ".*")
        .replace("$namespace", ".*")
        .replace("$workload", ".*")
}

/// Label names a query uses: in `by (...)` / `without (...)` groupings and in
/// `{name op value}` selectors.
pub fn labels_used(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for keyword in ["by", "without"] {
        let mut rest = expr;
        while let Some(i) = rest.find(&format!("{keyword} (")) {
            let after = &rest[i + keyword.len() + 2..];
            if let Some(end) = after.find(')') {
                out.extend(
                    after[..end]
                        .split(',')
                        .map(|l| l.trim().to_owned())
                        .filter(|l| !l.is_empty()),
                );
            }
            rest = &rest[i + keyword.len()..];
        }
    }
    let mut rest = expr;
    while let Some(i) = rest.find('{') {
        let Some(end) = rest[i..].find('}') else {
            break;
        };
        for matcher in rest[i + 1..i + end].split(',') {
            let name: String = matcher
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
        rest = &rest[i + end..];
    }
    // `{{label}}` legend templates are not in expressions; `le` is Prometheus's.
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_read_with_their_labels() {
        let expr = r#"histogram_quantile(0.99, sum by (le, destination_service) (rate(istio_request_duration_milliseconds_bucket{reporter="waypoint",response_code!~"5.."}[$__rate_interval])))"#;
        let labels: Vec<String> = labels_used(expr).into_iter().collect();
        assert_eq!(
            labels,
            ["destination_service", "le", "reporter", "response_code"]
        );
        assert!(instantiate(expr).contains("[15m]"));
        assert_eq!(
            label_values("label_values(istio_requests_total{reporter=\"waypoint\"}, namespace)")
                .expect("variable"),
            "count by (namespace) (istio_requests_total{reporter=\"waypoint\"})"
        );
        assert!(label_values("query_result(up)").is_err());
        assert_eq!(encode("a b{c=\"d\"}"), "a%20b%7Bc%3D%22d%22%7D");
    }

    #[test]
    fn pods_become_discovery_groups_with_kubernetes_meta_labels() {
        let pods = serde_json::json!({"items": [
            {"metadata": {"name": "ztunnel-a", "namespace": "cairn-system",
                          "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "15020"}},
             "spec": {"nodeName": "a"}, "status": {"phase": "Running", "podIP": "10.0.0.1"}},
            {"metadata": {"name": "pending", "namespace": "x"}, "spec": {}, "status": {"phase": "Pending"}},
        ]});
        let groups = pod_targets(&pods);
        assert_eq!(groups.as_array().map(Vec::len), Some(1), "{groups}");
        let labels = &groups[0]["labels"];
        assert_eq!(groups[0]["targets"][0], "10.0.0.1");
        assert_eq!(
            labels["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
            "true"
        );
        assert_eq!(
            labels["__meta_kubernetes_pod_annotation_prometheus_io_port"],
            "15020"
        );
        assert_eq!(labels["__meta_kubernetes_pod_node_name"], "a");
        assert_eq!(labels["__meta_kubernetes_pod_phase"], "Running");
    }
}
