//! The admin endpoint (port 15020): `/healthz/ready`, `/config_dump`, `/metrics`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use cairn_client::admin::Page;
use http::StatusCode;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;

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

    /// The page at `path`.
    pub fn page(&self, path: &str) -> Page {
        match path {
            "/healthz/ready" if self.ready.load(Ordering::Acquire) => {
                Page::ok("text/plain", "ready\n")
            }
            "/healthz/ready" => Page::with_status(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: no config yet\n",
            ),
            "/config_dump" => Page::ok(
                "application/json",
                serde_json::to_string_pretty(&self.config_dump()).unwrap_or_default(),
            ),
            "/metrics" => match &self.prometheus {
                Some(p) => Page::ok("text/plain; version=0.0.4", p.render()),
                None => Page::with_status(StatusCode::NOT_FOUND, "metrics are not enabled\n"),
            },
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
