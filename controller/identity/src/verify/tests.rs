use std::{sync::Arc, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::*;

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("generate CA key");
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).expect("self-sign CA");
    Ca {
        der: cert.der().clone(),
        issuer: Issuer::new(params, key),
    }
}

struct Leaf {
    der: CertificateDer<'static>,
    key: KeyPair,
}

fn leaf(ca: &Ca, sans: Vec<SanType>, ttl: Duration) -> Leaf {
    let key = KeyPair::generate().expect("generate leaf key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + ttl;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &ca.issuer).expect("sign leaf");
    Leaf {
        der: cert.der().clone(),
        key,
    }
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("ia5 string"))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn verify(roots: &MeshRoots, leaf: &Leaf) -> Result<SpiffeId, VerifyError> {
    roots.verify(
        &leaf.der,
        &[],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        &provider().signature_verification_algorithms,
    )
}

const ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";

#[test]
fn verifies_chain_and_yields_identity() {
    let ca = ca("mesh");
    let roots = MeshRoots::from_der(std::slice::from_ref(&ca.der)).expect("roots");
    let l = leaf(&ca, vec![uri(ID)], Duration::from_secs(3600));
    assert_eq!(verify(&roots, &l).expect("valid").to_string(), ID);
}

#[test]
fn refuses_foreign_expired_and_malformed_identities() {
    let mesh = ca("mesh");
    let roots = MeshRoots::from_der(std::slice::from_ref(&mesh.der)).expect("roots");
    let other = ca("other");
    let foreign = leaf(&other, vec![uri(ID)], Duration::from_secs(3600));
    assert!(matches!(
        verify(&roots, &foreign),
        Err(VerifyError::Chain(webpki::Error::UnknownIssuer))
    ));

    let expired = leaf(&mesh, vec![uri(ID)], Duration::ZERO);
    std::thread::sleep(Duration::from_millis(1100));
    assert!(matches!(
        verify(&roots, &expired),
        Err(VerifyError::Chain(webpki::Error::CertExpired { .. }))
    ));

    let dns_only = leaf(
        &mesh,
        vec![SanType::DnsName("reviews".try_into().expect("dns"))],
        Duration::from_secs(3600),
    );
    assert!(matches!(
        verify(&roots, &dns_only),
        Err(VerifyError::NoIdentity)
    ));

    let two = leaf(
        &mesh,
        vec![uri(ID), uri("spiffe://cluster.local/ns/x/sa/y")],
        Duration::from_secs(3600),
    );
    assert!(matches!(
        verify(&roots, &two),
        Err(VerifyError::ManyIdentities(2))
    ));

    let not_mesh = leaf(
        &mesh,
        vec![uri("spiffe://cluster.local/foo")],
        Duration::from_secs(3600),
    );
    assert!(matches!(
        verify(&roots, &not_mesh),
        Err(VerifyError::BadIdentity(_))
    ));
}

/// Runs a TLS 1.3 handshake in memory; returns the error either side saw first.
fn handshake(
    client: ClientConfig,
    server: ServerConfig,
) -> Result<Option<SpiffeId>, rustls::Error> {
    let name = ServerName::try_from("mesh.invalid").expect("name");
    let mut c = ClientConnection::new(Arc::new(client), name)?;
    let mut s = ServerConnection::new(Arc::new(server))?;
    for _ in 0..10 {
        let mut buf = Vec::new();
        c.write_tls(&mut buf).expect("client write");
        s.read_tls(&mut buf.as_slice()).expect("server read");
        s.process_new_packets()?;
        let mut buf = Vec::new();
        s.write_tls(&mut buf).expect("server write");
        c.read_tls(&mut buf.as_slice()).expect("client read");
        c.process_new_packets()?;
        if !c.is_handshaking() && !s.is_handshaking() {
            // The client's final flight (its certificate) must reach the server.
            let mut buf = Vec::new();
            c.write_tls(&mut buf).expect("client write");
            s.read_tls(&mut buf.as_slice()).expect("server read");
            s.process_new_packets()?;
            return Ok(s
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(|c| identity_of(c).expect("identity")));
        }
    }
    panic!("handshake did not finish");
}

fn key_der(l: &Leaf) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(l.key.serialize_der()))
}

fn configs(
    ca: &Ca,
    client: &Leaf,
    server: &Leaf,
    expect_server: &str,
) -> (ClientConfig, ServerConfig) {
    let roots = MeshRoots::from_der(std::slice::from_ref(&ca.der)).expect("roots");
    let p = provider();
    let client_cfg = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier::new(
            roots.clone(),
            SpiffeId::parse(expect_server).expect("id"),
            &p,
        )))
        .with_client_auth_cert(vec![client.der.clone()], key_der(client))
        .expect("client cert");
    let server_cfg = ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_client_cert_verifier(Arc::new(ClientVerifier::new(roots, &p)))
        .with_single_cert(vec![server.der.clone()], key_der(server))
        .expect("server cert");
    (client_cfg, server_cfg)
}

#[test]
fn mutual_tls_handshake_checks_both_identities() {
    let mesh = ca("mesh");
    let server_id = "spiffe://cluster.local/ns/default/sa/ratings";
    let client = leaf(&mesh, vec![uri(ID)], Duration::from_secs(3600));
    let server = leaf(&mesh, vec![uri(server_id)], Duration::from_secs(3600));

    let (c, s) = configs(&mesh, &client, &server, server_id);
    let seen = handshake(c, s).expect("handshake succeeds");
    assert_eq!(seen.expect("client identity").to_string(), ID);

    // The client expects someone else: the handshake fails on the client side.
    let (c, s) = configs(
        &mesh,
        &client,
        &server,
        "spiffe://cluster.local/ns/default/sa/other",
    );
    let err = handshake(c, s).expect_err("identity mismatch");
    assert!(err.to_string().contains("expected"), "{err}");

    // A client certificate from another CA is refused by the server.
    let other = ca("other");
    let rogue = leaf(&other, vec![uri(ID)], Duration::from_secs(3600));
    let (c, s) = configs(&mesh, &rogue, &server, server_id);
    let err = handshake(c, s).expect_err("foreign client");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
}
