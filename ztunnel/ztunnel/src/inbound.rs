//! Inbound: connections arriving for a local workload, over HBONE (mTLS, with the
//! client's identity) or in plaintext (no identity; refused where STRICT applies).
//! Either way policy decides, then the proxy connects to the application and splices
//! both directions with half-close.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use cairn_api::model::Workload;
use cairn_hbone::{
    H2Settings,
    dialer::Dialer,
    server::{Connect, Handler, HandlerFuture, Responder, serve_listener},
};
use cairn_identity::SpiffeId;
use http::StatusCode;
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::{
    SharedState,
    certs::Certificates,
    metrics::{ConnLabels, Reporter, ResponseFlags, SecurityPolicy},
    policy::{ConnInfo, Decision, authorize},
    state::ProxyState,
};

/// Metric labels for a connection to local workload `dst`.
fn labels(
    state: &ProxyState,
    src: SocketAddr,
    identity: Option<&SpiffeId>,
    dst: &Workload,
    security: SecurityPolicy,
) -> ConnLabels {
    let source = state.workload_by_ip(src.ip());
    ConnLabels {
        reporter: Reporter::Destination,
        source_workload: source.map(|w| w.workload_name.clone()).unwrap_or_default(),
        source_workload_namespace: source.map(|w| w.namespace.clone()).unwrap_or_default(),
        source_principal: identity.map(ToString::to_string).unwrap_or_default(),
        destination_workload: dst.workload_name.clone(),
        destination_workload_namespace: dst.namespace.clone(),
        destination_principal: dst.identity.to_string(),
        destination_service: String::new(),
        connection_security_policy: security,
    }
}

const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Turns true when the process drains (see [`begin_drain`]).
static DRAIN: std::sync::LazyLock<tokio::sync::watch::Sender<bool>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::Sender::new(false));

/// Starts draining every HBONE connection: each sends GOAWAY, so peers open new
/// streams elsewhere, while the streams in flight finish.
pub fn begin_drain() {
    DRAIN.send_replace(true);
}

/// Connections being spliced right now (what a graceful drain waits for).
pub static ACTIVE_CONNECTIONS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Serves HBONE CONNECTs for one local workload (the one whose certificate the
/// listener presents): the authority must be one of its addresses.
pub struct HboneInbound {
    pub state: SharedState,
    pub workload_uid: String,
    /// Makes the connection to the application (inside the pod's network namespace
    /// when the pod is captured, so the connection is not captured again).
    pub dialer: Dialer,
}

fn access(
    direction: &'static str,
    src: SocketAddr,
    dst: SocketAddr,
    identity: Option<&cairn_identity::SpiffeId>,
    workload: &str,
    result: &str,
    bytes: (u64, u64),
) {
    info!(
        target: "access",
        direction,
        src.addr = %src,
        dst.addr = %dst,
        src.identity = identity.map(ToString::to_string).unwrap_or_default(),
        dst.workload = workload,
        result,
        bytes.sent = bytes.0,
        bytes.received = bytes.1,
        "connection complete"
    );
}

impl Handler for HboneInbound {
    fn handle(&self, c: Connect, responder: Responder) -> HandlerFuture {
        let state = self.state.load_full();
        let uid = self.workload_uid.clone();
        let dialer = self.dialer.clone();
        Box::pin(async move {
            let Some(dst) = state.workload(&uid).cloned() else {
                warn!(workload = %uid, "inbound for a workload not in config");
                responder.refuse(StatusCode::SERVICE_UNAVAILABLE);
                return;
            };
            if !dst.addresses.contains(&c.authority.ip()) {
                warn!(authority = %c.authority, workload = %uid, "CONNECT authority is not this workload's address");
                responder.refuse(StatusCode::BAD_REQUEST);
                return;
            }
            let conn = ConnInfo {
                source: Some(c.peer_identity.clone()),
                source_ip: c.peer_addr.ip(),
                destination_ip: c.authority.ip(),
                destination_port: c.authority.port(),
            };
            let labels = labels(
                &state,
                c.peer_addr,
                Some(&c.peer_identity),
                &dst,
                SecurityPolicy::MutualTls,
            );
            // Every refusal is logged with the reason it was answered with, and counted.
            let refuse = |responder: Responder, result: &str, status: StatusCode| {
                labels.opened();
                labels.closed(0, 0, ResponseFlags::for_refusal(status));
                access(
                    "inbound",
                    c.peer_addr,
                    c.authority,
                    Some(&c.peer_identity),
                    &dst.name,
                    result,
                    (0, 0),
                );
                responder.refuse(status);
            };
            if let Decision::Deny { reason } = authorize(&state, &dst, &conn) {
                refuse(
                    responder,
                    &format!("denied: {reason}"),
                    StatusCode::FORBIDDEN,
                );
                return;
            }
            // Decided: the connection keeps its workload and labels, not the snapshot.
            drop(state);
            let app =
                match tokio::time::timeout(APP_CONNECT_TIMEOUT, dialer.connect(None, c.authority))
                    .await
                {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        s
                    }
                    Ok(Err(e)) => {
                        refuse(
                            responder,
                            &format!("application unreachable: {e}"),
                            StatusCode::SERVICE_UNAVAILABLE,
                        );
                        return;
                    }
                    Err(_) => {
                        refuse(
                            responder,
                            "application connect timed out",
                            StatusCode::GATEWAY_TIMEOUT,
                        );
                        return;
                    }
                };
            let Ok(tunnel) = responder.accept() else {
                return;
            };
            let mut app = app;
            let copy = async {
                let (from_app, from_peer) = cairn_hbone::splice::splice(&mut app, tunnel).await?;
                Ok((from_peer, from_app))
            };
            splice(
                copy,
                "inbound",
                c.peer_addr,
                c.authority,
                Some(&c.peer_identity),
                &dst,
                &labels,
            )
            .await;
        })
    }
}

/// Runs `copy` (both directions until both sides are done, each side's EOF
/// half-closing the other; it yields `(from peer, from app)` byte counts) and
/// accounts for the connection: gauge, metrics, access log.
#[allow(clippy::too_many_arguments)]
async fn splice(
    copy: impl Future<Output = std::io::Result<(u64, u64)>>,
    direction: &'static str,
    src: SocketAddr,
    dst: SocketAddr,
    identity: Option<&cairn_identity::SpiffeId>,
    w: &Workload,
    labels: &ConnLabels,
) {
    labels.opened();
    ACTIVE_CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let result = copy.await;
    ACTIVE_CONNECTIONS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    let (from_peer, from_app) = result.as_ref().map(|r| *r).unwrap_or((0, 0));
    labels.closed(from_app, from_peer, ResponseFlags::None);
    match result {
        Ok((from_peer, from_app)) => {
            access(
                direction,
                src,
                dst,
                identity,
                &w.name,
                "ok",
                (from_app, from_peer),
            );
        }
        Err(e) => access(
            direction,
            src,
            dst,
            identity,
            &w.name,
            &format!("error: {e}"),
            (0, 0),
        ),
    }
}

/// A plaintext connection to a local workload (PERMISSIVE): policy without identity.
pub async fn plaintext(
    state: &SharedState,
    mut downstream: TcpStream,
    dst_addr: SocketAddr,
    dialer: &Dialer,
) {
    let state = state.load_full();
    let src = downstream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let Some(dst) = state.workload_by_ip(dst_addr.ip()).cloned() else {
        warn!(dst.addr = %dst_addr, "plaintext inbound for an unknown workload; closing");
        return;
    };
    let conn = ConnInfo {
        source: None,
        source_ip: src.ip(),
        destination_ip: dst_addr.ip(),
        destination_port: dst_addr.port(),
    };
    let labels = labels(&state, src, None, &dst, SecurityPolicy::None);
    // Every refusal is counted and logged with its reason.
    let refused = |flags, result: &str| {
        labels.opened();
        labels.closed(0, 0, flags);
        access(
            "inbound_plaintext",
            src,
            dst_addr,
            None,
            &dst.name,
            result,
            (0, 0),
        );
    };
    if let Decision::Deny { reason } = authorize(&state, &dst, &conn) {
        refused(ResponseFlags::Denied, &format!("denied: {reason}"));
        return;
    }
    drop(state);
    match tokio::time::timeout(APP_CONNECT_TIMEOUT, dialer.connect(None, dst_addr)).await {
        Ok(Ok(mut app)) => {
            let _ = app.set_nodelay(true);
            let copy = crate::relay::relay(&mut downstream, &mut app);
            splice(
                copy,
                "inbound_plaintext",
                src,
                dst_addr,
                None,
                &dst,
                &labels,
            )
            .await
        }
        _ => refused(ResponseFlags::ConnectFailure, "application unreachable"),
    }
}

/// TLS handshakes in progress per HBONE listener at most (see
/// `cairn_hbone::server::serve_listener`).
pub const MAX_PENDING_HANDSHAKES: usize = cairn_hbone::server::DEFAULT_MAX_PENDING_HANDSHAKES;

/// Accepts HBONE on `listener` for one local workload until the task is aborted. The
/// server certificate is taken from `certs` per connection, so rotations apply to new
/// connections while established ones keep their session.
pub async fn serve_hbone(
    listener: tokio::net::TcpListener,
    certs: Arc<dyn Certificates>,
    identity: SpiffeId,
    settings: H2Settings,
    handler: Arc<HboneInbound>,
    max_pending_handshakes: usize,
) {
    serve_listener(
        listener,
        move || certs.server(&identity).map_err(|e| e.to_string()),
        settings,
        handler,
        max_pending_handshakes,
        DRAIN.subscribe(),
    )
    .await
}
