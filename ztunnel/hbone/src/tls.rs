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

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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
