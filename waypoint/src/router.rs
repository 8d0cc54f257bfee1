//! One service port's request path: select the rule, inject its faults, then answer
//! directly, redirect, or forward to a backend chosen by weight.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tracing::{debug, warn};

use crate::route::{Action, RouteTable, WeightedBackend};

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
    #[error("connecting or sending to {backend}: {source}")]
    Failed { backend: String, source: BoxError },
}

pub type UpstreamFuture =
    Pin<Box<dyn Future<Output = Result<Response<Body>, UpstreamError>> + Send>>;

/// Sends a request to one of a backend's endpoints.
pub trait Upstream: Send + Sync + 'static {
    fn send(&self, backend: &str, req: Request<Body>) -> UpstreamFuture;
}

pub struct Router {
    table: ArcSwap<RouteTable>,
    upstream: Arc<dyn Upstream>,
    rng: Mutex<StdRng>,
}

/// Envoy's answer bodies, so clients and tests see the same text as with Istio.
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

    /// Swaps the routing config; requests in flight finish with the one they started with.
    pub fn set_table(&self, table: RouteTable) {
        self.table.store(Arc::new(table));
    }

    pub async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let table = self.table.load_full();
        let (mut parts, body) = req.into_parts();
        let Some(rule) = table.select(&parts) else {
            debug!(path = %parts.uri.path(), "no route matched");
            return respond(StatusCode::NOT_FOUND, "no route matched");
        };
        let (fault, backend) = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            let fault = rule.fault.as_ref().map(|f| f.decide(&mut *rng));
            let backend = match &rule.action {
                Action::Forward(backends) => pick(backends, &mut *rng).map(|b| b.backend.clone()),
                _ => None,
            };
            (fault.unwrap_or_default(), backend)
        };
        if let Some(delay) = fault.delay {
            tokio::time::sleep(delay).await;
        }
        if let Some(status) = fault.abort {
            return respond(status, "fault filter abort");
        }
        let mut resp = match &rule.action {
            Action::Respond { status, body } => {
                let mut resp = Response::new(full(body.clone()));
                *resp.status_mut() = *status;
                resp
            }
            Action::Redirect {
                authority,
                path,
                status,
            } => {
                let host = authority
                    .clone()
                    .or_else(|| parts.uri.authority().map(|a| a.to_string()))
                    .or_else(|| {
                        parts
                            .headers
                            .get(header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .map(str::to_owned)
                    })
                    .unwrap_or_default();
                let path = path.clone().unwrap_or_else(|| {
                    parts
                        .uri
                        .path_and_query()
                        .map_or("/".into(), |p| p.to_string())
                });
                let mut resp = respond(*status, "");
                match header::HeaderValue::try_from(format!("http://{host}{path}")) {
                    Ok(location) => {
                        resp.headers_mut().insert(header::LOCATION, location);
                    }
                    Err(_) => return respond(StatusCode::BAD_REQUEST, "invalid redirect target"),
                }
                resp
            }
            Action::Forward(_) => {
                let Some(backend) = backend else {
                    return respond(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
                };
                rule.request_headers.apply(&mut parts.headers);
                let sent = self
                    .upstream
                    .send(&backend, Request::from_parts(parts, body));
                let result = match rule.timeout {
                    Some(t) => match tokio::time::timeout(t, sent).await {
                        Ok(r) => r,
                        Err(_) => {
                            warn!(%backend, timeout = ?t, "upstream request timeout");
                            return respond(
                                StatusCode::GATEWAY_TIMEOUT,
                                "upstream request timeout",
                            );
                        }
                    },
                    None => sent.await,
                };
                match result {
                    Ok(resp) => resp,
                    Err(e) => {
                        warn!(%backend, error = %e, "upstream failed");
                        return respond(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "upstream connect error or disconnect/reset before headers",
                        );
                    }
                }
            }
        };
        rule.response_headers.apply(resp.headers_mut());
        resp
    }
}

/// Plain HTTP to fixed endpoint addresses per backend (endpoints outside the mesh;
/// HBONE upstreams come with the waypoint issue). Pooled, HTTP/1.1.
pub struct HttpUpstream {
    client: Client<HttpConnector, Body>,
    endpoints: HashMap<String, SocketAddr>,
}

impl HttpUpstream {
    pub fn new(endpoints: HashMap<String, SocketAddr>) -> Self {
        HttpUpstream {
            client: Client::builder(TokioExecutor::new()).build_http(),
            endpoints,
        }
    }
}

impl Upstream for HttpUpstream {
    fn send(&self, backend: &str, mut req: Request<Body>) -> UpstreamFuture {
        let Some(addr) = self.endpoints.get(backend).copied() else {
            let backend = backend.to_owned();
            return Box::pin(async move { Err(UpstreamError::NoEndpoint(backend)) });
        };
        let path = req
            .uri()
            .path_and_query()
            .map_or("/".to_owned(), |p| p.to_string());
        let client = self.client.clone();
        let backend = backend.to_owned();
        Box::pin(async move {
            let failed = |source: BoxError| UpstreamError::Failed {
                backend: backend.clone(),
                source,
            };
            *req.uri_mut() = format!("http://{addr}{path}")
                .parse()
                .map_err(|e: http::uri::InvalidUri| failed(e.into()))?;
            // hyper speaks HTTP/1.1 to the endpoint whatever the client spoke.
            *req.version_mut() = http::Version::HTTP_11;
            let resp = client.request(req).await.map_err(|e| failed(e.into()))?;
            Ok(resp.map(|b| b.map_err(|e| -> BoxError { e.into() }).boxed()))
        })
    }
}

/// Serves `router` on `listener` (HTTP/1.1, and HTTP/2 with prior knowledge) until the
/// task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, router: Arc<Router>) {
    use hyper_util::{rt::TokioIo, server::conn::auto};
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accept failed; retrying in 100ms");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let router = router.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let router = router.clone();
                async move {
                    let req = req.map(|b| b.map_err(|e| -> BoxError { e.into() }).boxed());
                    Ok::<_, std::convert::Infallible>(router.handle(req).await)
                }
            });
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
