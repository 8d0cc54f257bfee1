//! The published resources, versioned, and the subscribers to tell about changes.
//!
//! Publishing never waits for a client: a change marks the changed names in each
//! subscriber's pending set (coalescing repeated changes to one name) and wakes its
//! stream task. A pending set is bounded; past the bound it collapses into "resync
//! everything", which the stream task answers by diffing its client's versions against
//! the cache. So a client that never reads costs at most that bound, and slows no one.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::Notify;

use crate::compile::{Delta, ResourceType};

/// Pending names per type beyond which a subscriber resyncs instead.
pub const DEFAULT_PENDING_LIMIT: usize = 10_000;

/// One published resource.
#[derive(Debug, PartialEq, Eq)]
pub struct Versioned {
    pub version: String,
    pub body: Vec<u8>,
    /// Who may receive it (see `compile::Encoded::audience`).
    pub audience: Option<String>,
}

/// A content hash: the same bytes always get the same version, across restarts, so a
/// reconnecting client's `initial_resource_versions` can be trusted.
pub fn version_of(body: &[u8]) -> String {
    // FNV-1a, 64 bit: fast, stable, and collisions only cost a missed push of
    // identical-looking content (never wrong data), at 2^-64 odds.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub names: HashMap<ResourceType, BTreeSet<String>>,
    pub resync: BTreeSet<ResourceType>,
}

/// One connected stream's mailbox.
#[derive(Debug)]
pub struct Subscriber {
    pub id: u64,
    pending: Mutex<Pending>,
    pub(crate) notify: Notify,
    limit: usize,
}

impl Subscriber {
    fn mark(&self, type_: ResourceType, names: &[String]) {
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if !p.resync.contains(&type_) {
                let set = p.names.entry(type_).or_default();
                set.extend(names.iter().cloned());
                if set.len() > self.limit {
                    p.names.remove(&type_);
                    p.resync.insert(type_);
                }
            }
        }
        self.notify.notify_one();
    }

    pub(crate) fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// How many names wait to be sent (resync counts as the limit).
    pub fn pending_len(&self) -> usize {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.names.values().map(BTreeSet::len).sum::<usize>() + p.resync.len() * self.limit
    }
}

#[derive(Debug, Default)]
struct Inner {
    resources: HashMap<ResourceType, HashMap<String, Arc<Versioned>>>,
    subscribers: HashMap<u64, Arc<Subscriber>>,
}

/// What one [`Cache::apply`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    pub updated: usize,
    pub removed: usize,
    pub subscribers: usize,
}

#[derive(Debug)]
pub struct Cache {
    inner: RwLock<Inner>,
    next_id: AtomicU64,
    pending_limit: usize,
}

impl Default for Cache {
    fn default() -> Self {
        Self::new(DEFAULT_PENDING_LIMIT)
    }
}

impl Cache {
    pub fn new(pending_limit: usize) -> Self {
        Self {
            inner: RwLock::default(),
            next_id: AtomicU64::new(1),
            pending_limit,
        }
    }

    /// Publishes a compile delta; only resources whose bytes changed are announced.
    pub fn apply(&self, delta: &Delta) -> ApplyStats {
        let mut changed: HashMap<ResourceType, Vec<String>> = HashMap::new();
        let mut stats = ApplyStats::default();
        let subscribers: Vec<Arc<Subscriber>> = {
            let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
            for e in &delta.updated {
                let version = version_of(&e.body);
                let map = inner.resources.entry(e.type_).or_default();
                if map.get(&e.name).is_some_and(|r| r.version == version) {
                    continue;
                }
                map.insert(
                    e.name.clone(),
                    Arc::new(Versioned {
                        version,
                        body: e.body.clone(),
                        audience: e.audience.clone(),
                    }),
                );
                changed.entry(e.type_).or_default().push(e.name.clone());
                stats.updated += 1;
            }
            for (type_, name) in &delta.removed {
                if inner
                    .resources
                    .get_mut(type_)
                    .and_then(|m| m.remove(name))
                    .is_some()
                {
                    changed.entry(*type_).or_default().push(name.clone());
                    stats.removed += 1;
                }
            }
            inner.subscribers.values().cloned().collect()
        };
        if !changed.is_empty() {
            stats.subscribers = subscribers.len();
            for s in &subscribers {
                for (type_, names) in &changed {
                    s.mark(*type_, names);
                }
            }
        }
        stats
    }

    pub fn subscribe(&self) -> Arc<Subscriber> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let sub = Arc::new(Subscriber {
            id,
            pending: Mutex::default(),
            notify: Notify::new(),
            limit: self.pending_limit,
        });
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .subscribers
            .insert(id, sub.clone());
        sub
    }

    pub fn unsubscribe(&self, id: u64) {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .subscribers
            .remove(&id);
    }

    pub fn get(&self, type_: ResourceType, name: &str) -> Option<Arc<Versioned>> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .resources
            .get(&type_)?
            .get(name)
            .cloned()
    }

    /// Every resource of a type with its version.
    pub fn all(&self, type_: ResourceType) -> Vec<(String, Arc<Versioned>)> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .resources
            .get(&type_)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    pub fn len(&self, type_: ResourceType) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .resources
            .get(&type_)
            .map_or(0, HashMap::len)
    }

    /// The largest backlog of any subscriber (see [`Subscriber::pending_len`]).
    pub fn max_pending(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .subscribers
            .values()
            .map(|s| s.pending_len())
            .max()
            .unwrap_or(0)
    }

    pub fn subscriber_count(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .subscribers
            .len()
    }
}
