//! The ztunnel's certificates from the real controller CA: issued for workloads on its
//! node, rotated at half life, and a tunnel opened before a rotation keeps working after.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use cairn_api::model::{Address, TunnelProtocol, Workload};
use cairn_hbone::{
    H2Settings,
    client::{Client, PoolKey, PoolSettings},
};
use cairn_identity::{SpiffeId, verify::MeshRoots};
use cairn_tests::in_process::{Controller, start_controller};
use cairn_ztunnel::{
    SharedState,
    ca::{CaConfig, CertManager, CertState},
    certs::Certificates,
    inbound::{self, HboneInbound},
    state::ProxyState,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

const BOOKINFO: &str = include_str!("../controller/controller/tests/fixtures/bookinfo.yaml");
const TTL: Duration = Duration::from_secs(4);

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "bookinfo", sa).expect("id")
}

async fn controller(dir: &std::path::Path) -> Controller {
    std::fs::create_dir_all(dir.join("config")).expect("mkdir");
    std::fs::write(dir.join("config/app.yaml"), BOOKINFO).expect("write");
    start_controller(dir, ([127, 0, 0, 1], 0).into(), TTL).await
}

async fn generation_at_least(m: &CertManager, who: &SpiffeId, n: u64) {
    for _ in 0..400 {
        if let Some((CertState::Available { .. }, g)) = m.state(who)
            && g >= n
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "{who} never reached certificate generation {n}: {:?}",
        m.state(who)
    );
}

/// node-a's certificate manager against the CA at `addr`.
fn node_a_certificates(addr: SocketAddr, root: &str, timeout: Duration) -> Arc<CertManager> {
    CertManager::new(
        CaConfig {
            address: format!("https://{addr}"),
            root_pem: root.to_owned(),
            server_name: "localhost".into(),
            token: "node-a".into(),
            ttl: TTL,
            timeout,
        },
        MeshRoots::from_pem(root.as_bytes()).expect("roots"),
    )
}

#[tokio::test]
async fn certificates_rotate_without_breaking_established_tunnels() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = controller(dir.path()).await;
    let (addr, root) = (ctl.addr, ctl.root.clone());
    let certs = node_a_certificates(addr, &root, cairn_ztunnel::ca::CA_TIMEOUT);
    let (reviews, productpage) = (id("bookinfo-reviews"), id("bookinfo-productpage"));
    let _tasks = [
        certs.manage(reviews.clone()),
        certs.manage(productpage.clone()),
    ];
    // ratings runs on node-b: node-a's ztunnel cannot get it.
    let _ratings = certs.manage(id("bookinfo-ratings"));
    generation_at_least(&certs, &reviews, 1).await;
    generation_at_least(&certs, &productpage, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        matches!(certs.state(&id("bookinfo-ratings")), Some((CertState::Failed(e), 0)) if e.contains("node node-a runs no workload")),
        "{:?}",
        certs.state(&id("bookinfo-ratings"))
    );

    // reviews' pod: an app that echoes as it reads, and its HBONE listener.
    let pod: SocketAddr = "127.9.0.12:9080".parse().expect("addr");
    let app = TcpListener::bind(pod).await.expect("bind app");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let workload = Workload {
        uid: "Kubernetes//Pod/bookinfo/reviews-v1".into(),
        name: "reviews-v1".into(),
        namespace: "bookinfo".into(),
        addresses: vec![pod.ip()],
        network: String::new(),
        identity: reviews.clone(),
        tunnel_protocol: TunnelProtocol::Hbone,
        native_tunnel: false,
        waypoint: None,
        node: "node-a".into(),
        canonical_name: "reviews".into(),
        canonical_revision: "v1".into(),
        workload_name: "reviews-v1".into(),
        services: BTreeMap::new(),
        authorization_policies: vec![],
        healthy: true,
        locality: None,
        cluster_id: "Kubernetes".into(),
    };
    let state: SharedState = Arc::new(ArcSwap::from_pointee(ProxyState::new(
        &BTreeMap::from([(workload.uid.clone(), Address::Workload(Box::new(workload)))]),
        &BTreeMap::new(),
    )));
    let listener = TcpListener::bind("127.9.0.12:15008")
        .await
        .expect("bind hbone");
    let dyn_certs: Arc<dyn Certificates> = certs.clone();
    tokio::spawn(inbound::serve_hbone(
        listener,
        dyn_certs.clone(),
        reviews.clone(),
        H2Settings::default(),
        Arc::new(HboneInbound {
            state,
            workload_uid: "Kubernetes//Pod/bookinfo/reviews-v1".into(),
            dialer: Default::default(),
        }),
        inbound::MAX_PENDING_HANDSHAKES,
    ));

    let key = PoolKey {
        source: productpage.clone(),
        destination: reviews.clone(),
        address: "127.9.0.12:15008".parse().expect("addr"),
        source_ip: None,
        dialer: Default::default(),
    };
    // A tunnel from productpage to reviews with the certificates current right now.
    let open = async |client: &Client| {
        let tls = dyn_certs
            .client(&productpage, &reviews)
            .expect("client tls");
        client.connect(&key, tls, pod).await
    };
    let client = Client::new(H2Settings::default(), PoolSettings::default());
    let mut tunnel = open(&client).await.expect("tunnel");
    let mut buf = [0u8; 16];
    tunnel.write_all(b"before").await.expect("write");
    let n = tunnel.read(&mut buf).await.expect("read");
    assert_eq!(&buf[..n], b"before");

    // Not before half of the 4 s lifetime (minus at most 10% jitter)...
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        certs.state(&reviews).map(|s| s.1),
        Some(1),
        "rotated too early"
    );
    // ...but soon after, both certificates have been replaced.
    generation_at_least(&certs, &reviews, 2).await;
    generation_at_least(&certs, &productpage, 2).await;

    // The tunnel opened under the old certificates keeps working...
    tunnel
        .write_all(b"after")
        .await
        .expect("write after rotation");
    let n = tunnel.read(&mut buf).await.expect("read after rotation");
    assert_eq!(&buf[..n], b"after");
    // ...and new connections use the new ones.
    let fresh = Client::new(H2Settings::default(), PoolSettings::default());
    let mut t2 = open(&fresh)
        .await
        .expect("tunnel with rotated certificates");
    t2.write_all(b"new").await.expect("write");
    let n = t2.read(&mut buf).await.expect("read");
    assert_eq!(&buf[..n], b"new");
}

#[tokio::test]
async fn a_stalled_ca_fails_the_fetch_which_is_then_retried() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = controller(dir.path()).await;
    let root = ctl.root.clone();
    // Takes connections and never says a word (no TLS, no gRPC).
    let stalled = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = stalled.local_addr().expect("addr");
    let attempts = Arc::new(AtomicUsize::new(0));
    let seen = attempts.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = stalled.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    let certs = node_a_certificates(addr, &root, Duration::from_millis(300));
    let reviews = id("bookinfo-reviews");
    let _task = certs.manage(reviews.clone());
    // Each attempt gives up after the timeout and a new one follows after the backoff.
    for _ in 0..100 {
        if attempts.load(Ordering::SeqCst) >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        attempts.load(Ordering::SeqCst) >= 3,
        "fetches hang on a stalled CA: {} attempts, {:?}",
        attempts.load(Ordering::SeqCst),
        certs.state(&reviews)
    );
    assert!(
        matches!(certs.state(&reviews), Some((CertState::Failed(_), 0))),
        "{:?}",
        certs.state(&reviews)
    );
}
