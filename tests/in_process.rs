//! The controller in process, over a config directory, for tests that pair it with a
//! ztunnel: local source watched every 20 ms, delta ADS and CA on TLS, one node token
//! (`node-a` for node `node-a`).

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use cairn_controller::{
    auth::{Caller, StaticTokens},
    ca::CertificateAuthority,
    compile::MeshConfig,
    local::LocalSource,
    runtime::Runtime,
    server::{self, ServeConfig},
    xds::Cache,
};
use tokio::sync::watch;

/// A running controller; it stops when this is dropped.
pub struct Controller {
    pub addr: SocketAddr,
    /// The mesh root (PEM).
    pub root: String,
    _stop: watch::Sender<bool>,
}

/// Starts a controller on `listen` over `dir/config`, its CA in `dir/ca` with
/// certificates of `ttl`.
pub async fn start_controller(dir: &Path, listen: SocketAddr, ttl: Duration) -> Controller {
    let ca = Arc::new(
        CertificateAuthority::load_or_create(&dir.join("ca"), "cluster.local", ttl).expect("ca"),
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
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let root = ca.root_pem().to_owned();
    let mut rx = stop_rx;
    tokio::spawn(async move {
        let _ = server::serve(
            listener,
            ServeConfig {
                serving_names: vec!["localhost".into()],
                cert_ttl: ttl,
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
    Controller {
        addr,
        root,
        _stop: stop,
    }
}
