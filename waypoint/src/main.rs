//! `waypoint`: Cairn's L7 proxy process. One per waypoint Gateway: it proves the
//! waypoint's SPIFFE identity (certificate from the mesh CA), takes its routes over
//! delta xDS, serves HBONE on 15008 (the inner stream is the client's connection to
//! `service-VIP:port`) and sends requests on over HBONE to the chosen endpoints.
//! Settings come from the environment (`waypoint --help` lists them).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use cairn_client::{
    ca::{CA_TIMEOUT, CaConfig, CertManager},
    certs::Certificates,
    token::Token,
    xds::{XdsClient, XdsConfig},
};
use cairn_hbone::{
    H2Settings,
    client::{Client, PoolSettings},
    server::{Connect, Handler, HandlerFuture, Responder, serve_listener},
};
use cairn_identity::{SpiffeId, verify::MeshRoots};
use cairn_waypoint::{
    admin::Admin,
    cluster::Transport,
    hbone_upstream::{HboneTransport, TlsFor, UpstreamPools},
    ingress::{ConnLimits, Ingress},
    xds::{RouteSink, TransportFor},
};
use clap::Parser;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::sync::watch;
use tracing::info;

fn duration(s: &str) -> Result<Duration, String> {
    cairn_client::duration(s).ok_or_else(|| format!("{s:?}: write a duration like 500ms or 30s"))
}

#[derive(Debug, Parser)]
#[command(
    name = "waypoint",
    about = "Cairn's waypoint: the L7 proxy for the services and workloads bound to it"
)]
struct Settings {
    /// The waypoint's SPIFFE identity (its ServiceAccount's).
    #[arg(long, env = "CAIRN_IDENTITY")]
    identity: SpiffeId,
    /// The controller (xDS and CA), `https://host:port`.
    #[arg(long, env = "CAIRN_CONTROLLER")]
    controller: String,
    /// Name to verify on the controller's certificate.
    #[arg(
        long,
        env = "CAIRN_CONTROLLER_NAME",
        default_value = "cairn-controller"
    )]
    controller_name: String,
    /// The mesh root certificate (PEM).
    #[arg(long, env = "CAIRN_ROOT_CERT")]
    root_cert: std::path::PathBuf,
    /// File holding the bearer token for the controller.
    #[arg(long, env = "CAIRN_TOKEN_FILE")]
    token_file: std::path::PathBuf,
    #[arg(long, env = "CAIRN_HBONE_ADDR", default_value = "0.0.0.0:15008")]
    hbone_addr: SocketAddr,
    #[arg(long, env = "CAIRN_ADMIN_ADDR", default_value = "0.0.0.0:15020")]
    admin_addr: SocketAddr,
    #[arg(long, env = "CAIRN_WORKER_THREADS", default_value_t = 2)]
    worker_threads: usize,
    /// Certificate lifetime asked of the CA.
    #[arg(long, env = "CAIRN_CERT_TTL", default_value = "24h", value_parser = duration)]
    cert_ttl: Duration,
    /// On SIGTERM: how long connections in flight may take to finish.
    #[arg(long, env = "CAIRN_DRAIN", default_value = "5s", value_parser = duration)]
    drain: Duration,
}

fn main() -> anyhow::Result<()> {
    cairn_client::process::start();
    let settings = Settings::parse();
    cairn_client::process::runtime(settings.worker_threads)
        .context("starting the runtime")?
        .block_on(run(settings))
}

/// Istio's buckets for the request duration histogram (milliseconds) and, for the
/// size histograms, powers of ten as Envoy's defaults are.
const DURATION_BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0,
];
const SIZE_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

/// The ingress, counting connections in flight for the drain.
struct Counted {
    ingress: Arc<Ingress>,
    active: Arc<AtomicUsize>,
}

impl Handler for Counted {
    fn handle(&self, connect: Connect, responder: Responder) -> HandlerFuture {
        let active = self.active.clone();
        active.fetch_add(1, Ordering::AcqRel);
        let served = self.ingress.handle(connect, responder);
        Box::pin(async move {
            served.await;
            active.fetch_sub(1, Ordering::AcqRel);
        })
    }
}

async fn run(s: Settings) -> anyhow::Result<()> {
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("istio_request_duration_milliseconds".into()),
            DURATION_BUCKETS,
        )
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), SIZE_BUCKETS))
        .context("histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    cairn_waypoint::telemetry::fold_histograms(prometheus.clone());
    let root_pem = std::fs::read_to_string(&s.root_cert)
        .with_context(|| format!("reading CAIRN_ROOT_CERT {}", s.root_cert.display()))?;
    // Read at every use (a projected token rotates); checked once now for a clear
    // start-up error.
    let token = Token::File(s.token_file.clone());
    token.current().context("CAIRN_TOKEN_FILE")?;
    let roots = MeshRoots::from_pem(root_pem.as_bytes()).context("mesh root")?;

    let certs = CertManager::new(
        CaConfig {
            address: s.controller.clone(),
            root_pem: root_pem.clone(),
            server_name: s.controller_name.clone(),
            token: token.clone(),
            ttl: s.cert_ttl,
            timeout: CA_TIMEOUT,
        },
        roots,
    );
    let _rotation = certs.manage(s.identity.clone());

    let hbone = Client::new(H2Settings::default(), PoolSettings::default());
    let tls: TlsFor = {
        let (certs, me) = (certs.clone(), s.identity.clone());
        Arc::new(move |peer: &SpiffeId| certs.client(&me, peer).map_err(Into::into))
    };
    let transport: TransportFor = {
        let me = s.identity.clone();
        // One set of upstream connections for every config.
        let pools = UpstreamPools::default();
        Arc::new(move |identities| {
            Arc::new(
                HboneTransport::new(hbone.clone(), me.clone(), tls.clone(), identities)
                    .with_pools(&pools),
            ) as Arc<dyn Transport>
        })
    };
    let ingress = Arc::new(Ingress::new(ConnLimits::default()));
    let sink = RouteSink::new(ingress.clone(), transport, None);
    let dump = sink.dump();
    let client = XdsClient::new(
        XdsConfig {
            address: s.controller.clone(),
            root_pem,
            server_name: s.controller_name.clone(),
            token,
            node_id: format!("waypoint~{}", s.identity),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(15),
        },
        sink,
    );
    let admin = Admin {
        identity: s.identity.clone(),
        certs: certs.clone(),
        synced: client.synced.clone(),
        xds: client.stats.clone(),
        dump,
        prometheus,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(client.run(stop_rx.clone()));

    let admin_listener = tokio::net::TcpListener::bind(s.admin_addr)
        .await
        .with_context(|| format!("binding the admin endpoint {}", s.admin_addr))?;
    info!(addr = %s.admin_addr, "admin endpoint: /healthz/ready /config_dump /metrics");
    tokio::spawn(admin.serve(admin_listener));

    let listener = tokio::net::TcpListener::bind(s.hbone_addr)
        .await
        .with_context(|| format!("binding HBONE {}", s.hbone_addr))?;
    info!(addr = %s.hbone_addr, identity = %s.identity, "serving HBONE");
    let active = Arc::new(AtomicUsize::new(0));
    let handler = Arc::new(Counted {
        ingress,
        active: active.clone(),
    });
    let accept = {
        let (certs, me) = (certs.clone(), s.identity.clone());
        tokio::spawn(serve_listener(
            listener,
            move || certs.server(&me).map_err(|e| e.to_string()),
            H2Settings::default(),
            handler,
            cairn_hbone::server::DEFAULT_MAX_PENDING_HANDSHAKES,
            stop_rx,
        ))
    };

    cairn_client::process::shutdown_signal().await;
    info!(drain = ?s.drain, "shutting down: no new connections; draining");
    accept.abort();
    let _ = stop_tx.send(true);
    cairn_client::process::drain(|| active.load(Ordering::Acquire), s.drain).await;
    cairn_client::process::flush_logs();
    Ok(())
}
