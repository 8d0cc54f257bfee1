//! Connection metrics under Istio's standard names and labels, so existing dashboards
//! and alerts keep working.

use metrics::{Label, counter};

/// Who reports: the destination side (inbound) or the source side (outbound).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug)]
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
        counter!(
            "istio_tcp_connections_opened_total",
            self.labels(ResponseFlags::None)
        )
        .increment(1);
    }

    /// `sent` and `received` are from the reporter's point of view of the client:
    /// bytes the destination sent back, and bytes it received. A connection that
    /// never reached its destination also counts in `istio_tcp_connections_failed_total`.
    pub fn closed(&self, sent: u64, received: u64, flags: ResponseFlags) {
        let labels = self.labels(flags);
        if flags != ResponseFlags::None {
            counter!("istio_tcp_connections_failed_total", labels.clone()).increment(1);
        }
        counter!("istio_tcp_connections_closed_total", labels.clone()).increment(1);
        counter!("istio_tcp_sent_bytes_total", labels.clone()).increment(sent);
        counter!("istio_tcp_received_bytes_total", labels).increment(received);
    }
}

/// Control-plane and certificate health (shared with the waypoint).
pub use cairn_client::health;
