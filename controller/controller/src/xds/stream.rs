//! One client's delta ADS stream: subscriptions, what the client holds, nonces.

use std::collections::{BTreeSet, HashMap};

use cairn_api::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use tracing::{debug, warn};

use super::cache::{Cache, Pending};
use crate::compile::ResourceType;

/// What one response changed, to undo on NACK: `(name, version the client had before)`.
type Undo = Vec<(String, Option<String>)>;

#[derive(Debug, Default)]
struct TypeState {
    subscribed: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// Versions the client holds (what it ACKed, plus what is in flight).
    holds: HashMap<String, String>,
    in_flight: HashMap<String, Undo>,
}

impl TypeState {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// Which audience-scoped resources a client may receive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Audience {
    /// Every resource (node proxies, tests).
    All,
    /// Resources for this waypoint (`namespace/name`) and unscoped ones.
    Waypoint(String),
}

impl Audience {
    fn admits(&self, r: &super::cache::Versioned) -> bool {
        match (self, &r.audience) {
            (Audience::All, _) | (_, None) => true,
            (Audience::Waypoint(me), Some(to)) => me == to,
        }
    }
}

/// Stream state; pure logic (no I/O) so it is tested directly.
#[derive(Debug)]
pub struct StreamState {
    client: String,
    audience: Audience,
    types: HashMap<ResourceType, TypeState>,
    nonce: u64,
}

/// The outcome of one request.
#[derive(Debug, Default)]
pub struct Handled {
    pub response: Option<DeltaDiscoveryResponse>,
    pub nack: Option<String>,
}

impl StreamState {
    #[cfg(test)]
    pub fn new(client: String) -> Self {
        Self::for_audience(client, Audience::All)
    }

    /// A stream that only receives the scoped resources `audience` admits.
    pub fn for_audience(client: String, audience: Audience) -> Self {
        Self {
            client,
            audience,
            types: HashMap::new(),
            nonce: 0,
        }
    }

    pub fn handle(&mut self, cache: &Cache, req: DeltaDiscoveryRequest) -> Handled {
        let mut out = Handled::default();
        let Some(type_) = ResourceType::from_type_url(&req.type_url) else {
            warn!(client = %self.client, type_url = %req.type_url, "ignoring request for a type Cairn does not serve");
            return out;
        };
        let client = self.client.clone();
        let st = self.types.entry(type_).or_default();

        if !req.response_nonce.is_empty() {
            let undo = st.in_flight.remove(&req.response_nonce);
            match (&req.error_detail, undo) {
                (Some(err), Some(undo)) => {
                    warn!(
                        client = %client,
                        type_url = %req.type_url,
                        nonce = %req.response_nonce,
                        error = %err.message,
                        "client rejected (NACK) a push; it keeps its previous resources",
                    );
                    metrics::counter!("cairn_xds_nacks_total", "type" => type_name(type_))
                        .increment(1);
                    for (name, prev) in undo.into_iter().rev() {
                        match prev {
                            Some(v) => st.holds.insert(name, v),
                            None => st.holds.remove(&name),
                        };
                    }
                    out.nack = Some(err.message.clone());
                }
                (Some(err), None) => {
                    warn!(client = %client, nonce = %req.response_nonce, error = %err.message, "NACK for an unknown nonce");
                    out.nack = Some(err.message.clone());
                }
                (None, _) => debug!(client = %client, nonce = %req.response_nonce, "ACK"),
            }
        }

        let first = !st.subscribed;
        let mut newly = Vec::new();
        if first {
            st.subscribed = true;
            st.wildcard = req.resource_names_subscribe.is_empty();
            st.holds = req.initial_resource_versions.clone().into_iter().collect();
        }
        for n in &req.resource_names_subscribe {
            if n == "*" {
                st.wildcard = true;
            } else if st.names.insert(n.clone()) {
                // A re-subscribed name is sent again even if the client had it.
                if !first {
                    st.holds.remove(n);
                }
                newly.push(n.clone());
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                st.wildcard = false;
            } else {
                st.names.remove(n);
            }
        }
        if !req.resource_names_unsubscribe.is_empty() {
            let keep: Vec<String> = st.holds.keys().filter(|n| st.wants(n)).cloned().collect();
            st.holds.retain(|n, _| keep.contains(n));
        }

        if first {
            // Always answer the first request, even with nothing, so the client
            // knows it is in sync.
            out.response = Some(
                self.full_diff(cache, type_)
                    .unwrap_or_else(|| self.empty_response(type_)),
            );
        } else if !newly.is_empty() || req.resource_names_subscribe.iter().any(|n| n == "*") {
            out.response = if req.resource_names_subscribe.iter().any(|n| n == "*") {
                self.full_diff(cache, type_)
            } else {
                self.diff_names(cache, type_, newly.into_iter())
            };
        }
        out
    }

    /// Builds responses for what changed in the cache since the last push.
    pub fn on_pending(&mut self, cache: &Cache, pending: Pending) -> Vec<DeltaDiscoveryResponse> {
        let mut out = Vec::new();
        for type_ in ResourceType::ALL {
            if !self.types.get(&type_).is_some_and(|s| s.subscribed) {
                continue;
            }
            let resp = if pending.resync.contains(&type_) {
                self.full_diff(cache, type_)
            } else if let Some(names) = pending.names.get(&type_) {
                self.diff_names(cache, type_, names.iter().cloned())
            } else {
                None
            };
            out.extend(resp);
        }
        out
    }

    fn empty_response(&mut self, type_: ResourceType) -> DeltaDiscoveryResponse {
        self.nonce += 1;
        DeltaDiscoveryResponse {
            type_url: type_.type_url().to_owned(),
            nonce: self.nonce.to_string(),
            ..Default::default()
        }
    }

    /// Compares everything the client wants with everything it holds.
    fn full_diff(&mut self, cache: &Cache, type_: ResourceType) -> Option<DeltaDiscoveryResponse> {
        let st = self.types.get(&type_)?;
        let mut names: BTreeSet<String> = st.holds.keys().cloned().collect();
        if st.wildcard {
            names.extend(cache.all(type_).into_iter().map(|(n, _)| n));
        } else {
            names.extend(st.names.iter().cloned());
        }
        self.diff_names(cache, type_, names.into_iter())
    }

    /// A response for `names` whose cached version differs from what the client holds.
    fn diff_names(
        &mut self,
        cache: &Cache,
        type_: ResourceType,
        names: impl Iterator<Item = String>,
    ) -> Option<DeltaDiscoveryResponse> {
        let st = self.types.get_mut(&type_)?;
        let audience = &self.audience;
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        let mut undo = Undo::new();
        for name in names {
            let wanted = st.wants(&name);
            let held = st.holds.get(&name).cloned();
            // A resource scoped to another audience is, for this client, absent.
            let current = cache.get(type_, &name).filter(|r| audience.admits(r));
            match (wanted, current) {
                (true, Some(r)) if held.as_deref() != Some(r.version.as_str()) => {
                    resources.push(Resource {
                        name: name.clone(),
                        version: r.version.clone(),
                        resource: Some(prost_types::Any {
                            type_url: type_.type_url().to_owned(),
                            value: r.body.clone(),
                        }),
                        ..Default::default()
                    });
                    st.holds.insert(name.clone(), r.version.clone());
                    undo.push((name, held));
                }
                (true, None) if held.is_some() => {
                    removed.push(name.clone());
                    st.holds.remove(&name);
                    undo.push((name, held));
                }
                _ => {}
            }
        }
        if resources.is_empty() && removed.is_empty() {
            return None;
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        st.in_flight.insert(nonce.clone(), undo);
        metrics::counter!("cairn_xds_pushed_resources_total", "type" => type_name(type_))
            .increment((resources.len() + removed.len()) as u64);
        Some(DeltaDiscoveryResponse {
            type_url: type_.type_url().to_owned(),
            resources,
            removed_resources: removed,
            nonce,
            ..Default::default()
        })
    }
}

fn type_name(t: ResourceType) -> &'static str {
    match t {
        ResourceType::Address => "address",
        ResourceType::Authorization => "authorization",
        ResourceType::RouteConfig => "route_config",
    }
}

#[cfg(test)]
mod tests;
