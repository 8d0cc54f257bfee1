//! Connection metrics under Istio's standard names and labels, so existing dashboards
//! and alerts keep working.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use metrics::{Counter, Label, counter};

/// Who reports: the destination side (inbound) or the source side (outbound).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// `mutual_tls` for HBONE, `none` for plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SecurityPolicy {
    MutualTls,
    None,
}

impl SecurityPolicy {
    fn as_str(self) -> &'static str {
        match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::None => "none",
        }
    }
}

/// Why a connection ended badly (`response_flags`, Istio's values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFlags {
    /// Nothing to report.
    None,
    /// Refused by authorization policy (or STRICT mTLS).
    Denied,
    /// The next hop (peer ztunnel, waypoint or application) could not be reached.
    ConnectFailure,
}

impl ResponseFlags {
    /// The flag for a CONNECT answered with `status` instead of 200: 403 is a policy
    /// refusal, anything else means the destination could not be reached.
    pub fn for_refusal(status: http::StatusCode) -> Self {
        if status == http::StatusCode::FORBIDDEN {
            ResponseFlags::Denied
        } else {
            ResponseFlags::ConnectFailure
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Denied => "DENY",
            ResponseFlags::ConnectFailure => "CONNECT",
        }
    }
}

/// The labels of one connection. Unknown values are `unknown`, as in Istio.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub connection_security_policy: SecurityPolicy,
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        "unknown".into()
    } else {
        s.into()
    }
}

impl ConnLabels {
    fn labels(&self, flags: ResponseFlags) -> Vec<Label> {
        vec![
            Label::new("response_flags", flags.as_str()),
            Label::new("reporter", self.reporter.as_str()),
            Label::new("source_workload", or_unknown(&self.source_workload)),
            Label::new(
                "source_workload_namespace",
                or_unknown(&self.source_workload_namespace),
            ),
            Label::new("source_principal", or_unknown(&self.source_principal)),
            Label::new(
                "destination_workload",
                or_unknown(&self.destination_workload),
            ),
            Label::new(
                "destination_workload_namespace",
                or_unknown(&self.destination_workload_namespace),
            ),
            Label::new(
                "destination_principal",
                or_unknown(&self.destination_principal),
            ),
            Label::new("destination_service", or_unknown(&self.destination_service)),
            Label::new(
                "connection_security_policy",
                self.connection_security_policy.as_str(),
            ),
        ]
    }

    pub fn opened(&self) {
        handles(self).opened.increment(1);
    }

    /// `sent` and `received` are from the reporter's point of view of the client:
    /// bytes the destination sent back, and bytes it received. A connection that
    /// never reached its destination also counts in `istio_tcp_connections_failed_total`.
    pub fn closed(&self, sent: u64, received: u64, flags: ResponseFlags) {
        if flags == ResponseFlags::None {
            let h = handles(self);
            h.closed.increment(1);
            h.sent.increment(sent);
            h.received.increment(received);
            return;
        }
        // Failures are the rare case: their label sets are not kept.
        let labels = self.labels(flags);
        counter!("istio_tcp_connections_failed_total", labels.clone()).increment(1);
        counter!("istio_tcp_connections_closed_total", labels.clone()).increment(1);
        counter!("istio_tcp_sent_bytes_total", labels.clone()).increment(sent);
        counter!("istio_tcp_received_bytes_total", labels).increment(received);
    }
}

/// The counters of one label set with no response flags, registered once: a
/// connection then costs a lookup here instead of building ten labels four times
/// and finding each counter in the recorder's registry.
struct Handles {
    opened: Counter,
    closed: Counter,
    sent: Counter,
    received: Counter,
}

/// Label sets kept at most; past it the cache starts over (a bound against peers
/// or workloads churning, not a limit on the metrics).
const MAX_LABEL_SETS: usize = 4096;

#[derive(Default)]
struct Cache {
    /// Which recorder the handles were registered with (its address): handles made
    /// before a recorder was installed are not kept once it is.
    recorder: usize,
    sets: HashMap<ConnLabels, Arc<Handles>>,
}

fn current_recorder() -> usize {
    metrics::with_recorder(|r| std::ptr::from_ref(r).cast::<()>() as usize)
}

fn handles(labels: &ConnLabels) -> Arc<Handles> {
    static CACHE: std::sync::LazyLock<Mutex<Cache>> = std::sync::LazyLock::new(Mutex::default);
    let recorder = current_recorder();
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if cache.recorder != recorder || cache.sets.len() >= MAX_LABEL_SETS {
        cache.sets.clear();
        cache.recorder = recorder;
    }
    if let Some(h) = cache.sets.get(labels) {
        return h.clone();
    }
    let l = labels.labels(ResponseFlags::None);
    let h = Arc::new(Handles {
        opened: counter!("istio_tcp_connections_opened_total", l.clone()),
        closed: counter!("istio_tcp_connections_closed_total", l.clone()),
        sent: counter!("istio_tcp_sent_bytes_total", l.clone()),
        received: counter!("istio_tcp_received_bytes_total", l),
    });
    cache.sets.insert(labels.clone(), h.clone());
    h
}

/// Control-plane and certificate health (shared with the waypoint).
pub use cairn_client::health;

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

    fn labels(workload: &str) -> ConnLabels {
        ConnLabels {
            reporter: Reporter::Destination,
            source_workload: "client".into(),
            source_workload_namespace: "shop".into(),
            source_principal: "spiffe://cluster.local/ns/shop/sa/client".into(),
            destination_workload: workload.into(),
            destination_workload_namespace: "shop".into(),
            destination_principal: String::new(),
            destination_service: String::new(),
            connection_security_policy: SecurityPolicy::MutualTls,
        }
    }

    /// The sum of `name`'s samples for `workload` in `text` (over response flags).
    fn sample(text: &str, name: &str, workload: &str) -> Option<u64> {
        let want = format!("destination_workload=\"{workload}\"");
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&want))
            .map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    #[test]
    fn cached_counters_count_every_connection_under_the_current_recorder() {
        let first = PrometheusBuilder::new().build_recorder();
        let first_handle = first.handle();
        metrics::with_local_recorder(&first, || {
            for _ in 0..3 {
                labels("web").opened();
                labels("web").closed(10, 20, ResponseFlags::None);
            }
            labels("web").opened();
            labels("web").closed(0, 0, ResponseFlags::Denied);
        });
        let text = first_handle.render();
        assert_eq!(
            sample(&text, "istio_tcp_connections_opened_total", "web"),
            Some(4)
        );
        assert_eq!(sample(&text, "istio_tcp_sent_bytes_total", "web"), Some(30));
        assert_eq!(
            sample(&text, "istio_tcp_received_bytes_total", "web"),
            Some(60)
        );
        assert_eq!(
            sample(&text, "istio_tcp_connections_failed_total", "web"),
            Some(1)
        );
        // Another recorder (a process that installs its own after connections were
        // counted): the same label set counts there, not into the first one's handles.
        let second = PrometheusBuilder::new().build_recorder();
        let second_handle = second.handle();
        metrics::with_local_recorder(&second, || labels("web").opened());
        assert_eq!(
            sample(
                &second_handle.render(),
                "istio_tcp_connections_opened_total",
                "web"
            ),
            Some(1)
        );
        assert_eq!(
            sample(
                &first_handle.render(),
                "istio_tcp_connections_opened_total",
                "web"
            ),
            Some(4)
        );
    }
}
