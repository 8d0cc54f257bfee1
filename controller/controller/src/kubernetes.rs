//! Kubernetes mode's config source: one list+watch per kind the store holds, against
//! a real API server, feeding the same decoder, store and compile step as the config
//! directory ([`crate::local`]).
//!
//! Each kind's watch turns into [`Change`]s on one channel; [`KubeSource`] applies
//! them to the store (pure: unit-tested without a server) and [`run`] publishes each
//! batch. A relist (at start, and after a watch falls too far behind) deletes the
//! objects of that kind it did not list. An object the decoder rejects keeps its last
//! good version, as a bad document does in local mode. A kind the API server does not
//! serve (an Istio CRD not installed) counts as empty until it appears.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service, ServiceAccount},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use crate::{
    decode,
    resources::{Kind, ObjectRef, gateway, istio},
    runtime::Runtime,
    store::Store,
};

/// The API resource (group, version, plural) each kind is watched as.
pub fn api_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::Namespace => ApiResource::erase::<Namespace>(&()),
        Kind::Node => ApiResource::erase::<Node>(&()),
        Kind::Pod => ApiResource::erase::<Pod>(&()),
        Kind::Service => ApiResource::erase::<Service>(&()),
        Kind::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
        Kind::ServiceAccount => ApiResource::erase::<ServiceAccount>(&()),
        Kind::VirtualService => ApiResource::erase::<istio::VirtualService>(&()),
        Kind::DestinationRule => ApiResource::erase::<istio::DestinationRule>(&()),
        Kind::ServiceEntry => ApiResource::erase::<istio::ServiceEntry>(&()),
        Kind::AuthorizationPolicy => ApiResource::erase::<istio::AuthorizationPolicy>(&()),
        Kind::PeerAuthentication => ApiResource::erase::<istio::PeerAuthentication>(&()),
        Kind::RequestAuthentication => ApiResource::erase::<istio::RequestAuthentication>(&()),
        Kind::Gateway => ApiResource::erase::<gateway::Gateway>(&()),
        Kind::HttpRoute => ApiResource::erase::<gateway::HTTPRoute>(&()),
        Kind::GrpcRoute => ApiResource::erase::<gateway::GRPCRoute>(&()),
    }
}

/// What one kind's watch reported.
#[derive(Debug, Clone)]
pub enum Change {
    /// A (re)list starts: the objects listed until `Listed` are all there are.
    Relist(Kind),
    /// An object was added, changed or listed.
    Apply(Kind, Value),
    Delete(Kind, Value),
    /// The (re)list is complete.
    Listed(Kind),
    /// The API server does not serve this kind (its CRD is not installed).
    NotServed(Kind),
}

/// Applies [`Change`]s to the store.
#[derive(Debug, Default)]
pub struct KubeSource {
    /// Objects listed since each kind's relist began.
    listing: HashMap<Kind, HashSet<ObjectRef>>,
    /// Kinds listed at least once (or known not served).
    synced: BTreeSet<Kind>,
    /// Objects rejected by the decoder, with why: kept out of relist deletions.
    rejected: HashMap<ObjectRef, String>,
    /// Fields of accepted objects the decoder ignored (not implemented by Cairn).
    ignored: HashMap<ObjectRef, Vec<String>>,
}

impl KubeSource {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether every kind has been listed once: before that the store is partial and
    /// must not be served (a proxy would be told to delete what is merely unlisted).
    pub fn synced(&self) -> bool {
        self.synced.len() == Kind::ALL.len()
    }

    /// Kinds not listed yet.
    pub fn pending(&self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| !self.synced.contains(k))
            .collect()
    }

    /// Objects the decoder rejects, with the reason.
    pub fn rejected(&self) -> &HashMap<ObjectRef, String> {
        &self.rejected
    }

    /// What the status writer reports besides compile notices.
    pub fn reports(&self) -> Reports {
        Reports {
            rejected: self.rejected.clone(),
            ignored: self.ignored.clone(),
        }
    }

    /// Applies one change; returns the store objects it changed.
    pub fn apply(&mut self, store: &mut Store, change: Change) -> Vec<ObjectRef> {
        let mut changed = Vec::new();
        match change {
            Change::Relist(kind) => {
                self.listing.insert(kind, HashSet::new());
            }
            Change::Apply(kind, value) => {
                if let Some(r) = self.apply_object(store, kind, value, &mut changed)
                    && let Some(listed) = self.listing.get_mut(&kind)
                {
                    listed.insert(r);
                }
            }
            Change::Delete(kind, value) => {
                if let Some(r) = object_ref(kind, &value) {
                    self.rejected.remove(&r);
                    self.ignored.remove(&r);
                    if store.delete(&r).is_some() {
                        changed.push(r);
                    }
                }
            }
            Change::Listed(kind) => {
                let listed = self.listing.remove(&kind).unwrap_or_default();
                let gone: Vec<ObjectRef> = store
                    .refs_of_kind(kind)
                    .filter(|r| !listed.contains(r))
                    .collect();
                for r in gone {
                    store.delete(&r);
                    changed.push(r);
                }
                self.rejected
                    .retain(|r, _| r.kind != kind || listed.contains(r));
                self.ignored
                    .retain(|r, _| r.kind != kind || listed.contains(r));
                self.synced.insert(kind);
            }
            Change::NotServed(kind) => {
                self.synced.insert(kind);
            }
        }
        changed
    }

    /// Decodes and stores one object; returns its ref when it could be read at all.
    fn apply_object(
        &mut self,
        store: &mut Store,
        kind: Kind,
        mut value: Value,
        changed: &mut Vec<ObjectRef>,
    ) -> Option<ObjectRef> {
        // Watch events carry apiVersion and kind; list items may not.
        let ar = api_resource(kind);
        if let Some(obj) = value.as_object_mut() {
            obj.insert("apiVersion".into(), Value::String(ar.api_version.clone()));
            obj.insert("kind".into(), Value::String(ar.kind.clone()));
            // Server-side bookkeeping the decoder has no use for.
            if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("managedFields");
            }
        }
        let r = object_ref(kind, &value);
        match decode::decode_value(0, value) {
            Ok(d) => {
                let r = d.object.object_ref();
                for w in &d.warnings {
                    warn!(object = %r, path = %w.path, "{}", w.message);
                }
                if d.warnings.is_empty() {
                    self.ignored.remove(&r);
                } else {
                    let fields = d.warnings.iter().map(|w| w.to_string()).collect();
                    self.ignored.insert(r.clone(), fields);
                }
                self.rejected.remove(&r);
                if store.get(&r) != Some(&d.object) {
                    store.apply(d.object);
                    changed.push(r.clone());
                }
                Some(r)
            }
            Err(e) => {
                let Some(r) = r else {
                    warn!(kind = %kind, error = %e, "rejected an object without a name");
                    return None;
                };
                let kept = store.get(&r).is_some();
                warn!(object = %r, path = %e.path.as_deref().unwrap_or(""), error = %e.message, kept_last_good = kept, "rejected object; its last good version stays in force");
                self.rejected.insert(r.clone(), e.to_string());
                Some(r)
            }
        }
    }
}

fn object_ref(kind: Kind, value: &Value) -> Option<ObjectRef> {
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str()?.to_owned();
    let namespace = if kind.is_namespaced() {
        meta.get("namespace")?.as_str()?.to_owned()
    } else {
        String::new()
    };
    Some(ObjectRef {
        kind,
        namespace,
        name,
    })
}

/// Watches one kind and forwards what it sees. Errors are retried with backoff.
async fn watch_kind(client: Client, kind: Kind, tx: mpsc::Sender<Change>) {
    let api: Api<DynamicObject> = Api::all_with(client, &api_resource(kind));
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
    let mut not_served = false;
    while let Some(event) = events.next().await {
        let change = match event {
            Ok(watcher::Event::Init) => Change::Relist(kind),
            Ok(watcher::Event::InitApply(o) | watcher::Event::Apply(o)) => {
                match serde_json::to_value(o) {
                    Ok(v) => Change::Apply(kind, v),
                    Err(e) => {
                        warn!(kind = %kind, error = %e, "cannot re-encode a watched object");
                        continue;
                    }
                }
            }
            Ok(watcher::Event::Delete(o)) => match serde_json::to_value(o) {
                Ok(v) => Change::Delete(kind, v),
                Err(e) => {
                    warn!(kind = %kind, error = %e, "cannot re-encode a deleted object");
                    continue;
                }
            },
            Ok(watcher::Event::InitDone) => {
                if not_served {
                    info!(kind = %kind, "the API server serves this kind now");
                    not_served = false;
                }
                Change::Listed(kind)
            }
            Err(e) => {
                if is_not_found(&e) {
                    if !not_served {
                        warn!(kind = %kind, "the API server does not serve this kind (CRD not installed?); treating it as empty and retrying");
                        not_served = true;
                        if tx.send(Change::NotServed(kind)).await.is_err() {
                            return;
                        }
                    }
                } else {
                    warn!(kind = %kind, error = %e, "watch failed; retrying with backoff (the last listed config stays in force)");
                }
                continue;
            }
        };
        if tx.send(change).await.is_err() {
            return;
        }
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.is_not_found(),
        watcher::Error::WatchError(s) => s.is_not_found(),
        _ => false,
    }
}

/// What the decoder said about objects, for the status writer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reports {
    /// Objects rejected, with why.
    pub rejected: HashMap<ObjectRef, String>,
    /// Accepted objects with fields Cairn ignores: `path: message` each.
    pub ignored: HashMap<ObjectRef, Vec<String>>,
}

/// [`Reports`] shared with the status writer.
pub type SharedReports = Arc<std::sync::Mutex<Reports>>;

/// Who hears of store changes: each notifier after every batch that changed the
/// store (or what the decoder reports), and the reports as they stand after it.
#[derive(Clone, Default)]
pub struct Listeners {
    pub changed: Vec<Arc<tokio::sync::Notify>>,
    pub reports: SharedReports,
}

/// Watches every kind and publishes each batch of changes through `runtime`. Sends
/// `true` on `ready` once every kind is listed, and tells `listeners` after every
/// batch that changed the store. Returns when `shutdown` turns true.
pub async fn run(
    client: Client,
    runtime: Arc<Runtime>,
    ready: watch::Sender<bool>,
    listeners: Listeners,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, rx) = mpsc::channel(1024);
    let watchers: Vec<_> = Kind::ALL
        .into_iter()
        .map(|kind| tokio::spawn(watch_kind(client.clone(), kind, tx.clone())))
        .collect();
    drop(tx);
    // Decoding and compiling are CPU work: one blocking thread applies every batch.
    let applier = tokio::task::spawn_blocking(move || apply_loop(rx, &runtime, &ready, &listeners));
    let _ = shutdown.wait_for(|stop| *stop).await;
    for w in &watchers {
        w.abort();
    }
    let _ = applier.await;
    info!("Kubernetes watches stopped");
}

fn apply_loop(
    mut rx: mpsc::Receiver<Change>,
    runtime: &Runtime,
    ready: &watch::Sender<bool>,
    listeners: &Listeners,
) {
    let mut source = KubeSource::new();
    while let Some(first) = rx.blocking_recv() {
        let mut changed = Vec::new();
        let mut count = 0usize;
        {
            let mut store = runtime.store().write().unwrap_or_else(|e| e.into_inner());
            let mut next = Some(first);
            // Everything already queued goes into one publish.
            while let Some(change) = next.take() {
                count += 1;
                changed.extend(source.apply(&mut store, change));
                if count < 4096 {
                    next = rx.try_recv().ok();
                }
            }
        }
        changed.sort();
        changed.dedup();
        let stats = runtime.publish(&changed);
        // A rejected update changes no object, but is news for the status writer.
        let reports_changed = {
            let mut shared = listeners.reports.lock().unwrap_or_else(|e| e.into_inner());
            // Compared in place: most batches change no report, and need no copy.
            let differ = shared.rejected != source.rejected || shared.ignored != source.ignored;
            if differ {
                *shared = source.reports();
            }
            differ
        };
        if !changed.is_empty() || reports_changed {
            for n in &listeners.changed {
                n.notify_one();
            }
        }
        if !changed.is_empty() {
            debug!(
                events = count,
                objects = changed.len(),
                updated = stats.updated,
                removed = stats.removed,
                "cluster config changed"
            );
        }
        if !*ready.borrow() && source.synced() {
            let store = runtime.store().read().unwrap_or_else(|e| e.into_inner());
            info!(
                objects = store.len(),
                rejected = source.rejected().len(),
                "every kind listed: serving the cluster's config"
            );
            let _ = ready.send(true);
        }
    }
}

#[cfg(test)]
mod tests;
