//! Workload certificates from the mesh CA (Istio's `CreateCertificate`), cached and
//! rotated at half life with jitter, retried with backoff, never served expired.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use cairn_api::proto::ca::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};
use cairn_hbone::tls::{WorkloadCertificate, client_config, server_config};
use cairn_identity::{SpiffeId, verify::MeshRoots};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::{ClientConfig, ServerConfig};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tracing::{info, warn};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{
    certs::{CertError, Certificates},
    health,
};

/// How to reach the CA.
#[derive(Clone, Debug)]
pub struct CaConfig {
    pub address: String,
    pub root_pem: String,
    pub server_name: String,
    pub token: crate::token::Token,
    /// Requested lifetime.
    pub ttl: Duration,
    /// How long one fetch (connecting, the TLS handshake and the `CreateCertificate`
    /// call together) may take before it fails and is retried with backoff: a stalled
    /// CA must not leave a workload waiting forever. [`CA_TIMEOUT`] unless a test
    /// wants it short.
    pub timeout: Duration,
}

/// The default [`CaConfig::timeout`].
pub const CA_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("building the CSR for {id}: {reason}")]
    Csr { id: SpiffeId, reason: String },
    #[error("CA address {0}")]
    Address(String),
    #[error("the CA did not answer within {0:?}")]
    Timeout(Duration),
    #[error("connecting to the CA: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("CA refused {id}: {status}")]
    Refused { id: SpiffeId, status: tonic::Status },
    #[error("CA answered with an unusable chain for {id}: {reason}")]
    Chain { id: SpiffeId, reason: String },
}

/// A certificate with its validity.
#[derive(Debug)]
pub struct Issued {
    pub cert: WorkloadCertificate,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// TLS configurations built from this certificate, made once and reused by every
    /// connection until the next rotation replaces the whole `Issued`.
    server: std::sync::OnceLock<Arc<ServerConfig>>,
    clients: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
}

/// The channel to the CA: one HTTP/2 connection, opened on first use and reopened by
/// tonic when it drops, shared by every certificate fetch. Each fetch is bounded by
/// `config.timeout` as a whole (connect, TLS handshake and call) where it is made.
fn ca_channel(config: &CaConfig) -> Result<Channel, CaError> {
    Ok(Channel::from_shared(config.address.clone())
        .map_err(|e| CaError::Address(format!("{}: {e}", config.address)))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&config.root_pem))
                .domain_name(config.server_name.clone()),
        )?
        .connect_lazy())
}

/// One `CreateCertificate` call over `channel`: fresh ECDSA P-256 key, CSR with the
/// SPIFFE URI SAN, `ImpersonatedIdentity` set as Istio's node proxies do.
pub async fn fetch(config: &CaConfig, channel: Channel, id: &SpiffeId) -> Result<Issued, CaError> {
    let csr_err = |reason: String| CaError::Csr {
        id: id.clone(),
        reason,
    };
    let key = KeyPair::generate().map_err(|e| csr_err(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        id.to_string()
            .try_into()
            .map_err(|e: rcgen::Error| csr_err(e.to_string()))?,
    )];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| csr_err(e.to_string()))?;
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: i64::try_from(config.ttl.as_secs()).unwrap_or(i64::MAX),
        metadata: Some(prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
                },
            )]
            .into(),
        }),
    });
    let bearer = config.token.bearer().map_err(|e| csr_err(e.to_string()))?;
    request.metadata_mut().insert("authorization", bearer);
    let response = IstioCertificateServiceClient::new(channel)
        .create_certificate(request)
        .await
        .map_err(|status| CaError::Refused {
            id: id.clone(),
            status,
        })?
        .into_inner();
    let chain_err = |reason: String| CaError::Chain {
        id: id.clone(),
        reason,
    };
    let chain_pem = response.cert_chain.concat();
    let cert = WorkloadCertificate::from_pem(&chain_pem, &key.serialize_pem())
        .map_err(|e| chain_err(e.to_string()))?;
    if &cert.identity != id {
        return Err(chain_err(format!("certificate is for {}", cert.identity)));
    }
    let leaf = cert
        .chain
        .first()
        .ok_or_else(|| chain_err("empty chain".into()))?;
    let (_, x509) = X509Certificate::from_der(leaf).map_err(|e| chain_err(e.to_string()))?;
    let to_time =
        |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    Ok(Issued {
        not_before: to_time(x509.validity().not_before.timestamp()),
        not_after: to_time(x509.validity().not_after.timestamp()),
        cert,
        server: std::sync::OnceLock::new(),
        clients: Mutex::default(),
    })
}

/// What `/config_dump` and tests see of one identity's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertState {
    Pending,
    Available { not_after: SystemTime },
    Failed(String),
}

struct Entry {
    issued: Option<Arc<Issued>>,
    state: CertState,
    /// Times this identity's certificate was (re)issued.
    generation: u64,
}

/// Certificates per identity, fetched from the CA and kept fresh.
pub struct CertManager {
    config: CaConfig,
    roots: MeshRoots,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
    /// Built on the first fetch (building can fail on a bad address, which is then
    /// reported and retried like any failed fetch).
    channel: Mutex<Option<Channel>>,
}

impl CertManager {
    pub fn new(config: CaConfig, roots: MeshRoots) -> Arc<Self> {
        Arc::new(Self {
            config,
            roots,
            entries: Mutex::default(),
            channel: Mutex::default(),
        })
    }

    fn reset_channel(&self) {
        *self.channel.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn channel(&self) -> Result<Channel, CaError> {
        let mut slot = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = ca_channel(&self.config)?;
        *slot = Some(c.clone());
        Ok(c)
    }

    pub fn state(&self, id: &SpiffeId) -> Option<(CertState, u64)> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|e| (e.state.clone(), e.generation))
    }

    /// Every identity with its state, for `/config_dump`.
    pub fn states(&self) -> Vec<(SpiffeId, CertState)> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.state.clone()))
            .collect()
    }

    fn current(&self, id: &SpiffeId) -> Result<Arc<Issued>, CertError> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let issued = entries
            .get(id)
            .and_then(|e| e.issued.clone())
            .ok_or_else(|| CertError::Missing(id.clone()))?;
        // Never serve an expired certificate, whatever the rotation task is doing.
        if issued.not_after <= SystemTime::now() {
            return Err(CertError::Missing(id.clone()));
        }
        Ok(issued)
    }

    /// Drops `id`'s certificate (its last local workload left; the task managing it
    /// must be aborted first).
    pub fn forget(&self, id: &SpiffeId) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(id);
        publish_earliest_expiry(&entries);
    }

    /// Keeps `id`'s certificate fresh until the returned task is aborted: fetches now
    /// (retrying with backoff), then again at half life (minus up to 10% jitter).
    pub fn manage(self: &Arc<Self>, id: SpiffeId) -> tokio::task::JoinHandle<()> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.clone())
            .or_insert(Entry {
                issued: None,
                state: CertState::Pending,
                generation: 0,
            });
        let me = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                let timeout = me.config.timeout;
                let fetched = match me.channel() {
                    Ok(channel) => tokio::time::timeout(timeout, fetch(&me.config, channel, &id))
                        .await
                        .unwrap_or(Err(CaError::Timeout(timeout))),
                    Err(e) => Err(e),
                };
                if fetched.is_err() {
                    // Whatever went wrong, the next attempt starts on a new connection
                    // rather than one that may be wedged mid-handshake.
                    me.reset_channel();
                }
                match fetched {
                    Ok(issued) => {
                        backoff = Duration::from_millis(200);
                        // Half of the remaining life from now (CAs back-date notBefore
                        // for clock skew, so the certificate's own span overstates it).
                        let received = SystemTime::now();
                        let remaining = issued
                            .not_after
                            .duration_since(received)
                            .unwrap_or_default();
                        let refresh_at =
                            received + remaining.mul_f64(0.5 - rand::random::<f64>() * 0.1);
                        info!(identity = %id, not_after = ?issued.not_after, "workload certificate issued");
                        health::certificate_fetched(true);
                        {
                            let mut entries = me.entries.lock().unwrap_or_else(|e| e.into_inner());
                            if let Some(e) = entries.get_mut(&id) {
                                e.state = CertState::Available {
                                    not_after: issued.not_after,
                                };
                                e.issued = Some(Arc::new(issued));
                                e.generation += 1;
                            }
                            publish_earliest_expiry(&entries);
                        }
                        let wait = refresh_at
                            .duration_since(SystemTime::now())
                            .unwrap_or(Duration::from_millis(100));
                        tokio::time::sleep(wait).await;
                    }
                    Err(e) => {
                        warn!(identity = %id, error = %e, retry_in = ?backoff, "certificate fetch failed");
                        health::certificate_fetched(false);
                        if let Some(entry) = me
                            .entries
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_mut(&id)
                        {
                            // Keep serving a still-valid certificate; just record the failure.
                            entry.state = match &entry.issued {
                                Some(i) if i.not_after > SystemTime::now() => {
                                    CertState::Available {
                                        not_after: i.not_after,
                                    }
                                }
                                _ => CertState::Failed(e.to_string()),
                            };
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        })
    }
}

impl Certificates for CertManager {
    fn client(
        &self,
        source: &SpiffeId,
        destination: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, CertError> {
        let issued = self.current(source)?;
        let mut clients = issued.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(config) = clients.get(destination) {
            return Ok(config.clone());
        }
        let config =
            client_config(&issued.cert, &self.roots, destination.clone()).map_err(|e| {
                CertError::Tls {
                    id: source.clone(),
                    source: e,
                }
            })?;
        clients.insert(destination.clone(), config.clone());
        Ok(config)
    }

    fn server(&self, identity: &SpiffeId) -> Result<Arc<ServerConfig>, CertError> {
        let issued = self.current(identity)?;
        if let Some(config) = issued.server.get() {
            return Ok(config.clone());
        }
        let config = server_config(&issued.cert, &self.roots).map_err(|e| CertError::Tls {
            id: identity.clone(),
            source: e,
        })?;
        Ok(issued.server.get_or_init(|| config).clone())
    }
}

fn publish_earliest_expiry(entries: &HashMap<SpiffeId, Entry>) {
    let earliest = entries
        .values()
        .filter_map(|e| e.issued.as_ref().map(|i| i.not_after))
        .min();
    health::earliest_certificate_expiry(earliest);
}
