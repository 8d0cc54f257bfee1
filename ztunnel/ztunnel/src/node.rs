//! The node's local workloads: for each workload scheduled on this node, keep its
//! certificate fresh and an HBONE listener on `<pod-ip>:15008` presenting it.
//!
//! With capture (the eBPF issue) these listeners move into each pod's network
//! namespace; with explicit addressing they bind the pod IP directly.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use cairn_api::HBONE_PORT;
use cairn_hbone::{H2Settings, dialer::Dialer};
use cairn_identity::SpiffeId;
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    SharedState,
    ca::CertManager,
    certs::Certificates,
    inbound::{self, HboneInbound},
    outbound::Outbound,
};

pub struct NodeProxy {
    node: String,
    state: SharedState,
    certs: Arc<dyn Certificates>,
    manager: Option<Arc<CertManager>>,
    /// When set, each local workload also gets the explicit outbound entry (15001).
    outbound: Option<Arc<Outbound>>,
    listeners: HashMap<String, (IpAddr, Vec<JoinHandle<()>>)>,
    managed: HashMap<SpiffeId, JoinHandle<()>>,
    /// Addresses we could not bind, so the failure is logged once.
    unbindable: HashSet<IpAddr>,
    /// Whether to bind listeners on the pod addresses (explicit addressing); off when
    /// in-pod capture serves the pods.
    listen: bool,
}

impl NodeProxy {
    pub fn new(
        node: String,
        state: SharedState,
        certs: Arc<dyn Certificates>,
        manager: Option<Arc<CertManager>>,
        outbound: Option<Arc<Outbound>>,
    ) -> Self {
        Self {
            node,
            state,
            certs,
            manager,
            outbound,
            listeners: HashMap::new(),
            managed: HashMap::new(),
            unbindable: HashSet::new(),
            listen: true,
        }
    }

    /// Certificates only: the pods' listeners live in their namespaces (`inpod`).
    pub fn without_listeners(mut self) -> Self {
        self.listen = false;
        self
    }

    /// UIDs of workloads with a listener.
    pub fn listening(&self) -> Vec<String> {
        let mut v: Vec<String> = self.listeners.keys().cloned().collect();
        v.sort();
        v
    }

    /// Brings listeners and certificates in line with the current state.
    pub async fn reconcile(&mut self) {
        let state = self.state.load_full();
        let local: Vec<_> = state
            .workloads()
            // A waypoint on this node serves its own HBONE and proves its own identity.
            .filter(|w| w.node == self.node && !w.native_tunnel)
            .cloned()
            .collect();
        let wanted: HashSet<&str> = local.iter().map(|w| w.uid.as_str()).collect();
        self.listeners.retain(|uid, (ip, tasks)| {
            let keep = wanted.contains(uid.as_str());
            if !keep {
                info!(workload = %uid, addr = %ip, "workload left the node; closing its listeners");
                tasks.iter().for_each(JoinHandle::abort);
            }
            keep
        });
        let identities: HashSet<&SpiffeId> = local.iter().map(|w| &w.identity).collect();
        if let Some(manager) = &self.manager {
            self.managed.retain(|id, task| {
                let keep = identities.contains(id);
                if !keep {
                    task.abort();
                    manager.forget(id);
                }
                keep
            });
            for id in &identities {
                if !self.managed.contains_key(*id) {
                    self.managed
                        .insert((*id).clone(), manager.manage((*id).clone()));
                }
            }
        }
        if !self.listen {
            return;
        }
        for w in local {
            if self.listeners.contains_key(&w.uid) {
                continue;
            }
            let Some(ip) = w.addresses.first().copied() else {
                continue;
            };
            let listener = match TcpListener::bind(SocketAddr::new(ip, HBONE_PORT)).await {
                Ok(l) => l,
                Err(e) => {
                    if self.unbindable.insert(ip) {
                        warn!(workload = %w.uid, addr = %ip, error = %e, "cannot listen for HBONE on the pod address");
                    }
                    continue;
                }
            };
            self.unbindable.remove(&ip);
            info!(workload = %w.uid, addr = %ip, identity = %w.identity, "HBONE listener up");
            let handler = Arc::new(HboneInbound {
                state: self.state.clone(),
                workload_uid: w.uid.clone(),
                dialer: Dialer::host(),
            });
            let task = tokio::spawn(inbound::serve_hbone(
                listener,
                self.certs.clone(),
                w.identity.clone(),
                H2Settings::default(),
                handler,
                inbound::MAX_PENDING_HANDSHAKES,
            ));
            let mut tasks = vec![task];
            if let Some(outbound) = &self.outbound {
                match TcpListener::bind(SocketAddr::new(ip, crate::explicit::PORT)).await {
                    Ok(l) => tasks.push(tokio::spawn(crate::explicit::serve(
                        l,
                        outbound.clone(),
                        self.state.clone(),
                        w.uid.clone(),
                    ))),
                    Err(e) => {
                        warn!(workload = %w.uid, addr = %ip, error = %e, "cannot listen for explicit outbound")
                    }
                }
            }
            self.listeners.insert(w.uid.clone(), (ip, tasks));
        }
    }

    /// Stops accepting: closes every listener (established connections go on).
    pub fn stop_listening(&mut self) {
        for (_, (_, tasks)) in self.listeners.drain() {
            tasks.iter().for_each(JoinHandle::abort);
        }
    }
}

impl Drop for NodeProxy {
    fn drop(&mut self) {
        self.stop_listening();
        for (_, task) in self.managed.drain() {
            task.abort();
        }
    }
}
