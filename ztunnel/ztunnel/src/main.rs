//! `ztunnel`: Cairn's node proxy. Configured from the environment (see
//! `cairn_ztunnel::config`); config from the controller over delta xDS, or from a local
//! YAML file with `CAIRN_LOCAL_CONFIG`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use arc_swap::ArcSwap;
use cairn_client::token::Token;
use cairn_hbone::{
    H2Settings,
    client::{Client, PoolSettings},
};
use cairn_identity::verify::MeshRoots;
use cairn_ztunnel::{
    admin::Admin,
    ca::{CaConfig, CertManager},
    certs::{Certificates, NoCertificates},
    config::{Config, ConfigMode, Env},
    inbound::ACTIVE_CONNECTIONS,
    inpod::InPod,
    local::LocalConfig,
    node::NodeProxy,
    outbound::Outbound,
    state::ProxyState,
    xds::{StateSink, XdsClient, XdsConfig},
};
use tokio::sync::watch;
use tracing::{info, warn};

fn main() -> anyhow::Result<()> {
    cairn_client::process::start();
    let config = Config::from_source(&Env).context("configuration")?;
    cairn_client::process::runtime(config.worker_threads)
        .context("starting the runtime")?
        .block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let state = Arc::new(ArcSwap::from_pointee(ProxyState::default()));
    let ready = Arc::new(AtomicBool::new(false));
    // Set once the first config arrived (local mode: at once).
    let synced = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);

    let (certs, manager): (Arc<dyn Certificates>, Option<Arc<CertManager>>) = match &config.mode {
        ConfigMode::Local { file } => {
            let local = LocalConfig::load(file).context("local config")?;
            state.store(Arc::new(local.into_state()));
            ready.store(true, Ordering::Release);
            synced.store(true, Ordering::Release);
            warn!(file = %file.display(), "local config mode: no CA, so HBONE connections are refused");
            (Arc::new(NoCertificates), None)
        }
        ConfigMode::Controller {
            address,
            server_name,
            root_cert,
            token_file,
        } => {
            let root_pem = std::fs::read_to_string(root_cert)
                .with_context(|| format!("reading CAIRN_ROOT_CERT {}", root_cert.display()))?;
            // Read at every use (a projected token rotates); checked once now for a
            // clear start-up error.
            let token = Token::File(token_file.clone());
            token.current().context("CAIRN_TOKEN_FILE")?;
            let roots = MeshRoots::from_pem(root_pem.as_bytes()).context("mesh root")?;
            let client = XdsClient::new(
                XdsConfig {
                    address: address.clone(),
                    root_pem: root_pem.clone(),
                    server_name: server_name.clone(),
                    token: token.clone(),
                    node_id: config.node_name.clone(),
                    initial_backoff: Duration::from_millis(200),
                    max_backoff: Duration::from_secs(15),
                },
                StateSink::new(state.clone()),
            );
            let xds_synced = client.synced.clone();
            let ready = ready.clone();
            let synced = synced.clone();
            tokio::spawn(client.run(stop_rx.clone()));
            tokio::spawn(async move {
                while !xds_synced.load(Ordering::Acquire) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                synced.store(true, Ordering::Release);
                ready.store(true, Ordering::Release);
                info!("first config received; ready");
            });
            let manager = CertManager::new(
                CaConfig {
                    address: address.clone(),
                    root_pem,
                    server_name: server_name.clone(),
                    token,
                    ttl: config.cert_ttl,
                    timeout: cairn_ztunnel::ca::CA_TIMEOUT,
                },
                roots,
            );
            (manager.clone(), Some(manager))
        }
    };

    let admin_listener = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("binding the admin endpoint {}", config.admin_addr))?;
    info!(addr = %config.admin_addr, "admin endpoint: /healthz/ready /config_dump /metrics");
    tokio::spawn(
        Admin {
            state: state.clone(),
            certs: manager.clone(),
            ready,
            prometheus: Some(prometheus),
        }
        .serve(admin_listener),
    );

    let outbound = config.explicit_outbound.then(|| {
        Arc::new(Outbound {
            state: state.clone(),
            client: Client::new(H2Settings::default(), PoolSettings::default()),
            certs: certs.clone(),
            bind_source_ip: true,
        })
    });
    let mut inpod = match &config.capture {
        None => None,
        Some(capture) => {
            let outbound = Arc::new(Outbound {
                state: state.clone(),
                client: Client::new(H2Settings::default(), PoolSettings::default()),
                certs: certs.clone(),
                // The socket is made in the pod's namespace: the pod IP is its source.
                bind_source_ip: false,
            });
            Some(
                InPod::new(
                    config.node_name.clone(),
                    capture,
                    state.clone(),
                    synced.clone(),
                    certs.clone(),
                    outbound,
                )
                .context("in-pod capture (CAIRN_CAPTURE)")?,
            )
        }
    };
    let mut node = NodeProxy::new(config.node_name.clone(), state, certs, manager, outbound);
    if inpod.is_some() {
        // Captured pods are served from listeners inside their namespaces.
        node = node.without_listeners();
    }
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // Pods enrolled by the CNI plugin are adopted within this much of appearing.
    let mut pod_tick = tokio::time::interval(Duration::from_millis(100));
    let shutdown = cairn_client::process::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tick.tick() => node.reconcile().await,
            _ = pod_tick.tick(), if inpod.is_some() => {
                if let Some(inpod) = &mut inpod {
                    inpod.reconcile();
                }
            }
            _ = &mut shutdown => break,
        }
    }
    info!(drain = ?config.drain, "shutting down: no new connections; draining");
    node.stop_listening();
    if let Some(inpod) = &mut inpod {
        inpod.stop_listening();
    }
    cairn_ztunnel::inbound::begin_drain();
    let _ = stop_tx.send(true);
    cairn_client::process::drain(|| ACTIVE_CONNECTIONS.load(Ordering::Acquire), config.drain).await;
    cairn_client::process::flush_logs();
    Ok(())
}
