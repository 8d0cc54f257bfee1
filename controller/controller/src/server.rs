//! The controller's gRPC endpoint: delta ADS and the CA on one TLS port, with a
//! serving certificate issued by the mesh CA itself.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use cairn_api::proto::{
    ca::istio_certificate_service_server::IstioCertificateServiceServer,
    discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer,
};
use cairn_identity::SpiffeId;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::{
    auth::Authenticator,
    ca::{CertificateAuthority, service::CaService},
    runtime::Runtime,
    xds::AdsService,
};

/// DNS names the controller's serving certificate carries by default.
pub const DEFAULT_SERVING_NAMES: &[&str] = &[
    "cairn-controller.cairn-system.svc",
    "cairn-controller.cairn-system.svc.cluster.local",
    "localhost",
];

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("issuing the controller's serving certificate: {0}")]
    Certificate(#[from] crate::ca::CaError),
    #[error("controller identity: {0}")]
    Identity(#[from] cairn_identity::ParseError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

pub struct ServeConfig {
    pub serving_names: Vec<String>,
    pub cert_ttl: Duration,
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: ServeConfig,
    runtime: Arc<Runtime>,
    ca: Arc<CertificateAuthority>,
    auth: Arc<dyn Authenticator>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let local: Option<SocketAddr> = listener.local_addr().ok();
    let id = SpiffeId::new(ca.trust_domain(), "cairn-system", "cairn-controller")?;
    let ips: Vec<_> = local
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
        .into_iter()
        .chain([std::net::IpAddr::from([127, 0, 0, 1])])
        .collect();
    let (cert, key) = ca.issue_serving(&id, &config.serving_names, &ips)?;
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    let (stop_streams, streams_stop) = tokio::sync::watch::channel(false);
    let ads = AdsService::new(runtime.cache().clone(), auth.clone(), streams_stop);
    let ca_svc = CaService::new(ca, auth, runtime.clone(), config.cert_ttl);
    Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(AggregatedDiscoveryServiceServer::new(ads))
        .add_service(IstioCertificateServiceServer::new(ca_svc))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown.await;
            // End the long-lived xDS streams so graceful shutdown can finish.
            let _ = stop_streams.send(true);
        })
        .await?;
    Ok(())
}
