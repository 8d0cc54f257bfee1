//! The L4 data path on loopback: "pods" are 127.0.0.x addresses, each server pod has an
//! application and an HBONE listener presenting its certificate; a captured outbound
//! connection is handed to the outbound proxy with its original destination.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use arc_swap::ArcSwap;
use cairn_api::model::{
    Address, Authorization, Match, NetworkAddress, PolicyAction, PolicyScope, Port, Service,
    StringMatch, TunnelProtocol, Workload,
};
use cairn_hbone::{
    H2Settings,
    client::{Client, ClientError, PoolSettings},
    tls::WorkloadCertificate,
};
use cairn_identity::{SpiffeId, verify::MeshRoots};
use cairn_ztunnel::{
    SharedState,
    certs::{Certificates, StaticCertificates},
    inbound::{self, HboneInbound},
    outbound::{Outbound, OutboundError},
    state::ProxyState,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const VIP: &str = "10.96.0.12:9080";
const SVC: &str = "bookinfo/reviews.bookinfo.svc.cluster.local";

fn sa(name: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "bookinfo", name).expect("id")
}

struct Mesh {
    issuer: Issuer<'static, KeyPair>,
    roots: MeshRoots,
}

fn mesh() -> Mesh {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "test mesh");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).expect("root");
    Mesh {
        roots: MeshRoots::from_pem(cert.pem().as_bytes()).expect("roots"),
        issuer: Issuer::new(params, key),
    }
}

fn cert(m: &Mesh, id: &SpiffeId) -> WorkloadCertificate {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().expect("ia5"))];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::hours(1);
    let c = params.signed_by(&key, &m.issuer).expect("leaf");
    WorkloadCertificate::from_pem(&c.pem(), &key.serialize_pem()).expect("workload cert")
}

fn pod(
    name: &str,
    ip: [u8; 4],
    service_account: &str,
    policies: &[&str],
    backs_reviews: bool,
) -> Workload {
    Workload {
        uid: format!("Kubernetes//Pod/bookinfo/{name}"),
        name: name.into(),
        namespace: "bookinfo".into(),
        addresses: vec![IpAddr::from(ip)],
        network: String::new(),
        identity: sa(service_account),
        tunnel_protocol: TunnelProtocol::Hbone,
        native_tunnel: false,
        waypoint: None,
        node: "node-a".into(),
        canonical_name: name.into(),
        canonical_revision: "v1".into(),
        workload_name: name.into(),
        services: if backs_reviews {
            BTreeMap::from([(
                SVC.to_string(),
                vec![Port {
                    service_port: 9080,
                    target_port: 9080,
                    app_protocol: Default::default(),
                }],
            )])
        } else {
            BTreeMap::new()
        },
        authorization_policies: policies.iter().map(|s| s.to_string()).collect(),
        healthy: true,
        locality: None,
        cluster_id: "Kubernetes".into(),
    }
}

const REVIEWS_POLICIES: &[&str] = &[
    "bookinfo/reviews-viewer",
    "bookinfo/no-details-ip",
    "istio-system/static-strict",
];

fn state(strict: bool, net: u8) -> ProxyState {
    // STRICT: the static strict policy plus the L4 rules; PERMISSIVE here means no
    // policy at all on reviews (an ALLOW-by-principal policy would refuse plaintext
    // even under PERMISSIVE, as in Istio).
    let reviews_policies: Vec<&str> = if strict {
        REVIEWS_POLICIES.to_vec()
    } else {
        Vec::new()
    };
    let workloads = [
        pod("productpage", [127, net, 0, 10], "productpage", &[], false),
        pod("details", [127, net, 0, 11], "details", &[], false),
        pod(
            "reviews-v1",
            [127, net, 0, 12],
            "reviews",
            &reviews_policies,
            true,
        ),
        pod(
            "reviews-v2",
            [127, net, 0, 13],
            "reviews",
            &reviews_policies,
            true,
        ),
        pod("ratings", [127, net, 0, 14], "ratings", &[], false),
        // Claims to be reviews, but its listener will present ratings' certificate.
        pod("impostor", [127, net, 0, 15], "reviews", &[], false),
    ];
    let mut addresses: BTreeMap<String, Address> = workloads
        .into_iter()
        .map(|w| (w.uid.clone(), Address::Workload(Box::new(w))))
        .collect();
    addresses.insert(
        SVC.into(),
        Address::Service(Box::new(Service {
            name: "reviews".into(),
            namespace: "bookinfo".into(),
            hostname: "reviews.bookinfo.svc.cluster.local".into(),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: "10.96.0.12".parse().expect("ip"),
            }],
            ports: vec![Port {
                service_port: 9080,
                target_port: 9080,
                app_protocol: Default::default(),
            }],
            subject_alt_names: vec![],
            waypoint: None,
            load_balancing: None,
        })),
    );
    let allow_from = |principals: &[&str]| Match {
        principals: principals
            .iter()
            .map(|p| StringMatch::Exact(p.to_string()))
            .collect(),
        ..Default::default()
    };
    let policies = BTreeMap::from([
        (
            "bookinfo/reviews-viewer".to_string(),
            Authorization {
                name: "reviews-viewer".into(),
                namespace: "bookinfo".into(),
                scope: PolicyScope::WorkloadSelector,
                action: PolicyAction::Allow,
                rules: vec![vec![
                    vec![allow_from(&[
                        "cluster.local/ns/bookinfo/sa/productpage",
                        "cluster.local/ns/bookinfo/sa/details",
                    ])],
                    vec![Match {
                        destination_ports: vec![9080],
                        ..Default::default()
                    }],
                ]],
                dry_run: false,
            },
        ),
        (
            "bookinfo/no-details-ip".to_string(),
            Authorization {
                name: "no-details-ip".into(),
                namespace: "bookinfo".into(),
                scope: PolicyScope::WorkloadSelector,
                action: PolicyAction::Deny,
                rules: vec![vec![vec![Match {
                    source_ips: vec![format!("127.{net}.0.11/32").parse().expect("cidr")],
                    ..Default::default()
                }]]],
                dry_run: false,
            },
        ),
        (
            "istio-system/static-strict".to_string(),
            Authorization {
                name: "static-strict".into(),
                namespace: "istio-system".into(),
                scope: PolicyScope::WorkloadSelector,
                action: PolicyAction::Deny,
                rules: vec![vec![vec![Match {
                    not_principals: vec![StringMatch::Presence],
                    ..Default::default()
                }]]],
                dry_run: false,
            },
        ),
    ]);
    ProxyState::new(&addresses, &policies)
}

/// An application that answers `<name>:<what it read>` after the client half-closes.
async fn app(addr: SocketAddr, name: &'static str) {
    let l = TcpListener::bind(addr).await.expect("bind app");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf).await;
                let _ = s.write_all(format!("{name}:").as_bytes()).await;
                let _ = s.write_all(&buf).await;
            });
        }
    });
}

struct Node {
    state: SharedState,
    outbound: Arc<Outbound>,
    certs: Arc<dyn Certificates>,
}

async fn node(strict: bool, net: u8) -> Node {
    node_with(strict, net, inbound::MAX_PENDING_HANDSHAKES).await
}

async fn node_with(strict: bool, net: u8, max_pending_handshakes: usize) -> Node {
    let m = mesh();
    let ids = ["productpage", "details", "reviews", "ratings"].map(sa);
    let certs: Arc<dyn Certificates> = Arc::new(StaticCertificates::new(
        m.roots.clone(),
        ids.iter().map(|i| cert(&m, i)),
    ));
    let state: SharedState = Arc::new(ArcSwap::from_pointee(state(strict, net)));
    for (ip, name, presents) in [
        ([127, net, 0, 12], "v1", "reviews"),
        ([127, net, 0, 13], "v2", "reviews"),
        ([127, net, 0, 15], "impostor", "ratings"),
    ] {
        let ip = IpAddr::from(ip);
        app(SocketAddr::new(ip, 9080), name).await;
        let listener = TcpListener::bind(SocketAddr::new(ip, 15008))
            .await
            .expect("bind hbone");
        let uid = match name {
            "v1" => "Kubernetes//Pod/bookinfo/reviews-v1",
            "v2" => "Kubernetes//Pod/bookinfo/reviews-v2",
            _ => "Kubernetes//Pod/bookinfo/impostor",
        };
        let handler = Arc::new(HboneInbound {
            state: state.clone(),
            workload_uid: uid.into(),
            dialer: cairn_hbone::dialer::Dialer::host(),
        });
        tokio::spawn(inbound::serve_hbone(
            listener,
            certs.clone(),
            sa(presents),
            H2Settings::default(),
            handler,
            max_pending_handshakes,
        ));
    }
    let outbound = Arc::new(Outbound {
        state: state.clone(),
        client: Client::new(H2Settings::default(), PoolSettings::default()),
        certs: certs.clone(),
        bind_source_ip: true,
    });
    Node {
        state,
        outbound,
        certs,
    }
}

/// Connects "from" `source` to `dst` through the outbound proxy; returns what came back
/// and the proxy's result.
async fn call(
    n: &Node,
    source: &str,
    dst: &str,
    msg: &[u8],
) -> (Vec<u8>, Result<(u64, u64), OutboundError>) {
    let capture = TcpListener::bind("127.0.0.1:0").await.expect("capture");
    let mut client = TcpStream::connect(capture.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (captured, _) = capture.accept().await.expect("accept");
    let w = n
        .state
        .load()
        .workload(&format!("Kubernetes//Pod/bookinfo/{source}"))
        .cloned()
        .expect("source workload");
    let ob = n.outbound.clone();
    let dst: SocketAddr = dst.parse().expect("dst");
    let proxy = tokio::spawn(async move {
        ob.proxy(&w, dst, captured, &cairn_hbone::dialer::Dialer::host())
            .await
    });
    client.write_all(msg).await.expect("write");
    client.shutdown().await.expect("half-close");
    let mut out = Vec::new();
    let _ = client.read_to_end(&mut out).await;
    (out, proxy.await.expect("proxy task"))
}

#[tokio::test]
async fn service_vip_reaches_both_endpoints_over_mtls_with_policy() {
    let n = node(true, 1).await;
    let mut seen = HashSet::new();
    for _ in 0..40 {
        let (out, res) = call(&n, "productpage", VIP, b"hi").await;
        res.expect("allowed");
        let out = String::from_utf8(out).expect("utf8");
        assert!(out == "v1:hi" || out == "v2:hi", "{out}");
        seen.insert(out);
    }
    assert_eq!(seen.len(), 2, "traffic spread across both endpoints");
    // 40 connections, 2 destinations: pooled HBONE connections, not 40.
    assert_eq!(n.outbound.client.connections_opened(), 2);
}

#[tokio::test]
async fn denied_by_principal_and_by_source_ip() {
    let n = node(true, 2).await;
    let (out, res) = call(&n, "ratings", VIP, b"hi").await;
    assert!(out.is_empty());
    assert!(
        matches!(
            res,
            Err(OutboundError::Hbone(ClientError::Refused {
                status: http::StatusCode::FORBIDDEN,
                ..
            }))
        ),
        "{res:?}"
    );
    // details' principal is allowed, but its connections come from 127.2.0.11 (the
    // proxy binds the source pod's IP), which a DENY ipBlock covers.
    let (out, res) = call(&n, "details", VIP, b"hi").await;
    assert!(out.is_empty());
    assert!(res.is_err(), "{res:?}");
}

#[tokio::test]
async fn peer_with_the_wrong_identity_is_refused() {
    let n = node(true, 3).await;
    // The impostor pod is "reviews" in config, but presents ratings' certificate.
    let (out, res) = call(&n, "productpage", "127.3.0.15:9080", b"hi").await;
    assert!(out.is_empty());
    match res {
        Err(OutboundError::Hbone(ClientError::Tls { source, .. })) => {
            assert!(source.to_string().contains("expected"), "{source}");
        }
        other => panic!("expected a TLS identity failure, got {other:?}"),
    }
}

#[tokio::test]
async fn strict_rejects_plaintext_and_permissive_accepts_it() {
    for (strict, net, want) in [(true, 4, ""), (false, 5, "v1:plain")] {
        let n = node(strict, net).await;
        let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(front.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (accepted, _) = front.accept().await.expect("accept");
        let state = n.state.clone();
        let task = tokio::spawn(async move {
            inbound::plaintext(
                &state,
                accepted,
                SocketAddr::from(([127, net, 0, 12], 9080)),
                &cairn_hbone::dialer::Dialer::host(),
            )
            .await
        });
        client.write_all(b"plain").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out).await;
        task.await.expect("task");
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            want,
            "strict={strict}"
        );
    }
}

fn prometheus() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("install the metrics recorder once")
        })
        .clone()
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect admin");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test]
async fn admin_reports_config_metrics_and_readiness() {
    let handle = prometheus();
    let n = node(true, 6).await;
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admin = cairn_ztunnel::admin::Admin {
        state: n.state.clone(),
        certs: None,
        ready: ready.clone(),
        prometheus: Some(handle),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(admin.serve(listener));

    assert!(
        http_get(addr, "/healthz/ready")
            .await
            .starts_with("HTTP/1.1 503")
    );
    ready.store(true, std::sync::atomic::Ordering::Release);
    assert!(
        http_get(addr, "/healthz/ready")
            .await
            .starts_with("HTTP/1.1 200")
    );

    let dump = http_get(addr, "/config_dump").await;
    assert!(
        dump.contains("\"uid\": \"Kubernetes//Pod/bookinfo/reviews-v1\""),
        "{dump}"
    );
    assert!(dump.contains("\"name\": \"reviews-viewer\""), "{dump}");

    let (out, res) = call(&n, "productpage", VIP, b"metrics").await;
    res.expect("allowed");
    assert!(out.ends_with(b"metrics"));
    // The inbound side records the connection after both directions finished.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let metrics = http_get(addr, "/metrics").await;
    let opened = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains(
                    "source_principal=\"spiffe://cluster.local/ns/bookinfo/sa/productpage\"",
                )
                && l.contains("source_workload=\"productpage\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
        })
        .unwrap_or_else(|| panic!("no inbound connection metric in:\n{metrics}"));
    assert!(
        opened.contains("destination_workload=\"reviews-v"),
        "{opened}"
    );
    assert!(
        metrics.contains("istio_tcp_received_bytes_total{"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_flood_of_half_open_connections_is_shed_without_hurting_traffic() {
    const LIMIT: usize = 4;
    let n = node_with(false, 29, LIMIT).await;
    let v1 = "127.29.0.12:9080";
    let hbone: SocketAddr = "127.29.0.12:15008".parse().expect("addr");
    // An established, pooled HBONE connection to v1.
    let (out, res) = call(&n, "productpage", v1, b"before").await;
    res.expect("allowed");
    assert_eq!(out, b"v1:before");
    // LIMIT connections that never start TLS take every handshake slot...
    let mut silent = Vec::new();
    for _ in 0..LIMIT {
        silent.push(TcpStream::connect(hbone).await.expect("connect"));
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // ...so more are closed at once instead of piling up.
    for _ in 0..20 {
        let mut s = TcpStream::connect(hbone).await.expect("connect");
        let mut b = [0u8; 1];
        let closed = tokio::time::timeout(std::time::Duration::from_secs(2), s.read(&mut b)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "shed connection left open: {closed:?}"
        );
    }
    // Traffic on the established connection goes on during the flood.
    let (out, res) = call(&n, "productpage", v1, b"during").await;
    res.expect("allowed during the flood");
    assert_eq!(out, b"v1:during");
    // Once the flood stops, new HBONE connections are accepted again.
    drop(silent);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let fresh = Node {
        state: n.state.clone(),
        outbound: Arc::new(Outbound {
            state: n.state.clone(),
            client: Client::new(H2Settings::default(), PoolSettings::default()),
            certs: n.certs.clone(),
            bind_source_ip: true,
        }),
        certs: n.certs.clone(),
    };
    let (out, res) = call(&fresh, "productpage", v1, b"after").await;
    res.expect("allowed after the flood");
    assert_eq!(out, b"v1:after");
    assert_eq!(fresh.outbound.client.connections_opened(), 1);
}
