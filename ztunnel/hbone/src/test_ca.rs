//! A throwaway mesh CA for tests and benchmarks (feature `test-ca`): a self-signed
//! root and SPIFFE workload certificates signed by it, valid for an hour.

use cairn_identity::verify::MeshRoots;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

use crate::tls::WorkloadCertificate;

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl TestCa {
    /// A new root named `name`. Panics only if key generation fails (tests).
    #[allow(clippy::expect_used)]
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("root");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    pub fn root_pem(&self) -> &str {
        &self.pem
    }

    #[allow(clippy::expect_used)]
    pub fn roots(&self) -> MeshRoots {
        MeshRoots::from_pem(self.pem.as_bytes()).expect("roots")
    }

    /// A certificate proving `id` (a `spiffe://` URI), valid from a minute ago for an
    /// hour.
    #[allow(clippy::expect_used)]
    pub fn workload(&self, id: &str) -> WorkloadCertificate {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.try_into().expect("ia5"))];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::hours(1);
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        WorkloadCertificate::from_pem(&cert.pem(), &key.serialize_pem()).expect("workload cert")
    }
}
