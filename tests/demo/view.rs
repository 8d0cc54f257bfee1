//! The live view: what the frontend saw (its stats file) beside what the proxies
//! report (their `/metrics`): identities at each hop, the waypoint's requests, and
//! policy denials.

use std::{collections::BTreeMap, fmt::Write};

use crate::app::{Stats, Tally, WINDOW};

/// One sample of Prometheus text: name, labels, value.
#[derive(Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses Prometheus text exposition (comments skipped, escapes in label values
/// undone).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some((s, v)) => (s.trim(), v),
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}').unwrap_or(rest))),
            None => (series, BTreeMap::new()),
        };
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    out
}

fn parse_labels(mut s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    while let Some((key, rest)) = s.split_once("=\"") {
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_owned(), value);
        s = &rest[end..];
    }
    out
}

/// What one proxy said.
pub struct Scrape<'a> {
    pub who: &'a str,
    /// None when it did not answer.
    pub samples: Option<Vec<Sample>>,
}

/// Everything a frame shows.
pub struct Frame<'a> {
    pub header: String,
    pub stats: Option<Stats>,
    pub ztunnels: [Scrape<'a>; 2],
    pub waypoint: Scrape<'a>,
    pub footer: &'a str,
}

fn label<'a>(s: &'a Sample, k: &str) -> &'a str {
    s.labels.get(k).map_or("", String::as_str)
}

fn bar(share: f64, width: usize) -> String {
    "#".repeat((share * width as f64).round() as usize)
}

fn tally(out: &mut String, what: &str, t: &Tally) {
    let n = t.requests.max(1) as f64;
    let _ = writeln!(out, "  {what}: {} requests", t.requests);
    for (version, count) in &t.versions {
        let share = *count as f64 / n;
        let shown = if version == "-" {
            "(none)"
        } else {
            version.as_str()
        };
        let _ = writeln!(
            out,
            "    reviews {shown:<7} {count:>7}  {:>5.1}%  {}",
            share * 100.0,
            bar(share, 40)
        );
    }
    let codes: Vec<String> = t
        .codes
        .iter()
        .map(|(c, n)| format!("{c}: {n} ({:.1}%)", *n as f64 / n_or_one(t) * 100.0))
        .collect();
    let _ = writeln!(out, "    responses   {}", codes.join("   "));
    let _ = writeln!(
        out,
        "    latency     p50 {:.2} ms   p99 {:.2} ms",
        t.p50_ms, t.p99_ms
    );
}

fn n_or_one(t: &Tally) -> f64 {
    t.requests.max(1) as f64
}

/// The text of one frame.
pub fn render(f: &Frame<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}\n", f.header);
    let _ = writeln!(out, "frontend -> reviews (what the app saw)");
    match &f.stats {
        Some(s) => {
            tally(&mut out, &format!("last {} s", WINDOW.as_secs()), &s.recent);
            tally(&mut out, "since start", &s.total);
            if let Some(e) = &s.last_error {
                let _ = writeln!(out, "    last error  {e}");
            }
        }
        None => {
            let _ = writeln!(out, "  (no traffic yet)");
        }
    }

    let _ = writeln!(
        out,
        "\nidentities at each hop (connections, from the ztunnels' istio_tcp_connections_opened_total)"
    );
    for z in &f.ztunnels {
        let Some(samples) = &z.samples else {
            let _ = writeln!(out, "  {:<15} (not answering)", z.who);
            continue;
        };
        let mut rows: BTreeMap<(String, String, String, String), f64> = BTreeMap::new();
        for s in samples
            .iter()
            .filter(|s| s.name == "istio_tcp_connections_opened_total")
        {
            let key = (
                label(s, "reporter").to_owned(),
                label(s, "source_principal").to_owned(),
                label(s, "destination_principal").to_owned(),
                label(s, "connection_security_policy").to_owned(),
            );
            *rows.entry(key).or_default() += s.value;
        }
        for ((reporter, src, dst, policy), n) in rows {
            let src = if src.is_empty() || src == "unknown" {
                "(no identity)".to_owned()
            } else {
                src
            };
            let side = if reporter == "source" { "out" } else { "in " };
            let _ = writeln!(out, "  {:<15} {side} {src} -> {dst}  {policy}  {n}", z.who);
        }
    }

    let _ = writeln!(
        out,
        "\nat the waypoint (requests, from istio_requests_total)"
    );
    let mut denied_l7 = 0.0;
    match &f.waypoint.samples {
        None => {
            let _ = writeln!(out, "  {} (not answering)", f.waypoint.who);
        }
        Some(samples) => {
            let mut rows: BTreeMap<(String, String, String), f64> = BTreeMap::new();
            for s in samples.iter().filter(|s| s.name == "istio_requests_total") {
                let code = label(s, "response_code").to_owned();
                if code == "403" {
                    denied_l7 += s.value;
                }
                let key = (
                    label(s, "source_principal").to_owned(),
                    label(s, "destination_workload").to_owned(),
                    code,
                );
                *rows.entry(key).or_default() += s.value;
            }
            for ((src, dst, code), n) in rows {
                let dst = if dst.is_empty() || dst == "unknown" {
                    "(answered by the waypoint)".to_owned()
                } else {
                    dst
                };
                let _ = writeln!(out, "  {src} -> {dst:<27} {code}  {n}");
            }
        }
    }
    let denied_l4: f64 = f
        .ztunnels
        .iter()
        .filter_map(|z| z.samples.as_ref())
        .flatten()
        .filter(|s| {
            s.name == "istio_tcp_connections_failed_total" && label(s, "response_flags") == "DENY"
        })
        .map(|s| s.value)
        .fold(0.0, |a, b| a + b);
    let _ = writeln!(
        out,
        "\npolicy denials   waypoint (403 RBAC: access denied): {denied_l7}   ztunnels (L4 connections): {denied_l4}"
    );
    let _ = writeln!(out, "\n{}", f.footer);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_with_labels_and_escapes() {
        let text = "# HELP x y\n# TYPE x counter\nistio_requests_total{reporter=\"waypoint\",source_principal=\"spiffe://a/b\",response_code=\"403\",odd=\"q\\\"uote, comma\"} 7\nup 1\n";
        let samples = parse_metrics(text);
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].name, "istio_requests_total");
        assert_eq!(samples[0].labels["source_principal"], "spiffe://a/b");
        assert_eq!(samples[0].labels["response_code"], "403");
        assert_eq!(samples[0].labels["odd"], "q\"uote, comma");
        assert_eq!(samples[0].value, 7.0);
        assert_eq!(samples[1].name, "up");
    }

    #[test]
    fn a_frame_shows_identities_denials_and_the_split() {
        let z = "istio_tcp_connections_opened_total{reporter=\"source\",source_principal=\"spiffe://cluster.local/ns/demo/sa/frontend\",destination_principal=\"spiffe://cluster.local/ns/demo/sa/waypoint\",connection_security_policy=\"mutual_tls\"} 4\n";
        let w = "istio_requests_total{source_principal=\"spiffe://cluster.local/ns/demo/sa/frontend\",destination_workload=\"\",response_code=\"403\"} 25\n";
        let mut stats = Stats::default();
        stats.recent.requests = 100;
        stats.recent.versions.insert("v1".into(), 90);
        stats.recent.versions.insert("v2".into(), 10);
        let frame = Frame {
            header: "h".into(),
            stats: Some(stats),
            ztunnels: [
                Scrape {
                    who: "ztunnel node-a",
                    samples: Some(parse_metrics(z)),
                },
                Scrape {
                    who: "ztunnel node-b",
                    samples: None,
                },
            ],
            waypoint: Scrape {
                who: "waypoint",
                samples: Some(parse_metrics(w)),
            },
            footer: "f",
        };
        let text = render(&frame);
        assert!(text.contains("out spiffe://cluster.local/ns/demo/sa/frontend -> spiffe://cluster.local/ns/demo/sa/waypoint  mutual_tls  4"), "{text}");
        assert!(text.contains("reviews v2           10   10.0%"), "{text}");
        assert!(
            text.contains("waypoint (403 RBAC: access denied): 25"),
            "{text}"
        );
        assert!(text.contains("ztunnel node-b  (not answering)"), "{text}");
    }
}
