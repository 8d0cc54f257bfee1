//! The delta xDS client: subscribes to Address and Authorization resources, converts
//! them to the model at the edge, and swaps the proxy state atomically.
//!
//! A response that does not convert is NACKed as a whole and the previous state stays.
//! When the controller is unreachable the proxy keeps serving its last good state and
//! reconnects with exponential backoff, sending `initial_resource_versions` so only
//! differences come back.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use cairn_api::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL,
    model::{Address, Authorization},
    proto::{
        discovery::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
        envoy::config::core::v3::Node,
        google::rpc::Status as RpcStatus,
        istio::{security as sec, workload as wl},
    },
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tracing::{info, warn};

use crate::{SharedState, metrics::health, state::ProxyState};

/// How to reach the controller.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// `https://host:port`.
    pub address: String,
    /// The mesh root (PEM) the controller's serving certificate chains to.
    pub root_pem: String,
    /// Name to verify on the controller's certificate.
    pub server_name: String,
    /// Bearer token.
    pub token: String,
    /// `node.id` sent to the controller.
    pub node_id: String,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("controller address {0:?} is invalid")]
    Address(String),
    #[error("connecting to the controller: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("controller stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("controller closed the stream")]
    Closed,
    #[error("connecting to the controller timed out")]
    ConnectTimeout,
}

/// Counters the admin page and tests read.
#[derive(Debug, Default)]
pub struct XdsStats {
    pub connects: AtomicU64,
    pub resources_received: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
}

/// The resources held, as converted models plus their versions.
#[derive(Debug, Default, Clone)]
pub struct Held {
    pub addresses: BTreeMap<String, Address>,
    pub authorizations: BTreeMap<String, Authorization>,
    versions: HashMap<String, BTreeMap<String, String>>,
}

impl Held {
    /// Applies one response; on a conversion error nothing changes.
    pub fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Result<usize, String> {
        enum Converted {
            Address(Address),
            Authorization(Authorization),
        }
        let mut converted = Vec::with_capacity(resp.resources.len());
        for r in &resp.resources {
            let body = r
                .resource
                .as_ref()
                .ok_or_else(|| format!("resource {} has no body", r.name))?;
            let c = match resp.type_url.as_str() {
                ADDRESS_TYPE_URL => {
                    let p = wl::Address::decode(body.value.as_slice())
                        .map_err(|e| format!("resource {}: {e}", r.name))?;
                    Converted::Address(
                        Address::try_from(p).map_err(|e| format!("resource {}: {e}", r.name))?,
                    )
                }
                AUTHORIZATION_TYPE_URL => {
                    let p = sec::Authorization::decode(body.value.as_slice())
                        .map_err(|e| format!("resource {}: {e}", r.name))?;
                    Converted::Authorization(
                        Authorization::try_from(p)
                            .map_err(|e| format!("resource {}: {e}", r.name))?,
                    )
                }
                other => return Err(format!("unexpected type {other}")),
            };
            converted.push((r.name.clone(), r.version.clone(), c));
        }
        let versions = self.versions.entry(resp.type_url.clone()).or_default();
        let n = converted.len() + resp.removed_resources.len();
        for (name, version, c) in converted {
            versions.insert(name.clone(), version);
            match c {
                Converted::Address(a) => {
                    self.addresses.insert(name, a);
                }
                Converted::Authorization(a) => {
                    self.authorizations.insert(name, a);
                }
            }
        }
        for name in &resp.removed_resources {
            versions.remove(name);
            self.addresses.remove(name);
            self.authorizations.remove(name);
        }
        Ok(n)
    }

    fn initial_versions(&self, type_url: &str) -> BTreeMap<String, String> {
        self.versions.get(type_url).cloned().unwrap_or_default()
    }
}

pub struct XdsClient {
    config: XdsConfig,
    state: SharedState,
    held: Held,
    pub stats: Arc<XdsStats>,
    /// Turns true once the first response has been applied.
    pub synced: Arc<std::sync::atomic::AtomicBool>,
}

impl XdsClient {
    pub fn new(config: XdsConfig, state: SharedState) -> Self {
        Self {
            config,
            state,
            held: Held::default(),
            stats: Arc::default(),
            synced: Arc::default(),
        }
    }

    /// Runs until `shutdown` turns true, reconnecting with backoff.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = self.config.initial_backoff;
        loop {
            let started = tokio::time::Instant::now();
            let result = tokio::select! {
                r = self.stream_once() => r,
                _ = shutdown.changed() => return,
            };
            match result {
                Ok(()) => health::xds_terminated("closed"),
                Err(e) => {
                    health::xds_terminated("error");
                    warn!(error = %e, retry_in = ?backoff, "xDS stream failed; serving the last good config")
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = self.config.initial_backoff;
            }
            // Jitter: up to +50%, so a fleet does not reconnect in lockstep.
            let jitter = backoff.mul_f64(rand::random::<f64>() * 0.5);
            tokio::select! {
                _ = tokio::time::sleep(backoff + jitter) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }

    async fn channel(&self) -> Result<Channel, XdsError> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.config.root_pem))
            .domain_name(self.config.server_name.clone());
        Ok(Channel::from_shared(self.config.address.clone())
            .map_err(|_| XdsError::Address(self.config.address.clone()))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            // An idle xDS stream is normal; a controller that vanished without closing
            // is found by HTTP/2 PINGs, and the stream reconnects.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect()
            .await?)
    }

    async fn stream_once(&mut self) -> Result<(), XdsError> {
        // The TLS handshake is not covered by the connect timeout: bound it all.
        let channel = tokio::time::timeout(Duration::from_secs(10), self.channel())
            .await
            .map_err(|_| XdsError::ConnectTimeout)??;
        let (tx, rx) = mpsc::channel(16);
        let node = Node {
            id: self.config.node_id.clone(),
            ..Default::default()
        };
        for type_url in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL] {
            let _ = tx
                .send(DeltaDiscoveryRequest {
                    node: Some(node.clone()),
                    type_url: type_url.into(),
                    resource_names_subscribe: vec!["*".into()],
                    initial_resource_versions: self.held.initial_versions(type_url),
                    ..Default::default()
                })
                .await;
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let bearer = format!("Bearer {}", self.config.token)
            .parse()
            .map_err(|_| {
                XdsError::Status(tonic::Status::invalid_argument(
                    "token is not a valid header value",
                ))
            })?;
        request.metadata_mut().insert("authorization", bearer);
        let mut responses = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(request)
            .await?
            .into_inner();
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        health::xds_connected();
        info!(controller = %self.config.address, "xDS stream established");
        while let Some(resp) = responses.message().await? {
            // `apply` converts everything before changing anything.
            let ack = match self.held.apply(&resp) {
                Ok(n) => {
                    self.state.store(Arc::new(ProxyState::new(
                        &self.held.addresses,
                        &self.held.authorizations,
                    )));
                    self.stats
                        .resources_received
                        .fetch_add(n as u64, Ordering::Relaxed);
                    self.stats.acks.fetch_add(1, Ordering::Relaxed);
                    health::xds_response(&resp.type_url, true);
                    self.synced.store(true, Ordering::Release);
                    DeltaDiscoveryRequest {
                        type_url: resp.type_url.clone(),
                        response_nonce: resp.nonce.clone(),
                        ..Default::default()
                    }
                }
                Err(message) => {
                    warn!(type_url = %resp.type_url, nonce = %resp.nonce, error = %message, "rejecting (NACK) config; keeping the previous version");
                    self.stats.nacks.fetch_add(1, Ordering::Relaxed);
                    health::xds_response(&resp.type_url, false);
                    DeltaDiscoveryRequest {
                        type_url: resp.type_url.clone(),
                        response_nonce: resp.nonce.clone(),
                        error_detail: Some(RpcStatus {
                            code: tonic::Code::InvalidArgument as i32,
                            message,
                            details: vec![],
                        }),
                        ..Default::default()
                    }
                }
            };
            if tx.send(ack).await.is_err() {
                break;
            }
        }
        Err(XdsError::Closed)
    }
}

#[cfg(test)]
mod tests;
