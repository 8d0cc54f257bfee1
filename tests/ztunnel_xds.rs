//! The ztunnel's xDS client against the real controller, in process: initial sync, a
//! config change, the controller going away (last good config kept) and coming back
//! (resync of differences only).

use std::{net::TcpListener as StdListener, path::Path, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use cairn_controller::{
    auth::{Caller, StaticTokens},
    ca::{CertificateAuthority, DEFAULT_TTL},
    compile::MeshConfig,
    local::LocalSource,
    runtime::Runtime,
    server::{self, ServeConfig},
    xds::Cache,
};
use cairn_ztunnel::{
    SharedState,
    state::ProxyState,
    xds::{XdsClient, XdsConfig},
};
use tokio::sync::watch;

const BOOKINFO: &str = include_str!("../controller/controller/tests/fixtures/bookinfo.yaml");
const REVIEWS_V1: &str = "Kubernetes//Pod/bookinfo/reviews-v1-545db77b95-klmno";

/// Starts a controller on `port` over `dir`; stops when the returned sender is dropped.
async fn controller(dir: &Path, port: u16) -> (watch::Sender<bool>, String) {
    let ca = Arc::new(
        CertificateAuthority::load_or_create(&dir.join("ca"), "cluster.local", DEFAULT_TTL)
            .expect("ca"),
    );
    let auth = Arc::new(StaticTokens::new([(
        "node-a".to_string(),
        Caller::Node("node-a".into()),
    )]));
    let runtime = Arc::new(Runtime::new(
        MeshConfig::default(),
        Arc::new(Cache::default()),
    ));
    let mut source = LocalSource::new(dir.join("config"));
    runtime.scan(&mut source);
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(
        runtime
            .clone()
            .watch(source, Duration::from_millis(20), stop_rx.clone()),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    let root = ca.root_pem().to_owned();
    let mut rx = stop_rx;
    tokio::spawn(async move {
        let _ = server::serve(
            listener,
            ServeConfig {
                serving_names: vec!["localhost".into()],
                cert_ttl: DEFAULT_TTL,
            },
            runtime,
            ca,
            auth,
            async move {
                let _ = rx.changed().await;
            },
        )
        .await;
    });
    (stop, root)
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test]
async fn ztunnel_follows_the_controller_and_survives_its_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("config")).expect("mkdir");
    let config = dir.path().join("config/app.yaml");
    std::fs::write(&config, BOOKINFO).expect("write");
    let port = StdListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let (stop, root) = controller(dir.path(), port).await;

    let state: SharedState = Arc::new(ArcSwap::from_pointee(ProxyState::default()));
    let client = XdsClient::new(
        XdsConfig {
            address: format!("https://127.0.0.1:{port}"),
            root_pem: root,
            server_name: "localhost".into(),
            token: "node-a".into(),
            node_id: "node-a".into(),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(400),
        },
        state.clone(),
    );
    let stats = client.stats.clone();
    let (_shutdown, shutdown_rx) = watch::channel(false);
    tokio::spawn(client.run(shutdown_rx));

    eventually("initial sync", || state.load().workloads().count() == 5).await;
    assert_eq!(state.load().services().count(), 4);
    assert!(
        state
            .load()
            .policies()
            .any(|p| p.name == "istio_converted_static_strict")
    );
    let first = stats
        .resources_received
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(first, 10, "5 workloads + 4 services + 1 policy");

    // A change reaches the proxy.
    let edited = BOOKINFO.replacen(
        "    app: reviews\n    version: v1\n",
        "    app: reviews\n    version: canary\n",
        1,
    );
    std::fs::write(&config, &edited).expect("write");
    eventually("canary revision", || {
        state
            .load()
            .workload(REVIEWS_V1)
            .is_some_and(|w| w.canonical_revision == "canary")
    })
    .await;

    // The controller goes away: the proxy keeps its last good state.
    drop(stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state.load().workloads().count(), 5);

    // While it is away one more thing changes; it comes back on the same port.
    let removed = edited
        .split("---\n")
        .filter(|d| !d.contains("ratings-v1-7dc98c7588-uvwxy"))
        .collect::<Vec<_>>()
        .join("---\n");
    std::fs::write(&config, removed).expect("write");
    let before = stats
        .resources_received
        .load(std::sync::atomic::Ordering::Relaxed);
    let (_stop2, _) = controller(dir.path(), port).await;
    eventually("resync after restart", || {
        state.load().workloads().count() == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resynced = stats
        .resources_received
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    assert_eq!(
        resynced, 1,
        "only the removal crossed the wire after the restart"
    );
    assert!(stats.connects.load(std::sync::atomic::Ordering::Relaxed) >= 2);
}
