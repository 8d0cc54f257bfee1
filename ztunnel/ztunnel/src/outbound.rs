//! Outbound: where a captured connection from a local workload goes.
//!
//! [`route`] decides from the state (and the per-service round-robin counters): a
//! service VIP becomes one healthy endpoint (or the service's waypoint); a workload that speaks HBONE is reached by
//! tunnelling to `<its ip>:15008` as the source identity; anything else passes through
//! as plain TCP. [`Outbound::proxy`] carries the decision out.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use cairn_api::{
    HBONE_PORT,
    model::{
        GatewayDestination, LoadBalancingMode, LocalityScope, Service, TunnelProtocol, Workload,
    },
};
use cairn_hbone::{
    client::{Client, ClientError, PoolKey},
    dialer::Dialer,
    splice::{SpliceError, splice_early},
};
use cairn_identity::SpiffeId;
use rand::seq::IndexedRandom;
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::{
    SharedState, balance,
    certs::Certificates,
    metrics::{ConnLabels, Reporter, ResponseFlags, SecurityPolicy},
    state::ProxyState,
};

/// Where to send one outbound connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// HBONE CONNECT to `authority` through `<gateway>:15008`, expecting `identity`.
    Hbone {
        gateway: SocketAddr,
        authority: SocketAddr,
        identity: SpiffeId,
        /// Set when the gateway is a waypoint rather than the destination itself.
        via_waypoint: bool,
    },
    /// Plain TCP to this address (destination not in the mesh).
    Passthrough(SocketAddr),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("service {service} has no port {port}")]
    NoPort { service: String, port: u16 },
    #[error("service {0} has no healthy endpoint")]
    NoEndpoint(String),
    #[error("waypoint {0} cannot be resolved to a running waypoint workload")]
    NoWaypoint(String),
}

fn service_key(s: &Service) -> String {
    format!("{}/{}", s.namespace, s.hostname)
}

/// The port a workload serves `service_port` of `svc` on.
fn target_port(svc: &Service, w: &Workload, service_port: u16) -> Option<u16> {
    let from_workload = w
        .services
        .get(&service_key(svc))
        .and_then(|ports| ports.iter().find(|p| p.service_port == service_port))
        .map(|p| p.target_port)
        .filter(|p| *p != 0);
    let from_service = svc
        .ports
        .iter()
        .find(|p| p.service_port == service_port)
        .map(|p| {
            if p.target_port == 0 {
                service_port
            } else {
                p.target_port
            }
        });
    from_workload.or(from_service)
}

fn waypoint_route(
    state: &ProxyState,
    source: &Workload,
    waypoint: &cairn_api::model::GatewayAddress,
    authority: SocketAddr,
) -> Result<Route, RouteError> {
    let describe = || format!("{:?}", waypoint.destination);
    let svc = match &waypoint.destination {
        GatewayDestination::Address { address, .. } => state.service_by_vip(*address),
        GatewayDestination::Hostname(h) => {
            state.service(&format!("{}/{}", h.namespace, h.hostname))
        }
    }
    .ok_or_else(|| RouteError::NoWaypoint(describe()))?;
    let candidates: Vec<&Arc<Workload>> = state
        .endpoints(&service_key(svc))
        .filter(|w| w.healthy && w.uid != source.uid)
        .collect();
    let w = candidates
        .choose(&mut rand::rng())
        .ok_or_else(|| RouteError::NoWaypoint(describe()))?;
    let ip = *w
        .addresses
        .first()
        .ok_or_else(|| RouteError::NoWaypoint(describe()))?;
    Ok(Route::Hbone {
        gateway: SocketAddr::new(ip, waypoint.hbone_mtls_port),
        authority,
        identity: w.identity.clone(),
        via_waypoint: true,
    })
}

fn workload_route(w: &Workload, port: u16) -> Option<Route> {
    let ip = *w.addresses.first()?;
    Some(match w.tunnel_protocol {
        TunnelProtocol::Hbone => Route::Hbone {
            gateway: SocketAddr::new(ip, HBONE_PORT),
            authority: SocketAddr::new(ip, port),
            identity: w.identity.clone(),
            via_waypoint: false,
        },
        TunnelProtocol::None => Route::Passthrough(SocketAddr::new(ip, port)),
    })
}

/// How closely `endpoint` matches `source` along the service's routing preference:
/// the number of leading scopes that match (region, then zone, ...).
fn locality_rank(source: &Workload, endpoint: &Workload, prefs: &[LocalityScope]) -> usize {
    let none = Default::default();
    let (sl, el) = (
        source.locality.as_ref().unwrap_or(&none),
        endpoint.locality.as_ref().unwrap_or(&none),
    );
    prefs
        .iter()
        .take_while(|scope| match scope {
            LocalityScope::Region => sl.region == el.region,
            LocalityScope::Zone => sl.region == el.region && sl.zone == el.zone,
            LocalityScope::Subzone => {
                sl.region == el.region && sl.zone == el.zone && sl.subzone == el.subzone
            }
            LocalityScope::Node => source.node == endpoint.node,
            LocalityScope::Cluster => source.cluster_id == endpoint.cluster_id,
            LocalityScope::Network => source.network == endpoint.network,
        })
        .count()
}

/// The endpoints a connection may go to, per the service's `LoadBalancing`: without
/// one, every healthy endpoint; FAILOVER, the healthy endpoints of the best locality
/// rank available; STRICT, only endpoints matching every preferred scope.
pub fn preferred_endpoints<'a>(
    state: &'a ProxyState,
    svc: &Service,
    source: &Workload,
) -> Vec<&'a Arc<Workload>> {
    let only_healthy = svc.load_balancing.as_ref().is_none_or(|lb| lb.only_healthy);
    let all: Vec<&Arc<Workload>> = state
        .endpoints(&service_key(svc))
        .filter(|w| !w.addresses.is_empty() && (w.healthy || !only_healthy))
        .collect();
    let Some(lb) = &svc.load_balancing else {
        return all;
    };
    let prefs = &lb.routing_preference;
    if prefs.is_empty() || lb.mode == LoadBalancingMode::Passthrough {
        return all;
    }
    let ranked: Vec<(usize, &Arc<Workload>)> = all
        .into_iter()
        .map(|w| (locality_rank(source, w, prefs), w))
        .collect();
    let best = match lb.mode {
        LoadBalancingMode::Strict => prefs.len(),
        _ => ranked.iter().map(|(r, _)| *r).max().unwrap_or(0),
    };
    ranked
        .into_iter()
        .filter(|(r, _)| *r == best)
        .map(|(_, w)| w)
        .collect()
}

/// Decides where `source`'s connection to `original` goes.
pub fn route(
    state: &ProxyState,
    source: &Workload,
    original: SocketAddr,
) -> Result<Route, RouteError> {
    let (ip, port) = (original.ip(), original.port());
    if let Some(svc) = state.service_by_vip(ip) {
        if let Some(wp) = &svc.waypoint {
            // As in Istio, the waypoint gets the service address as authority.
            return waypoint_route(state, source, wp, original);
        }
        if !svc.ports.iter().any(|p| p.service_port == port) {
            return Err(RouteError::NoPort {
                service: svc.hostname.clone(),
                port,
            });
        }
        let candidates = preferred_endpoints(state, svc, source);
        let endpoint = balance::ENDPOINTS
            .pick(&(&svc.namespace, &svc.hostname), &candidates)
            .ok_or_else(|| RouteError::NoEndpoint(svc.hostname.clone()))?;
        let target = target_port(svc, endpoint, port).unwrap_or(port);
        return workload_route(endpoint, target)
            .ok_or_else(|| RouteError::NoEndpoint(svc.hostname.clone()));
    }
    if let Some(w) = state.workload_by_ip(ip) {
        if let Some(wp) = &w.waypoint
            && w.uid != source.uid
        {
            return waypoint_route(state, source, wp, original);
        }
        if let Some(r) = workload_route(w, port) {
            return Ok(r);
        }
    }
    Ok(Route::Passthrough(original))
}

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("routing: {0}")]
    Route(#[from] RouteError),
    #[error("certificates: {0}")]
    Certs(#[from] crate::certs::CertError),
    #[error("HBONE: {0}")]
    Hbone(#[from] ClientError),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("copying: {0}")]
    Copy(std::io::Error),
}

/// The outbound proxy for the local workloads of one node.
pub struct Outbound {
    pub state: SharedState,
    pub client: Client,
    pub certs: Arc<dyn Certificates>,
    /// Connect from the source workload's own IP (in-pod sockets).
    pub bind_source_ip: bool,
}

impl Outbound {
    /// Proxies one captured connection from `source` to `original` until both sides
    /// are done. Returns the bytes `(sent, received)` from the client's side.
    ///
    /// `dialer` makes the outgoing socket (in the source pod's network namespace when
    /// the connection was captured there).
    pub async fn proxy(
        &self,
        source: &Workload,
        original: SocketAddr,
        mut downstream: TcpStream,
        dialer: &Dialer,
    ) -> Result<(u64, u64), OutboundError> {
        let state = self.state.load_full();
        let route = route(&state, source, original)?;
        let source_ip: Option<IpAddr> = self
            .bind_source_ip
            .then(|| source.addresses.first().copied())
            .flatten();
        let labels = source_labels(&state, source, original, &route);
        // The connection may outlive many config changes: it keeps what it needs
        // (route, labels), not the whole snapshot.
        drop(state);
        labels.opened();
        let result = self
            .carry(&route, source, source_ip, dialer, &mut downstream)
            .await;
        let (sent, received) = result.as_ref().map(|r| *r).unwrap_or((0, 0));
        let flags = match &result {
            Ok(_) | Err(OutboundError::Copy(_)) => ResponseFlags::None,
            Err(OutboundError::Hbone(ClientError::Refused { status, .. })) => {
                ResponseFlags::for_refusal(*status)
            }
            Err(_) => ResponseFlags::ConnectFailure,
        };
        labels.closed(received, sent, flags);
        match &result {
            Ok((sent, received)) => {
                info!(target: "access", direction = "outbound", src.workload = %source.name, dst.addr = %original, route = ?route, bytes.sent = sent, bytes.received = received, "connection complete")
            }
            Err(e) => {
                warn!(target: "access", direction = "outbound", src.workload = %source.name, dst.addr = %original, route = ?route, error = %e, "connection failed")
            }
        }
        result
    }

    async fn carry(
        &self,
        route: &Route,
        source: &Workload,
        source_ip: Option<IpAddr>,
        dialer: &Dialer,
        downstream: &mut TcpStream,
    ) -> Result<(u64, u64), OutboundError> {
        match route {
            Route::Hbone {
                gateway,
                authority,
                identity,
                ..
            } => {
                let tls = self.certs.client(&source.identity, identity)?;
                let key = PoolKey {
                    source: source.identity.clone(),
                    destination: identity.clone(),
                    address: *gateway,
                    source_ip,
                    dialer: dialer.clone(),
                };
                // The client's first bytes travel right behind the CONNECT.
                let tunnel = self.client.connect_early(&key, tls, *authority).await?;
                splice_early(downstream, tunnel).await.map_err(|e| match e {
                    SpliceError::Tunnel(e) => OutboundError::Hbone(e),
                    SpliceError::Io(e) => OutboundError::Copy(e),
                })
            }
            Route::Passthrough(addr) => {
                let mut upstream =
                    dialer
                        .connect(None, *addr)
                        .await
                        .map_err(|source| OutboundError::Connect {
                            addr: *addr,
                            source,
                        })?;
                let _ = upstream.set_nodelay(true);
                crate::relay::relay(downstream, &mut upstream)
                    .await
                    .map_err(OutboundError::Copy)
            }
        }
    }
}

/// Metric labels for an outbound connection (`reporter="source"`).
fn source_labels(
    state: &ProxyState,
    source: &Workload,
    original: SocketAddr,
    route: &Route,
) -> ConnLabels {
    let (destination, security, principal) = match route {
        Route::Hbone {
            authority,
            identity,
            ..
        } => (
            state.workload_by_ip(authority.ip()),
            SecurityPolicy::MutualTls,
            identity.to_string(),
        ),
        Route::Passthrough(addr) => (
            state.workload_by_ip(addr.ip()),
            SecurityPolicy::None,
            String::new(),
        ),
    };
    ConnLabels {
        reporter: Reporter::Source,
        source_workload: source.workload_name.clone(),
        source_workload_namespace: source.namespace.clone(),
        source_principal: source.identity.to_string(),
        destination_workload: destination
            .map(|w| w.workload_name.clone())
            .unwrap_or_default(),
        destination_workload_namespace: destination
            .map(|w| w.namespace.clone())
            .unwrap_or_default(),
        destination_principal: principal,
        destination_service: state
            .service_by_vip(original.ip())
            .map(|s| s.hostname.clone())
            .unwrap_or_default(),
        connection_security_policy: security,
    }
}

#[cfg(test)]
mod tests;
