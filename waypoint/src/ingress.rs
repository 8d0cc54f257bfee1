//! Client connections into the waypoint. Over HBONE ([`Ingress`]) each CONNECT
//! stream is one client's original connection to `service-VIP:port`: the authority
//! names the service, the mTLS peer is the client's identity. Either way
//! ([`serve_connection`]) the first bytes decide how the connection is served:
//! HTTP/1.1 or HTTP/2 through the service's [`Router`], anything else passed
//! through to one of the service's endpoints as opaque TCP.
//!
//! Costs a peer can impose are bounded here: the time to say what it speaks
//! (`sniff_timeout`), the time and bytes to send a request head
//! (`header_read_timeout`, `max_header_bytes`: 431 past it), concurrent HTTP/2
//! streams, the HTTP/2 header list, and streams reset before being served (h2's
//! rapid-reset defence).

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use cairn_hbone::server::{Connect, Handler, HandlerFuture, Responder};
use cairn_identity::SpiffeId;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use crate::{
    detect::{Prefixed, Protocol, sniff},
    head_timer::HeadTimer,
    router::{BoxError, Router},
};

/// Who a request came from, in every request's extensions for the router (L7
/// policy, telemetry).
#[derive(Clone, Debug)]
pub struct Downstream {
    /// The client's SPIFFE id, proven by mTLS; `None` on plaintext.
    pub identity: Option<SpiffeId>,
    /// The connection's peer (over HBONE: the client's ztunnel).
    pub peer: SocketAddr,
    /// The service the connection was made to (`hostname:port`).
    pub service: Arc<str>,
    /// The address the client connected to (over HBONE: the CONNECT authority,
    /// `service-VIP:port`).
    pub destination: SocketAddr,
}

/// One service port the waypoint serves.
pub struct Service {
    /// `hostname:port`, for logs and metrics.
    pub name: Arc<str>,
    pub router: Arc<Router>,
    /// Where opaque (non-HTTP) connections go: the service's endpoints on this port.
    pub opaque_backend: String,
    /// What the service port says it speaks (port name or `appProtocol`).
    pub declared: Declared,
}

/// A service port's declared protocol, as Istio's protocol selection reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Declared {
    /// Nothing declared: sniffed, and opaque TCP if the client is silent for the
    /// sniff timeout (a server-speaks-first protocol).
    #[default]
    Unknown,
    /// HTTP, HTTP/2 or gRPC: always served as HTTP (HTTP/2 when the client opens with
    /// the preface). A client that connects and waits, as pooling HTTP clients do, is
    /// not mistaken for opaque TCP.
    Http,
    /// TCP (or TLS): passed through without looking.
    Opaque,
}

impl Declared {
    pub fn of(p: cairn_api::model::AppProtocol) -> Declared {
        use cairn_api::model::AppProtocol as A;
        match p {
            A::Http11 | A::Http2 | A::Grpc => Declared::Http,
            A::Tcp | A::Tls => Declared::Opaque,
            A::Unknown => Declared::Unknown,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// How long a client may take to show what it speaks before it is taken as
    /// opaque TCP (Istio's protocol detection timeout: 100 ms).
    pub sniff_timeout: Duration,
    /// How long an HTTP/1.1 client may take to send a request head, from its first
    /// byte.
    pub header_read_timeout: Duration,
    /// How long a keep-alive HTTP/1.1 connection may wait for its next request
    /// before the waypoint closes it (in order: the client sees a FIN). Envoy's
    /// default, an hour: clients' pools drop idle connections well before that, so
    /// a close never races a request they are sending.
    pub idle_timeout: Duration,
    /// Largest HTTP/1.1 request head; larger ones get 431.
    pub max_header_bytes: usize,
    /// Largest HTTP/2 header list (decoded).
    pub h2_max_header_list_bytes: u32,
    pub h2_max_concurrent_streams: u32,
    /// Streams a client may reset before the server accepts them; past it the
    /// connection is closed (CVE-2023-44487).
    pub h2_max_pending_accept_reset_streams: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            sniff_timeout: Duration::from_millis(100),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            max_header_bytes: 64 * 1024,
            h2_max_header_list_bytes: 64 * 1024,
            h2_max_concurrent_streams: 1000,
            h2_max_pending_accept_reset_streams: 20,
        }
    }
}

/// How long closing a client connection in order may take before it is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves one client connection until it ends.
pub async fn serve_connection<IO>(
    mut io: IO,
    service: Arc<Service>,
    downstream: Downstream,
    limits: ConnLimits,
    live: Option<Live>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = downstream.peer;
    let sniffed = match service.declared {
        Declared::Opaque => Ok((Protocol::Opaque, bytes::Bytes::new())),
        Declared::Unknown => sniff(&mut io, limits.sniff_timeout).await,
        // Declared HTTP waits for a first request as long as for any next one: a
        // client's pool may open a connection and keep it idle before using it.
        Declared::Http => match sniff(&mut io, limits.idle_timeout).await {
            Ok((Protocol::Opaque, prefix)) if prefix.is_empty() => {
                debug!(%peer, service = %service.name, "HTTP client closed or sent nothing");
                // In order, as every close here: the client sees a FIN, not a reset.
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, io.shutdown()).await;
                return;
            }
            // Not HTTP on an HTTP port: hyper answers it with 400.
            Ok((Protocol::Opaque, prefix)) => Ok((Protocol::Http1, prefix)),
            other => other,
        },
    };
    let (protocol, prefix) = match sniffed {
        Ok(x) => x,
        Err(e) => {
            debug!(%peer, service = %service.name, error = %e, "connection failed before its first bytes");
            return;
        }
    };
    let io = Prefixed::new(prefix, io);
    let downstream = Arc::new(downstream);
    let first = service.router.clone();
    let http = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        // Each request takes the service's current routes: a config change applies to
        // the next request on a connection already open (keep-alive, HTTP/2, gRPC).
        let router = live
            .as_ref()
            .and_then(Live::router)
            .unwrap_or_else(|| first.clone());
        let downstream = downstream.clone();
        async move {
            let mut req = req.map(|b| b.map_err(|e| -> BoxError { e.into() }).boxed());
            req.extensions_mut().insert(downstream);
            Ok::<_, Infallible>(router.handle(req).await)
        }
    });
    let result = match protocol {
        Protocol::Http1 => {
            let (io, timer) = HeadTimer::wrap(io, limits.idle_timeout, limits.header_read_timeout);
            let mut conn = hyper::server::conn::http1::Builder::new()
                .timer(timer)
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(limits.max_header_bytes.max(8192))
                .serve_connection(TokioIo::new(io), http);
            let result = (&mut conn).await;
            if result.is_err() {
                // hyper half-closes a connection that ends cleanly, but after an error
                // (an idle keep-alive's head timer, a malformed request) it only stops.
                // Close in order here too: through HBONE that is END_STREAM, and the
                // client sees a FIN it can act on (drop the pooled connection), not a
                // reset that fails the request it may be sending.
                let mut io = conn.into_parts().io.into_inner();
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, io.shutdown()).await;
            }
            result.map_err(|e| (e.is_parse() || e.is_timeout(), e))
        }
        Protocol::Http2 => hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(limits.h2_max_header_list_bytes)
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset_streams)
            .serve_connection(TokioIo::new(io), http)
            .await
            .map_err(|e| (e.is_parse() || e.is_timeout(), e)),
        Protocol::Opaque => {
            pass_through(io, &service, peer).await;
            return;
        }
    };
    match result {
        Ok(()) => debug!(%peer, service = %service.name, ?protocol, "connection closed"),
        // Idle past `idle_timeout`, or a head slower than `header_read_timeout`.
        Err((true, e)) if e.is_timeout() => {
            debug!(%peer, service = %service.name, ?protocol, idle = ?limits.idle_timeout, head = ?limits.header_read_timeout, "no request head in time (idle keep-alive or slow head); connection closed")
        }
        Err((true, e)) => {
            warn!(%peer, service = %service.name, ?protocol, error = %e, "client sent malformed HTTP; connection closed")
        }
        Err((false, e)) => {
            debug!(%peer, service = %service.name, ?protocol, error = %e, "connection ended with an error")
        }
    }
}

/// Opaque TCP: bytes both ways to one of the service's endpoints, half-closes
/// carried through.
async fn pass_through<IO>(mut io: IO, service: &Service, peer: SocketAddr)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut upstream = match service.router.open(&service.opaque_backend).await {
        Ok(u) => u,
        Err(e) => {
            warn!(%peer, service = %service.name, error = %e, "opaque connection: no upstream; closing");
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut io, &mut upstream).await {
        Ok((sent, received)) => {
            debug!(%peer, service = %service.name, sent, received, "opaque connection closed")
        }
        Err(e) => {
            debug!(%peer, service = %service.name, error = %e, "opaque connection ended with an error")
        }
    }
}

type Services = Arc<ArcSwap<HashMap<SocketAddr, Arc<Service>>>>;

/// Where a connection finds its service's current router, request by request.
#[derive(Clone)]
pub struct Live {
    services: Services,
    address: SocketAddr,
}

impl Live {
    /// None once the service is no longer served: its connections finish on the
    /// routes they had.
    fn router(&self) -> Option<Arc<Router>> {
        self.services
            .load()
            .get(&self.address)
            .map(|s| s.router.clone())
    }
}

/// The waypoint's HBONE handler: CONNECT to `service-VIP:port` -> that service.
pub struct Ingress {
    services: Services,
    limits: ConnLimits,
}

impl Ingress {
    pub fn new(limits: ConnLimits) -> Self {
        Self {
            services: Arc::new(ArcSwap::from_pointee(HashMap::new())),
            limits,
        }
    }

    /// The services served, by `VIP:port`. Open connections route their next
    /// request with the new routes; a connection's protocol and opaque backend stay
    /// as they were when it opened.
    pub fn set_services(&self, services: HashMap<SocketAddr, Arc<Service>>) {
        self.services.store(Arc::new(services));
    }
}

impl Handler for Ingress {
    fn handle(&self, connect: Connect, responder: Responder) -> HandlerFuture {
        let service = self.services.load().get(&connect.authority).cloned();
        let limits = self.limits;
        let live = Live {
            services: self.services.clone(),
            address: connect.authority,
        };
        Box::pin(async move {
            let Some(service) = service else {
                warn!(
                    authority = %connect.authority,
                    source_principal = %connect.peer_identity,
                    "CONNECT to an address this waypoint does not serve; refused"
                );
                responder.refuse(StatusCode::NOT_FOUND);
                return;
            };
            let stream = match responder.accept() {
                Ok(s) => s,
                Err(e) => {
                    debug!(authority = %connect.authority, error = %e, "client gone before the tunnel opened");
                    return;
                }
            };
            let downstream = Downstream {
                identity: Some(connect.peer_identity),
                peer: connect.peer_addr,
                service: service.name.clone(),
                destination: connect.authority,
            };
            serve_connection(stream, service, downstream, limits, Some(live)).await;
        })
    }
}
