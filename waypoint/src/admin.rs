//! The waypoint's admin endpoint (port 15020, as ztunnel's): `/metrics` (Prometheus),
//! `/healthz/ready` (200 once the config arrived and the certificate was issued),
//! `/config_dump` (identity, certificate, xDS counters, what is served).

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use cairn_client::{
    ca::{CertManager, CertState},
    xds::XdsStats,
};
use cairn_identity::SpiffeId;
use http::{Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::warn;

use crate::xds::Dump;

#[derive(Clone)]
pub struct Admin {
    pub identity: SpiffeId,
    pub certs: Arc<CertManager>,
    pub synced: Arc<AtomicBool>,
    pub xds: Arc<XdsStats>,
    pub dump: Arc<ArcSwap<Dump>>,
    pub prometheus: PrometheusHandle,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Admin {
    /// Ready: config received and a valid certificate to present.
    pub fn ready(&self) -> bool {
        self.synced.load(Ordering::Acquire)
            && matches!(
                self.certs.state(&self.identity),
                Some((CertState::Available { .. }, _))
            )
    }

    pub fn config_dump(&self) -> serde_json::Value {
        let certificate = match self.certs.state(&self.identity) {
            Some((CertState::Available { not_after }, generation)) => {
                json!({"state": "available", "notAfter": unix(not_after), "generation": generation})
            }
            Some((CertState::Pending, _)) | None => json!({"state": "pending"}),
            Some((CertState::Failed(e), _)) => json!({"state": "failed", "error": e}),
        };
        let x = &self.xds;
        json!({
            "identity": self.identity.to_string(),
            "certificate": certificate,
            "xds": {
                "synced": self.synced.load(Ordering::Acquire),
                "connects": x.connects.load(Ordering::Relaxed),
                "acks": x.acks.load(Ordering::Relaxed),
                "nacks": x.nacks.load(Ordering::Relaxed),
                "resourcesReceived": x.resources_received.load(Ordering::Relaxed),
            },
            "config": &**self.dump.load(),
        })
    }

    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, content_type, body) = match path {
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.prometheus.render(),
            ),
            "/healthz/ready" if self.ready() => (StatusCode::OK, "text/plain", "ready\n".into()),
            "/healthz/ready" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not ready: waiting for the config and the certificate\n".into(),
            ),
            "/config_dump" => (
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&self.config_dump()).unwrap_or_default(),
            ),
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
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
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
