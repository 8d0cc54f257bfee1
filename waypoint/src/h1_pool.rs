//! The waypoint's upstream HTTP/1.1 connections, kept per endpoint for the next
//! request. Both transports use it: plain TCP to endpoints outside the mesh, and
//! tunnels through HBONE to mesh endpoints (the tunnel carries HTTP/1.1 to the
//! application).
//!
//! A connection has no task of its own. hyper's client connection is a future that
//! writes requests and reads responses; the request's task polls it while it waits
//! for the response head, and the response body polls it while the body is read
//! ([`Driven`]). A spawned connection task would be woken, and would wake the
//! request's task in turn, for each request and each response (two task hand-offs
//! per exchange on the proxy's busiest path).
//!
//! HTTP/1.1 carries one request at a time: a connection is back in the pool once
//! its response body has ended, and is taken again only once hyper says it can take
//! the next request. A response dropped before its body ended closes its connection
//! (as hyper's own connection task does). Closed connections and connections idle
//! past [`IDLE_TIMEOUT`] are dropped when met.
//!
//! A request hyper could not send on a pooled connection (the peer closed it while
//! it sat idle) never left the waypoint, so it goes out on another connection; any
//! failure after that is the caller's to retry.

use std::{
    collections::HashMap,
    future::poll_fn,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri, header, uri::PathAndQuery};
use hyper::{
    body::{Body as HttpBody, Frame, Incoming, SizeHint},
    client::conn::http1::{Connection, SendRequest},
};
use hyper_util::rt::TokioIo;
use sync_wrapper::SyncWrapper;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::{
    cluster::MaxRequestsPerConnection,
    router::{Body, BoxError, UpstreamError},
};

/// How long an unused connection is kept (hyper's and Envoy's pools use about this).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Unused connections kept per endpoint; past it a connection is closed once its
/// response is done.
pub const PER_ENDPOINT: usize = 16;

/// What a pooled connection runs over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

struct Pooled<IO: Io> {
    sender: SendRequest<Body>,
    /// The connection itself; `None` once it has ended.
    conn: Option<Connection<TokioIo<IO>, Body>>,
    /// Requests this connection has carried.
    used: usize,
    since: Instant,
}

impl<IO: Io> Pooled<IO> {
    /// Lets the connection write and read what it can; false once it has ended.
    fn drive(&mut self, endpoint: SocketAddr, cx: &mut Context<'_>) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        match Pin::new(conn).poll(cx) {
            Poll::Pending => true,
            Poll::Ready(ended) => {
                if let Err(e) = ended {
                    debug!(%endpoint, error = %e, "upstream HTTP/1.1 connection ended with an error");
                }
                self.conn = None;
                false
            }
        }
    }
}

pub struct Http1Pool<IO: Io> {
    idle: Mutex<HashMap<SocketAddr, Vec<Pooled<IO>>>>,
}

impl<IO: Io> Default for Http1Pool<IO> {
    fn default() -> Self {
        Self {
            idle: Mutex::default(),
        }
    }
}

impl<IO: Io> Http1Pool<IO> {
    /// A connection to `endpoint` ready for a request, if one is pooled. Each
    /// connection looked at is polled first, so one the peer closed while it sat
    /// idle is seen closed.
    fn take(&self, endpoint: SocketAddr, cx: &mut Context<'_>) -> Option<Pooled<IO>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&endpoint)?;
        while let Some(mut c) = list.pop() {
            if c.since.elapsed() > IDLE_TIMEOUT || !c.drive(endpoint, cx) {
                continue;
            }
            if c.sender.is_ready() {
                return Some(c);
            }
            // Open but not ready for a request: nothing an idle connection should
            // be (a response still arriving was never given back). Closed.
            debug!(%endpoint, "pooled upstream connection not ready; closing it");
        }
        None
    }

    fn give_back(&self, endpoint: SocketAddr, mut conn: Pooled<IO>) {
        conn.since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(endpoint).or_default();
        if list.len() < PER_ENDPOINT {
            list.push(conn);
        }
    }

    /// How many unused connections to `endpoint` are pooled.
    #[cfg(test)]
    fn pooled(&self, endpoint: SocketAddr) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.get(&endpoint).map_or(0, Vec::len)
    }

    /// Sends `req` to `endpoint` on a pooled connection, or on a new one over the
    /// byte stream `connect` opens. The connection comes back to the pool when the
    /// response body ends, unless the request's cluster caps requests per
    /// connection and this one reached the cap.
    pub async fn send<C, F>(
        self: &Arc<Self>,
        endpoint: SocketAddr,
        mut req: Request<Body>,
        connect: C,
    ) -> Result<Response<Driven<IO>>, UpstreamError>
    where
        C: Fn() -> F,
        F: Future<Output = Result<IO, UpstreamError>>,
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
            let pooled = poll_fn(|cx| Poll::Ready(self.take(endpoint, cx))).await;
            let (mut conn, fresh) = match pooled {
                Some(c) => (c, false),
                None => (handshake(endpoint, connect().await?).await?, true),
            };
            let mut response = std::pin::pin!(conn.sender.try_send_request(req));
            // The connection writes the request and reads the answer while the
            // response is awaited.
            let answered = poll_fn(|cx| {
                conn.drive(endpoint, cx);
                response.as_mut().poll(cx)
            })
            .await;
            match answered {
                Ok(resp) => {
                    conn.used += 1;
                    let home = max
                        .is_none_or(|m| conn.used < m)
                        .then(|| (self.clone(), endpoint));
                    return Ok(resp.map(|body| Driven {
                        body,
                        conn: SyncWrapper::new(Some(conn)),
                        home,
                    }));
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

/// A response body read off its connection: polling the body polls the connection,
/// and the connection goes back to its pool when the body ends.
pub struct Driven<IO: Io> {
    body: Incoming,
    /// `None` once given back or closed. (Behind `SyncWrapper`: a body must be
    /// `Sync`, and the connection is only ever used through `&mut`.)
    conn: SyncWrapper<Option<Pooled<IO>>>,
    /// Where the connection goes once the body has ended; `None`: it closes then.
    home: Option<(Arc<Http1Pool<IO>>, SocketAddr)>,
}

impl<IO: Io> Driven<IO> {
    /// The body has ended: the connection can carry the next request.
    fn release(&mut self) {
        if let (Some(conn), Some((pool, endpoint))) = (self.conn.get_mut().take(), &self.home) {
            pool.give_back(*endpoint, conn);
        }
    }
}

impl<IO: Io> HttpBody for Driven<IO> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        // At most twice: the body, then the connection (which reads what the body
        // waits for, or ends and so ends the body), then the body again.
        for _ in 0..2 {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => {}
                Poll::Ready(None) => {
                    this.release();
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if this.body.is_end_stream() {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => {
                    *this.conn.get_mut() = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let endpoint = this.home.as_ref().map_or(UNSPECIFIED, |h| h.1);
            // Without a connection (it ended) hyper has ended the body.
            if let Some(conn) = this.conn.get_mut()
                && !conn.drive(endpoint, cx)
            {
                *this.conn.get_mut() = None;
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<IO: Io> Drop for Driven<IO> {
    fn drop(&mut self) {
        // A body with nothing left to read (no body at all, or all of it read)
        // leaves its connection reusable; any other is closed with it.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

/// Only for logs, where a body that closes on its last request has no pool.
const UNSPECIFIED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// Opens HTTP/1.1 over `io` (the connection is driven by its requests).
async fn handshake<IO: Io>(endpoint: SocketAddr, io: IO) -> Result<Pooled<IO>, UpstreamError> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| UpstreamError::Reset {
            backend: endpoint.to_string(),
            source: e.into(),
        })?;
    Ok(Pooled {
        sender,
        conn: Some(conn),
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

    /// An HTTP/1.1 server answering `/empty` with 204 and everything else with
    /// [`BODY`] bytes; counts connections.
    async fn server() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let answer = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        match req.uri().path() {
                            "/empty" => Response::builder()
                                .status(http::StatusCode::NO_CONTENT)
                                .body(full("")),
                            _ => Response::builder().body(full(vec![b'x'; BODY])),
                        }
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

    fn pool() -> Arc<Http1Pool<tokio::net::TcpStream>> {
        Arc::new(Http1Pool::default())
    }

    async fn body_len(resp: Response<Driven<tokio::net::TcpStream>>) -> usize {
        resp.into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .len()
    }

    /// Lets the server see a connection close, as the time between a client's
    /// requests does.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn a_connection_is_back_in_the_pool_once_its_body_is_read() {
        let (addr, accepted) = server().await;
        let pool = pool();
        let connect = || dial(addr, Duration::from_secs(5));
        // The first response's body is not read yet: its connection is busy, so the
        // second request needs a connection of its own.
        let first = pool.send(addr, get(), connect).await.expect("first");
        let second = pool.send(addr, get(), connect).await.expect("second");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.pooled(addr), 0, "both connections are busy");
        assert_eq!(body_len(first).await, BODY);
        assert_eq!(pool.pooled(addr), 1, "the first body is read");
        assert_eq!(body_len(second).await, BODY);
        assert_eq!(pool.pooled(addr), 2);
        for _ in 0..20 {
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
    async fn a_response_dropped_before_its_body_ends_closes_its_connection() {
        let (addr, accepted) = server().await;
        let pool = pool();
        let connect = || dial(addr, Duration::from_secs(5));
        let unread = pool.send(addr, get(), connect).await.expect("first");
        drop(unread);
        assert_eq!(pool.pooled(addr), 0);
        let resp = pool.send(addr, get(), connect).await.expect("second");
        assert_eq!(body_len(resp).await, BODY);
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "a new connection");
    }

    #[tokio::test]
    async fn a_response_without_a_body_frees_its_connection_unread() {
        let (addr, accepted) = server().await;
        let pool = pool();
        let connect = || dial(addr, Duration::from_secs(5));
        for _ in 0..5 {
            let req = Request::builder()
                .uri("http://backend/empty")
                .body(full(""))
                .expect("request");
            let resp = pool.send(addr, req, connect).await.expect("204");
            assert_eq!(resp.status(), http::StatusCode::NO_CONTENT);
            drop(resp);
            assert_eq!(pool.pooled(addr), 1);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection for all");
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_replaced() {
        let (addr, accepted) = server().await;
        let pool = pool();
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
        let pool = pool();
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
