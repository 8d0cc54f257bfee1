//! The typed object store: every object the controller knows, by kind and name,
//! with the indexes the compile step needs.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};

use crate::resources::{Kind, Object, ObjectRef, gateway, istio};

type Key = (String, String);

/// Objects by kind, then `(namespace, name)` (namespace empty for cluster-scoped kinds).
#[derive(Clone, Debug, Default)]
pub struct Store {
    objects: HashMap<Kind, BTreeMap<Key, Object>>,
    pods_by_node: HashMap<String, BTreeSet<Key>>,
}

fn key(r: &ObjectRef) -> Key {
    (r.namespace.clone(), r.name.clone())
}

fn node_of(obj: &Object) -> Option<String> {
    match obj {
        Object::Pod(p) => p.spec.as_ref().and_then(|s| s.node_name.clone()),
        _ => None,
    }
}

macro_rules! typed_accessors {
    ($($fn_all:ident, $fn_in:ident, $variant:ident, $ty:ty;)*) => {
        $(
            /// Every object of this kind.
            pub fn $fn_all(&self) -> impl Iterator<Item = &Arc<$ty>> + '_ {
                self.of_kind(Kind::$variant).filter_map(|o| match o {
                    Object::$variant(x) => Some(x),
                    _ => None,
                })
            }

            /// Objects of this kind in one namespace.
            pub fn $fn_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Arc<$ty>> + 'a {
                self.in_namespace(Kind::$variant, namespace).filter_map(|o| match o {
                    Object::$variant(x) => Some(x),
                    _ => None,
                })
            }
        )*
    };
}

impl Store {
    /// Inserts or replaces an object; returns the previous version.
    pub fn apply(&mut self, obj: Object) -> Option<Object> {
        let r = obj.object_ref();
        let k = key(&r);
        if let Some(node) = node_of(&obj) {
            self.pods_by_node.entry(node).or_default().insert(k.clone());
        }
        let prev = self
            .objects
            .entry(r.kind)
            .or_default()
            .insert(k.clone(), obj);
        if let Some(old_node) = prev.as_ref().and_then(node_of)
            && Some(&old_node)
                != self
                    .objects
                    .get(&r.kind)
                    .and_then(|m| m.get(&k))
                    .and_then(node_of)
                    .as_ref()
        {
            self.unindex_node(&old_node, &k);
        }
        prev
    }

    /// Removes an object; returns it if it was there.
    pub fn delete(&mut self, r: &ObjectRef) -> Option<Object> {
        let k = key(r);
        let prev = self.objects.get_mut(&r.kind)?.remove(&k);
        if let Some(node) = prev.as_ref().and_then(node_of) {
            self.unindex_node(&node, &k);
        }
        prev
    }

    fn unindex_node(&mut self, node: &str, k: &Key) {
        if let Some(set) = self.pods_by_node.get_mut(node) {
            set.remove(k);
            if set.is_empty() {
                self.pods_by_node.remove(node);
            }
        }
    }

    pub fn get(&self, r: &ObjectRef) -> Option<&Object> {
        self.objects.get(&r.kind)?.get(&key(r))
    }

    pub fn len(&self) -> usize {
        self.objects.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Object> + '_ {
        self.objects
            .get(&kind)
            .into_iter()
            .flat_map(BTreeMap::values)
    }

    pub fn refs_of_kind(&self, kind: Kind) -> impl Iterator<Item = ObjectRef> + '_ {
        self.objects
            .get(&kind)
            .into_iter()
            .flat_map(BTreeMap::keys)
            .map(move |(ns, name)| ObjectRef {
                kind,
                namespace: ns.clone(),
                name: name.clone(),
            })
    }

    pub fn in_namespace<'a>(
        &'a self,
        kind: Kind,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a Object> + 'a {
        self.objects.get(&kind).into_iter().flat_map(move |m| {
            m.range((namespace.to_owned(), String::new())..)
                .take_while(move |((ns, _), _)| ns == namespace)
                .map(|(_, o)| o)
        })
    }

    pub fn namespace(&self, name: &str) -> Option<&Arc<Namespace>> {
        match self
            .objects
            .get(&Kind::Namespace)?
            .get(&(String::new(), name.to_owned()))?
        {
            Object::Namespace(n) => Some(n),
            _ => None,
        }
    }

    pub fn node(&self, name: &str) -> Option<&Arc<Node>> {
        match self
            .objects
            .get(&Kind::Node)?
            .get(&(String::new(), name.to_owned()))?
        {
            Object::Node(n) => Some(n),
            _ => None,
        }
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        match self
            .objects
            .get(&Kind::Service)?
            .get(&(namespace.to_owned(), name.to_owned()))?
        {
            Object::Service(s) => Some(s),
            _ => None,
        }
    }

    pub fn gateway(&self, namespace: &str, name: &str) -> Option<&Arc<gateway::Gateway>> {
        match self
            .objects
            .get(&Kind::Gateway)?
            .get(&(namespace.to_owned(), name.to_owned()))?
        {
            Object::Gateway(g) => Some(g),
            _ => None,
        }
    }

    /// Pods whose `spec.nodeName` is `node`.
    pub fn pod_refs_on_node(&self, node: &str) -> impl Iterator<Item = ObjectRef> + '_ {
        self.pods_by_node
            .get(node)
            .into_iter()
            .flatten()
            .map(|(ns, name)| ObjectRef {
                kind: Kind::Pod,
                namespace: ns.clone(),
                name: name.clone(),
            })
    }

    pub fn pods_on_node<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a Arc<Pod>> + 'a {
        let pods = self.objects.get(&Kind::Pod);
        self.pods_by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(move |k| match pods?.get(k)? {
                Object::Pod(p) => Some(p),
                _ => None,
            })
    }

    typed_accessors! {
        pods, pods_in, Pod, Pod;
        services, services_in, Service, Service;
        service_entries, service_entries_in, ServiceEntry, istio::ServiceEntry;
        authorization_policies, authorization_policies_in, AuthorizationPolicy, istio::AuthorizationPolicy;
        peer_authentications, peer_authentications_in, PeerAuthentication, istio::PeerAuthentication;
        destination_rules, destination_rules_in, DestinationRule, istio::DestinationRule;
    }
}
