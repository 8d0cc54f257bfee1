//! Mesh TLS: TLS 1.3 only, ALPN `h2`, both sides present SPIFFE certificates, the
//! client checks the server's identity against the one the config expects.

use std::sync::Arc;

use cairn_identity::{
    SpiffeId,
    verify::{ClientVerifier, MeshRoots, ServerVerifier, VerifyError, identity_of},
};
use rustls::{ClientConfig, ServerConfig, crypto::CryptoProvider};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("workload certificate chain is not valid PEM: {0}")]
    Chain(String),
    #[error("workload private key is not valid PEM: {0}")]
    Key(String),
    #[error("workload certificate: {0}")]
    Identity(#[from] VerifyError),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A workload's certificate chain (leaf first) and key, with the identity it proves.
#[derive(Debug)]
pub struct WorkloadCertificate {
    pub identity: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl WorkloadCertificate {
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Chain(e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::Chain("no certificate".into()))?;
        let identity = identity_of(leaf)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::Key(e.to_string()))?;
        Ok(Self {
            identity,
            chain,
            key,
        })
    }
}

/// ring's TLS 1.3 suites, AES-128-GCM first (rustls lists AES-256-GCM first). Both
/// are approved everywhere Cairn runs; with AES hardware AES-128 does 10 rounds per
/// block instead of 14, and every byte between nodes is sealed once and opened once,
/// so the order shows in CPU per GB. Go's and BoringSSL's TLS 1.3 (so Envoy's)
/// prefer AES-128-GCM the same way. The client's order decides (rustls servers
/// follow it), and all three suites stay offered and accepted, so peers with
/// another preference (Istio's ztunnel) still agree on one.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..default_provider()
    })
}

/// Client side of HBONE for `cert`, accepting only a server proving `expected`.
pub fn client_config(
    cert: &WorkloadCertificate,
    roots: &MeshRoots,
    expected: SpiffeId,
) -> Result<Arc<ClientConfig>, TlsError> {
    let p = provider();
    let mut config = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier::new(
            roots.clone(),
            expected,
            &p,
        )))
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Server side of HBONE for `cert`: clients must chain to the mesh roots.
pub fn server_config(
    cert: &WorkloadCertificate,
    roots: &MeshRoots,
) -> Result<Arc<ServerConfig>, TlsError> {
    let p = provider();
    let mut config = ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(ClientVerifier::new(roots.clone(), &p)))
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
