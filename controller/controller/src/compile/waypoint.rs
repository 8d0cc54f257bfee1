//! `istio.io/use-waypoint` resolution: which waypoint (if any) serves a pod or service.

use std::collections::BTreeMap;

use cairn_api::{HBONE_PORT, proto::istio::workload as wl};

use super::MeshConfig;
use crate::{resources::gateway::WAYPOINT_CLASS, store::Store};

pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// The label a waypoint's pods and Service carry (Gateway API's convention).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Whether `pod` runs a waypoint: it names, with [`GATEWAY_NAME_LABEL`], a waypoint
/// Gateway of its namespace. Such a pod is a workload (it speaks HBONE itself) even
/// though it is never captured.
pub fn is_waypoint_pod(store: &Store, pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(GATEWAY_NAME_LABEL))
        .and_then(|name| store.gateway(ns, name))
        .is_some_and(|gw| gw.spec.gateway_class_name == WAYPOINT_CLASS)
}

/// What a waypoint handles, from its Gateway's `istio.io/waypoint-for` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    fn from_label(v: Option<&str>) -> Self {
        match v {
            Some("workload") => Self::Workload,
            Some("all") => Self::All,
            Some("none") => Self::None,
            // Istio's default.
            _ => Self::Service,
        }
    }

    fn serves_services(self) -> bool {
        matches!(self, Self::Service | Self::All)
    }

    fn serves_workloads(self) -> bool {
        matches!(self, Self::Workload | Self::All)
    }
}

/// A `use-waypoint` label lookup result at one level.
enum Label<'a> {
    /// No label here: ask the next level.
    Unset,
    /// `istio.io/use-waypoint: none`: explicitly no waypoint.
    Opted,
    Waypoint {
        namespace: &'a str,
        name: &'a str,
    },
}

fn label<'a>(labels: Option<&'a BTreeMap<String, String>>, own_namespace: &'a str) -> Label<'a> {
    let Some(labels) = labels else {
        return Label::Unset;
    };
    match labels.get(USE_WAYPOINT).map(String::as_str) {
        None | Some("") => Label::Unset,
        Some("none") => Label::Opted,
        Some(name) => Label::Waypoint {
            namespace: labels
                .get(USE_WAYPOINT_NAMESPACE)
                .map(String::as_str)
                .unwrap_or(own_namespace),
            name,
        },
    }
}

/// Which kind of thing is asking.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum For {
    Workload,
    Service,
}

/// Resolves the waypoint for an object with `own` labels in `namespace`: the object's
/// label wins over its namespace's; `none` opts out; the waypoint must exist and serve
/// this kind of traffic (`istio.io/waypoint-for`).
pub fn resolve(
    store: &Store,
    mesh: &MeshConfig,
    namespace: &str,
    own: Option<&BTreeMap<String, String>>,
    for_: For,
) -> Option<wl::GatewayAddress> {
    let (wp_ns, wp_name) = resolve_name(store, namespace, own, for_)?;
    Some(address(store, mesh, &wp_ns, &wp_name))
}

/// [`resolve`], as the waypoint Gateway's (namespace, name).
pub fn resolve_name(
    store: &Store,
    namespace: &str,
    own: Option<&BTreeMap<String, String>>,
    for_: For,
) -> Option<(String, String)> {
    let (wp_ns, wp_name) = match label(own, namespace) {
        Label::Opted => return None,
        Label::Waypoint { namespace, name } => (namespace, name),
        Label::Unset => {
            let ns_labels = store
                .namespace(namespace)
                .and_then(|n| n.metadata.labels.as_ref());
            match label(ns_labels, namespace) {
                Label::Waypoint { namespace, name } => (namespace, name),
                Label::Opted | Label::Unset => return None,
            }
        }
    };
    let gw = store.gateway(wp_ns, wp_name)?;
    if gw.spec.gateway_class_name != WAYPOINT_CLASS {
        return None;
    }
    let serves = WaypointFor::from_label(
        gw.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(WAYPOINT_FOR))
            .map(String::as_str),
    );
    let ok = match for_ {
        For::Workload => serves.serves_workloads(),
        For::Service => serves.serves_services(),
    };
    ok.then(|| (wp_ns.to_owned(), wp_name.to_owned()))
}

/// The waypoint's address: its Service's cluster IP when one exists, else its hostname.
pub fn address(
    store: &Store,
    mesh: &MeshConfig,
    namespace: &str,
    name: &str,
) -> wl::GatewayAddress {
    let vip = store
        .service(namespace, name)
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.cluster_ip.as_deref())
        .and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
    let destination = match vip {
        Some(ip) => wl::gateway_address::Destination::Address(wl::NetworkAddress {
            network: mesh.network.clone(),
            address: super::ip_bytes(ip),
            length: None,
        }),
        None => wl::gateway_address::Destination::Hostname(wl::NamespacedHostname {
            namespace: namespace.to_owned(),
            hostname: mesh.service_hostname(namespace, name),
        }),
    };
    wl::GatewayAddress {
        destination: Some(destination),
        hbone_mtls_port: u32::from(HBONE_PORT),
    }
}
