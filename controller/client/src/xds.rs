//! The delta xDS (ADS) client: one stream to the controller carrying every type a
//! proxy subscribes to, each response ACKed or NACKed as a whole.
//!
//! What the resources mean belongs to the proxy: a [`Subscriber`] converts a response
//! to its model and applies it, or refuses it whole (then it is NACKed and the
//! previous state stays). When the controller is unreachable the proxy keeps serving
//! its last good state and this client reconnects with jittered exponential backoff,
//! sending `initial_resource_versions` so only differences come back.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use cairn_api::proto::{
    discovery::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
    envoy::config::core::v3::Node,
    google::rpc::Status as RpcStatus,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tracing::{info, warn};

use crate::health;

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
    pub token: crate::token::Token,
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

/// Counters the admin pages and tests read.
#[derive(Debug, Default)]
pub struct XdsStats {
    pub connects: AtomicU64,
    pub resources_received: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
}

/// What a proxy does with the resources it subscribes to.
pub trait Subscriber: Send + 'static {
    /// The types subscribed to (as wildcards), in the order they are requested.
    fn type_urls(&self) -> Vec<&'static str>;

    /// Converts and applies one response, all or nothing: the number of resources
    /// changed, or why the response was refused (sent back in the NACK).
    fn apply(&mut self, response: &DeltaDiscoveryResponse) -> Result<usize, String>;
}

/// Resource versions held, per type: what `initial_resource_versions` reports on a
/// reconnect. Only responses the subscriber accepted move them.
#[derive(Debug, Default)]
struct Versions(HashMap<String, BTreeMap<String, String>>);

impl Versions {
    fn accepted(&mut self, resp: &DeltaDiscoveryResponse) {
        let held = self.0.entry(resp.type_url.clone()).or_default();
        for r in &resp.resources {
            held.insert(r.name.clone(), r.version.clone());
        }
        for name in &resp.removed_resources {
            held.remove(name);
        }
    }

    fn of(&self, type_url: &str) -> BTreeMap<String, String> {
        self.0.get(type_url).cloned().unwrap_or_default()
    }
}

pub struct XdsClient<S> {
    config: XdsConfig,
    subscriber: S,
    versions: Versions,
    pub stats: Arc<XdsStats>,
    /// Turns true once the first response of every subscribed type has been applied.
    pub synced: Arc<AtomicBool>,
}

impl<S: Subscriber> XdsClient<S> {
    pub fn new(config: XdsConfig, subscriber: S) -> Self {
        Self {
            config,
            subscriber,
            versions: Versions::default(),
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
        let types = self.subscriber.type_urls();
        for type_url in &types {
            let _ = tx
                .send(DeltaDiscoveryRequest {
                    node: Some(node.clone()),
                    type_url: (*type_url).into(),
                    resource_names_subscribe: vec!["*".into()],
                    initial_resource_versions: self.versions.of(type_url),
                    ..Default::default()
                })
                .await;
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let bearer = self
            .config
            .token
            .bearer()
            .map_err(|e| XdsError::Status(tonic::Status::unauthenticated(e.to_string())))?;
        request.metadata_mut().insert("authorization", bearer);
        let mut responses = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(request)
            .await?
            .into_inner();
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        health::xds_connected();
        info!(controller = %self.config.address, "xDS stream established");
        let mut unsynced: Vec<&str> = types;
        while let Some(resp) = responses.message().await? {
            let ack = self.answer(&resp);
            if ack.error_detail.is_none() {
                unsynced.retain(|t| *t != resp.type_url);
                if unsynced.is_empty() {
                    self.synced.store(true, Ordering::Release);
                }
            }
            if tx.send(ack).await.is_err() {
                break;
            }
        }
        Err(XdsError::Closed)
    }

    /// Applies one response and builds its ACK, or its NACK with the reason.
    fn answer(&mut self, resp: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let mut ack = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        match self.subscriber.apply(resp) {
            Ok(n) => {
                self.versions.accepted(resp);
                self.stats
                    .resources_received
                    .fetch_add(n as u64, Ordering::Relaxed);
                self.stats.acks.fetch_add(1, Ordering::Relaxed);
                health::xds_response(&resp.type_url, true);
            }
            Err(message) => {
                warn!(type_url = %resp.type_url, nonce = %resp.nonce, error = %message, "rejecting (NACK) config; keeping the previous version");
                self.stats.nacks.fetch_add(1, Ordering::Relaxed);
                health::xds_response(&resp.type_url, false);
                ack.error_detail = Some(RpcStatus {
                    code: tonic::Code::InvalidArgument as i32,
                    message,
                    details: vec![],
                });
            }
        }
        ack
    }
}

#[cfg(test)]
mod tests {
    use cairn_api::proto::discovery::Resource;

    use super::*;

    /// Accepts resources whose body is not empty.
    struct Picky(usize);

    impl Subscriber for Picky {
        fn type_urls(&self) -> Vec<&'static str> {
            vec!["t"]
        }

        fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Result<usize, String> {
            if resp.resources.iter().any(|r| r.resource.is_none()) {
                return Err("a resource has no body".into());
            }
            self.0 += 1;
            Ok(resp.resources.len() + resp.removed_resources.len())
        }
    }

    fn resource(name: &str, version: &str, body: bool) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            resource: body.then(prost_types::Any::default),
            ..Default::default()
        }
    }

    fn config() -> XdsConfig {
        XdsConfig {
            address: "https://127.0.0.1:1".into(),
            root_pem: String::new(),
            server_name: "localhost".into(),
            token: "t".into(),
            node_id: "n".into(),
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
        }
    }

    #[test]
    fn only_accepted_responses_move_the_versions_sent_on_reconnect() {
        let mut client = XdsClient::new(config(), Picky(0));
        let good = DeltaDiscoveryResponse {
            type_url: "t".into(),
            resources: vec![resource("a", "1", true), resource("b", "1", true)],
            nonce: "1".into(),
            ..Default::default()
        };
        let ack = client.answer(&good);
        assert_eq!(ack.response_nonce, "1");
        assert!(ack.error_detail.is_none());

        let bad = DeltaDiscoveryResponse {
            type_url: "t".into(),
            resources: vec![resource("a", "2", true), resource("c", "1", false)],
            removed_resources: vec!["b".into()],
            nonce: "2".into(),
            ..Default::default()
        };
        let nack = client.answer(&bad);
        assert_eq!(nack.response_nonce, "2");
        let detail = nack.error_detail.expect("NACK");
        assert!(detail.message.contains("no body"), "{}", detail.message);

        let removal = DeltaDiscoveryResponse {
            type_url: "t".into(),
            removed_resources: vec!["b".into()],
            nonce: "3".into(),
            ..Default::default()
        };
        assert!(client.answer(&removal).error_detail.is_none());

        let held = client.versions.of("t");
        assert_eq!(
            held.into_iter().collect::<Vec<_>>(),
            vec![("a".to_string(), "1".to_string())],
            "the NACKed a@2 and c@1 are not claimed; b's removal is"
        );
        assert_eq!(client.subscriber.0, 2);
        assert_eq!(client.stats.nacks.load(Ordering::Relaxed), 1);
        assert_eq!(client.stats.acks.load(Ordering::Relaxed), 2);
    }
}
