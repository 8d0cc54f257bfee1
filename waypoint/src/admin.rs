//! The waypoint's admin endpoint (port 15020, as ztunnel's): `/metrics` (Prometheus),
//! `/healthz/ready` (200 once the config arrived and the certificate was issued),
//! `/config_dump` (identity, certificate, xDS counters, what is served).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use cairn_client::{
    admin::Page,
    ca::{CertManager, CertState},
    xds::XdsStats,
};
use cairn_identity::SpiffeId;
use http::StatusCode;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;

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

    /// The page at `path`.
    pub fn page(&self, path: &str) -> Page {
        match path {
            "/metrics" => Page::ok("text/plain; version=0.0.4", self.prometheus.render()),
            "/healthz/ready" if self.ready() => Page::ok("text/plain", "ready\n"),
            "/healthz/ready" => Page::with_status(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: waiting for the config and the certificate\n",
            ),
            "/config_dump" => Page::ok(
                "application/json",
                serde_json::to_string_pretty(&self.config_dump()).unwrap_or_default(),
            ),
            _ => Page::with_status(
                StatusCode::NOT_FOUND,
                "try /healthz/ready, /config_dump or /metrics\n",
            ),
        }
    }

    /// Serves HTTP/1.1 on `listener` until the task is aborted.
    pub async fn serve(self, listener: TcpListener) {
        cairn_client::admin::serve(listener, Arc::new(move |path: &str| self.page(path))).await
    }
}
