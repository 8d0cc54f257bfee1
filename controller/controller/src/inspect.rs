//! `cairn ztunnel-config` and `cairn proxy-status`: what a proxy holds, read from its
//! admin port (15020): `/config_dump` (the model types, as JSON) and `/metrics`.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use cairn_api::model::{Authorization, Service, TunnelProtocol, Workload};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("{admin}: {source}")]
    Connect {
        admin: String,
        source: std::io::Error,
    },
    #[error("{admin}{path}: answered {status}")]
    Status {
        admin: String,
        path: String,
        status: String,
    },
    #[error("{admin}/config_dump is not a ztunnel's: {why}")]
    NotZtunnel { admin: String, why: String },
}

/// GET `path` over `stream` with HTTP/1.0 (the server closes after the answer and
/// never chunks it); the status code and body.
pub fn http_get(mut stream: TcpStream, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    let timeout = Some(Duration::from_secs(5));
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP response head")
    })?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no status code"))?;
    Ok((status, body.to_owned()))
}

/// The body of `http://<admin><path>`; an error for anything but 200.
pub fn fetch(admin: &str, path: &str) -> Result<String, InspectError> {
    let connect = |source| InspectError::Connect {
        admin: admin.into(),
        source,
    };
    let addr: SocketAddr = admin
        .to_socket_addrs()
        .map_err(connect)?
        .next()
        .ok_or_else(|| connect(std::io::Error::other("no address")))?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(connect)?;
    let (status, body) = http_get(stream, admin, path).map_err(connect)?;
    if status != 200 {
        return Err(InspectError::Status {
            admin: admin.into(),
            path: path.into(),
            status: status.to_string(),
        });
    }
    Ok(body)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Certificate {
    identity: String,
    state: String,
    #[serde(default)]
    expires_unix: Option<u64>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ZtunnelDump {
    workloads: Vec<Workload>,
    services: Vec<Service>,
    policies: Vec<Authorization>,
    certificates: Vec<Certificate>,
}

/// Which part of a ztunnel's config to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Workloads,
    Services,
    Policies,
    Certificates,
    All,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn in_words(secs_from_now: i64) -> String {
    let (sign, s) = if secs_from_now < 0 {
        ("expired ", -secs_from_now)
    } else {
        ("in ", secs_from_now)
    };
    let s = s as u64;
    match s {
        0..=119 => format!("{sign}{s}s"),
        120..=7199 => format!("{sign}{}m", s / 60),
        _ => format!("{sign}{}h", s / 3600),
    }
}

/// Tables of a ztunnel's `/config_dump` (`admin` names it in errors).
pub fn ztunnel_config(admin: &str, dump: &str, section: Section) -> Result<String, InspectError> {
    let d: ZtunnelDump = serde_json::from_str(dump).map_err(|e| InspectError::NotZtunnel {
        admin: admin.into(),
        why: e.to_string(),
    })?;
    let show = |s: Section| section == Section::All || section == s;
    let mut out = String::new();
    if show(Section::Workloads) {
        let _ = writeln!(
            out,
            "{:<12} {:<20} {:<15} {:<8} {:<9} {:<10} IDENTITY",
            "NAMESPACE", "NAME", "ADDRESS", "NODE", "PROTOCOL", "WAYPOINT"
        );
        let mut ws: Vec<&Workload> = d.workloads.iter().collect();
        ws.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for w in ws {
            let protocol = if w.native_tunnel {
                "HBONE*"
            } else if w.tunnel_protocol == TunnelProtocol::Hbone {
                "HBONE"
            } else {
                "TCP"
            };
            let addr = w
                .addresses
                .first()
                .map_or("-".to_owned(), ToString::to_string);
            let waypoint = if w.waypoint.is_some() { "yes" } else { "-" };
            let _ = writeln!(
                out,
                "{:<12} {:<20} {:<15} {:<8} {:<9} {:<10} {}",
                w.namespace, w.name, addr, w.node, protocol, waypoint, w.identity
            );
        }
        out.push('\n');
    }
    if show(Section::Services) {
        let _ = writeln!(
            out,
            "{:<12} {:<36} {:<15} {:<14} WAYPOINT",
            "NAMESPACE", "HOSTNAME", "VIP", "PORTS"
        );
        for s in &d.services {
            let vip = s
                .addresses
                .first()
                .map_or("-".to_owned(), |a| a.address.to_string());
            let ports: Vec<String> = s.ports.iter().map(|p| p.service_port.to_string()).collect();
            let waypoint = if s.waypoint.is_some() { "yes" } else { "-" };
            let _ = writeln!(
                out,
                "{:<12} {:<36} {:<15} {:<14} {waypoint}",
                s.namespace,
                s.hostname,
                vip,
                ports.join(",")
            );
        }
        out.push('\n');
    }
    if show(Section::Policies) {
        let _ = writeln!(
            out,
            "{:<12} {:<24} {:<10} {:<7} RULES",
            "NAMESPACE", "NAME", "SCOPE", "ACTION"
        );
        for p in &d.policies {
            let scope = format!("{:?}", p.scope).to_ascii_uppercase();
            let action = format!("{:?}", p.action).to_ascii_uppercase();
            let _ = writeln!(
                out,
                "{:<12} {:<24} {:<10} {:<7} {}{}",
                p.namespace,
                p.name,
                scope,
                action,
                p.rules.len(),
                if p.dry_run { " (dry run)" } else { "" }
            );
        }
        out.push('\n');
    }
    if show(Section::Certificates) {
        let _ = writeln!(out, "{:<10} {:<16} IDENTITY", "STATE", "EXPIRES");
        let now = now_unix() as i64;
        for c in &d.certificates {
            let expires = match (c.expires_unix, &c.error) {
                (Some(t), _) => in_words(t as i64 - now),
                (None, Some(e)) => e.clone(),
                (None, None) => "-".into(),
            };
            let _ = writeln!(out, "{:<10} {:<16} {}", c.state, expires, c.identity);
        }
    }
    Ok(out)
}

/// Sum of the samples of metric `name` in Prometheus text whose labels contain every
/// one of `filters`; None when there is no such sample.
pub fn sum_metric(text: &str, name: &str, filters: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !rest.starts_with(['{', ' ']) || !filters.iter().all(|f| rest.contains(f)) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// One proxy's state, for `proxy-status`.
#[derive(Debug, PartialEq)]
pub struct ProxyStatus {
    pub admin: String,
    /// "ztunnel" or "waypoint"; the error when it did not answer.
    pub kind: Result<String, String>,
    pub connected: Option<bool>,
    pub accepted: f64,
    pub rejected: f64,
    /// What it holds: "4 workloads, 3 services, 1 policies" / "2 routes".
    pub holds: String,
    pub cert_expiry: Option<i64>,
}

/// Reads one proxy's `/metrics` and `/config_dump`.
pub fn proxy_status(admin: &str) -> ProxyStatus {
    let answer = fetch(admin, "/metrics").and_then(|m| Ok((m, fetch(admin, "/config_dump")?)));
    let (metrics, dump) = match answer {
        Ok(x) => x,
        Err(e) => {
            return ProxyStatus {
                admin: admin.into(),
                kind: Err(e.to_string()),
                connected: None,
                accepted: 0.0,
                rejected: 0.0,
                holds: String::new(),
                cert_expiry: None,
            };
        }
    };
    status_of(admin, &metrics, &dump)
}

fn status_of(admin: &str, metrics: &str, dump: &str) -> ProxyStatus {
    let v: serde_json::Value = serde_json::from_str(dump).unwrap_or_default();
    let len = |k: &str| v[k].as_array().map_or(0, Vec::len);
    let (kind, holds) = if v.get("workloads").is_some() {
        (
            "ztunnel",
            format!(
                "{} workloads, {} services, {} policies",
                len("workloads"),
                len("services"),
                len("policies")
            ),
        )
    } else if v.get("config").is_some() {
        let routes = v["config"]["routes"].as_object().map_or(0, |m| m.len());
        ("waypoint", format!("{routes} route configs"))
    } else {
        ("unknown", String::new())
    };
    let accepted =
        sum_metric(metrics, "cairn_xds_responses_total", &["result=\"ack"]).unwrap_or(0.0);
    let rejected =
        sum_metric(metrics, "cairn_xds_responses_total", &["result=\"nack"]).unwrap_or(0.0);
    ProxyStatus {
        admin: admin.into(),
        kind: Ok(kind.into()),
        connected: sum_metric(metrics, "cairn_xds_connected", &[]).map(|c| c >= 1.0),
        accepted,
        rejected,
        holds,
        cert_expiry: sum_metric(
            metrics,
            "cairn_certificate_earliest_expiry_timestamp_seconds",
            &[],
        )
        .map(|t| t as i64),
    }
}

/// The `proxy-status` table.
pub fn render_status(rows: &[ProxyStatus]) -> String {
    let mut out = format!(
        "{:<22} {:<9} {:<9} {:<8} {:<8} {:<16} HOLDS\n",
        "PROXY", "KIND", "XDS", "ACCEPTED", "REJECTED", "CERT EXPIRES"
    );
    let now = now_unix() as i64;
    for r in rows {
        match &r.kind {
            Err(e) => {
                let _ = writeln!(out, "{:<22} unreachable: {e}", r.admin);
            }
            Ok(kind) => {
                let xds = match r.connected {
                    Some(true) => "CONNECTED",
                    Some(false) => "STALE",
                    None => "-",
                };
                let cert = r.cert_expiry.map_or("-".into(), |t| in_words(t - now));
                let _ = writeln!(
                    out,
                    "{:<22} {:<9} {:<9} {:<8} {:<8} {:<16} {}",
                    r.admin, kind, xds, r.accepted, r.rejected, cert, r.holds
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = r#"{
      "workloads": [{"uid": "demo/frontend", "name": "frontend", "namespace": "demo",
        "addresses": ["10.77.1.10"], "identity": "spiffe://cluster.local/ns/demo/sa/frontend",
        "tunnelProtocol": "HBONE", "node": "node-a", "healthy": true}],
      "services": [{"name": "reviews", "namespace": "demo", "hostname": "reviews.demo.svc.cluster.local",
        "addresses": [{"address": "10.96.0.12"}], "ports": [{"servicePort": 9080, "targetPort": 9080}]}],
      "policies": [],
      "certificates": [{"identity": "spiffe://cluster.local/ns/demo/sa/frontend", "state": "available", "expiresUnix": 4102444800},
                       {"identity": "spiffe://cluster.local/ns/demo/sa/x", "state": "failed", "error": "CA unreachable"}]
    }"#;

    #[test]
    fn a_ztunnel_dump_renders_as_tables() {
        let out = ztunnel_config("a:1", DUMP, Section::All).expect("render");
        assert!(
            out.contains("demo         frontend             10.77.1.10      node-a   HBONE     -          spiffe://cluster.local/ns/demo/sa/frontend"),
            "{out}"
        );
        assert!(
            out.contains("reviews.demo.svc.cluster.local       10.96.0.12      9080"),
            "{out}"
        );
        assert!(out.contains("available  in "), "{out}");
        assert!(out.contains("failed     CA unreachable"), "{out}");
        let only = ztunnel_config("a:1", DUMP, Section::Certificates).expect("render");
        assert!(!only.contains("NAMESPACE"), "{only}");
    }

    #[test]
    fn a_dump_that_is_not_a_ztunnels_is_an_error_naming_the_proxy() {
        let err = ztunnel_config("10.0.0.1:15020", "{\"config\": {}}", Section::All)
            .expect_err("not a ztunnel");
        assert!(err.to_string().contains("10.0.0.1:15020"), "{err}");
    }

    #[test]
    fn status_from_metrics_and_dump() {
        let metrics = "cairn_xds_connected 1\ncairn_xds_responses_total{type=\"a\",result=\"ack\"} 3\ncairn_xds_responses_total{type=\"b\",result=\"ack\"} 2\ncairn_xds_responses_total{type=\"a\",result=\"nack\"} 1\ncairn_certificate_earliest_expiry_timestamp_seconds 4102444800\n";
        let s = status_of("z:1", metrics, DUMP);
        assert_eq!(s.kind, Ok("ztunnel".into()));
        assert_eq!(s.connected, Some(true));
        assert_eq!((s.accepted, s.rejected), (5.0, 1.0));
        assert_eq!(s.holds, "1 workloads, 1 services, 0 policies");
        let w = status_of(
            "w:1",
            "cairn_xds_connected 0\n",
            r#"{"identity": "x", "config": {"routes": {"a": {}, "b": {}}}}"#,
        );
        assert_eq!(w.kind, Ok("waypoint".into()));
        assert_eq!(w.connected, Some(false));
        let table = render_status(&[s, w]);
        assert!(table.contains("CONNECTED"), "{table}");
        assert!(
            table.contains("STALE") && table.contains("2 route configs"),
            "{table}"
        );
    }
}
