//! The mesh certificate authority: an ECDSA P-256 root (generated on first start and
//! persisted, or operator-provided) that signs SPIFFE workload certificates.

pub mod service;

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use cairn_identity::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use tracing::info;

/// Default lifetime of workload certificates.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a generated root.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Back-dating of `notBefore`, for peers whose clocks run a little behind.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

// Istio's `cacerts` layout, for operator-provided CAs.
const CA_CERT: &str = "ca-cert.pem";
const CA_KEY: &str = "ca-key.pem";
const ROOT_CERT: &str = "root-cert.pem";
const CERT_CHAIN: &str = "cert-chain.pem";
// Cairn's own generated root.
const SELF_ROOT_KEY: &str = "root-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA material in {path} is invalid: {reason}")]
    Material { path: PathBuf, reason: String },
    #[error("CSR is malformed or its signature does not verify: {0}")]
    BadCsr(String),
    #[error("CSR must carry exactly one URI SAN with the SPIFFE id and no other SANs (found {0})")]
    CsrSans(String),
    #[error("CSR SPIFFE id is invalid: {0}")]
    CsrIdentity(#[from] cairn_identity::ParseError),
    #[error("CSR asks for trust domain {got:?}; this mesh is {want:?}")]
    TrustDomain { got: String, want: String },
    #[error("signing failed: {0}")]
    Sign(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

fn material(path: &Path, reason: impl ToString) -> CaError {
    CaError::Material {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// A signed certificate with its chain up to the root (PEM, leaf first).
#[derive(Debug, Clone)]
pub struct IssuedChain {
    pub chain: Vec<String>,
    pub not_after: OffsetDateTime,
}

pub struct CertificateAuthority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// PEMs from the signing cert (exclusive of leaf) up to the root.
    chain: Vec<String>,
    root_pem: String,
    max_ttl: Duration,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the CA from `dir`: Istio's plug-in layout (`ca-cert.pem`, `ca-key.pem`,
    /// `root-cert.pem`, optional `cert-chain.pem`) if present, else Cairn's own root
    /// (`root-cert.pem` + `root-key.pem`), generated and persisted on first start.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &str,
        max_ttl: Duration,
    ) -> Result<Self, CaError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let read = |name: &str| -> Result<Option<String>, CaError> {
            let p = dir.join(name);
            match fs::read_to_string(&p) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io(&p)(e)),
            }
        };
        let (cert_pem, key_pem, chain) =
            if let (Some(cert), Some(key)) = (read(CA_CERT)?, read(CA_KEY)?) {
                let root = read(ROOT_CERT)?.ok_or_else(|| {
                    material(
                        &dir.join(ROOT_CERT),
                        "plug-in CA needs root-cert.pem beside ca-cert.pem",
                    )
                })?;
                let chain = match read(CERT_CHAIN)? {
                    Some(c) => split_pem(&c),
                    None if cert.trim() == root.trim() => vec![root.clone()],
                    None => vec![cert.clone(), root.clone()],
                };
                info!(dir = %dir.display(), "using operator-provided CA (cacerts layout)");
                (cert, key, chain)
            } else if let (Some(cert), Some(key)) = (read(ROOT_CERT)?, read(SELF_ROOT_KEY)?) {
                info!(dir = %dir.display(), "loaded mesh root");
                (cert.clone(), key, vec![cert])
            } else {
                let (cert, key) = generate_root(trust_domain)?;
                write_private(&dir.join(SELF_ROOT_KEY), &key)?;
                fs::write(dir.join(ROOT_CERT), &cert).map_err(io(&dir.join(ROOT_CERT)))?;
                info!(dir = %dir.display(), "generated a new mesh root (ECDSA P-256)");
                (cert.clone(), key, vec![cert])
            };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| material(&dir.join(CA_KEY), e))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| material(&dir.join(CA_CERT), e))?;
        let root_pem = chain.last().cloned().unwrap_or_default();
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            chain,
            root_pem,
            max_ttl,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The mesh root certificate (PEM), what every proxy trusts.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Parses and verifies a CSR and returns the SPIFFE id it asks for. Anything but a
    /// single URI SAN with a SPIFFE id of this trust domain is refused.
    pub fn requested_identity(
        &self,
        csr_pem: &str,
    ) -> Result<(SpiffeId, CertificateSigningRequestParams), CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let sans = &csr.params.subject_alt_names;
        let id = match sans.as_slice() {
            [SanType::URI(uri)] => SpiffeId::parse(uri.as_str())?,
            other => {
                let described: Vec<String> = other.iter().map(|s| format!("{s:?}")).collect();
                return Err(CaError::CsrSans(if described.is_empty() {
                    "none".into()
                } else {
                    described.join(", ")
                }));
            }
        };
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::TrustDomain {
                got: id.trust_domain().to_owned(),
                want: self.trust_domain.clone(),
            });
        }
        Ok((id, csr))
    }

    /// Issues a workload certificate for `id` with the CSR's public key. The lifetime
    /// is `ttl`, capped at the CA's maximum.
    pub fn issue(
        &self,
        id: &SpiffeId,
        csr: &CertificateSigningRequestParams,
        ttl: Duration,
    ) -> Result<IssuedChain, CaError> {
        let ttl = ttl.min(self.max_ttl);
        let mut params = CertificateParams::default();
        // Only what we decide goes in: the CSR contributes its key, nothing else.
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
        )];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, self.trust_domain.as_str());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ttl;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain.iter().cloned());
        Ok(IssuedChain {
            chain,
            not_after: params.not_after,
        })
    }

    /// A serving certificate for the controller itself (DNS/IP SANs plus its SPIFFE id).
    /// Returns `(chain PEM, key PEM)`.
    pub fn issue_serving(
        &self,
        id: &SpiffeId,
        dns: &[String],
        ips: &[IpAddr],
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut sans = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
        )];
        for d in dns {
            sans.push(SanType::DnsName(
                d.clone()
                    .try_into()
                    .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
            ));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + self.max_ttl;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut chain = cert.pem();
        for c in &self.chain[..self.chain.len().saturating_sub(1)] {
            chain.push_str(c);
        }
        Ok((chain, key.serialize_pem()))
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, non-zero leading byte: a valid DER INTEGER of 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn generate_root(trust_domain: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params
        .distinguished_name
        .push(DnType::CommonName, "Cairn mesh root");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + ROOT_TTL;
    params.serial_number = Some(random_serial());
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_private(path: &Path, contents: &str) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    std::io::Write::write_all(&mut f, contents.as_bytes()).map_err(io(path))
}

fn split_pem(bundle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in bundle.lines() {
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END ") {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

#[cfg(test)]
mod tests;
