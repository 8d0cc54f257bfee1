//! rustls verifiers that check a peer's chain against the mesh roots and yield its
//! SPIFFE identity.
//!
//! Mesh certificates carry a single URI SAN (the SPIFFE id) and no DNS name, so the
//! stock webpki verifiers (which match DNS/IP names) do not fit: these verify the chain
//! with webpki and then compare identities instead of host names.

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime, pem::PemObject};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use crate::SpiffeId;

/// Why a peer certificate was refused.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no mesh root certificates were given")]
    NoRoots,
    #[error("mesh root certificate is invalid: {0}")]
    BadRoot(String),
    #[error("certificate chain does not verify against the mesh roots: {0}")]
    Chain(webpki::Error),
    #[error("certificate is not valid X.509: {0}")]
    Parse(String),
    #[error("certificate has no SPIFFE URI SAN")]
    NoIdentity,
    #[error("certificate has {0} URI SANs; a mesh certificate carries exactly one")]
    ManyIdentities(usize),
    #[error("certificate URI SAN is not a mesh SPIFFE id: {0}")]
    BadIdentity(#[from] crate::ParseError),
    #[error("peer is {}, expected {}", .0.1, .0.0)]
    UnexpectedIdentity(Box<(SpiffeId, SpiffeId)>),
}

impl From<VerifyError> for rustls::Error {
    fn from(e: VerifyError) -> Self {
        let cert_err = match e {
            VerifyError::Chain(webpki::Error::CertExpired { .. }) => CertificateError::Expired,
            VerifyError::Chain(webpki::Error::CertNotValidYet { .. }) => {
                CertificateError::NotValidYet
            }
            VerifyError::Chain(webpki::Error::UnknownIssuer) => CertificateError::UnknownIssuer,
            other => CertificateError::Other(OtherError(Arc::new(other))),
        };
        rustls::Error::InvalidCertificate(cert_err)
    }
}

/// The trust anchors of the mesh (the CA root, plus any roots being rotated in).
#[derive(Clone, Debug)]
pub struct MeshRoots {
    anchors: Arc<Vec<TrustAnchor<'static>>>,
    subjects: Arc<Vec<DistinguishedName>>,
}

impl MeshRoots {
    /// Reads every certificate in a PEM bundle as a trust anchor.
    pub fn from_pem(pem: &[u8]) -> Result<Self, VerifyError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| VerifyError::BadRoot(e.to_string()))?;
        Self::from_der(&certs)
    }

    pub fn from_der(certs: &[CertificateDer<'_>]) -> Result<Self, VerifyError> {
        if certs.is_empty() {
            return Err(VerifyError::NoRoots);
        }
        let anchors = certs
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| VerifyError::BadRoot(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let subjects = anchors
            .iter()
            .map(|a| DistinguishedName::from(a.subject.to_vec()))
            .collect();
        Ok(Self {
            anchors: Arc::new(anchors),
            subjects: Arc::new(subjects),
        })
    }

    /// Verifies `end_entity` (with `intermediates`) for `usage` at `now` and returns the
    /// SPIFFE id it proves.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
        algs: &WebPkiSupportedAlgorithms,
    ) -> Result<SpiffeId, VerifyError> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(VerifyError::Chain)?;
        cert.verify_for_usage(
            algs.all,
            &self.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(VerifyError::Chain)?;
        identity_of(end_entity)
    }
}

/// The SPIFFE id in a certificate's single URI SAN. Does not verify the chain.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, VerifyError> {
    let (_, x509) = x509_parser::certificate::X509Certificate::from_der(cert)
        .map_err(|e| VerifyError::Parse(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| VerifyError::Parse(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(VerifyError::NoIdentity),
        [one] => Ok(SpiffeId::parse(one)?),
        many => Err(VerifyError::ManyIdentities(many.len())),
    }
}

fn algorithms(provider: &CryptoProvider) -> WebPkiSupportedAlgorithms {
    provider.signature_verification_algorithms
}

/// The handshake-signature half of both verifiers: the provider's algorithms.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

// === impl ServerVerifier ===

/// Client-side verifier: the server must chain to the mesh roots and prove exactly the
/// identity the config expects for the destination.
#[derive(Debug)]
pub struct ServerVerifier {
    roots: MeshRoots,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerVerifier {
    pub fn new(roots: MeshRoots, expected: SpiffeId, provider: &CryptoProvider) -> Self {
        Self {
            roots,
            expected,
            algs: algorithms(provider),
        }
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = self.roots.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            &self.algs,
        )?;
        if got != self.expected {
            return Err(
                VerifyError::UnexpectedIdentity(Box::new((self.expected.clone(), got))).into(),
            );
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

// === impl ClientVerifier ===

/// Server-side verifier: the client must present a certificate chaining to the mesh
/// roots with a SPIFFE id. Which identities may do what is policy's job, not this one's;
/// read the id back with [`identity_of`] on the connection's peer certificate.
#[derive(Debug)]
pub struct ClientVerifier {
    roots: MeshRoots,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientVerifier {
    pub fn new(roots: MeshRoots, provider: &CryptoProvider) -> Self {
        Self {
            roots,
            algs: algorithms(provider),
        }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.roots.subjects
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.roots.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            &self.algs,
        )?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

#[cfg(test)]
mod tests;
