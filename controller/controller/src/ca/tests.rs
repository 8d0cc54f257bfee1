use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, UnixTime, pem::PemObject};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;

const TD: &str = "cluster.local";

fn csr(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("ia5"))
}

fn ders(chain: &[String]) -> Vec<CertificateDer<'static>> {
    chain
        .iter()
        .map(|p| CertificateDer::from_pem_slice(p.as_bytes()).expect("pem cert"))
        .collect()
}

fn verify_chain(chain: &[String], root_pem: &str) -> cairn_identity::SpiffeId {
    let roots = cairn_identity::verify::MeshRoots::from_pem(root_pem.as_bytes()).expect("roots");
    let certs = ders(chain);
    roots
        .verify(
            &certs[0],
            &certs[1..],
            UnixTime::now(),
            webpki_usage(),
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
        .expect("chain verifies against the mesh root")
}

fn webpki_usage() -> webpki::KeyUsage {
    webpki::KeyUsage::client_auth()
}

#[test]
fn root_is_generated_once_and_persisted_privately() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::load_or_create(dir.path(), TD, DEFAULT_TTL).expect("create");
    let root = ca.root_pem().to_owned();
    let mode = std::fs::metadata(dir.path().join("root-key.pem"))
        .expect("key file")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let again = CertificateAuthority::load_or_create(dir.path(), TD, DEFAULT_TTL).expect("load");
    assert_eq!(again.root_pem(), root);
    let der = CertificateDer::from_pem_slice(root.as_bytes()).expect("pem");
    let (_, cert) = X509Certificate::from_der(&der).expect("x509");
    assert!(cert.is_ca());
    assert_eq!(
        cert.public_key().algorithm.algorithm.to_id_string(),
        "1.2.840.10045.2.1",
        "EC public key"
    );
}

#[test]
fn signs_good_csr_with_spiffe_san_and_ttl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::load_or_create(dir.path(), TD, DEFAULT_TTL).expect("ca");
    let id = "spiffe://cluster.local/ns/bookinfo/sa/reviews";
    let (got, params) = ca
        .requested_identity(&csr(vec![uri(id)]))
        .expect("valid csr");
    assert_eq!(got.to_string(), id);
    let issued = ca
        .issue(&got, &params, Duration::from_secs(3600))
        .expect("issue");
    assert_eq!(issued.chain.len(), 2, "leaf + root");
    assert_eq!(verify_chain(&issued.chain, ca.root_pem()).to_string(), id);

    let leaf = ders(&issued.chain).remove(0);
    let (_, cert) = X509Certificate::from_der(&leaf).expect("x509");
    let v = cert.validity();
    let lifetime = v.not_after.timestamp() - v.not_before.timestamp();
    assert_eq!(lifetime, 3600 + 60, "TTL plus the back-dated minute");
    assert!(!cert.is_ca());

    // A TTL past the CA maximum is capped.
    let issued = ca
        .issue(&got, &params, Duration::from_secs(365 * 86400))
        .expect("issue");
    let leaf = ders(&issued.chain).remove(0);
    let (_, cert) = X509Certificate::from_der(&leaf).expect("x509");
    let v = cert.validity();
    assert_eq!(
        v.not_after.timestamp() - v.not_before.timestamp(),
        DEFAULT_TTL.as_secs() as i64 + 60
    );
}

#[test]
fn refuses_malformed_and_overreaching_csrs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::load_or_create(dir.path(), TD, DEFAULT_TTL).expect("ca");
    assert!(matches!(
        ca.requested_identity(
            "-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n"
        ),
        Err(CaError::BadCsr(_))
    ));
    assert!(matches!(
        ca.requested_identity("garbage"),
        Err(CaError::BadCsr(_))
    ));
    let extra = csr(vec![
        uri("spiffe://cluster.local/ns/a/sa/b"),
        SanType::DnsName("evil.example.com".try_into().expect("dns")),
    ]);
    assert!(matches!(
        ca.requested_identity(&extra),
        Err(CaError::CsrSans(_))
    ));
    let two = csr(vec![
        uri("spiffe://cluster.local/ns/a/sa/b"),
        uri("spiffe://cluster.local/ns/kube-system/sa/admin"),
    ]);
    assert!(matches!(
        ca.requested_identity(&two),
        Err(CaError::CsrSans(_))
    ));
    assert!(matches!(
        ca.requested_identity(&csr(vec![])),
        Err(CaError::CsrSans(_))
    ));
    let foreign = csr(vec![uri("spiffe://other.domain/ns/a/sa/b")]);
    assert!(matches!(
        ca.requested_identity(&foreign),
        Err(CaError::TrustDomain { .. })
    ));
    let not_spiffe = csr(vec![uri("https://example.com/")]);
    assert!(matches!(
        ca.requested_identity(&not_spiffe),
        Err(CaError::CsrIdentity(_))
    ));
}

#[test]
fn operator_provided_intermediate_chains_to_its_root() {
    // An operator root, and an intermediate it signed, in Istio's cacerts layout.
    let root_key = KeyPair::generate().expect("key");
    let mut root_params = CertificateParams::default();
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "operator root");
    let root = root_params.self_signed(&root_key).expect("root");
    let root_issuer = rcgen::Issuer::new(root_params, root_key);
    let int_key = KeyPair::generate().expect("key");
    let mut int_params = CertificateParams::default();
    int_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    int_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cluster intermediate");
    let int = int_params
        .signed_by(&int_key, &root_issuer)
        .expect("intermediate");

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca-cert.pem"), int.pem()).expect("write");
    std::fs::write(dir.path().join("ca-key.pem"), int_key.serialize_pem()).expect("write");
    std::fs::write(dir.path().join("root-cert.pem"), root.pem()).expect("write");
    std::fs::write(
        dir.path().join("cert-chain.pem"),
        format!("{}{}", int.pem(), root.pem()),
    )
    .expect("write");

    let ca = CertificateAuthority::load_or_create(dir.path(), TD, DEFAULT_TTL).expect("plug-in CA");
    assert_eq!(ca.root_pem(), root.pem());
    let id = "spiffe://cluster.local/ns/a/sa/b";
    let (got, params) = ca.requested_identity(&csr(vec![uri(id)])).expect("csr");
    let issued = ca.issue(&got, &params, DEFAULT_TTL).expect("issue");
    assert_eq!(issued.chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(verify_chain(&issued.chain, &root.pem()).to_string(), id);
    assert!(
        !dir.path().join("root-key.pem").exists(),
        "no root generated"
    );
}
