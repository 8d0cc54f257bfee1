//! The HBONE client side: CONNECT streams over a pool of mutual-TLS HTTP/2
//! connections.
//!
//! Connections are keyed by (source identity, destination identity, destination
//! address): a connection proves one identity to one peer, so it is only shared by
//! streams that would prove the same. Each connection carries up to
//! `max_streams_per_connection` CONNECT streams; past that a new one is opened.
//! A connection idle (no streams) for `idle_timeout` closes itself, and one that
//! ends for any reason leaves the pool at once: a peer the proxy stopped talking to
//! (a node gone, a workload moved) keeps no connection, no keepalive pings and no
//! pool entry. A dropped [`Client`]'s connections close once idle.
//!
//! Callers that find no connection with room for their key while one is being
//! dialed wait for that dial instead of starting their own: a burst of connections
//! to a new peer makes one TLS handshake, not one per connection, and a dial that
//! fails fails them all at once. A dial abandoned by its caller hands the job to
//! the next waiter.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use cairn_identity::SpiffeId;
use h2::{
    RecvStream, SendStream,
    client::{ResponseFuture, SendRequest},
};
use http::{Method, Request, StatusCode};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use crate::{H2Settings, keepalive, stream::H2Stream, transport};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "connecting to {addr}: {source} — is HBONE (15008) reachable, or a NetworkPolicy blocking it?"
    )]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("mTLS with {addr} failed: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    /// Another caller's dial to the same peer, which this one waited for, failed.
    #[error("connecting to {addr} failed (a concurrent dial to the same peer): {reason}")]
    SharedDial { addr: SocketAddr, reason: Arc<str> },
    #[error("{addr} refused CONNECT {authority} with status {status}")]
    Refused {
        addr: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
    },
}

/// What a pooled connection is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: SpiffeId,
    pub destination: SpiffeId,
    pub address: SocketAddr,
    /// Local address to connect from (the source workload's IP when the proxy's
    /// sockets live in the pod's network namespace); `None` lets the kernel choose.
    pub source_ip: Option<std::net::IpAddr>,
    /// Where the connection's socket is made (part of the key: connections from two
    /// pods' namespaces are never shared).
    pub dialer: crate::dialer::Dialer,
}

#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    pub max_streams_per_connection: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

struct Connection {
    send: SendRequest<Bytes>,
    /// Streams open or reserved; [`CLOSING`] once the connection closes for being
    /// idle (no stream can be reserved after that).
    streams: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    idle_since: Mutex<Instant>,
}

/// A stream count no connection reaches: the connection is closing.
const CLOSING: usize = usize::MAX / 2;

#[derive(Default)]
struct PoolState {
    conns: HashMap<PoolKey, Vec<Arc<Connection>>>,
    /// Dials in flight, one per key at most: later callers wait for it.
    dialing: HashMap<PoolKey, watch::Receiver<Dialed>>,
}

type Pool = Mutex<PoolState>;

/// How a dial in flight ended, for the callers waiting on it.
#[derive(Clone, Debug)]
enum Dialed {
    Pending,
    /// The connection is in the pool (with room for the waiters, or not).
    Ready,
    Failed(Arc<str>),
}

/// The right (and duty) to dial for a key. Dropped without [`DialTicket::finish`]
/// (its caller went away), it lets the waiters try again.
struct DialTicket {
    pool: Weak<Pool>,
    key: PoolKey,
    tx: watch::Sender<Dialed>,
}

impl DialTicket {
    fn finish(self, outcome: Dialed) {
        self.tx.send_replace(outcome);
    }
}

impl Drop for DialTicket {
    fn drop(&mut self) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let mut pool = pool.lock().unwrap_or_else(|e| e.into_inner());
        let ours = pool
            .dialing
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()));
        if ours {
            pool.dialing.remove(&self.key);
        }
    }
}

/// What a caller does next for its key.
enum Next {
    /// A connection with a stream slot reserved for the caller.
    Pooled(Arc<Connection>),
    /// Wait for another caller's dial.
    Wait(watch::Receiver<Dialed>),
    /// Dial (boxed: the key is large, and dialing is the rare case).
    Dial(Box<DialTicket>),
}

/// Resolves once `conn` has had no stream for `timeout` (and then no stream can be
/// reserved on it any more), or once the pool let go of it.
async fn idle_out(conn: Weak<Connection>, timeout: Duration) {
    loop {
        let Some(c) = conn.upgrade() else {
            return;
        };
        let wait = match c.streams.load(Ordering::Acquire) {
            0 => {
                let since = *c.idle_since.lock().unwrap_or_else(|e| e.into_inner());
                (since + timeout).saturating_duration_since(Instant::now())
            }
            _ => timeout,
        };
        if wait.is_zero()
            && c.streams
                .compare_exchange(0, CLOSING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return;
        }
        drop(c);
        tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
    }
}

/// Takes an ended connection out of the pool.
fn forget(pool: &Weak<Pool>, key: &PoolKey, conn: &Weak<Connection>) {
    let Some(pool) = pool.upgrade() else {
        return;
    };
    let mut pool = pool.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(list) = pool.conns.get_mut(key) {
        list.retain(|c| !std::ptr::eq(Arc::as_ptr(c), conn.as_ptr()));
        if list.is_empty() {
            pool.conns.remove(key);
        }
    }
}

/// One reserved stream slot on a connection, released when the tunnel (or a failed
/// attempt) is dropped; the last one out starts the idle clock.
pub(crate) struct StreamGuard {
    conn: Arc<Connection>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.conn.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self
                .conn
                .idle_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

/// Opens HBONE tunnels, reusing connections.
#[derive(Clone)]
pub struct Client {
    h2: H2Settings,
    pool: PoolSettings,
    conns: Arc<Pool>,
    opened: Arc<AtomicUsize>,
}

impl Client {
    pub fn new(h2: H2Settings, pool: PoolSettings) -> Self {
        Self {
            h2,
            pool,
            conns: Arc::default(),
            opened: Arc::default(),
        }
    }

    /// How many connections this client has opened so far.
    pub fn connections_opened(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }

    /// How many connections the pool holds now (open, or ended a moment ago).
    pub fn connections_pooled(&self) -> usize {
        let pool = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        pool.conns.values().map(Vec::len).sum()
    }

    /// Opens a CONNECT to `authority` through the HBONE endpoint in `key` and waits
    /// for the answer. `tls` must prove `key.source` and expect `key.destination`.
    pub async fn connect(
        &self,
        key: &PoolKey,
        tls: Arc<ClientConfig>,
        authority: SocketAddr,
    ) -> Result<H2Stream, ClientError> {
        let early = self.connect_early(key, tls, authority).await?;
        let (guard, send) = (early.guard, early.send);
        let recv = answer(early.response, early.addr, authority, early.timeout).await?;
        Ok(H2Stream::new(send, recv, Some(Box::new(guard))))
    }

    /// Sends a CONNECT and returns without waiting for the answer, so the caller can
    /// send the first bytes right behind the request (one round trip less before
    /// they arrive; the peer holds them until it has decided). The answer is awaited
    /// by [`crate::splice::splice_early`].
    pub async fn connect_early(
        &self,
        key: &PoolKey,
        tls: Arc<ClientConfig>,
        authority: SocketAddr,
    ) -> Result<EarlyTunnel, ClientError> {
        // Each turn takes a slot, waits for a dial to end, or dials: a turn that
        // does not return retires a connection or follows an ended dial.
        loop {
            let conn = match self.next(key) {
                Next::Pooled(conn) => conn,
                Next::Wait(rx) => {
                    wait_for_dial(rx, key.address).await?;
                    continue;
                }
                Next::Dial(ticket) => {
                    let dialed = self.dial(key, tls.clone()).await;
                    ticket.finish(match &dialed {
                        Ok(_) => Dialed::Ready,
                        Err(e) => Dialed::Failed(e.to_string().into()),
                    });
                    return self.open_stream(dialed?, key.address, authority).await;
                }
            };
            match self.open_stream(conn.clone(), key.address, authority).await {
                // A pooled connection the peer is closing (GOAWAY while draining) or
                // that died since its last use: retire it and go on.
                Err(ClientError::H2 { source, .. }) => {
                    debug!(addr = %key.address, error = %source, "pooled HBONE connection unusable; dialing anew");
                    conn.closed.store(true, Ordering::Release);
                }
                done => return done,
            }
        }
    }

    /// Sends the CONNECT on `conn`, whose stream slot is already reserved.
    async fn open_stream(
        &self,
        conn: Arc<Connection>,
        addr: SocketAddr,
        authority: SocketAddr,
    ) -> Result<EarlyTunnel, ClientError> {
        // From here on the slot is released on every path, success or not.
        let guard = StreamGuard { conn: conn.clone() };
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(authority.to_string())
            .body(())
            .map_err(|e| ClientError::Connect {
                addr,
                source: std::io::Error::other(e),
            })?;
        // A connection without room for the stream must not hold the caller forever.
        let timeout = self.pool.connect_timeout;
        let send = async {
            let mut send = conn.send.clone().ready().await?;
            send.send_request(request, false)
        };
        let (response, send) = tokio::time::timeout(timeout, send)
            .await
            .map_err(|_| ClientError::ConnectTimeout { addr, timeout })?
            .map_err(|source| ClientError::H2 { addr, source })?;
        Ok(EarlyTunnel {
            send,
            response,
            guard,
            addr,
            authority,
            timeout,
        })
    }

    /// A live connection with room for one more stream (reserved on return), else
    /// the dial in flight for `key`, else a ticket to dial (the pool's lock makes
    /// the three one decision).
    fn next(&self, key: &PoolKey) -> Next {
        let mut pool = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = pool.conns.get_mut(key) {
            // Idleness is the connection task's to judge (`idle_out`): a connection it
            // closes for that can take no stream from then on.
            list.retain(|c| !c.closed.load(Ordering::Acquire));
            let max = self.pool.max_streams_per_connection;
            let found = list.iter().find(|c| {
                c.streams
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < max).then_some(n + 1)
                    })
                    .is_ok()
            });
            if let Some(conn) = found {
                return Next::Pooled(conn.clone());
            }
        }
        // (A dial whose ticket is gone, sender and all, has nothing to wait for.)
        if let Some(rx) = pool.dialing.get(key).filter(|rx| rx.has_changed().is_ok()) {
            return Next::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(Dialed::Pending);
        pool.dialing.insert(key.clone(), rx);
        Next::Dial(Box::new(DialTicket {
            pool: Arc::downgrade(&self.conns),
            key: key.clone(),
            tx,
        }))
    }

    async fn dial(
        &self,
        key: &PoolKey,
        tls: Arc<ClientConfig>,
    ) -> Result<Arc<Connection>, ClientError> {
        let addr = key.address;
        let timeout = self.pool.connect_timeout;
        let tcp = tokio::time::timeout(timeout, key.dialer.connect(key.source_ip, addr))
            .await
            .map_err(|_| ClientError::ConnectTimeout { addr, timeout })?
            .map_err(|source| ClientError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        // The server is identified by its SPIFFE id, not a name: SNI is not used for
        // verification (the verifier checks the identity).
        let name = ServerName::from(addr.ip());
        let mut tls = tokio::time::timeout(
            timeout,
            TlsConnector::from(tls).connect(name, transport(tcp)),
        )
        .await
        .map_err(|_| ClientError::ConnectTimeout { addr, timeout })?
        .map_err(|source| ClientError::Tls { addr, source })?;
        crate::tune_tls(tls.get_mut().1);
        let s = self.h2;
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            .max_header_list_size(s.max_header_list_size)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| ClientError::H2 { addr, source })?;
        let closed = Arc::new(AtomicBool::new(false));
        self.opened.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Connection {
            send,
            // This dial is for a stream: count it now.
            streams: Arc::new(AtomicUsize::new(1)),
            closed: closed.clone(),
            idle_since: Mutex::new(Instant::now()),
        });
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .conns
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        let ping = connection.ping_pong();
        let (pool, me, key, idle_timeout) = (
            Arc::downgrade(&self.conns),
            Arc::downgrade(&conn),
            key.clone(),
            self.pool.idle_timeout,
        );
        tokio::spawn(async move {
            let keepalive = keepalive::unresponsive(ping, s);
            tokio::select! {
                result = &mut connection => match result {
                    Ok(()) => debug!(%addr, "HBONE connection closed"),
                    Err(e) => warn!(%addr, error = %e, "HBONE connection failed"),
                },
                reason = keepalive => {
                    warn!(%addr, %reason, "HBONE peer unresponsive; closing the connection");
                }
                () = idle_out(me.clone(), idle_timeout) => {
                    debug!(%addr, ?idle_timeout, "HBONE connection idle; closing it");
                }
            }
            closed.store(true, Ordering::Release);
            forget(&pool, &key, &me);
        });
        Ok(conn)
    }
}

/// Waits for another caller's dial: `Ok` when it is worth looking at the pool again
/// (the dial succeeded, or its caller gave up and someone must dial anew).
async fn wait_for_dial(
    mut rx: watch::Receiver<Dialed>,
    addr: SocketAddr,
) -> Result<(), ClientError> {
    let outcome = match rx.wait_for(|d| !matches!(d, Dialed::Pending)).await {
        Ok(d) => d.clone(),
        Err(_) => return Ok(()),
    };
    match outcome {
        Dialed::Failed(reason) => Err(ClientError::SharedDial { addr, reason }),
        Dialed::Pending | Dialed::Ready => Ok(()),
    }
}

/// A CONNECT sent but not yet answered (see [`Client::connect_early`]).
pub struct EarlyTunnel {
    pub(crate) send: SendStream<Bytes>,
    pub(crate) response: ResponseFuture,
    pub(crate) guard: StreamGuard,
    pub(crate) addr: SocketAddr,
    pub(crate) authority: SocketAddr,
    /// How long the answer may take.
    pub(crate) timeout: Duration,
}

/// Waits for the answer to a CONNECT: the tunnel's receive side on 200, else why not.
/// A peer that accepted the connection but never answers fails after `timeout`.
pub(crate) async fn answer(
    response: ResponseFuture,
    addr: SocketAddr,
    authority: SocketAddr,
    timeout: Duration,
) -> Result<RecvStream, ClientError> {
    let response = tokio::time::timeout(timeout, response)
        .await
        .map_err(|_| ClientError::ConnectTimeout { addr, timeout })?
        .map_err(|source| ClientError::H2 { addr, source })?;
    if response.status() != StatusCode::OK {
        return Err(ClientError::Refused {
            addr,
            authority,
            status: response.status(),
        });
    }
    Ok(response.into_body())
}
