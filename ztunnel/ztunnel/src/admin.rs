//! The admin endpoint (port 15020): `/healthz/ready`, `/config_dump`, `/metrics`.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::warn;

use crate::{
    SharedState,
    ca::{CertManager, CertState},
};

/// What the admin pages read.
#[derive(Clone)]
pub struct Admin {
    pub state: SharedState,
    pub certs: Option<Arc<CertManager>>,
    /// Set once the first config (xDS or local) is in place.
    pub ready: Arc<AtomicBool>,
    pub prometheus: Option<PrometheusHandle>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Admin {
    /// The JSON of `/config_dump`: workloads, services, policies, certificates.
    pub fn config_dump(&self) -> serde_json::Value {
        let st = self.state.load();
        let mut workloads: Vec<_> = st.workloads().map(|w| w.as_ref().clone()).collect();
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        let mut services: Vec<_> = st.services().map(|s| s.as_ref().clone()).collect();
        services.sort_by(|a, b| (&a.namespace, &a.hostname).cmp(&(&b.namespace, &b.hostname)));
        let mut policies: Vec<_> = st.policies().map(|p| p.as_ref().clone()).collect();
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut certificates: Vec<serde_json::Value> = self
            .certs
            .iter()
            .flat_map(|c| c.states())
            .map(|(id, state)| match state {
                CertState::Pending => json!({"identity": id, "state": "pending"}),
                CertState::Available { not_after } => {
                    json!({"identity": id, "state": "available", "expiresUnix": unix(not_after)})
                }
                CertState::Failed(e) => json!({"identity": id, "state": "failed", "error": e}),
            })
            .collect();
        certificates.sort_by_key(|c| c["identity"].to_string());
        json!({
            "workloads": workloads,
            "services": services,
            "policies": policies,
            "certificates": certificates,
        })
    }

    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, content_type, body) = match path {
            "/healthz/ready" if self.ready.load(Ordering::Acquire) => {
                (StatusCode::OK, "text/plain", "ready\n".to_owned())
            }
            "/healthz/ready" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not ready: no config yet\n".to_owned(),
            ),
            "/config_dump" => (
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&self.config_dump()).unwrap_or_default(),
            ),
            "/metrics" => match &self.prometheus {
                Some(p) => (StatusCode::OK, "text/plain; version=0.0.4", p.render()),
                None => (
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "metrics are not enabled\n".into(),
                ),
            },
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /healthz/ready, /config_dump or /metrics\n".into(),
            ),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            resp.headers_mut().insert(CONTENT_TYPE, v);
        }
        resp
    }

    /// Serves HTTP/1.1 on `listener` until it fails.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let (tcp, peer): (_, SocketAddr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "admin listener failed");
                    return;
                }
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let resp = admin.respond(req.uri().path());
                    async move { Ok::<_, Infallible>(resp) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await
                {
                    warn!(src.addr = %peer, error = %e, "admin connection error");
                }
            });
        }
    }
}
