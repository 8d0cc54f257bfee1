//! The typed objects the controller stores: Kubernetes core kinds (k8s-openapi) and the
//! Istio / Gateway API kinds (kube `CustomResource` derives).

pub mod gateway;
pub mod istio;

use std::{fmt, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::Resource;

/// Every kind the store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    EndpointSlice,
    ServiceAccount,
    VirtualService,
    DestinationRule,
    ServiceEntry,
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
    Gateway,
    HttpRoute,
    GrpcRoute,
}

impl Kind {
    pub const ALL: [Kind; 15] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::ServiceAccount,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::ServiceEntry,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::RequestAuthentication,
        Kind::Gateway,
        Kind::HttpRoute,
        Kind::GrpcRoute,
    ];

    /// Resolves a manifest's `apiVersion` and `kind`. Versions that share a schema
    /// (Istio's v1/v1beta1/v1alpha3, Gateway API's v1/v1beta1) all map to one kind.
    pub fn from_manifest(api_version: &str, kind: &str) -> Option<Kind> {
        let (group, version) = match api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        let k = match (group, kind) {
            ("", "Namespace") if version == "v1" => Kind::Namespace,
            ("", "Node") if version == "v1" => Kind::Node,
            ("", "Pod") if version == "v1" => Kind::Pod,
            ("", "Service") if version == "v1" => Kind::Service,
            ("", "ServiceAccount") if version == "v1" => Kind::ServiceAccount,
            ("discovery.k8s.io", "EndpointSlice") if version == "v1" => Kind::EndpointSlice,
            ("networking.istio.io", k) if ["v1", "v1beta1", "v1alpha3"].contains(&version) => {
                match k {
                    "VirtualService" => Kind::VirtualService,
                    "DestinationRule" => Kind::DestinationRule,
                    "ServiceEntry" => Kind::ServiceEntry,
                    _ => return None,
                }
            }
            ("security.istio.io", k) if ["v1", "v1beta1"].contains(&version) => match k {
                "AuthorizationPolicy" => Kind::AuthorizationPolicy,
                "PeerAuthentication" => Kind::PeerAuthentication,
                "RequestAuthentication" => Kind::RequestAuthentication,
                _ => return None,
            },
            ("gateway.networking.k8s.io", k) if ["v1", "v1beta1"].contains(&version) => match k {
                "Gateway" => Kind::Gateway,
                "HTTPRoute" => Kind::HttpRoute,
                "GRPCRoute" => Kind::GrpcRoute,
                _ => return None,
            },
            _ => return None,
        };
        Some(k)
    }

    pub fn is_namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::Gateway => "Gateway",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies one object: kind, namespace (empty for cluster-scoped kinds), name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One typed object. Held behind `Arc` so snapshots of the store are cheap.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Arc<Namespace>),
    Node(Arc<Node>),
    Pod(Arc<Pod>),
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    ServiceAccount(Arc<ServiceAccount>),
    VirtualService(Arc<istio::VirtualService>),
    DestinationRule(Arc<istio::DestinationRule>),
    ServiceEntry(Arc<istio::ServiceEntry>),
    AuthorizationPolicy(Arc<istio::AuthorizationPolicy>),
    PeerAuthentication(Arc<istio::PeerAuthentication>),
    RequestAuthentication(Arc<istio::RequestAuthentication>),
    Gateway(Arc<gateway::Gateway>),
    HttpRoute(Arc<gateway::HTTPRoute>),
    GrpcRoute(Arc<gateway::GRPCRoute>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Node(_) => Kind::Node,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::ServiceAccount(_) => Kind::ServiceAccount,
            Object::VirtualService(_) => Kind::VirtualService,
            Object::DestinationRule(_) => Kind::DestinationRule,
            Object::ServiceEntry(_) => Kind::ServiceEntry,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
            Object::RequestAuthentication(_) => Kind::RequestAuthentication,
            Object::Gateway(_) => Kind::Gateway,
            Object::HttpRoute(_) => Kind::HttpRoute,
            Object::GrpcRoute(_) => Kind::GrpcRoute,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => o.meta(),
            Object::Node(o) => o.meta(),
            Object::Pod(o) => o.meta(),
            Object::Service(o) => o.meta(),
            Object::EndpointSlice(o) => o.meta(),
            Object::ServiceAccount(o) => o.meta(),
            Object::VirtualService(o) => o.meta(),
            Object::DestinationRule(o) => o.meta(),
            Object::ServiceEntry(o) => o.meta(),
            Object::AuthorizationPolicy(o) => o.meta(),
            Object::PeerAuthentication(o) => o.meta(),
            Object::RequestAuthentication(o) => o.meta(),
            Object::Gateway(o) => o.meta(),
            Object::HttpRoute(o) => o.meta(),
            Object::GrpcRoute(o) => o.meta(),
        }
    }

    pub fn object_ref(&self) -> ObjectRef {
        let meta = self.meta();
        ObjectRef {
            kind: self.kind(),
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}
