//! Wires store, compiler and cache: every store change becomes a compiled delta
//! published to subscribers.

use std::{
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use cairn_identity::SpiffeId;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    ca::service::WorkloadDirectory,
    compile::{Compiler, MeshConfig, Notice},
    local::{LocalSource, Scan},
    resources::ObjectRef,
    store::Store,
    xds::{Cache, cache::ApplyStats},
};

pub type SharedStore = Arc<RwLock<Store>>;

pub struct Runtime {
    store: SharedStore,
    compiler: Mutex<Compiler>,
    cache: Arc<Cache>,
}

impl Runtime {
    pub fn new(mesh: MeshConfig, cache: Arc<Cache>) -> Self {
        Self {
            store: SharedStore::default(),
            compiler: Mutex::new(Compiler::new(mesh)),
            cache,
        }
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Recompiles what `changed` affects and publishes it.
    pub fn publish(&self, changed: &[ObjectRef]) -> ApplyStats {
        if changed.is_empty() {
            return ApplyStats::default();
        }
        let delta = {
            let store = self.store.read().unwrap_or_else(|e| e.into_inner());
            let mut compiler = self.compiler.lock().unwrap_or_else(|e| e.into_inner());
            compiler.changed(&store, changed)
        };
        for n in &delta.notices {
            warn!(policy = %n.policy, "{}", n.message);
        }
        self.cache.apply(&delta)
    }

    /// The notices of the compile in force (every source's latest).
    pub fn notices(&self) -> Vec<Notice> {
        self.compiler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .notices()
    }

    /// Rescans a local source and publishes what changed.
    pub fn scan(&self, source: &mut LocalSource) -> (Scan, ApplyStats) {
        let scan = {
            let mut store = self.store.write().unwrap_or_else(|e| e.into_inner());
            source.scan(&mut store)
        };
        let stats = self.publish(&scan.changed);
        if !scan.changed.is_empty() {
            info!(
                objects = scan.changed.len(),
                updated = stats.updated,
                removed = stats.removed,
                "config changed"
            );
        }
        (scan, stats)
    }

    /// Rescans `source` every `interval` until `shutdown` turns true.
    pub async fn watch(
        self: Arc<Self>,
        mut source: LocalSource,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let rt = self.clone();
                    // Decoding and compiling are CPU work: keep them off the I/O threads.
                    source = match tokio::task::spawn_blocking(move || {
                        rt.scan(&mut source);
                        source
                    }).await {
                        Ok(s) => s,
                        Err(e) => {
                            warn!(error = %e, "config scan task failed; stopping the watcher");
                            return;
                        }
                    };
                }
                _ = shutdown.changed() => {
                    info!("config watcher stopped");
                    return;
                }
            }
        }
    }
}

impl WorkloadDirectory for Runtime {
    fn node_runs(&self, node: &str, id: &SpiffeId) -> bool {
        let store = self.store.read().unwrap_or_else(|e| e.into_inner());
        store.pods_on_node(node).any(|p| {
            let running = !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
            let sa = p
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref())
                .filter(|s| !s.is_empty())
                .unwrap_or("default");
            running
                && p.metadata.namespace.as_deref() == Some(id.namespace())
                && sa == id.service_account()
        })
    }
}
