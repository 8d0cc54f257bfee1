//! The proxy's view of the mesh: an immutable snapshot built from the validated model,
//! indexed for the lookups the data path makes.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use cairn_api::model::{Address, Authorization, PolicyScope, Service, Workload};

/// Everything the proxy knows, as of one config version. Cheap to share (`Arc`), never
/// mutated: updates build a new snapshot.
#[derive(Debug, Default, Clone)]
pub struct ProxyState {
    workloads: HashMap<String, Arc<Workload>>,
    workload_by_ip: HashMap<IpAddr, Arc<Workload>>,
    services: HashMap<String, Arc<Service>>,
    service_by_vip: HashMap<IpAddr, Arc<Service>>,
    /// Service key (`namespace/hostname`) -> the workloads backing it, by uid.
    endpoints: HashMap<String, Vec<Arc<Workload>>>,
    policies: HashMap<String, Arc<Authorization>>,
    /// Mesh-wide policies, in name order.
    global_policies: Vec<Arc<Authorization>>,
    /// Namespace -> its namespace-wide policies, in name order: a connection's
    /// lookup costs its namespace's policies, not every policy in the mesh.
    namespace_policies: HashMap<String, Vec<Arc<Authorization>>>,
}

impl ProxyState {
    /// Builds a snapshot from resources keyed by their xDS names.
    pub fn new(
        addresses: &BTreeMap<String, Address>,
        authorizations: &BTreeMap<String, Authorization>,
    ) -> Self {
        let mut s = Self::default();
        for a in addresses.values() {
            match a {
                Address::Workload(w) => {
                    let w: Arc<Workload> = Arc::new((**w).clone());
                    for ip in &w.addresses {
                        s.workload_by_ip.insert(*ip, w.clone());
                    }
                    for svc in w.services.keys() {
                        s.endpoints.entry(svc.clone()).or_default().push(w.clone());
                    }
                    s.workloads.insert(w.uid.clone(), w);
                }
                Address::Service(svc) => {
                    let svc: Arc<Service> = Arc::new((**svc).clone());
                    for a in &svc.addresses {
                        s.service_by_vip.insert(a.address, svc.clone());
                    }
                    s.services
                        .insert(format!("{}/{}", svc.namespace, svc.hostname), svc);
                }
            }
        }
        for list in s.endpoints.values_mut() {
            list.sort_by(|a, b| a.uid.cmp(&b.uid));
        }
        for (name, p) in authorizations {
            let p = Arc::new(p.clone());
            match p.scope {
                PolicyScope::Global => s.global_policies.push(p.clone()),
                PolicyScope::Namespace => s
                    .namespace_policies
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(p.clone()),
                PolicyScope::WorkloadSelector => {}
            }
            s.policies.insert(name.clone(), p);
        }
        s
    }

    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workload_by_ip.get(&ip)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.service_by_vip.get(&ip)
    }

    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    /// Workloads backing a service (`namespace/hostname`), in a stable order.
    pub fn endpoints<'a>(
        &'a self,
        service_key: &str,
    ) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        self.endpoints.get(service_key).into_iter().flatten()
    }

    /// The policies that apply to `w`: mesh-wide, its namespace's, and the
    /// selector-scoped ones it lists.
    pub fn policies_for<'a>(
        &'a self,
        w: &'a Workload,
    ) -> impl Iterator<Item = &'a Arc<Authorization>> + 'a {
        let scoped = self.global_policies.iter().chain(
            self.namespace_policies
                .get(&w.namespace)
                .into_iter()
                .flatten(),
        );
        let selected = w
            .authorization_policies
            .iter()
            .filter_map(|name| self.policies.get(name))
            .filter(|p| p.scope == PolicyScope::WorkloadSelector);
        scoped.chain(selected)
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.policies.values()
    }
}
