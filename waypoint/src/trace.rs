//! Request ids and trace context: every request leaves the waypoint with an
//! `x-request-id` (kept, or made here) and, when it arrived in a trace (W3C
//! `traceparent` or B3 `x-b3-*`), as a child span of it: the waypoint is a hop, so it
//! takes a new span id and the caller's becomes the parent. Requests outside any
//! trace are not put into one (no tracer is configured to collect it).

use http::{HeaderMap, HeaderName, HeaderValue};
use rand::Rng;

// Names made once: looking a header up by a `&str` parses the name every time.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");

/// What the access log says about a request's identity in traces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceIds {
    pub request_id: String,
    /// The trace the request belongs to, if any.
    pub trace_id: Option<String>,
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex(s: &mut String, b: u8) {
    s.push(char::from(HEX[usize::from(b >> 4)]));
    s.push(char::from(HEX[usize::from(b & 0xf)]));
}

fn hex_of(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        push_hex(&mut s, b);
    }
    s
}

fn hex(rng: &mut impl Rng, bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rng.random::<u8>()).collect();
    hex_of(&raw)
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A version-4 UUID, as Envoy makes request ids.
fn uuid(rng: &mut impl Rng) -> String {
    let mut b: [u8; 16] = rng.random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, &byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        push_hex(&mut s, byte);
    }
    s
}

fn get<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn set(h: &mut HeaderMap, name: HeaderName, value: String) {
    if let Ok(v) = HeaderValue::try_from(value) {
        h.insert(name, v);
    }
}

/// Makes the outgoing request's ids in `headers`; returns them for the access log.
pub fn propagate(headers: &mut HeaderMap, rng: &mut impl Rng) -> TraceIds {
    let request_id = match get(headers, &REQUEST_ID).filter(|v| !v.is_empty()) {
        Some(id) => id.to_owned(),
        None => {
            let id = uuid(rng);
            if let Ok(v) = HeaderValue::from_str(&id) {
                headers.insert(REQUEST_ID, v);
            }
            id
        }
    };
    let mut trace_id = None;
    // traceparent: version-traceid-parentid-flags.
    let w3c = get(headers, &TRACEPARENT).and_then(|tp| {
        let parts: Vec<&str> = tp.split('-').collect();
        match parts.as_slice() {
            [version, trace, parent, flags]
                if is_hex(version, 2)
                    && *version != "ff"
                    && is_hex(trace, 32)
                    && is_hex(parent, 16)
                    && is_hex(flags, 2)
                    && trace.bytes().any(|b| b != b'0') =>
            {
                Some((trace.to_string(), flags.to_string()))
            }
            _ => None,
        }
    });
    if let Some((trace, flags)) = w3c {
        set(
            headers,
            TRACEPARENT,
            format!("00-{trace}-{}-{flags}", hex(rng, 8)),
        );
        trace_id = Some(trace);
    }
    let b3 = get(headers, &B3_TRACE)
        .filter(|t| is_hex(t, 32) || is_hex(t, 16))
        .map(str::to_owned);
    if let Some(trace) = b3 {
        if let Some(span) = get(headers, &B3_SPAN).map(str::to_owned) {
            set(headers, B3_PARENT, span);
        }
        set(headers, B3_SPAN, hex(rng, 8));
        trace_id.get_or_insert(trace);
    }
    TraceIds {
        request_id,
        trace_id,
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    #[test]
    fn a_request_id_is_kept_or_made() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut h = HeaderMap::new();
        let ids = propagate(&mut h, &mut rng);
        let made = get(&h, &REQUEST_ID).expect("made").to_owned();
        assert_eq!(ids.request_id, made);
        assert_eq!(made.len(), 36);
        assert_eq!(made.as_bytes()[14], b'4', "version 4: {made}");
        assert_eq!(ids.trace_id, None, "no trace started");
        let again = propagate(&mut h, &mut rng);
        assert_eq!(again.request_id, made, "an existing id is kept");
    }

    #[test]
    fn the_waypoint_is_a_child_span_in_w3c_and_b3_traces() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut h = HeaderMap::new();
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        set(
            &mut h,
            TRACEPARENT,
            format!("00-{trace}-00f067aa0ba902b7-01"),
        );
        set(&mut h, B3_TRACE, trace.into());
        set(&mut h, B3_SPAN, "00f067aa0ba902b7".into());
        let ids = propagate(&mut h, &mut rng);
        assert_eq!(ids.trace_id.as_deref(), Some(trace));
        let tp = get(&h, &TRACEPARENT).expect("traceparent");
        assert!(
            tp.starts_with(&format!("00-{trace}-")) && tp.ends_with("-01"),
            "{tp}"
        );
        assert!(!tp.contains("00f067aa0ba902b7"), "a new span id: {tp}");
        assert_eq!(get(&h, &B3_PARENT), Some("00f067aa0ba902b7"));
        assert_ne!(get(&h, &B3_SPAN), Some("00f067aa0ba902b7"));
        // A malformed traceparent is not propagated as a trace.
        let mut bad = HeaderMap::new();
        set(&mut bad, TRACEPARENT, "00-xyz-00f067aa0ba902b7-01".into());
        assert_eq!(propagate(&mut bad, &mut rng).trace_id, None);
    }
}
