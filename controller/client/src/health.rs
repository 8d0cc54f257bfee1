//! Control-plane and certificate health, under Cairn's own names (Istio's ztunnel
//! has no stable equivalents): alert on `cairn_xds_connected == 0` for long, on NACKs,
//! and on `cairn_certificate_earliest_expiry_timestamp_seconds - time()` getting short.

use std::time::{SystemTime, UNIX_EPOCH};

use metrics::{counter, gauge};

pub fn xds_connected() {
    gauge!("cairn_xds_connected").set(1.0);
}

/// The xDS stream ended; `reason` is a short fixed word (`error`, `closed`).
pub fn xds_terminated(reason: &'static str) {
    gauge!("cairn_xds_connected").set(0.0);
    counter!("cairn_xds_stream_terminations_total", "reason" => reason).increment(1);
}

pub fn xds_response(type_url: &str, accepted: bool) {
    let result = if accepted { "ack" } else { "nack" };
    counter!("cairn_xds_responses_total", "type_url" => type_url.to_owned(), "result" => result)
        .increment(1);
}

/// A certificate fetch finished, successfully or not.
pub fn certificate_fetched(ok: bool) {
    let result = if ok { "ok" } else { "error" };
    counter!("cairn_certificate_fetches_total", "result" => result).increment(1);
}

/// The earliest expiry among the certificates this proxy serves (0 when none).
pub fn earliest_certificate_expiry(at: Option<SystemTime>) {
    let secs = at
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    gauge!("cairn_certificate_earliest_expiry_timestamp_seconds").set(secs);
}
