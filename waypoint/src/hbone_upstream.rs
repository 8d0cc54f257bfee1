//! HBONE to mesh endpoints: the waypoint sends each request to the chosen
//! endpoint's ztunnel (`<pod-ip>:15008`) as its own identity, checking the endpoint
//! proves the identity the config gives it. HBONE connections are HTTP/2 and pooled
//! (many CONNECT tunnels each, by `cairn_hbone::client`); inside a tunnel the
//! request travels as HTTP/1.1 to the application, and tunnels are kept for the next
//! request to the same endpoint. Endpoints with no mesh identity (outside the mesh)
//! get plain HTTP.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use cairn_hbone::client::{Client, ClientError, PoolKey};
use cairn_identity::SpiffeId;
use http::{Request, header};
use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use tracing::debug;

use crate::{
    cluster::{ConnectTimeout, MaxRequestsPerConnection, Transport},
    router::{
        Body, BoxError, ByteStream, HttpTransport, OpenFuture, UpstreamError, UpstreamFuture,
    },
};

/// Client TLS proving the waypoint's identity and expecting `peer` (certificates
/// rotate underneath, so asked per new HBONE connection).
pub type TlsFor = Arc<dyn Fn(&SpiffeId) -> Result<Arc<ClientConfig>, BoxError> + Send + Sync>;

/// How long opening a tunnel (TCP, TLS, CONNECT) may take unless the cluster says
/// (Istio's default `connectTimeout`).
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Idle HTTP/1.1 connections (inside tunnels) kept per endpoint.
const IDLE_PER_ENDPOINT: usize = 16;

pub struct HboneTransport {
    client: Client,
    me: SpiffeId,
    tls: TlsFor,
    /// The identity each mesh endpoint must prove.
    identities: HashMap<SocketAddr, SpiffeId>,
    /// Idle HTTP/1.1 connections with the requests each has carried.
    idle: Arc<Idle>,
    plain: HttpTransport,
    /// Where endpoints' HBONE listens: their IP and 15008, unless overridden
    /// (tests on loopback, where ports are shared).
    hbone_ip: Option<std::net::IpAddr>,
    hbone_port: u16,
}

impl HboneTransport {
    pub fn new(
        client: Client,
        me: SpiffeId,
        tls: TlsFor,
        identities: HashMap<SocketAddr, SpiffeId>,
    ) -> Self {
        Self {
            client,
            me,
            tls,
            identities,
            idle: Arc::default(),
            plain: HttpTransport::new(None),
            hbone_ip: None,
            hbone_port: cairn_hbone::PORT,
        }
    }

    /// Dials HBONE on this port instead of 15008.
    pub fn with_hbone_port(mut self, port: u16) -> Self {
        self.hbone_port = port;
        self
    }

    /// Dials HBONE at this address instead of the endpoint's (every endpoint behind
    /// one HBONE server: a test, or a node-local proxy).
    pub fn with_hbone_ip(mut self, ip: std::net::IpAddr) -> Self {
        self.hbone_ip = Some(ip);
        self
    }

    fn key(&self, endpoint: SocketAddr, peer: &SpiffeId) -> PoolKey {
        PoolKey {
            source: self.me.clone(),
            destination: peer.clone(),
            address: SocketAddr::new(self.hbone_ip.unwrap_or(endpoint.ip()), self.hbone_port),
            source_ip: None,
            dialer: Default::default(),
        }
    }

    fn tunnel(
        &self,
        endpoint: SocketAddr,
        peer: &SpiffeId,
        timeout: std::time::Duration,
    ) -> impl Future<Output = Result<cairn_hbone::stream::H2Stream, UpstreamError>> + Send + 'static
    {
        let client = self.client.clone();
        let key = self.key(endpoint, peer);
        let tls = (self.tls)(peer);
        async move {
            let failed = |source: BoxError| UpstreamError::Connect {
                backend: endpoint.to_string(),
                source,
            };
            let tls = tls.map_err(failed)?;
            let connected = tokio::time::timeout(timeout, client.connect(&key, tls, endpoint))
                .await
                .map_err(|_| failed(format!("connect timeout ({timeout:?})").into()))?;
            connected.map_err(|e| match e {
                ClientError::H2 { .. } => UpstreamError::Reset {
                    backend: endpoint.to_string(),
                    source: e.into(),
                },
                // Unreachable peer, wrong identity, refused CONNECT: no
                // connection to the application was made.
                _ => failed(e.into()),
            })
        }
    }
}

type Idle = Mutex<HashMap<SocketAddr, Vec<(SendRequest<Body>, usize)>>>;

fn take_idle(idle: &Idle, endpoint: SocketAddr) -> Option<(SendRequest<Body>, usize)> {
    let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
    let list = idle.get_mut(&endpoint)?;
    while let Some((s, used)) = list.pop() {
        if s.is_ready() {
            return Some((s, used));
        }
    }
    None
}

impl Transport for HboneTransport {
    fn send(&self, endpoint: SocketAddr, mut req: Request<Body>) -> UpstreamFuture {
        let Some(peer) = self.identities.get(&endpoint).cloned() else {
            return self.plain.send(endpoint, req);
        };
        let timeout = req
            .extensions()
            .get::<ConnectTimeout>()
            .map_or(DEFAULT_CONNECT_TIMEOUT, |t| t.0);
        let tunnel = self.tunnel(endpoint, &peer, timeout);
        let max_per_connection = req
            .extensions()
            .get::<MaxRequestsPerConnection>()
            .map(|m| m.0);
        let idle = self.idle.clone();
        Box::pin(async move {
            let reset = |source: BoxError| UpstreamError::Reset {
                backend: endpoint.to_string(),
                source,
            };
            let (mut sender, used) = match take_idle(&idle, endpoint) {
                Some(s) => s,
                None => {
                    let stream = tunnel.await?;
                    let (sender, conn) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream))
                            .await
                            .map_err(|e| reset(e.into()))?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            debug!(%endpoint, error = %e, "HTTP/1.1 inside HBONE ended with an error");
                        }
                    });
                    (sender, 0)
                }
            };
            // Origin form inside the tunnel; the authority moves to Host.
            if !req.headers().contains_key(header::HOST)
                && let Some(a) = req.uri().authority().map(|a| a.as_str().to_owned())
                && let Ok(v) = header::HeaderValue::try_from(a)
            {
                req.headers_mut().insert(header::HOST, v);
            }
            let pq = req
                .uri()
                .path_and_query()
                .map_or("/".to_owned(), |p| p.to_string());
            *req.uri_mut() = pq
                .parse()
                .map_err(|e: http::uri::InvalidUri| reset(e.into()))?;
            *req.version_mut() = http::Version::HTTP_11;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| reset(e.into()))?;
            // Ready again once this response's body has been read; until then it
            // is skipped when taken. At the cluster's maxRequestsPerConnection it is
            // dropped instead, and the tunnel closes once this response is done.
            let used = used + 1;
            if max_per_connection.is_none_or(|m| used < m) {
                let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
                let list = idle.entry(endpoint).or_default();
                if list.len() < IDLE_PER_ENDPOINT {
                    list.push((sender, used));
                }
            }
            Ok(resp.map(|b| b.map_err(|e| -> BoxError { e.into() }).boxed()))
        })
    }

    fn open(&self, endpoint: SocketAddr) -> OpenFuture {
        let Some(peer) = self.identities.get(&endpoint).cloned() else {
            return self.plain.open(endpoint);
        };
        let tunnel = self.tunnel(endpoint, &peer, DEFAULT_CONNECT_TIMEOUT);
        Box::pin(async move { Ok(Box::new(tunnel.await?) as Box<dyn ByteStream>) })
    }
}
