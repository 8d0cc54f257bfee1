//! Retries (VirtualService `retries`): which outcomes of an attempt are retried and
//! how long to wait before the next one. What bounds retries in flight per backend
//! (`maxRetries`, DestinationRule `retryBudget`) is the cluster's (`crate::cluster`).
//!
//! Semantics follow Envoy's, which Istio's users already know:
//! - `attempts` counts retries, not the first try;
//! - `5xx` retries any 5xx answer and any attempt that got no answer (connect
//!   failure, reset, per-try timeout); `gateway-error` retries 502/503/504 and no
//!   answer; `reset` retries no answer; `connect-failure` only failed connects;
//!   `retriable-4xx` retries 409; `retriable-status-codes` the listed codes; the gRPC
//!   conditions read `grpc-status` from the answer's headers;
//! - the wait before retry n (1-based) is uniformly random in
//!   `[0, (2^n - 1) * 25 ms]`, capped at 250 ms (fully jittered exponential backoff).

use std::time::Duration;

use http::{HeaderMap, StatusCode};
use rand::Rng;

/// The outcome conditions a rule retries on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub retriable_4xx: bool,
    pub retriable_status_codes: bool,
    pub grpc_cancelled: bool,
    pub grpc_deadline_exceeded: bool,
    pub grpc_internal: bool,
    pub grpc_resource_exhausted: bool,
    pub grpc_unavailable: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown retry condition {0:?}")]
pub struct UnknownCondition(pub String);

impl RetryOn {
    /// Adds one condition by its Envoy name (`5xx`, `gateway-error`, ...).
    pub fn add(&mut self, name: &str) -> Result<(), UnknownCondition> {
        let flag = match name {
            "5xx" => &mut self.five_xx,
            "gateway-error" => &mut self.gateway_error,
            "reset" => &mut self.reset,
            "connect-failure" => &mut self.connect_failure,
            "refused-stream" => &mut self.refused_stream,
            "retriable-4xx" => &mut self.retriable_4xx,
            "retriable-status-codes" => &mut self.retriable_status_codes,
            "cancelled" => &mut self.grpc_cancelled,
            "deadline-exceeded" => &mut self.grpc_deadline_exceeded,
            "internal" => &mut self.grpc_internal,
            "resource-exhausted" => &mut self.grpc_resource_exhausted,
            "unavailable" => &mut self.grpc_unavailable,
            other => return Err(UnknownCondition(other.to_owned())),
        };
        *flag = true;
        Ok(())
    }

    fn grpc(&self, code: u32) -> bool {
        match code {
            1 => self.grpc_cancelled,
            4 => self.grpc_deadline_exceeded,
            8 => self.grpc_resource_exhausted,
            13 => self.grpc_internal,
            14 => self.grpc_unavailable,
            _ => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub retries: u32,
    /// Deadline of each attempt; past it the attempt counts as timed out.
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    /// Codes `retriable-status-codes` retries.
    pub status_codes: Vec<StatusCode>,
}

/// What one attempt came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An answer arrived (its status and whether it is a gRPC failure is checked).
    Answered(StatusCode),
    /// No connection to an endpoint could be made.
    ConnectFailure,
    /// The endpoint refused the stream before processing it (HTTP/2 REFUSED_STREAM).
    RefusedStream,
    /// Connected, but the stream broke before an answer.
    Reset,
    /// The per-try timeout passed first.
    Timeout,
}

impl RetryPolicy {
    /// Whether `outcome` (with the answer's headers, for gRPC) should be retried.
    pub fn retriable(&self, outcome: Outcome, headers: Option<&HeaderMap>) -> bool {
        let on = &self.on;
        let no_answer = on.five_xx || on.gateway_error || on.reset;
        match outcome {
            Outcome::ConnectFailure => no_answer || on.connect_failure,
            Outcome::RefusedStream => no_answer || on.refused_stream,
            Outcome::Reset | Outcome::Timeout => no_answer,
            Outcome::Answered(status) => {
                let code = status.as_u16();
                (on.five_xx && status.is_server_error())
                    || (on.gateway_error && matches!(code, 502..=504))
                    || (on.retriable_4xx && code == 409)
                    || (on.retriable_status_codes && self.status_codes.contains(&status))
                    || headers
                        .and_then(|h| h.get("grpc-status"))
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u32>().ok())
                        .is_some_and(|c| on.grpc(c))
            }
        }
    }
}

const BACKOFF_BASE: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// The wait before retry `n` (1 for the first retry).
pub fn backoff(n: u32, rng: &mut impl Rng) -> Duration {
    let factor = (1u32 << n.min(16)) - 1;
    let ceiling = BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX);
    ceiling.mul_f64(rng.random::<f64>())
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    fn policy(names: &[&str], codes: &[u16]) -> RetryPolicy {
        let mut on = RetryOn::default();
        for n in names {
            on.add(n).expect("known");
        }
        RetryPolicy {
            retries: 2,
            per_try_timeout: None,
            on,
            status_codes: codes
                .iter()
                .map(|c| StatusCode::from_u16(*c).expect("status"))
                .collect(),
        }
    }

    fn answered(code: u16) -> Outcome {
        Outcome::Answered(StatusCode::from_u16(code).expect("status"))
    }

    #[test]
    fn conditions_retry_what_envoy_retries() {
        let five = policy(&["5xx"], &[]);
        for o in [
            answered(500),
            answered(503),
            Outcome::ConnectFailure,
            Outcome::Reset,
            Outcome::Timeout,
            Outcome::RefusedStream,
        ] {
            assert!(five.retriable(o, None), "5xx retries {o:?}");
        }
        assert!(!five.retriable(answered(404), None));
        let gw = policy(&["gateway-error"], &[]);
        assert!(gw.retriable(answered(502), None) && gw.retriable(answered(504), None));
        assert!(!gw.retriable(answered(500), None));
        let connect = policy(&["connect-failure"], &[]);
        assert!(connect.retriable(Outcome::ConnectFailure, None));
        assert!(!connect.retriable(Outcome::Reset, None));
        assert!(!connect.retriable(answered(503), None));
        let r4 = policy(&["retriable-4xx"], &[]);
        assert!(r4.retriable(answered(409), None) && !r4.retriable(answered(429), None));
        let codes = policy(&["retriable-status-codes"], &[429]);
        assert!(codes.retriable(answered(429), None) && !codes.retriable(answered(503), None));
        let grpc = policy(&["unavailable"], &[]);
        let mut h = HeaderMap::new();
        h.insert("grpc-status", "14".parse().expect("value"));
        assert!(grpc.retriable(answered(200), Some(&h)));
        h.insert("grpc-status", "5".parse().expect("value"));
        assert!(!grpc.retriable(answered(200), Some(&h)));
        assert!(RetryOn::default().add("sometimes").is_err());
    }

    #[test]
    fn backoff_is_jittered_under_an_exponential_ceiling() {
        let mut rng = StdRng::seed_from_u64(3);
        for (n, ceiling) in [(1, 25), (2, 75), (3, 175), (4, 250), (30, 250)] {
            let waits: Vec<Duration> = (0..200).map(|_| backoff(n, &mut rng)).collect();
            let max = waits.iter().max().copied().unwrap_or_default();
            assert!(max <= Duration::from_millis(ceiling), "retry {n}: {max:?}");
            assert!(
                max > Duration::from_millis(ceiling * 8 / 10),
                "retry {n} uses its range: {max:?}"
            );
        }
    }
}
