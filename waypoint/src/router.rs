//! One service port's request path: select the rule, inject its faults, then answer
//! directly, redirect, or forward to a backend chosen by weight (a forwarding rule's
//! CORS answers preflights and decorates responses).

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Body as _;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use crate::{
    authz::{Attributes, Policies, Verdict},
    cors::Cors,
    fault::Abort,
    ingress::Downstream,
    jwt::Authn,
    matching::RequestMatch,
    retry::{Outcome, backoff},
    route::{Action, BackendHeaders, RouteTable, Rule, WeightedBackend},
    telemetry::{Counting, Metered, Record, ResponseFlag, Routed},
    trace,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request and response bodies, streamed.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no endpoint known for backend {0}")]
    NoEndpoint(String),
    #[error("connecting to {backend}: {source}")]
    Connect { backend: String, source: BoxError },
    #[error("{backend} refused the stream: {source}")]
    RefusedStream { backend: String, source: BoxError },
    #[error("{backend} reset or closed before answering: {source}")]
    Reset { backend: String, source: BoxError },
    #[error("opaque TCP to {0} is not supported by this upstream")]
    OpaqueUnsupported(String),
    #[error("{0}: connection pool full (DestinationRule connectionPool)")]
    Overflow(String),
}

impl UpstreamError {
    /// What the failure means to the retry policy; `None` when retrying cannot help
    /// (no endpoint to try).
    fn outcome(&self) -> Option<Outcome> {
        match self {
            UpstreamError::NoEndpoint(_)
            | UpstreamError::OpaqueUnsupported(_)
            | UpstreamError::Overflow(_) => None,
            UpstreamError::Connect { .. } => Some(Outcome::ConnectFailure),
            UpstreamError::RefusedStream { .. } => Some(Outcome::RefusedStream),
            UpstreamError::Reset { .. } => Some(Outcome::Reset),
        }
    }
}

pub type UpstreamFuture =
    Pin<Box<dyn Future<Output = Result<Response<Body>, UpstreamError>> + Send>>;

/// A byte stream to an endpoint, for connections that are not HTTP.
pub trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ByteStream for T {}

pub type OpenFuture =
    Pin<Box<dyn Future<Output = Result<Box<dyn ByteStream>, UpstreamError>> + Send>>;

/// Reaches a backend's endpoints.
pub trait Upstream: Send + Sync + 'static {
    /// Sends one request to one of `backend`'s endpoints.
    fn send(&self, backend: &str, req: Request<Body>) -> UpstreamFuture;

    /// A slot for one more retry to `backend`, held while the retry runs; `None`
    /// when the backend's `maxRetries` retries, or as many as its retry budget
    /// allows, are already in flight. Unlimited unless the upstream counts.
    fn retry_slot(&self, _backend: &str) -> Option<RetrySlot> {
        Some(RetrySlot::unlimited())
    }

    /// Opens a byte stream to one of `backend`'s endpoints, for opaque TCP passed
    /// through. Upstreams that only answer HTTP (in-memory ones in tests) refuse.
    fn open(&self, backend: &str) -> OpenFuture {
        let backend = backend.to_owned();
        Box::pin(async move { Err(UpstreamError::OpaqueUnsupported(backend)) })
    }
}

/// One retry in flight, counted against its backend's limit until dropped.
#[must_use]
pub struct RetrySlot(Option<Arc<std::sync::atomic::AtomicUsize>>);

impl RetrySlot {
    pub fn unlimited() -> Self {
        RetrySlot(None)
    }

    /// A slot from `count` if fewer than `max` are taken.
    pub fn counted(count: &Arc<std::sync::atomic::AtomicUsize>, max: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        let mut now = count.load(Ordering::Acquire);
        loop {
            if now >= max {
                return None;
            }
            match count.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(RetrySlot(Some(count.clone()))),
                Err(actual) => now = actual,
            }
        }
    }
}

impl Drop for RetrySlot {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// Request bodies up to this size are kept while an attempt runs, so a retry can send
/// them again; larger or unsized (chunked) bodies are streamed and not retried.
pub const RETRY_BUFFER_LIMIT: usize = 64 * 1024;

/// How long a mirrored copy may take when its route sets no timeout (Envoy's default
/// route timeout). Without a bound, a mirror that accepts and never answers would
/// hold a task and a connection per copy, without limit.
pub const MIRROR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

pub struct Router {
    table: ArcSwap<RouteTable>,
    upstream: Arc<dyn Upstream>,
    rng: Mutex<StdRng>,
}

/// How one attempt ended.
enum Attempt {
    Answered(Response<Body>),
    Failed(UpstreamError),
    TimedOut,
}

impl Attempt {
    fn outcome(&self) -> Option<Outcome> {
        match self {
            Attempt::Answered(r) => Some(Outcome::Answered(r.status())),
            Attempt::Failed(e) => e.outcome(),
            Attempt::TimedOut => Some(Outcome::Timeout),
        }
    }

    /// The client's answer when this was the last attempt (after `retries`).
    fn into_response(self, backend: &str, retries: u32) -> Response<Body> {
        let exhausted = |flag| {
            if retries > 0 {
                ResponseFlag::RETRIES_EXHAUSTED
            } else {
                flag
            }
        };
        match self {
            Attempt::Answered(r) => r,
            Attempt::Failed(UpstreamError::NoEndpoint(_)) => {
                warn!(%backend, "no endpoint for backend");
                respond_flagged(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no healthy upstream",
                    ResponseFlag::NO_HEALTHY_UPSTREAM,
                )
            }
            Attempt::Failed(UpstreamError::Overflow(_)) => {
                warn!(%backend, "upstream connection pool overflow");
                respond_flagged(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                    ResponseFlag::OVERFLOW,
                )
            }
            Attempt::Failed(e) => {
                warn!(%backend, error = %e, retries, "upstream failed");
                let flag = match e {
                    UpstreamError::Connect { .. } => ResponseFlag::CONNECT_FAILURE,
                    _ => ResponseFlag::UPSTREAM_RESET,
                };
                respond_flagged(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers",
                    exhausted(flag),
                )
            }
            Attempt::TimedOut => {
                warn!(%backend, retries, "upstream per-try timeout");
                respond_flagged(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout",
                    exhausted(ResponseFlag::UPSTREAM_TIMEOUT),
                )
            }
        }
    }
}

/// `reviews:9080` -> `reviews-shadow:9080`, in the Host header and a URI authority.
fn shadow_host(req: &mut Request<Body>) {
    let shadow = |host: &str| match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{h}-shadow:{port}")
        }
        _ => format!("{host}-shadow"),
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(shadow);
    if let Some(v) = host.and_then(|h| header::HeaderValue::try_from(h).ok()) {
        req.headers_mut().insert(header::HOST, v);
    }
    if let Some(a) = req.uri().authority().map(|a| shadow(a.as_str())) {
        let mut parts = req.uri().clone().into_parts();
        if let Ok(a) = http::uri::Authority::try_from(a) {
            parts.authority = Some(a);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
}

/// The policies' verdict on a request, from its head and who sent it.
fn authorize(
    policies: &Policies,
    parts: &http::request::Parts,
    request_principal: Option<&str>,
) -> Verdict {
    if policies.policies.is_empty() {
        return Verdict::Allow;
    }
    let downstream = parts.extensions.get::<Arc<Downstream>>();
    let identity = downstream.and_then(|d| d.identity.as_ref());
    let principal = identity.map(|i| i.principal());
    let host = parts.uri.authority().map(|a| a.as_str()).or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    policies.evaluate(&Attributes {
        principal: principal.as_deref(),
        namespace: identity.map(|i| i.namespace()),
        request_principal,
        host,
        port: downstream.map_or(0, |d| d.destination.port()),
        method: parts.method.as_str(),
        path: parts.uri.path(),
        headers: &parts.headers,
    })
}

/// The request head again, for another attempt (of the extensions, only who sent it).
fn copy_head(parts: &http::request::Parts, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    if let Some(d) = parts.extensions.get::<Arc<Downstream>>() {
        req.extensions_mut().insert(d.clone());
    }
    req
}

/// The whole body when it is small enough to send again, else the body untouched.
/// Trailers of a buffered body are dropped.
async fn buffer_for_retry(mut body: Body) -> Result<Result<Bytes, Body>, BoxError> {
    let fits = body
        .size_hint()
        .upper()
        .is_some_and(|n| n <= RETRY_BUFFER_LIMIT as u64);
    if !fits {
        return Ok(Err(body));
    }
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if buf.len() + data.len() > RETRY_BUFFER_LIMIT {
            return Err("request body longer than its declared length".into());
        }
        buf.extend_from_slice(&data);
    }
    Ok(Ok(buf.freeze()))
}

/// Envoy's answer bodies, so clients and tests see the same text as with Istio.
fn respond_flagged(status: StatusCode, body: &'static str, flag: ResponseFlag) -> Response<Body> {
    let mut resp = respond(status, body);
    resp.extensions_mut().insert(flag);
    resp
}

/// A gRPC status as Envoy's fault filter answers it: HTTP 200, trailers-only (the
/// status in the headers), no body.
fn grpc_abort(code: u32) -> Response<Body> {
    let mut resp = Response::new(full(""));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", header::HeaderValue::from(code));
    h.insert(
        "grpc-message",
        header::HeaderValue::from_static("fault filter abort"),
    );
    resp.extensions_mut().insert(ResponseFlag::FAULT_ABORT);
    resp
}

fn respond(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    resp
}

/// One of `backends`, with probability weight / total; `None` when all weights are 0.
pub fn pick<'a>(
    backends: &'a [WeightedBackend],
    rng: &mut impl Rng,
) -> Option<&'a WeightedBackend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut ticket = rng.random_range(0..total);
    backends.iter().find(|b| {
        let w = u64::from(b.weight);
        if ticket < w {
            true
        } else {
            ticket -= w;
            false
        }
    })
}

impl Router {
    /// `seed` fixes the random source (tests); `None` seeds from the OS.
    pub fn new(table: RouteTable, upstream: Arc<dyn Upstream>, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Router {
            table: ArcSwap::from_pointee(table),
            upstream,
            rng: Mutex::new(rng),
        }
    }

    /// A byte stream to one of `backend`'s endpoints (opaque TCP).
    pub fn open(&self, backend: &str) -> OpenFuture {
        self.upstream.open(backend)
    }

    /// Swaps the routing config; requests in flight finish with the one they started with.
    pub fn set_table(&self, table: RouteTable) {
        self.table.store(Arc::new(table));
    }

    /// Answers one request: policy check, rule, fault, action; recorded in
    /// metrics and the access log when the response ends.
    pub async fn handle(&self, mut req: Request<Body>) -> Response<Body> {
        let start = std::time::Instant::now();
        let ids = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            trace::propagate(req.headers_mut(), &mut *rng)
        };
        let grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let downstream = req.extensions().get::<Arc<Downstream>>().cloned();
        let method = req.method().clone();
        let uri = req.uri().clone();
        // Bodies are counted as they are read; a request without one (most GETs) is
        // not wrapped.
        let (req, request_bytes) = match req.body().is_end_stream() {
            true => (req, None),
            false => {
                let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
                (req.map(|b| Counting::new(b, n.clone()).boxed()), Some(n))
            }
        };
        let resp = self.answer(req).await;
        let (mut parts, body) = resp.into_parts();
        let record = Record {
            start,
            downstream,
            method,
            uri,
            grpc,
            ids,
            request_bytes,
            status: parts.status,
            grpc_status: parts
                .headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            flag: parts.extensions.remove::<ResponseFlag>(),
            routed: parts.extensions.remove::<Routed>(),
        };
        Response::from_parts(parts, Metered::new(body, record).boxed())
    }

    async fn answer(&self, req: Request<Body>) -> Response<Body> {
        let table = self.table.load_full();
        let (mut parts, body) = req.into_parts();
        let request_principal = match table.jwt.is_empty() {
            true => None,
            false => match table.jwt.authenticate(&mut parts.headers) {
                Authn::NoToken => None,
                Authn::Valid(p) => Some(p),
                Authn::Invalid(why) => {
                    info!(reason = why, path = %parts.uri.path(), "request token refused");
                    return respond(StatusCode::UNAUTHORIZED, why);
                }
            },
        };
        if let Verdict::Deny(by) = authorize(&table.policies, &parts, request_principal.as_deref())
        {
            let downstream = parts.extensions.get::<Arc<Downstream>>();
            info!(
                policy = by.as_deref().unwrap_or("(no ALLOW policy matched)"),
                source_principal = downstream.and_then(|d| d.identity.as_ref()).map(|i| i.principal()).unwrap_or_default(),
                method = %parts.method,
                path = %parts.uri.path(),
                "request denied by policy"
            );
            return respond(StatusCode::FORBIDDEN, "RBAC: access denied");
        }
        let Some((rule, matched)) = table.select_match(&parts) else {
            debug!(path = %parts.uri.path(), "no route matched");
            return respond_flagged(
                StatusCode::NOT_FOUND,
                "no route matched",
                ResponseFlag::NO_ROUTE,
            );
        };
        let (fault, backend) = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            let fault = rule.fault.as_ref().map(|f| f.decide(&mut *rng));
            let backend = match &rule.action {
                Action::Forward(backends) => {
                    pick(backends, &mut *rng).map(|b| (b.backend.clone(), b.headers.clone()))
                }
                _ => None,
            };
            (fault.unwrap_or_default(), backend)
        };
        if let Some(delay) = fault.delay {
            tokio::time::sleep(delay).await;
        }
        match fault.abort {
            Some(Abort::Http(status)) => {
                return respond_flagged(status, "fault filter abort", ResponseFlag::FAULT_ABORT);
            }
            Some(Abort::Grpc(code)) => return grpc_abort(code),
            None => {}
        }
        let delayed = fault.delay.is_some();
        let (backend, backend_headers) = backend.unzip();
        let backend_headers = backend_headers.flatten();
        // CORS, as Envoy's filter runs behind Istio: after faults, on routes that
        // forward (not on redirects or direct responses).
        let cors = match (&rule.action, rule.cors.as_deref()) {
            (Action::Forward(_), Some(policy)) => {
                match policy.decide(&parts.method, &parts.headers) {
                    Cors::Pass => None,
                    Cors::Answer(headers) => {
                        let mut resp = Response::new(full(Bytes::new()));
                        *resp.headers_mut() = headers;
                        if delayed {
                            resp.extensions_mut().insert(ResponseFlag::FAULT_DELAY);
                        }
                        return resp;
                    }
                    Cors::Allowed(origin) => Some((policy, origin)),
                }
            }
            _ => None,
        };
        let mut resp = match &rule.action {
            Action::Respond { status, body } => {
                let mut resp = Response::new(full(body.clone()));
                *resp.status_mut() = *status;
                resp
            }
            Action::Redirect(redirect) => match redirect.location(&parts, matched) {
                Ok(location) => {
                    let mut resp = respond(redirect.status, "");
                    resp.headers_mut().insert(header::LOCATION, location);
                    resp
                }
                Err(e) => {
                    debug!(error = %e, "redirect");
                    return respond(StatusCode::BAD_REQUEST, "invalid redirect target");
                }
            },
            Action::Forward(_) => {
                let sent = self.send_for_rule(
                    rule,
                    matched,
                    backend.as_deref(),
                    backend_headers.as_deref(),
                    parts,
                    body,
                );
                match sent.await {
                    Ok(resp) => resp,
                    // The waypoint's own answer (503, 504): as it is, plus CORS.
                    Err(mut resp) => {
                        if let Some((policy, origin)) = cors {
                            policy.decorate(origin, resp.headers_mut());
                        }
                        return resp;
                    }
                }
            }
        };
        rule.response_headers.apply(resp.headers_mut());
        if let Some(h) = &backend_headers {
            h.response.apply(resp.headers_mut());
        }
        if delayed && resp.extensions().get::<ResponseFlag>().is_none() {
            resp.extensions_mut().insert(ResponseFlag::FAULT_DELAY);
        }
        if let Action::Forward(_) = &rule.action {
            resp.extensions_mut().insert(Routed {
                backend: backend.unwrap_or_default(),
                route: rule.name.clone(),
            });
        }
        // Last, as Envoy's CORS filter sees the response after the router's edits.
        if let Some((policy, origin)) = cors {
            policy.decorate(origin, resp.headers_mut());
        }
        resp
    }

    /// A forwarding rule's request to the picked `backend` (none: no healthy
    /// endpoint) within the rule's timeout; `Err` is the waypoint's own answer.
    async fn send_for_rule(
        &self,
        rule: &Rule,
        matched: Option<&RequestMatch>,
        backend: Option<&str>,
        backend_headers: Option<&BackendHeaders>,
        mut parts: http::request::Parts,
        body: Body,
    ) -> Result<Response<Body>, Response<Body>> {
        let Some(backend) = backend else {
            return Err(respond_flagged(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream",
                ResponseFlag::NO_HEALTHY_UPSTREAM,
            ));
        };
        rule.request_headers.apply(&mut parts.headers);
        if let Some(h) = backend_headers {
            h.request.apply(&mut parts.headers);
        }
        if let Some(rewrite) = &rule.rewrite {
            rewrite.apply(&mut parts, matched);
        }
        let forward = self.forward(rule, backend, parts, body);
        match rule.timeout {
            Some(t) => tokio::time::timeout(t, forward).await.map_err(|_| {
                warn!(%backend, timeout = ?t, "upstream request timeout");
                respond_flagged(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout",
                    ResponseFlag::UPSTREAM_TIMEOUT,
                )
            }),
            None => Ok(forward.await),
        }
    }

    /// Sends copies to the rule's mirrors that this request is picked for, with
    /// `-shadow` appended to the host as Envoy does. Fire and forget: answers and
    /// failures are dropped. A body too large (or unsized) to keep is not mirrored.
    fn mirror(&self, rule: &Rule, parts: &http::request::Parts, body: Option<&Bytes>) {
        if rule.mirrors.is_empty() {
            return;
        }
        let picked: Vec<&str> = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            rule.mirrors
                .iter()
                .filter(|m| m.percent.hit(&mut *rng))
                .map(|m| m.backend.as_str())
                .collect()
        };
        if picked.is_empty() {
            return;
        }
        let Some(body) = body else {
            debug!(route = %rule.name, "request body too large or unsized to mirror; not mirrored");
            return;
        };
        for backend in picked {
            let mut copy = copy_head(parts, full(body.clone()));
            shadow_host(&mut copy);
            let sent = self.upstream.send(backend, copy);
            let backend = backend.to_owned();
            let timeout = rule.timeout.unwrap_or(MIRROR_TIMEOUT);
            tokio::spawn(async move {
                // The answer is read to its end (so its connection can be reused)
                // and dropped; a mirror that stalls is given up on.
                let answered = async {
                    let mut body = sent.await?.into_body();
                    while let Some(frame) = body.frame().await {
                        frame.map_err(|source| UpstreamError::Reset {
                            backend: backend.clone(),
                            source,
                        })?;
                    }
                    Ok::<_, UpstreamError>(())
                };
                match tokio::time::timeout(timeout, answered).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(%backend, error = %e, "mirrored request failed"),
                    Err(_) => debug!(%backend, ?timeout, "mirrored request timed out; dropped"),
                }
            });
        }
    }

    /// Sends the request to `backend`, retrying as the rule says while the backend's
    /// `maxRetries` and retry budget allow.
    async fn forward(
        &self,
        rule: &Rule,
        backend: &str,
        parts: http::request::Parts,
        body: Body,
    ) -> Response<Body> {
        let policy = rule.retry.as_ref();
        let per_try = policy.and_then(|p| p.per_try_timeout);
        let copies = policy.is_some_and(|p| p.retries > 0) || !rule.mirrors.is_empty();
        let replay = match copies {
            true => match buffer_for_retry(body).await {
                Ok(replay) => replay,
                Err(e) => {
                    debug!(error = %e, "reading the request body failed");
                    return respond(StatusCode::BAD_REQUEST, "invalid request body");
                }
            },
            false => Err(body),
        };
        let (body, saved) = match replay {
            Ok(bytes) => (full(bytes.clone()), Some(bytes)),
            Err(body) => (body, None),
        };
        self.mirror(rule, &parts, saved.as_ref());
        let Some(saved) = saved else {
            // Nothing kept to send again: one attempt, and the head goes as it is.
            let attempt = self
                .attempt(backend, Request::from_parts(parts, body), per_try)
                .await;
            return attempt.into_response(backend, 0);
        };
        let mut body = Some(body);
        let mut retries = 0u32;
        let mut _retrying = None;
        loop {
            let body = body.take().unwrap_or_else(|| full(saved.clone()));
            let attempt = self
                .attempt(backend, copy_head(&parts, body), per_try)
                .await;
            let again = policy.is_some_and(|p| {
                retries < p.retries
                    && attempt.outcome().is_some_and(|o| {
                        let headers = match &attempt {
                            Attempt::Answered(r) => Some(r.headers()),
                            _ => None,
                        };
                        p.retriable(o, headers)
                    })
            });
            if !again {
                return attempt.into_response(backend, retries);
            }
            let Some(slot) = self.upstream.retry_slot(backend) else {
                debug!(%backend, "the backend's maxRetries or retry budget is spent; answering with the last attempt");
                return attempt.into_response(backend, retries);
            };
            _retrying = Some(slot);
            retries += 1;
            let wait = {
                let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
                backoff(retries, &mut *rng)
            };
            debug!(%backend, retry = retries, outcome = ?attempt.outcome(), ?wait, "retrying");
            drop(attempt);
            tokio::time::sleep(wait).await;
        }
    }

    /// Sends one attempt, within the per-try timeout if there is one.
    async fn attempt(
        &self,
        backend: &str,
        req: Request<Body>,
        per_try: Option<std::time::Duration>,
    ) -> Attempt {
        let sent = self.upstream.send(backend, req);
        match per_try {
            Some(t) => match tokio::time::timeout(t, sent).await {
                Ok(r) => r.map_or_else(Attempt::Failed, Attempt::Answered),
                Err(_) => Attempt::TimedOut,
            },
            None => sent.await.map_or_else(Attempt::Failed, Attempt::Answered),
        }
    }
}

/// Plain HTTP/1.1 to endpoints (those outside the mesh), pooled per endpoint
/// ([`crate::h1_pool`]). Connecting may take the cluster's `connectTimeout`
/// (DestinationRule `connectionPool.tcp.connectTimeout`, in the request's
/// extensions), else `connect_timeout`, else Istio's default, 10 s.
pub struct HttpTransport {
    pool: Arc<crate::h1_pool::Http1Pool>,
    connect_timeout: std::time::Duration,
}

impl HttpTransport {
    pub fn new(connect_timeout: Option<std::time::Duration>) -> Self {
        HttpTransport {
            pool: Arc::default(),
            connect_timeout: connect_timeout
                .unwrap_or(crate::hbone_upstream::DEFAULT_CONNECT_TIMEOUT),
        }
    }

    /// Keeps connections in `pool` (shared with the transports of other configs).
    pub fn with_pool(mut self, pool: Arc<crate::h1_pool::Http1Pool>) -> Self {
        self.pool = pool;
        self
    }
}

/// A TCP connection to `addr` within `timeout`, Nagle off.
pub(crate) async fn dial(
    addr: SocketAddr,
    timeout: std::time::Duration,
) -> Result<tokio::net::TcpStream, UpstreamError> {
    let failed = |source: BoxError| UpstreamError::Connect {
        backend: addr.to_string(),
        source,
    };
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| failed(format!("connect timeout ({timeout:?})").into()))?
        .map_err(|e| failed(e.into()))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

impl crate::cluster::Transport for HttpTransport {
    fn send(&self, addr: SocketAddr, req: Request<Body>) -> UpstreamFuture {
        let timeout = req
            .extensions()
            .get::<crate::cluster::ConnectTimeout>()
            .map_or(self.connect_timeout, |t| t.0);
        let pool = self.pool.clone();
        Box::pin(async move {
            let resp = pool.send(addr, req, || dial(addr, timeout)).await?;
            Ok(resp.map(|b| b.map_err(|e| -> BoxError { e.into() }).boxed()))
        })
    }

    fn open(&self, addr: SocketAddr) -> OpenFuture {
        let timeout = self.connect_timeout;
        Box::pin(async move { Ok(Box::new(dial(addr, timeout).await?) as Box<dyn ByteStream>) })
    }
}

/// Serves `router` on `listener` as plain TCP (tests, benchmarks: no mTLS, no
/// opaque backend) until the task is aborted. Connections are detected and bounded
/// like HBONE ones ([`crate::ingress::serve_connection`]).
pub async fn serve(listener: tokio::net::TcpListener, router: Arc<Router>) {
    use crate::ingress::{ConnLimits, Service, serve_connection};
    let service = Arc::new(Service {
        name: "plaintext".into(),
        router,
        opaque_backend: String::new(),
        declared: crate::ingress::Declared::Http,
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accept failed; retrying in 100ms");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let downstream = Downstream {
            identity: None,
            peer,
            service: service.name.clone(),
            destination: stream
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
        };
        tokio::spawn(serve_connection(
            stream,
            service.clone(),
            downstream,
            ConnLimits::default(),
            None,
        ));
    }
}
