//! The waypoint's xDS subscription: `cairn.l7.v1.RouteConfig` (one per service port:
//! routes, policies, backends with endpoints) and Address resources (for the services'
//! VIPs). Every response is converted whole before anything changes: a route config
//! that does not convert is NACKed and the ingress keeps serving the previous ones.
//!
//! The controller sends every route config; the waypoint serves those whose service
//! it knows from an Address resource. ztunnels only send a waypoint the traffic of
//! services bound to it, so the rest costs memory, not behaviour (filtering per
//! waypoint on the controller side is listed in docs/waypoint.md).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
};

use arc_swap::ArcSwap;
use cairn_api::{
    ADDRESS_TYPE_URL, ROUTE_CONFIG_TYPE_URL,
    model::{Address, Service as MeshService},
    proto::{
        cairn::l7::v1 as l7,
        discovery::{DeltaDiscoveryResponse, Resource},
        istio::workload as wl,
    },
};
use cairn_client::xds::Subscriber;
use cairn_identity::SpiffeId;
use prost::Message;
use serde::Serialize;
use tracing::{debug, info};

use crate::{
    cluster::{Clusters, Transport},
    config::{self, backend_key},
    ingress::{Declared, Ingress, Service},
    route::RouteTable,
    router::Router,
};

/// Makes the upstream transport for one route config's endpoints, given the identity
/// each mesh endpoint must prove (HBONE in the binary; plain HTTP in tests).
pub type TransportFor =
    Arc<dyn Fn(HashMap<SocketAddr, SpiffeId>) -> Arc<dyn Transport> + Send + Sync>;

/// A converted route config and the router built from it.
struct Built {
    config: l7::RouteConfig,
    router: Arc<Router>,
    /// The router's upstream clusters (the next config for this name takes over
    /// their state).
    clusters: Arc<Clusters>,
}

/// What `/config_dump` shows of the config.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Dump {
    /// `VIP:port` -> `hostname:port` for every address served.
    pub serving: BTreeMap<String, String>,
    /// Route configs held, by resource name, with their rule and backend names.
    pub routes: BTreeMap<String, DumpedRoute>,
    /// Route configs held whose service has no Address resource (not served).
    pub unbound: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DumpedRoute {
    pub rules: Vec<String>,
    pub backends: Vec<String>,
    pub policies: usize,
    pub jwt_rules: usize,
}

pub struct RouteSink {
    ingress: Arc<Ingress>,
    transport: TransportFor,
    seed: Option<u64>,
    services: BTreeMap<String, MeshService>,
    routes: BTreeMap<String, Built>,
    dump: Arc<ArcSwap<Dump>>,
}

impl RouteSink {
    /// `seed` fixes the routers' random choices (tests); `None` in production.
    pub fn new(ingress: Arc<Ingress>, transport: TransportFor, seed: Option<u64>) -> Self {
        Self {
            ingress,
            transport,
            seed,
            services: BTreeMap::new(),
            routes: BTreeMap::new(),
            dump: Arc::default(),
        }
    }

    /// The config as `/config_dump` shows it, updated on every accepted response.
    pub fn dump(&self) -> Arc<ArcSwap<Dump>> {
        self.dump.clone()
    }

    fn build(&self, name: &str, config: l7::RouteConfig) -> Result<Built, String> {
        let previous = self.routes.get(name);
        if let Some(b) = previous
            && b.config == config
        {
            return Ok(Built {
                config,
                router: b.router.clone(),
                clusters: b.clusters.clone(),
            });
        }
        let bad = |e: config::ConfigError| format!("route config {name}: {e}");
        let table = RouteTable::try_from(&config).map_err(bad)?;
        let (clusters, identities) = config::clusters(&config, self.seed).map_err(bad)?;
        let transport = (self.transport)(identities);
        let clusters = Arc::new(match previous {
            Some(b) => Clusters::replacing(clusters, transport, &b.clusters),
            None => Clusters::new(clusters, transport),
        });
        let router = Arc::new(Router::new(table, clusters.clone(), self.seed));
        Ok(Built {
            config,
            router,
            clusters,
        })
    }

    /// Rebuilds what the ingress serves from the services and routes held.
    fn publish(&self) {
        let mut served = HashMap::new();
        let mut dump = Dump::default();
        let mut by_host: HashMap<(&str, &str), &MeshService> = HashMap::new();
        for s in self.services.values() {
            by_host
                .entry((s.namespace.as_str(), s.hostname.as_str()))
                .or_insert(s);
        }
        for (name, b) in &self.routes {
            let c = &b.config;
            dump.routes.insert(
                name.clone(),
                DumpedRoute {
                    rules: c.rules.iter().map(|r| r.name.clone()).collect(),
                    backends: c.backends.iter().map(|b| b.name.clone()).collect(),
                    policies: c.policies.len(),
                    jwt_rules: c.jwt_rules.len(),
                },
            );
            let Ok(port) = u16::try_from(c.port) else {
                continue;
            };
            let Some(service) = by_host.get(&(c.namespace.as_str(), c.hostname.as_str())) else {
                dump.unbound.push(name.clone());
                continue;
            };
            let label: Arc<str> = format!("{}:{}", c.hostname, c.port).into();
            let declared = service
                .ports
                .iter()
                .find(|p| p.service_port == port)
                .map_or(Declared::Unknown, |p| Declared::of(p.app_protocol));
            let served_service = Arc::new(Service {
                name: label.clone(),
                router: b.router.clone(),
                opaque_backend: backend_key(&c.hostname, "", c.port),
                declared,
            });
            for vip in &service.addresses {
                let addr = SocketAddr::new(vip.address, port);
                dump.serving.insert(addr.to_string(), label.to_string());
                served.insert(addr, served_service.clone());
            }
        }
        debug!(
            addresses = served.len(),
            routes = self.routes.len(),
            "serving"
        );
        self.ingress.set_services(served);
        self.dump.store(Arc::new(dump));
    }
}

fn body(r: &Resource) -> Result<&[u8], String> {
    r.resource
        .as_ref()
        .map(|a| a.value.as_slice())
        .ok_or_else(|| format!("resource {} has no body", r.name))
}

impl Subscriber for RouteSink {
    fn type_urls(&self) -> Vec<&'static str> {
        // Addresses first: the first route configs then bind at once.
        vec![ADDRESS_TYPE_URL, ROUTE_CONFIG_TYPE_URL]
    }

    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Result<usize, String> {
        match resp.type_url.as_str() {
            ADDRESS_TYPE_URL => {
                let mut converted = Vec::with_capacity(resp.resources.len());
                for r in &resp.resources {
                    let p = wl::Address::decode(body(r)?)
                        .map_err(|e| format!("resource {}: {e}", r.name))?;
                    let a =
                        Address::try_from(p).map_err(|e| format!("resource {}: {e}", r.name))?;
                    converted.push((r.name.clone(), a));
                }
                for (name, a) in converted {
                    match a {
                        Address::Service(s) => {
                            self.services.insert(name, *s);
                        }
                        // Endpoints come with the route configs' backends.
                        Address::Workload(_) => {
                            self.services.remove(&name);
                        }
                    }
                }
                for name in &resp.removed_resources {
                    self.services.remove(name);
                }
            }
            ROUTE_CONFIG_TYPE_URL => {
                let mut built = Vec::with_capacity(resp.resources.len());
                for r in &resp.resources {
                    let c = l7::RouteConfig::decode(body(r)?)
                        .map_err(|e| format!("resource {}: {e}", r.name))?;
                    built.push((r.name.clone(), self.build(&r.name, c)?));
                }
                for (name, b) in built {
                    info!(route_config = %name, rules = b.config.rules.len(), backends = b.config.backends.len(), "route config applied");
                    self.routes.insert(name, b);
                }
                for name in &resp.removed_resources {
                    if self.routes.remove(name).is_some() {
                        info!(route_config = %name, "route config removed");
                    }
                }
            }
            other => return Err(format!("unexpected type {other}")),
        }
        self.publish();
        Ok(resp.resources.len() + resp.removed_resources.len())
    }
}
