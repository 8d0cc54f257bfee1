//! `controller`: the Cairn control plane, on a config directory (local mode, the
//! embedded default) or a Kubernetes API server (`--kube`).

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use cairn_controller::{
    auth::{Authenticator, StaticTokens},
    ca::CertificateAuthority,
    ca_secret,
    compile::MeshConfig,
    kubernetes, leader,
    local::LocalSource,
    policy_status,
    runtime::Runtime,
    server::{self, DEFAULT_SERVING_NAMES, ServeConfig},
    token_review::{self, TokenReviewer, ZtunnelAccount},
    validate::parse_duration,
    waypoint_deploy,
    xds::Cache,
};
use clap::Parser;
use tokio::sync::watch;
use tracing::info;

#[derive(Debug, Parser)]
#[command(
    name = "controller",
    version,
    about = "Cairn control plane: config, delta xDS and the mesh CA"
)]
struct Args {
    /// Directory of Kubernetes/Istio manifests (multi-document YAML), watched for changes.
    #[arg(long, required_unless_present = "kube", conflicts_with = "kube")]
    config_dir: Option<PathBuf>,
    /// Kubernetes mode: list and watch the cluster's objects on its API server.
    #[arg(long)]
    kube: bool,
    /// kubeconfig for `--kube` (default: the in-cluster service account, else
    /// $KUBECONFIG or ~/.kube/config).
    #[arg(long, requires = "kube")]
    kubeconfig: Option<PathBuf>,
    /// Address for the gRPC endpoint (delta ADS + CA, TLS).
    #[arg(long, default_value = "127.0.0.1:15012")]
    listen: String,
    /// Directory holding the mesh root (generated on first start) or an
    /// operator-provided CA in Istio's cacerts layout.
    #[arg(long, default_value = "cairn-ca")]
    ca_dir: PathBuf,
    /// Default and maximum lifetime of workload certificates.
    #[arg(long, default_value = "24h", value_parser = duration)]
    cert_ttl: Duration,
    /// YAML list of bearer tokens: `- {token: ..., node: ...}` or `{token: ..., identity: spiffe://...}`.
    /// Required in local mode; in Kubernetes mode callers present projected
    /// service-account tokens checked by TokenReview unless this is given.
    #[arg(long, required_unless_present = "kube")]
    tokens: Option<PathBuf>,
    /// Kubernetes mode: the ztunnel DaemonSet's service account (`namespace/name`),
    /// whose pod-bound tokens act for their node.
    #[arg(long, default_value = "cairn-system/ztunnel")]
    ztunnel_service_account: String,
    /// Kubernetes mode: namespace of the CA Secrets (`cacerts` from the operator, else
    /// Cairn's `cairn-ca-root`, created on first start).
    #[arg(long, env = "POD_NAMESPACE", default_value = "cairn-system")]
    ca_namespace: String,
    /// Kubernetes mode: this replica's name in the leader election (default: the
    /// host name and process id).
    #[arg(long, env = "POD_NAME")]
    leader_id: Option<String>,
    /// Kubernetes mode: the image of waypoint Deployments made for waypoint Gateways.
    #[arg(long, default_value = "ghcr.io/cairn-mesh/waypoint:0.1.0")]
    waypoint_image: String,
    /// Kubernetes mode: the controller's URL as waypoint pods dial it (default:
    /// `https://cairn-controller.<ca-namespace>.svc:15012`; a cluster without DNS,
    /// like the local test cluster, gives an address). The TLS name stays the
    /// Service's DNS name.
    #[arg(long)]
    waypoint_controller_url: Option<String>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Namespace whose selector-less policies are mesh-wide.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// How often the config directory is rescanned. A changed file applies once two
    /// consecutive scans read the same content.
    #[arg(long, default_value = "500ms", value_parser = duration)]
    poll_interval: Duration,
    /// DNS names for the controller's serving certificate (repeatable).
    #[arg(long = "serving-name")]
    serving_names: Vec<String>,
}

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes config: not in a pod, no $KUBECONFIG or ~/.kube/config; pass --kubeconfig")?,
    };
    info!(server = %config.cluster_url, "Kubernetes mode");
    kube::Client::try_from(config).context("building the Kubernetes client")
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // Colours only for a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let args = Args::parse();
    let mesh = MeshConfig {
        trust_domain: args.trust_domain.clone(),
        root_namespace: args.root_namespace.clone(),
        ..MeshConfig::default()
    };
    let runtime = Arc::new(Runtime::new(mesh, Arc::new(Cache::default())));

    let (stop_tx, stop_rx) = watch::channel(false);
    let kube = match args.config_dir {
        Some(_) => None,
        None => Some(kube_client(args.kubeconfig.as_deref()).await?),
    };
    if let Some(client) = &kube {
        ca_secret::sync_ca_dir(
            client.clone(),
            &args.ca_namespace,
            &args.ca_dir,
            &args.trust_domain,
        )
        .await
        .context("loading the mesh CA from the cluster")?;
    }
    let ca = Arc::new(
        CertificateAuthority::load_or_create(&args.ca_dir, &args.trust_domain, args.cert_ttl)
            .context("loading the mesh CA")?,
    );
    if let Some(client) = &kube {
        ca_secret::publish_root(client.clone(), &args.ca_namespace, ca.root_pem())
            .await
            .context("publishing the mesh root")?;
    }
    let auth: Arc<dyn Authenticator> = match (&args.tokens, &kube) {
        (Some(path), _) => {
            Arc::new(StaticTokens::from_file(path).context("loading bearer tokens")?)
        }
        (None, Some(client)) => {
            let (namespace, name) = args
                .ztunnel_service_account
                .split_once('/')
                .filter(|(ns, n)| !ns.is_empty() && !n.is_empty())
                .context("--ztunnel-service-account must be namespace/name")?;
            info!(ztunnel = %args.ztunnel_service_account, audience = token_review::AUDIENCE, "callers authenticate with service-account tokens (TokenReview)");
            Arc::new(TokenReviewer::new(
                client.clone(),
                ZtunnelAccount {
                    namespace: namespace.into(),
                    name: name.into(),
                },
                args.trust_domain.clone(),
            ))
        }
        (None, None) => anyhow::bail!("--tokens is required with --config-dir"),
    };
    let watcher = match (&args.config_dir, kube) {
        (Some(dir), _) => {
            if !dir.is_dir() {
                anyhow::bail!(
                    "--config-dir {}: not a directory; create it and put manifests (*.yaml) in it",
                    dir.display()
                );
            }
            let mut source = LocalSource::new(dir);
            let (scan, stats) = runtime.scan(&mut source);
            info!(
                dir = %dir.display(),
                objects = scan.changed.len(),
                errors = scan.errors.len(),
                resources = stats.updated,
                "initial config loaded"
            );
            tokio::spawn(runtime.clone().watch(source, args.poll_interval, stop_rx))
        }
        (None, None) => anyhow::bail!("give --config-dir or --kube"),
        (None, Some(client)) => {
            let (ready_tx, mut ready_rx) = watch::channel(false);
            let changed = Arc::new(tokio::sync::Notify::new());
            let status_changed = Arc::new(tokio::sync::Notify::new());
            let listeners = kubernetes::Listeners {
                changed: vec![changed.clone(), status_changed.clone()],
                reports: kubernetes::SharedReports::default(),
            };
            let reports = listeners.reports.clone();
            let task = tokio::spawn(kubernetes::run(
                client.clone(),
                runtime.clone(),
                ready_tx,
                listeners,
                stop_rx.clone(),
            ));
            // Serving a partial store would tell proxies to drop what is merely not
            // listed yet: wait for every kind's first list.
            loop {
                match tokio::time::timeout(Duration::from_secs(10), ready_rx.wait_for(|r| *r)).await
                {
                    Ok(Ok(_)) => break,
                    Ok(Err(_)) => anyhow::bail!("the Kubernetes watches stopped before listing"),
                    Err(_) => info!("waiting for the API server's first lists"),
                }
            }
            let (leader_tx, leader_rx) = watch::channel(false);
            let identity = args.leader_id.clone().unwrap_or_else(|| {
                let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
                format!("{}-{}", host.trim(), std::process::id())
            });
            tokio::spawn(leader::run(
                client.clone(),
                leader::Settings {
                    namespace: args.ca_namespace.clone(),
                    identity,
                    lease: Duration::from_secs(15),
                    retry: Duration::from_secs(2),
                },
                leader_tx,
                stop_rx.clone(),
            ));
            tokio::spawn(policy_status::run(
                client.clone(),
                runtime.clone(),
                reports,
                status_changed,
                leader_rx.clone(),
                stop_rx.clone(),
            ));
            let controller_name = format!("cairn-controller.{}.svc", args.ca_namespace);
            tokio::spawn(waypoint_deploy::run(
                client,
                runtime.store().clone(),
                waypoint_deploy::Settings {
                    image: args.waypoint_image.clone(),
                    controller: args
                        .waypoint_controller_url
                        .clone()
                        .unwrap_or_else(|| format!("https://{controller_name}:15012")),
                    controller_name,
                    trust_domain: args.trust_domain.clone(),
                    root_pem: ca.root_pem().to_owned(),
                },
                changed,
                leader_rx,
                stop_rx,
            ));
            task
        }
    };

    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    info!(addr = %listener.local_addr()?, root = %args.ca_dir.join("root-cert.pem").display(), "serving delta ADS and CA over TLS");

    let serving_names = if args.serving_names.is_empty() {
        DEFAULT_SERVING_NAMES
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        args.serving_names
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        info!("shutting down");
    };
    server::serve(
        listener,
        ServeConfig {
            serving_names,
            cert_ttl: args.cert_ttl,
        },
        runtime,
        ca,
        auth,
        shutdown,
    )
    .await
    .context("serving")?;
    let _ = stop_tx.send(true);
    let _ = watcher.await;
    Ok(())
}
