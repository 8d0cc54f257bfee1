//! Per-request telemetry under Istio's names and labels, so Istio's dashboards work
//! on waypoints: `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes` (`reporter="waypoint"`), and one
//! access log line per request (target `access`).
//!
//! A request is recorded when its response body ends or is dropped (client gone),
//! so durations and response sizes cover the whole exchange.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use metrics::{Label, counter, histogram};
use tracing::info;

use crate::{
    ingress::Downstream,
    router::{Body, BoxError},
    trace::TraceIds,
};

/// How often recorded histogram samples are folded into their buckets.
pub const FOLD_HISTOGRAMS_EVERY: Duration = Duration::from_secs(1);

/// Folds the recorder's histogram samples into their buckets every
/// [`FOLD_HISTOGRAMS_EVERY`], for the process's life. The Prometheus recorder keeps
/// every sample until it is folded, which it does on its own only when `/metrics`
/// is rendered: a waypoint nobody scrapes would grow by three samples (24 bytes)
/// per request, without bound.
pub fn fold_histograms(prometheus: metrics_exporter_prometheus::PrometheusHandle) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(FOLD_HISTOGRAMS_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            prometheus.run_upkeep();
        }
    });
}

/// Envoy's response flag for how the waypoint answered, in the response's
/// extensions (`-` when none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseFlag(pub &'static str);

impl ResponseFlag {
    pub const NO_ROUTE: Self = Self("NR");
    pub const FAULT_ABORT: Self = Self("FI");
    pub const FAULT_DELAY: Self = Self("DI");
    pub const NO_HEALTHY_UPSTREAM: Self = Self("UH");
    pub const CONNECT_FAILURE: Self = Self("UF");
    pub const UPSTREAM_RESET: Self = Self("UC");
    pub const UPSTREAM_TIMEOUT: Self = Self("UT");
    pub const RETRIES_EXHAUSTED: Self = Self("URX");
    pub const OVERFLOW: Self = Self("UO");
}

/// The backend a forwarded request went to, in the response's extensions.
#[derive(Clone, Debug)]
pub struct Routed {
    pub backend: String,
    pub route: String,
}

/// What a finished request is recorded with.
pub struct Record {
    pub start: Instant,
    pub downstream: Option<Arc<Downstream>>,
    pub method: http::Method,
    /// The request's URI as it arrived (the access log shows its path).
    pub uri: http::Uri,
    pub grpc: bool,
    pub ids: TraceIds,
    /// Request body bytes read so far; `None` for a request that came without a body.
    pub request_bytes: Option<Arc<AtomicU64>>,
    pub status: http::StatusCode,
    pub grpc_status: Option<String>,
    pub flag: Option<ResponseFlag>,
    pub routed: Option<Routed>,
}

/// What a request's metric labels depend on; the metric handles of each label set are
/// made once (label sets repeat: a handful per service and version).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct LabelKey {
    source_principal: Option<String>,
    source_namespace: Option<String>,
    /// `hostname` of the service.
    service: Option<String>,
    version: Option<String>,
    grpc: bool,
    code: u16,
    grpc_status: Option<String>,
    flag: &'static str,
    mtls: bool,
}

struct Handles {
    requests: metrics::Counter,
    duration: metrics::Histogram,
    request_bytes: metrics::Histogram,
    response_bytes: metrics::Histogram,
}

/// Label sets kept at most; past it the cache starts over (a bound against
/// unbounded principal or status cardinality, not a limit on the metrics).
const MAX_LABEL_SETS: usize = 4096;

/// A request's label inputs, borrowed: compared against the recent label sets
/// without building (allocating) a [`LabelKey`].
#[derive(Clone, Copy)]
struct KeyView<'a> {
    identity: Option<&'a cairn_identity::SpiffeId>,
    service: Option<&'a str>,
    version: Option<&'a str>,
    grpc: bool,
    code: u16,
    grpc_status: Option<&'a str>,
    flag: &'static str,
}

/// A recently used label set, keyed as its inputs were.
struct Recent {
    identity: Option<cairn_identity::SpiffeId>,
    service: Option<String>,
    version: Option<String>,
    grpc: bool,
    code: u16,
    grpc_status: Option<String>,
    flag: &'static str,
    handles: Arc<Handles>,
}

impl Recent {
    fn is(&self, v: &KeyView<'_>) -> bool {
        self.code == v.code
            && self.flag == v.flag
            && self.grpc == v.grpc
            && self.version.as_deref() == v.version
            && self.service.as_deref() == v.service
            && self.grpc_status.as_deref() == v.grpc_status
            && self.identity.as_ref() == v.identity
    }
}

/// Recent label sets per worker thread: the common case (the same few sets request
/// after request) costs comparisons, not allocations, hashing or a lock.
const RECENT_PER_THREAD: usize = 16;

thread_local! {
    static RECENT: std::cell::RefCell<Vec<Recent>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn handles_for(v: KeyView<'_>) -> Arc<Handles> {
    let hit = RECENT.with(|r| {
        r.borrow()
            .iter()
            .find(|e| e.is(&v))
            .map(|e| e.handles.clone())
    });
    if let Some(h) = hit {
        return h;
    }
    let h = handles(LabelKey {
        source_principal: v.identity.map(|i| i.to_string()),
        source_namespace: v.identity.map(|i| i.namespace().to_owned()),
        service: v.service.map(str::to_owned),
        version: v.version.map(str::to_owned),
        grpc: v.grpc,
        code: v.code,
        grpc_status: v.grpc_status.map(str::to_owned),
        flag: v.flag,
        mtls: v.identity.is_some(),
    });
    RECENT.with(|r| {
        let mut r = r.borrow_mut();
        if r.len() >= RECENT_PER_THREAD {
            r.remove(0);
        }
        r.push(Recent {
            identity: v.identity.cloned(),
            service: v.service.map(str::to_owned),
            version: v.version.map(str::to_owned),
            grpc: v.grpc,
            code: v.code,
            grpc_status: v.grpc_status.map(str::to_owned),
            flag: v.flag,
            handles: h.clone(),
        });
    });
    h
}

fn handles(key: LabelKey) -> Arc<Handles> {
    static CACHE: std::sync::OnceLock<Mutex<HashMap<LabelKey, Arc<Handles>>>> =
        std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = map.get(&key) {
        return h.clone();
    }
    if map.len() >= MAX_LABEL_SETS {
        map.clear();
    }
    let labels = labels(&key);
    let h = Arc::new(Handles {
        requests: counter!("istio_requests_total", labels.clone()),
        duration: histogram!("istio_request_duration_milliseconds", labels.clone()),
        request_bytes: histogram!("istio_request_bytes", labels.clone()),
        response_bytes: histogram!("istio_response_bytes", labels),
    });
    map.insert(key, h.clone());
    h
}

fn labels(k: &LabelKey) -> Vec<Label> {
    let mut host_parts = k.service.as_deref().unwrap_or_default().split('.');
    let (service_name, service_namespace) = (host_parts.next(), host_parts.next());
    vec![
        Label::new("reporter", "waypoint"),
        Label::new("source_workload", "unknown"),
        Label::new(
            "source_workload_namespace",
            or_unknown(k.source_namespace.as_deref()),
        ),
        Label::new(
            "source_principal",
            or_unknown(k.source_principal.as_deref()),
        ),
        Label::new("source_app", "unknown"),
        Label::new("source_version", "unknown"),
        Label::new("destination_service", or_unknown(k.service.as_deref())),
        Label::new("destination_service_name", or_unknown(service_name)),
        Label::new(
            "destination_service_namespace",
            or_unknown(service_namespace),
        ),
        Label::new("destination_workload", "unknown"),
        Label::new("destination_workload_namespace", "unknown"),
        Label::new("destination_principal", "unknown"),
        Label::new("destination_app", "unknown"),
        Label::new("destination_version", or_unknown(k.version.as_deref())),
        Label::new("request_protocol", if k.grpc { "grpc" } else { "http" }),
        Label::new("response_code", k.code.to_string()),
        Label::new(
            "grpc_response_status",
            k.grpc_status.clone().unwrap_or_default(),
        ),
        Label::new("response_flags", k.flag),
        Label::new(
            "connection_security_policy",
            if k.mtls { "mutual_tls" } else { "none" },
        ),
    ]
}

fn or_unknown(s: Option<&str>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or("unknown").to_owned()
}

impl Record {
    fn finish(self, response_bytes: u64) {
        let elapsed_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let d = self.downstream.as_deref();
        let identity = d.and_then(|d| d.identity.as_ref());
        // The service's hostname: `name.namespace.svc.<domain>:port` -> parts.
        let service = d.map(|d| d.service.rsplit_once(':').map_or(&*d.service, |(h, _)| h));
        // `host|subset|port`.
        let version = self
            .routed
            .as_ref()
            .and_then(|r| r.backend.split('|').nth(1));
        let flag = self.flag.map_or("-", |f| f.0);
        let request_bytes = self
            .request_bytes
            .as_ref()
            .map_or(0, |n| n.load(Ordering::Relaxed));
        let h = handles_for(KeyView {
            identity,
            service,
            version,
            grpc: self.grpc,
            code: self.status.as_u16(),
            grpc_status: self.grpc_status.as_deref(),
            flag,
        });
        h.requests.increment(1);
        h.duration.record(elapsed_ms);
        h.request_bytes.record(request_bytes as f64);
        h.response_bytes.record(response_bytes as f64);
        info!(
            target: "access",
            method = %self.method,
            path = %self.uri.path(),
            protocol = if self.grpc { "grpc" } else { "http" },
            response_code = self.status.as_u16(),
            response_flags = flag,
            duration_ms = format_args!("{elapsed_ms:.3}"),
            bytes_received = request_bytes,
            bytes_sent = response_bytes,
            // Fields are only rendered when the access log is on.
            source_principal = identity.map(|i| i.to_string()).as_deref().unwrap_or("-"),
            destination_service = service.unwrap_or("-"),
            route = self.routed.as_ref().map_or("-", |r| r.route.as_str()),
            upstream = self.routed.as_ref().map_or("-", |r| r.backend.as_str()),
            request_id = %self.ids.request_id,
            trace_id = self.ids.trace_id.as_deref().unwrap_or("-"),
            "request"
        );
    }
}

/// Counts a body's data bytes into a shared counter (request bodies, read by the
/// upstream while the record waits for the response).
pub struct Counting {
    inner: Body,
    count: Arc<AtomicU64>,
}

impl Counting {
    pub fn new(inner: Body, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl HttpBody for Counting {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that records its request once it ends or is dropped.
pub struct Metered {
    inner: Body,
    bytes: u64,
    record: Option<Record>,
}

impl Metered {
    pub fn new(inner: Body, record: Record) -> Self {
        Self {
            inner,
            bytes: 0,
            record: Some(record),
        }
    }

    fn finish(&mut self) {
        if let Some(r) = self.record.take() {
            r.finish(self.bytes);
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.finish();
    }
}

impl HttpBody for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
