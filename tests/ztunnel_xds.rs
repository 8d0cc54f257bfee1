//! The ztunnel's xDS client against the real controller, in process: initial sync, a
//! config change, the controller going away (last good config kept) and coming back
//! (resync of differences only).

use std::{net::TcpListener as StdListener, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use cairn_controller::ca::DEFAULT_TTL;
use cairn_tests::in_process::start_controller;
use cairn_ztunnel::{
    SharedState,
    state::ProxyState,
    xds::{StateSink, XdsClient, XdsConfig},
};
use tokio::sync::watch;

const BOOKINFO: &str = include_str!("../controller/controller/tests/fixtures/bookinfo.yaml");
const REVIEWS_V1: &str = "Kubernetes//Pod/bookinfo/reviews-v1-545db77b95-klmno";

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
    let listen: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let controller = start_controller(dir.path(), listen, DEFAULT_TTL).await;
    let root = controller.root.clone();

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
        StateSink::new(state.clone()),
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
    drop(controller);
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
    let _second = start_controller(dir.path(), listen, DEFAULT_TTL).await;
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
