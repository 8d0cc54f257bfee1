//! The waypoint's upstream HTTP/1.1 connections, kept per endpoint for the next
//! request. Both transports use it: plain TCP to endpoints outside the mesh, and
//! tunnels through HBONE to mesh endpoints (the tunnel carries HTTP/1.1 to the
//! application).
//!
//! HTTP/1.1 carries one request at a time. A connection goes back to the pool as
//! soon as its response head is in, and is taken again only once hyper says it can
//! take the next request (the response body has been read): a connection whose body
//! is still streaming stays pooled instead of being closed, so a busy endpoint keeps
//! the connections it needs rather than opening one per request. Closed connections
//! and connections idle past [`IDLE_TIMEOUT`] are dropped when met.
//!
//! A request hyper could not send on a pooled connection (the peer closed it while
//! it sat idle) never left the waypoint, so it goes out on another connection; any
//! failure after that is the caller's to retry.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use http::{HeaderValue, Request, Response, Uri, header, uri::PathAndQuery};
use hyper::{body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::{
    cluster::MaxRequestsPerConnection,
    router::{Body, BoxError, UpstreamError},
};

/// How long an unused connection is kept (hyper's and Envoy's pools use about this).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Connections kept per endpoint, busy ones included; past it a connection is closed
/// once its response is done.
pub const PER_ENDPOINT: usize = 16;

struct Pooled {
    sender: SendRequest<Body>,
    /// Requests this connection has carried.
    used: usize,
    since: Instant,
}

impl Pooled {
    /// Closed, or unused past [`IDLE_TIMEOUT`].
    fn is_stale(&self) -> bool {
        self.sender.is_closed() || self.since.elapsed() > IDLE_TIMEOUT
    }
}

/// Connections given back between two sweeps of the whole pool.
const SWEEP_EVERY: usize = 1024;

/// Pooled connections by endpoint. One pool serves every config: the transports
/// built for successive route configs share it, so a config change (an endpoint
/// added elsewhere, a route edited) keeps the connections it already has.
#[derive(Default)]
pub struct Http1Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Pooled>>>,
    /// Connections given back so far (paces the sweeps).
    returned: AtomicUsize,
}

impl Http1Pool {
    /// A connection to `endpoint` ready for a request, if one is pooled.
    fn take(&self, endpoint: SocketAddr) -> Option<Pooled> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&endpoint)?;
        let mut i = list.len();
        let mut found = None;
        while i > 0 {
            i -= 1;
            let c = &list[i];
            if c.is_stale() {
                list.swap_remove(i);
            } else if c.sender.is_ready() {
                found = Some(list.swap_remove(i));
                break;
            }
        }
        if list.is_empty() {
            idle.remove(&endpoint);
        }
        found
    }

    fn give_back(&self, endpoint: SocketAddr, mut conn: Pooled) {
        conn.since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(endpoint).or_default();
        if list.len() < PER_ENDPOINT {
            list.push(conn);
        }
        // Endpoints come and go (the pool outlives configs): now and then, drop
        // what closed or expired everywhere, and the endpoints left with nothing.
        if self.returned.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            idle.retain(|_, list| {
                list.retain(|c| !c.is_stale());
                !list.is_empty()
            });
        }
    }

    /// Endpoints with connections pooled (tests).
    #[cfg(test)]
    fn endpoints(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// How many connections to `endpoint` are pooled (busy or not).
    #[cfg(test)]
    fn pooled(&self, endpoint: SocketAddr) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.get(&endpoint).map_or(0, Vec::len)
    }

    /// Sends `req` to `endpoint` on a pooled connection, or on a new one over the
    /// byte stream `connect` opens. The connection is kept for the next request
    /// unless the request's cluster caps requests per connection and this one
    /// reached the cap (then it closes once this response is done).
    pub async fn send<C, F, IO>(
        &self,
        endpoint: SocketAddr,
        mut req: Request<Body>,
        connect: C,
    ) -> Result<Response<Incoming>, UpstreamError>
    where
        C: Fn() -> F,
        F: Future<Output = Result<IO, UpstreamError>>,
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let max = req
            .extensions()
            .get::<MaxRequestsPerConnection>()
            .map(|m| m.0);
        origin_form(&mut req);
        let reset = |source: BoxError| UpstreamError::Reset {
            backend: endpoint.to_string(),
            source,
        };
        loop {
            let (mut conn, fresh) = match self.take(endpoint) {
                Some(c) => (c, false),
                None => (handshake(endpoint, connect().await?).await?, true),
            };
            match conn.sender.try_send_request(req).await {
                Ok(resp) => {
                    conn.used += 1;
                    if max.is_none_or(|m| conn.used < m) {
                        self.give_back(endpoint, conn);
                    }
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // Never sent: a pooled connection closed under us. Another one.
                    Some(unsent) if !fresh => {
                        debug!(%endpoint, error = %e.error(), "pooled upstream connection closed; sending on another");
                        req = unsent;
                    }
                    _ => return Err(reset(e.into_error().into())),
                },
            }
        }
    }
}

/// Opens HTTP/1.1 over `io`; its connection task runs until the connection ends.
async fn handshake<IO>(endpoint: SocketAddr, io: IO) -> Result<Pooled, UpstreamError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| UpstreamError::Reset {
            backend: endpoint.to_string(),
            source: e.into(),
        })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(%endpoint, error = %e, "upstream HTTP/1.1 connection ended with an error");
        }
    });
    Ok(Pooled {
        sender,
        used: 0,
        since: Instant::now(),
    })
}

/// An HTTP/1.1 request to an origin server: the path in the request line, the
/// authority (an HTTP/2 client's `:authority`) in `Host`.
fn origin_form(req: &mut Request<Body>) {
    if !req.headers().contains_key(header::HOST)
        && let Some(v) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    if req.uri().authority().is_some() || req.uri().scheme().is_some() {
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
    }
    *req.version_mut() = http::Version::HTTP_11;
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use http_body_util::BodyExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::router::{dial, full};

    /// Bodies larger than hyper reads ahead: a connection stays busy until its
    /// response body is read.
    const BODY: usize = 1 << 20;

    /// An HTTP/1.1 server answering every request with [`BODY`] bytes; counts
    /// connections.
    async fn server() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let answer = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(full(vec![b'x'; BODY])))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), answer)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn get() -> Request<Body> {
        Request::builder()
            .uri("http://backend/")
            .body(full(""))
            .expect("request")
    }

    async fn body_len(resp: Response<Incoming>) -> usize {
        resp.into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .len()
    }

    /// Lets the connections' tasks see their responses end, as the time between a
    /// client's requests does.
    async fn settle() {
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_connection_busy_with_a_body_is_kept_and_serves_the_next_requests() {
        let (addr, accepted) = server().await;
        let pool = Http1Pool::default();
        let connect = || dial(addr, Duration::from_secs(5));
        // The first response's body is not read yet: its connection is busy, so the
        // second request needs a connection of its own, and both stay pooled.
        let first = pool.send(addr, get(), connect).await.expect("first");
        let second = pool.send(addr, get(), connect).await.expect("second");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.pooled(addr), 2, "the busy connection was kept");
        assert_eq!(body_len(first).await, BODY);
        assert_eq!(body_len(second).await, BODY);
        for _ in 0..20 {
            settle().await;
            let resp = pool.send(addr, get(), connect).await.expect("again");
            assert_eq!(body_len(resp).await, BODY);
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the next requests reuse the two connections"
        );
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_replaced() {
        let (addr, accepted) = server().await;
        let pool = Http1Pool::default();
        let connect = || dial(addr, Duration::from_secs(5));
        let mut req = get();
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        let resp = pool.send(addr, req, connect).await.expect("first");
        assert_eq!(body_len(resp).await, BODY);
        settle().await;
        let resp = pool.send(addr, get(), connect).await.expect("second");
        assert_eq!(body_len(resp).await, BODY);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_at_its_request_cap_is_not_kept() {
        let (addr, accepted) = server().await;
        let pool = Http1Pool::default();
        let connect = || dial(addr, Duration::from_secs(5));
        for _ in 0..6 {
            settle().await;
            let mut req = get();
            req.extensions_mut().insert(MaxRequestsPerConnection(2));
            let resp = pool.send(addr, req, connect).await.expect("request");
            assert_eq!(body_len(resp).await, BODY);
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            3,
            "two requests per connection"
        );
    }

    #[tokio::test]
    async fn endpoints_whose_connections_closed_are_swept_out() {
        let (gone, _) = server().await;
        let (busy, _) = server().await;
        let pool = Http1Pool::default();
        let connect = |addr| move || dial(addr, Duration::from_secs(5));
        // The connection to `gone` closes after its response, as when the endpoint
        // goes away; nothing is sent there again.
        let mut req = get();
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        let resp = pool.send(gone, req, connect(gone)).await.expect("first");
        assert_eq!(body_len(resp).await, BODY);
        settle().await;
        assert_eq!(pool.endpoints(), 1);
        for _ in 0..SWEEP_EVERY {
            let resp = pool.send(busy, get(), connect(busy)).await.expect("busy");
            drop(resp);
        }
        assert_eq!(pool.endpoints(), 1, "only the endpoint in use is left");
        assert_eq!(pool.pooled(gone), 0);
    }

    #[test]
    fn requests_go_out_in_origin_form_with_a_host() {
        let mut req = Request::builder()
            .uri("http://reviews.demo:9080/reviews/1?x=2")
            .version(http::Version::HTTP_2)
            .body(full(""))
            .expect("request");
        origin_form(&mut req);
        assert_eq!(req.uri(), "/reviews/1?x=2");
        assert_eq!(req.headers()[header::HOST], "reviews.demo:9080");
        assert_eq!(req.version(), http::Version::HTTP_11);

        // A Host the client sent is kept.
        let mut req = Request::builder()
            .uri("/ratings")
            .header(header::HOST, "ratings:9080")
            .body(full(""))
            .expect("request");
        origin_form(&mut req);
        assert_eq!(req.uri(), "/ratings");
        assert_eq!(req.headers()[header::HOST], "ratings:9080");
    }
}
