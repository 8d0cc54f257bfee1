//! The compile step: store -> the resources proxies run on.
//!
//! [`compile`] is the pure, whole-store function (what tests assert on). [`Compiler`]
//! does the same work incrementally: it knows which objects each resource came from
//! and which objects a change can affect, so one pod change recompiles one workload.

pub mod authorization;
pub mod l7;
pub mod l7_backend;
pub mod l7_httproute;
pub mod l7_policy;
pub mod peer_authentication;
pub mod service;
pub mod waypoint;
pub mod workload;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use cairn_api::proto::{
    cairn::l7::v1::RouteConfig,
    istio::{security as sec, workload as wl},
};
use prost::Message;

use crate::{
    resources::{Kind, ObjectRef},
    store::Store,
};

/// Mesh-wide settings the compile step needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshConfig {
    pub trust_domain: String,
    /// Policies here without a selector are mesh-wide (Istio's `istio-system`).
    pub root_namespace: String,
    pub cluster_id: String,
    pub domain_suffix: String,
    pub network: String,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            cluster_id: "Kubernetes".into(),
            domain_suffix: "cluster.local".into(),
            network: String::new(),
        }
    }
}

impl MeshConfig {
    pub fn service_hostname(&self, namespace: &str, name: &str) -> String {
        format!("{name}.{namespace}.svc.{}", self.domain_suffix)
    }
}

pub fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// `matchLabels` semantics: every selector label is present with the same value.
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Something about a policy an operator must know (e.g. it fails closed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// The kind of the object the notice is about, where it is one object (the
    /// status writer reports it there); `policy` names it.
    pub kind: Option<crate::resources::Kind>,
    /// `namespace/name` of the policy.
    pub policy: String,
    pub message: String,
}

/// The resource types served: Address and Authorization to ztunnels (and
/// waypoints, for endpoints), RouteConfig to waypoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceType {
    Address,
    Authorization,
    RouteConfig,
}

impl ResourceType {
    pub const ALL: [ResourceType; 3] = [
        ResourceType::Address,
        ResourceType::Authorization,
        ResourceType::RouteConfig,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Address => cairn_api::ADDRESS_TYPE_URL,
            ResourceType::Authorization => cairn_api::AUTHORIZATION_TYPE_URL,
            ResourceType::RouteConfig => cairn_api::ROUTE_CONFIG_TYPE_URL,
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }
}

/// The whole compiled state, as protos.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compiled {
    pub addresses: BTreeMap<String, wl::Address>,
    pub authorizations: BTreeMap<String, sec::Authorization>,
    pub route_configs: BTreeMap<String, RouteConfig>,
    pub notices: Vec<Notice>,
}

/// An object that produces resources.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Source {
    Pod(String, String),
    Service(String, String),
    ServiceEntry(String, String),
    AuthorizationPolicy(String, String),
    PeerAuthentication(String, String),
    StaticStrict,
    /// Every waypoint RouteConfig: one whole-store compile ([`l7::route_configs`]),
    /// redone when any object routes depend on changes.
    Routes,
}

enum Output {
    Address(String, Box<wl::Address>),
    Authorization(String, sec::Authorization),
    RouteConfig(String, Box<RouteConfig>),
}

impl Output {
    fn key(&self) -> (ResourceType, String) {
        match self {
            Output::Address(n, _) => (ResourceType::Address, n.clone()),
            Output::Authorization(n, _) => (ResourceType::Authorization, n.clone()),
            Output::RouteConfig(n, _) => (ResourceType::RouteConfig, n.clone()),
        }
    }
}

fn workload_address(w: wl::Workload) -> Output {
    Output::Address(
        w.uid.clone(),
        Box::new(wl::Address {
            r#type: Some(wl::address::Type::Workload(w)),
        }),
    )
}

fn service_address(s: wl::Service) -> Output {
    Output::Address(
        format!("{}/{}", s.namespace, s.hostname),
        Box::new(wl::Address {
            r#type: Some(wl::address::Type::Service(s)),
        }),
    )
}

fn compile_source(
    store: &Store,
    mesh: &MeshConfig,
    src: &Source,
    notices: &mut Vec<Notice>,
) -> Vec<Output> {
    let get = |kind, ns: &str, name: &str| {
        store.get(&ObjectRef {
            kind,
            namespace: ns.to_owned(),
            name: name.to_owned(),
        })
    };
    use crate::resources::Object as O;
    match src {
        Source::Pod(ns, name) => match get(Kind::Pod, ns, name) {
            Some(O::Pod(p)) => workload::compile(store, mesh, p)
                .map(workload_address)
                .into_iter()
                .collect(),
            _ => Vec::new(),
        },
        Source::Service(ns, name) => match get(Kind::Service, ns, name) {
            Some(O::Service(s)) => service::compile(store, mesh, s)
                .map(service_address)
                .into_iter()
                .collect(),
            _ => Vec::new(),
        },
        Source::ServiceEntry(ns, name) => match get(Kind::ServiceEntry, ns, name) {
            Some(O::ServiceEntry(se)) => {
                let (svcs, wls) = service::compile_entry(store, mesh, se);
                svcs.into_iter()
                    .map(service_address)
                    .chain(wls.into_iter().map(workload_address))
                    .collect()
            }
            _ => Vec::new(),
        },
        Source::AuthorizationPolicy(ns, name) => match get(Kind::AuthorizationPolicy, ns, name) {
            Some(O::AuthorizationPolicy(p)) => authorization::compile(mesh, p, notices)
                .map(|a| Output::Authorization(format!("{ns}/{name}"), a))
                .into_iter()
                .collect(),
            _ => Vec::new(),
        },
        Source::PeerAuthentication(ns, name) => match get(Kind::PeerAuthentication, ns, name) {
            Some(O::PeerAuthentication(p)) => peer_authentication::compile(store, mesh, p)
                .map(|a| Output::Authorization(format!("{ns}/{}", a.name), a))
                .into_iter()
                .collect(),
            _ => Vec::new(),
        },
        Source::Routes => {
            let (configs, mut route_notices) = l7::route_configs(store, mesh);
            notices.append(&mut route_notices);
            configs
                .into_iter()
                .map(|(n, c)| Output::RouteConfig(n, Box::new(c)))
                .collect()
        }
        Source::StaticStrict => {
            let a = peer_authentication::static_strict(mesh);
            vec![Output::Authorization(
                format!("{}/{}", a.namespace, a.name),
                a,
            )]
        }
    }
}

fn source_of(r: &ObjectRef) -> Option<Source> {
    let (ns, name) = (r.namespace.clone(), r.name.clone());
    Some(match r.kind {
        Kind::Pod => Source::Pod(ns, name),
        Kind::Service => Source::Service(ns, name),
        Kind::ServiceEntry => Source::ServiceEntry(ns, name),
        Kind::AuthorizationPolicy => Source::AuthorizationPolicy(ns, name),
        Kind::PeerAuthentication => Source::PeerAuthentication(ns, name),
        _ => return None,
    })
}

const SOURCE_KINDS: [Kind; 5] = [
    Kind::Pod,
    Kind::Service,
    Kind::ServiceEntry,
    Kind::AuthorizationPolicy,
    Kind::PeerAuthentication,
];

fn all_sources(store: &Store) -> BTreeSet<Source> {
    SOURCE_KINDS
        .iter()
        .flat_map(|k| store.refs_of_kind(*k))
        .filter_map(|r| source_of(&r))
        .chain([Source::StaticStrict, Source::Routes])
        .collect()
}

fn in_namespace(store: &Store, kind: Kind, ns: &str) -> Vec<Source> {
    store
        .in_namespace(kind, ns)
        .filter_map(|o| source_of(&o.object_ref()))
        .collect()
}

/// The sources whose output may change when `changed` changes (the store already holds
/// the new state; the old one matters only through outputs the compiler remembers).
fn affected(store: &Store, mesh: &MeshConfig, changed: &ObjectRef) -> BTreeSet<Source> {
    let ns = changed.namespace.as_str();
    let mut out = BTreeSet::new();
    out.extend(source_of(changed));
    // Routes carry endpoints (pods) and their DestinationRule policies.
    if matches!(
        changed.kind,
        Kind::Namespace
            | Kind::Pod
            | Kind::Service
            | Kind::Gateway
            | Kind::VirtualService
            | Kind::DestinationRule
            | Kind::AuthorizationPolicy
            | Kind::RequestAuthentication
            | Kind::HttpRoute
            | Kind::GrpcRoute
    ) {
        out.insert(Source::Routes);
    }
    match changed.kind {
        Kind::Namespace => {
            for k in [Kind::Pod, Kind::Service, Kind::ServiceEntry] {
                out.extend(in_namespace(store, k, &changed.name));
            }
            // Peer authentication bases depend on namespace-level policy only, not on
            // namespace labels, so nothing else.
        }
        Kind::Node => out.extend(
            store
                .pod_refs_on_node(&changed.name)
                .filter_map(|r| source_of(&r)),
        ),
        Kind::Service => {
            // Selector membership and named ports live on workloads.
            out.extend(in_namespace(store, Kind::Pod, ns));
            // A waypoint's Service gives the waypoint its address, used anywhere.
            if store.gateway(ns, &changed.name).is_some() {
                return all_sources(store);
            }
        }
        Kind::AuthorizationPolicy => {
            if ns == mesh.root_namespace {
                out.extend(store.refs_of_kind(Kind::Pod).filter_map(|r| source_of(&r)));
            } else {
                out.extend(in_namespace(store, Kind::Pod, ns));
            }
        }
        Kind::PeerAuthentication => {
            if ns == mesh.root_namespace {
                for k in [Kind::Pod, Kind::PeerAuthentication] {
                    out.extend(store.refs_of_kind(k).filter_map(|r| source_of(&r)));
                }
            } else {
                out.extend(in_namespace(store, Kind::Pod, ns));
                out.extend(in_namespace(store, Kind::PeerAuthentication, ns));
            }
        }
        Kind::Gateway => return all_sources(store),
        Kind::Pod
        | Kind::ServiceEntry
        | Kind::EndpointSlice
        | Kind::ServiceAccount
        | Kind::VirtualService
        | Kind::DestinationRule
        | Kind::RequestAuthentication
        | Kind::HttpRoute
        | Kind::GrpcRoute => {}
    }
    out
}

/// Compiles the whole store. Pure: same store, same output.
pub fn compile(store: &Store, mesh: &MeshConfig) -> Compiled {
    let mut out = Compiled::default();
    for src in all_sources(store) {
        for o in compile_source(store, mesh, &src, &mut out.notices) {
            match o {
                Output::Address(n, a) => {
                    out.addresses.insert(n, *a);
                }
                Output::Authorization(n, a) => {
                    out.authorizations.insert(n, a);
                }
                Output::RouteConfig(n, c) => {
                    out.route_configs.insert(n, *c);
                }
            }
        }
    }
    out
}

/// One compiled resource, encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub type_: ResourceType,
    pub name: String,
    /// The encoded message (`Address` or `Authorization`), the value of its `Any`.
    pub body: Vec<u8>,
    /// Who may receive it: `None` every client; `Some(w)` only the waypoint `w`
    /// (`namespace/name`; empty: no waypoint).
    pub audience: Option<String>,
}

/// What one recompile produced: resources to (re)publish and resources gone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub updated: Vec<Encoded>,
    pub removed: Vec<(ResourceType, String)>,
    pub notices: Vec<Notice>,
}

/// Incremental compiler: remembers which resources each source produced.
#[derive(Debug)]
pub struct Compiler {
    mesh: MeshConfig,
    produced: HashMap<Source, Vec<(ResourceType, String)>>,
    /// The notices each source's last compile gave: with `produced`, the state of
    /// the whole compile without compiling it again.
    notices: BTreeMap<Source, Vec<Notice>>,
    /// Until the first full compile, any change compiles everything.
    initialized: bool,
}

impl Compiler {
    pub fn new(mesh: MeshConfig) -> Self {
        Self {
            mesh,
            produced: HashMap::new(),
            notices: BTreeMap::new(),
            initialized: false,
        }
    }

    pub fn mesh(&self) -> &MeshConfig {
        &self.mesh
    }

    /// Every notice of the current compile (a full compile's, kept up to date by the
    /// incremental ones): what the status writer reports.
    pub fn notices(&self) -> Vec<Notice> {
        self.notices.values().flatten().cloned().collect()
    }

    /// Recompiles every source. Resources no source produces any more are removed.
    pub fn full(&mut self, store: &Store) -> Delta {
        self.initialized = true;
        let mut sources = all_sources(store);
        sources.extend(self.produced.keys().cloned());
        self.recompile_sources(store, sources)
    }

    /// Recompiles what `changed` objects can affect.
    pub fn changed(&mut self, store: &Store, changed: &[ObjectRef]) -> Delta {
        if !self.initialized {
            return self.full(store);
        }
        let mut sources = BTreeSet::new();
        for r in changed {
            sources.extend(affected(store, &self.mesh, r));
        }
        self.recompile_sources(store, sources)
    }

    fn recompile_sources(&mut self, store: &Store, sources: BTreeSet<Source>) -> Delta {
        let mut delta = Delta::default();
        let mut written = BTreeSet::new();
        for src in sources {
            let first_notice = delta.notices.len();
            let outputs = compile_source(store, &self.mesh, &src, &mut delta.notices);
            match &delta.notices[first_notice..] {
                [] => self.notices.remove(&src),
                given => self.notices.insert(src.clone(), given.to_vec()),
            };
            let keys: Vec<_> = outputs.iter().map(Output::key).collect();
            let old = match keys.is_empty() {
                true => self.produced.remove(&src).unwrap_or_default(),
                false => self.produced.insert(src, keys.clone()).unwrap_or_default(),
            };
            for k in old {
                if !keys.contains(&k) {
                    delta.removed.push(k);
                }
            }
            for o in outputs {
                let (type_, name) = o.key();
                let (body, audience) = match o {
                    Output::Address(_, a) => (a.encode_to_vec(), None),
                    Output::Authorization(_, a) => (a.encode_to_vec(), None),
                    Output::RouteConfig(_, c) => (c.encode_to_vec(), Some(c.waypoint.clone())),
                };
                written.insert((type_, name.clone()));
                delta.updated.push(Encoded {
                    type_,
                    name,
                    body,
                    audience,
                });
            }
        }
        // A resource removed by one source but (re)produced by another stays.
        delta.removed.retain(|k| !written.contains(k));
        delta
    }
}

#[cfg(test)]
mod tests;
