//! mTLS configurations per workload identity.
//!
//! [`Certificates`] is the seam between the proxy paths and wherever certificates
//! come from (static files in tests; the CA client with rotation in the full ztunnel).

use std::{collections::HashMap, sync::Arc};

use cairn_hbone::tls::{TlsError, WorkloadCertificate, client_config, server_config};
use cairn_identity::{SpiffeId, verify::MeshRoots};
use rustls::{ClientConfig, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no certificate for {0} yet: it has not been fetched from the CA")]
    Missing(SpiffeId),
    #[error("TLS configuration for {id}: {source}")]
    Tls { id: SpiffeId, source: TlsError },
}

pub trait Certificates: Send + Sync + 'static {
    /// Client side: prove `source`, expect the server to be `destination`.
    fn client(
        &self,
        source: &SpiffeId,
        destination: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, CertError>;
    /// Server side: prove `identity`.
    fn server(&self, identity: &SpiffeId) -> Result<Arc<ServerConfig>, CertError>;
}

/// A fixed set of certificates.
pub struct StaticCertificates {
    roots: MeshRoots,
    certs: HashMap<SpiffeId, WorkloadCertificate>,
}

impl StaticCertificates {
    pub fn new(roots: MeshRoots, certs: impl IntoIterator<Item = WorkloadCertificate>) -> Self {
        Self {
            roots,
            certs: certs.into_iter().map(|c| (c.identity.clone(), c)).collect(),
        }
    }
}

impl Certificates for StaticCertificates {
    fn client(
        &self,
        source: &SpiffeId,
        destination: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, CertError> {
        let cert = self
            .certs
            .get(source)
            .ok_or_else(|| CertError::Missing(source.clone()))?;
        client_config(cert, &self.roots, destination.clone()).map_err(|source_err| CertError::Tls {
            id: source.clone(),
            source: source_err,
        })
    }

    fn server(&self, identity: &SpiffeId) -> Result<Arc<ServerConfig>, CertError> {
        let cert = self
            .certs
            .get(identity)
            .ok_or_else(|| CertError::Missing(identity.clone()))?;
        server_config(cert, &self.roots).map_err(|source| CertError::Tls {
            id: identity.clone(),
            source,
        })
    }
}

/// No certificates at all (local config without a CA): HBONE is refused, plainly.
pub struct NoCertificates;

impl Certificates for NoCertificates {
    fn client(&self, source: &SpiffeId, _: &SpiffeId) -> Result<Arc<ClientConfig>, CertError> {
        Err(CertError::Missing(source.clone()))
    }

    fn server(&self, identity: &SpiffeId) -> Result<Arc<ServerConfig>, CertError> {
        Err(CertError::Missing(identity.clone()))
    }
}
