//! The HBONE server side: terminate mutual TLS, then serve CONNECT streams.
//!
//! Each CONNECT is handed to a [`Handler`] with the client's proven identity and the
//! requested `ip:port`; the handler accepts it (200, then the tunnel) or refuses it
//! with a status. Requests that are not a well-formed CONNECT to `ip:port` are
//! answered here (405 / 400) and never reach the handler.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use cairn_identity::{SpiffeId, verify::identity_of};
use h2::{RecvStream, server::SendResponse};
use http::{Method, Response, StatusCode};
use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tracing::{debug, warn};

use crate::{H2Settings, Transport, keepalive, stream::H2Stream, transport};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("TLS handshake with {peer} did not finish within {timeout:?}")]
    HandshakeTimeout { peer: SocketAddr, timeout: Duration },
    #[error("TLS handshake with {peer} failed: {source}")]
    Handshake {
        peer: SocketAddr,
        source: std::io::Error,
    },
    #[error("{peer} negotiated no ALPN h2: is it an HBONE client?")]
    Alpn { peer: SocketAddr },
    #[error("{peer} presented no usable mesh identity: {reason}")]
    Identity { peer: SocketAddr, reason: String },
    #[error("HTTP/2 with {peer}: {source}")]
    H2 { peer: SocketAddr, source: h2::Error },
    #[error("{peer} sent no HTTP/2 preface within {timeout:?} of the TLS handshake")]
    PrefaceTimeout { peer: SocketAddr, timeout: Duration },
}

/// One accepted CONNECT, before it is answered.
#[derive(Debug, Clone)]
pub struct Connect {
    /// The client's SPIFFE id, proven by its certificate.
    pub peer_identity: SpiffeId,
    pub peer_addr: SocketAddr,
    /// The `:authority` of the CONNECT: where the client wants to go.
    pub authority: SocketAddr,
}

/// The answer half of a CONNECT.
pub struct Responder {
    respond: SendResponse<Bytes>,
    recv: RecvStream,
}

impl Responder {
    /// Answers 200 and returns the tunnel.
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let response = Response::builder()
            .status(StatusCode::OK)
            .body(())
            .unwrap_or_default();
        let send = self.respond.send_response(response, false)?;
        Ok(H2Stream::new(send, self.recv, None))
    }

    /// Answers with an error status and ends the stream.
    pub fn refuse(mut self, status: StatusCode) {
        let mut response = Response::new(());
        *response.status_mut() = status;
        if let Err(e) = self.respond.send_response(response, true) {
            debug!(error = %e, "could not send refusal; peer gone");
        }
    }
}

pub type HandlerFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// [`serve_listener`]'s bound on TLS handshakes in progress, unless the proxy says.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 128;

/// Accepts HBONE connections on `listener` until the task is aborted, each served by
/// `handler`. The server configuration is asked for per connection, so certificate
/// rotations apply to new connections while established ones keep their session.
///
/// At most `max_pending_handshakes` TLS handshakes run at once; past that new
/// connections are closed at once (`cairn_hbone_connections_shed_total`): a flood of
/// half-open connections costs a bounded number of sockets for at most the handshake
/// timeout, and connections already established are unaffected. Connections send
/// GOAWAY when `drain` turns true.
pub async fn serve_listener<F>(
    listener: tokio::net::TcpListener,
    server_config: F,
    settings: H2Settings,
    handler: Arc<dyn Handler>,
    max_pending_handshakes: usize,
    drain: tokio::sync::watch::Receiver<bool>,
) where
    F: Fn() -> Result<Arc<ServerConfig>, String>,
{
    let pending = Arc::new(tokio::sync::Semaphore::new(max_pending_handshakes));
    let mut shed = 0u64;
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors or memory, or a connection aborted while
                // queued: all pass. Giving up would cut the listener off for good.
                warn!(error = %e, "HBONE accept failed; retrying in 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            shed += 1;
            metrics::counter!("cairn_hbone_connections_shed_total").increment(1);
            // 1st, 2nd, 4th, 8th...: visible without flooding the log in turn.
            if shed.is_power_of_two() {
                warn!(src.addr = %peer, shed, max_pending_handshakes, "too many HBONE handshakes in progress; closing new connections");
            }
            continue;
        };
        let config = match server_config() {
            Ok(c) => c,
            Err(e) => {
                warn!(src.addr = %peer, error = %e, "refusing HBONE connection: no certificate to present");
                continue;
            }
        };
        // Small frames (HEADERS, then DATA) must not wait on Nagle + delayed ACK.
        let _ = tcp.set_nodelay(true);
        let server = Server::new(config, settings).with_drain(drain.clone());
        let handler = handler.clone();
        tokio::spawn(async move {
            let handshake = server.handshake(tcp, peer).await;
            drop(permit);
            match handshake {
                Ok((tls, identity)) => {
                    if let Err(e) = server.serve(tls, peer, identity, handler).await {
                        warn!(error = %e, "HBONE connection ended with an error");
                    }
                }
                Err(e) => warn!(error = %e, "HBONE handshake refused"),
            }
        });
    }
}

/// Decides and serves CONNECT streams.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, connect: Connect, responder: Responder) -> HandlerFuture;
}

/// Accepts HBONE connections with one TLS configuration.
#[derive(Clone)]
pub struct Server {
    acceptor: TlsAcceptor,
    settings: H2Settings,
    handshake_timeout: Duration,
    /// Turns true when the process drains: connections then send GOAWAY, so peers
    /// open new streams elsewhere while the ones in flight finish.
    drain: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Server {
    pub fn new(config: Arc<ServerConfig>, settings: H2Settings) -> Self {
        Self {
            acceptor: TlsAcceptor::from(config),
            settings,
            handshake_timeout: Duration::from_secs(10),
            drain: None,
        }
    }

    /// Drain (GOAWAY, let streams in flight finish) once `drain` turns true.
    pub fn with_drain(mut self, drain: tokio::sync::watch::Receiver<bool>) -> Self {
        self.drain = Some(drain);
        self
    }

    /// How long a client may take to finish the TLS handshake, and then to send its
    /// HTTP/2 preface (default 10 s each).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Terminates TLS on `tcp` and returns the stream with the client's identity.
    /// A peer that stalls mid-handshake is dropped after the handshake timeout.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Result<(TlsStream<Transport>, SpiffeId), ServerError> {
        let timeout = self.handshake_timeout;
        let mut tls = tokio::time::timeout(timeout, self.acceptor.accept(transport(tcp)))
            .await
            .map_err(|_| ServerError::HandshakeTimeout { peer, timeout })?
            .map_err(|source| ServerError::Handshake { peer, source })?;
        crate::tune_tls(tls.get_mut().1);
        let (_, conn) = tls.get_ref();
        if conn.alpn_protocol() != Some(b"h2") {
            return Err(ServerError::Alpn { peer });
        }
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| ServerError::Identity {
                peer,
                reason: "no client certificate".into(),
            })?;
        let id = identity_of(leaf).map_err(|e| ServerError::Identity {
            peer,
            reason: e.to_string(),
        })?;
        Ok((tls, id))
    }

    /// Serves CONNECT streams on an established connection until the peer closes it.
    /// The client's HTTP/2 preface and SETTINGS must arrive within the handshake
    /// timeout: a peer with a valid certificate that goes silent after TLS would
    /// otherwise hold its socket and TLS session for good (keepalive starts only once
    /// HTTP/2 is up, and the bound on pending handshakes covers TLS alone).
    pub async fn serve<IO>(
        &self,
        io: IO,
        peer_addr: SocketAddr,
        peer_identity: SpiffeId,
        handler: Arc<dyn Handler>,
    ) -> Result<(), ServerError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let s = self.settings;
        let handshake = h2::server::Builder::new()
            .initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            .max_header_list_size(s.max_header_list_size)
            .max_concurrent_streams(s.max_concurrent_streams)
            .handshake::<_, Bytes>(io);
        let timeout = self.handshake_timeout;
        let mut conn = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| ServerError::PrefaceTimeout {
                peer: peer_addr,
                timeout,
            })?
            .map_err(|source| ServerError::H2 {
                peer: peer_addr,
                source,
            })?;
        let ping = conn.ping_pong();
        let mut keepalive = std::pin::pin!(keepalive::unresponsive(ping, s));
        // Connections from before the drain began get GOAWAY; one accepted after it
        // (a race with closing the listener) is served: the drain deadline bounds it.
        let mut drain = self.drain.clone().filter(|rx| !*rx.borrow());
        let draining = async |drain: &mut Option<tokio::sync::watch::Receiver<bool>>| match drain {
            // A drain signal that can no longer come never drains.
            Some(rx) => {
                if rx.wait_for(|d| *d).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        };
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                reason = &mut keepalive => {
                    warn!(peer = %peer_addr, %reason, "HBONE client unresponsive; closing the connection");
                    return Ok(());
                }
                () = draining(&mut drain) => {
                    debug!(peer = %peer_addr, "draining: GOAWAY sent, streams in flight go on");
                    conn.graceful_shutdown();
                    drain = None;
                    continue;
                }
            };
            let Some(next) = next else { break };
            let (request, mut respond) = match next {
                Ok(r) => r,
                Err(source) if source.is_go_away() || source.is_remote() => {
                    debug!(peer = %peer_addr, error = %source, "HBONE connection ended by peer");
                    return Ok(());
                }
                Err(source) => {
                    return Err(ServerError::H2 {
                        peer: peer_addr,
                        source,
                    });
                }
            };
            let refuse = |respond: &mut SendResponse<Bytes>, status: StatusCode| {
                let mut response = Response::new(());
                *response.status_mut() = status;
                let _ = respond.send_response(response, true);
            };
            if request.method() != Method::CONNECT {
                warn!(peer = %peer_addr, method = %request.method(), "HBONE request is not CONNECT");
                refuse(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
                continue;
            }
            let authority = request
                .uri()
                .authority()
                .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
            let Some(authority) = authority else {
                warn!(peer = %peer_addr, uri = %request.uri(), "HBONE CONNECT authority is not ip:port");
                refuse(&mut respond, StatusCode::BAD_REQUEST);
                continue;
            };
            let connect = Connect {
                peer_identity: peer_identity.clone(),
                peer_addr,
                authority,
            };
            let responder = Responder {
                respond,
                recv: request.into_body(),
            };
            tokio::spawn(handler.handle(connect, responder));
        }
        Ok(())
    }
}
