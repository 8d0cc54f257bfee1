//! HBONE to mesh endpoints: the waypoint sends each request to the chosen
//! endpoint's ztunnel (`<pod-ip>:15008`) as its own identity, checking the endpoint
//! proves the identity the config gives it. HBONE connections are HTTP/2 and pooled
//! (many CONNECT tunnels each, by `cairn_hbone::client`); inside a tunnel the
//! request travels as HTTP/1.1 to the application, and tunnels are kept for the next
//! request to the same endpoint. Endpoints with no mesh identity (outside the mesh)
//! get plain HTTP.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use cairn_hbone::client::{Client, ClientError, PoolKey};
use cairn_identity::SpiffeId;
use http::Request;
use http_body_util::BodyExt;
use rustls::ClientConfig;

use crate::{
    cluster::{ConnectTimeout, Transport},
    h1_pool::Http1Pool,
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

/// The upstream connections the transports keep, one pool for tunnels and one for
/// plain connections: built once and given to the transport of every route config,
/// so a config change keeps them. (Two pools: an endpoint that joins the mesh must
/// not be reached over a plain connection pooled before. Within the tunnel pool a
/// connection stays with the pod it was opened to, whose identity was checked; a
/// pod keeps its address and identity for life.)
#[derive(Clone, Default)]
pub struct UpstreamPools {
    tunnels: Arc<Http1Pool>,
    plain: Arc<Http1Pool>,
}

pub struct HboneTransport {
    tunnels: Arc<Tunnels>,
    /// HTTP/1.1 connections inside tunnels, kept per endpoint.
    pool: Arc<Http1Pool>,
    plain: HttpTransport,
}

/// What opening a tunnel to an endpoint takes; used only when no pooled
/// connection to the endpoint is free.
struct Tunnels {
    client: Client,
    me: SpiffeId,
    tls: TlsFor,
    /// The identity each mesh endpoint must prove.
    identities: HashMap<SocketAddr, SpiffeId>,
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
            tunnels: Arc::new(Tunnels {
                client,
                me,
                tls,
                identities,
                hbone_ip: None,
                hbone_port: cairn_hbone::PORT,
            }),
            pool: Arc::default(),
            plain: HttpTransport::new(None),
        }
    }

    /// Keeps connections in `pools` (shared with the transports of other configs).
    pub fn with_pools(mut self, pools: &UpstreamPools) -> Self {
        self.pool = pools.tunnels.clone();
        self.plain = self.plain.with_pool(pools.plain.clone());
        self
    }

    /// The tunnel settings, while this transport is being built (not yet shared).
    fn tunnels_mut(&mut self) -> Option<&mut Tunnels> {
        Arc::get_mut(&mut self.tunnels)
    }

    /// Dials HBONE on this port instead of 15008.
    pub fn with_hbone_port(mut self, port: u16) -> Self {
        if let Some(t) = self.tunnels_mut() {
            t.hbone_port = port;
        }
        self
    }

    /// Dials HBONE at this address instead of the endpoint's (every endpoint behind
    /// one HBONE server: a test, or a node-local proxy).
    pub fn with_hbone_ip(mut self, ip: std::net::IpAddr) -> Self {
        if let Some(t) = self.tunnels_mut() {
            t.hbone_ip = Some(ip);
        }
        self
    }
}

impl Tunnels {
    fn key(&self, endpoint: SocketAddr, peer: &SpiffeId) -> PoolKey {
        PoolKey {
            source: self.me.clone(),
            destination: peer.clone(),
            address: SocketAddr::new(self.hbone_ip.unwrap_or(endpoint.ip()), self.hbone_port),
            source_ip: None,
            dialer: Default::default(),
        }
    }

    /// A tunnel to `endpoint`, which must prove the identity the config gives it.
    async fn open(
        &self,
        endpoint: SocketAddr,
        timeout: std::time::Duration,
    ) -> Result<cairn_hbone::stream::H2Stream, UpstreamError> {
        let failed = |source: BoxError| UpstreamError::Connect {
            backend: endpoint.to_string(),
            source,
        };
        let peer = self
            .identities
            .get(&endpoint)
            .ok_or_else(|| failed("no mesh identity for this endpoint".into()))?;
        let tls = (self.tls)(peer).map_err(failed)?;
        let key = self.key(endpoint, peer);
        let connected = tokio::time::timeout(timeout, self.client.connect(&key, tls, endpoint))
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

impl Transport for HboneTransport {
    fn send(&self, endpoint: SocketAddr, req: Request<Body>) -> UpstreamFuture {
        if !self.tunnels.identities.contains_key(&endpoint) {
            return self.plain.send(endpoint, req);
        }
        let timeout = req
            .extensions()
            .get::<ConnectTimeout>()
            .map_or(DEFAULT_CONNECT_TIMEOUT, |t| t.0);
        let (tunnels, pool) = (self.tunnels.clone(), self.pool.clone());
        Box::pin(async move {
            let resp = pool
                .send(endpoint, req, || tunnels.open(endpoint, timeout))
                .await?;
            Ok(resp.map(|b| b.map_err(|e| -> BoxError { e.into() }).boxed()))
        })
    }

    fn open(&self, endpoint: SocketAddr) -> OpenFuture {
        if !self.tunnels.identities.contains_key(&endpoint) {
            return self.plain.open(endpoint);
        }
        let tunnels = self.tunnels.clone();
        Box::pin(async move {
            let stream = tunnels.open(endpoint, DEFAULT_CONNECT_TIMEOUT).await?;
            Ok(Box::new(stream) as Box<dyn ByteStream>)
        })
    }
}
