//! Pod -> `istio.workload.Workload`.

use std::{collections::BTreeMap, net::IpAddr};

use cairn_api::proto::istio::workload as wl;
use k8s_openapi::{
    api::core::v1::{Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{
    MeshConfig, authorization, peer_authentication, selector_matches,
    service::service_port_list,
    waypoint::{self, For},
};
use crate::store::Store;

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const AMBIENT: &str = "ambient";
pub const NONE: &str = "none";

/// The resource name (uid) of a pod's workload, as Istio names it.
pub fn uid(mesh: &MeshConfig, namespace: &str, name: &str) -> String {
    format!("{}//Pod/{namespace}/{name}", mesh.cluster_id)
}

/// Whether a pod is in the mesh: its namespace (or the pod itself) is labelled
/// `istio.io/dataplane-mode=ambient`, and the pod does not opt out with `none`.
pub fn enrolled(store: &Store, pod: &Pod) -> bool {
    let pod_mode = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(DATAPLANE_MODE))
        .map(String::as_str);
    if pod_mode == Some(NONE) {
        return false;
    }
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return false;
    }
    if pod_mode == Some(AMBIENT) {
        return true;
    }
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    store
        .namespace(ns)
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(DATAPLANE_MODE))
        .is_some_and(|m| m == AMBIENT)
}

pub(crate) fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status.pod_ip.as_deref().and_then(|s| s.parse().ok())
    {
        ips.push(ip);
    }
    ips
}

pub(crate) fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn label<'a>(pod: &'a Pod, keys: &[&str]) -> Option<&'a str> {
    let labels = pod.metadata.labels.as_ref()?;
    keys.iter().find_map(|k| labels.get(*k).map(String::as_str))
}

/// The owning workload's name and type: a Deployment's pods are owned by a ReplicaSet
/// named `<deployment>-<hash>` where the hash is the `pod-template-hash` label.
fn owner(pod: &Pod) -> (String, wl::WorkloadType) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let Some(o) = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return (name, wl::WorkloadType::Pod);
    };
    match o.kind.as_str() {
        "ReplicaSet" => {
            let hash = label(pod, &["pod-template-hash"]).unwrap_or_default();
            let deployment = o
                .name
                .strip_suffix(hash)
                .and_then(|s| s.strip_suffix('-'))
                .unwrap_or(&o.name);
            (deployment.to_owned(), wl::WorkloadType::Deployment)
        }
        "Job" => (o.name.clone(), wl::WorkloadType::Job),
        "CronJob" => (o.name.clone(), wl::WorkloadType::Cronjob),
        _ => (o.name.clone(), wl::WorkloadType::Pod),
    }
}

/// Resolves a Service port's targetPort against the pod's container ports.
pub(crate) fn target_port(pod: &Pod, target: Option<&IntOrString>, port: i32) -> u32 {
    match target {
        None => u32::try_from(port).unwrap_or(0),
        Some(IntOrString::Int(p)) => u32::try_from(*p).unwrap_or(0),
        Some(IntOrString::String(name)) => pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u32::try_from(p.container_port).ok())
            // Unresolvable named port: the service port is not served by this pod.
            .unwrap_or(0),
    }
}

/// Services in the pod's namespace whose selector matches it.
pub fn selecting_services<'a>(
    store: &'a Store,
    pod: &'a Pod,
) -> impl Iterator<Item = &'a std::sync::Arc<Service>> + 'a {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty).clone();
    store.services_in(ns).filter(move |s| {
        s.spec
            .as_ref()
            .and_then(|spec| spec.selector.as_ref())
            .is_some_and(|sel| !sel.is_empty() && selector_matches(sel, &labels))
    })
}

/// Compiles one pod. `None` when the pod is not a mesh workload: not enrolled, not
/// running, or without an IP yet.
pub fn compile(store: &Store, mesh: &MeshConfig, pod: &Pod) -> Option<wl::Workload> {
    let name = pod.metadata.name.as_deref()?;
    let namespace = pod.metadata.namespace.as_deref()?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let in_mesh = enrolled(store, pod) || super::waypoint::is_waypoint_pod(store, pod);
    if matches!(phase, Some("Succeeded" | "Failed")) || !in_mesh {
        return None;
    }
    let addresses = pod_ips(pod);
    if addresses.is_empty() {
        return None;
    }
    let spec = pod.spec.as_ref();
    let node = spec.and_then(|s| s.node_name.clone()).unwrap_or_default();
    let (workload_name, workload_type) = owner(pod);

    let mut services = BTreeMap::new();
    for svc in selecting_services(store, pod) {
        let svc_name = svc.metadata.name.as_deref().unwrap_or_default();
        let ports = svc
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .map(|p| wl::Port {
                service_port: u32::try_from(p.port).unwrap_or(0),
                target_port: target_port(pod, p.target_port.as_ref(), p.port),
                app_protocol: service_port_list::app_protocol(p) as i32,
            })
            .collect();
        services.insert(
            format!("{namespace}/{}", mesh.service_hostname(namespace, svc_name)),
            wl::PortList { ports },
        );
    }

    let mut authorization_policies = authorization::selecting(store, mesh, pod);
    authorization_policies.extend(peer_authentication::selecting(store, mesh, pod));

    // A waypoint's own pods never send their traffic to a waypoint.
    let is_waypoint = pod
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key("gateway.networking.k8s.io/gateway-name"));
    let waypoint = if is_waypoint {
        None
    } else {
        waypoint::resolve(
            store,
            mesh,
            namespace,
            pod.metadata.labels.as_ref(),
            For::Workload,
        )
    };

    let locality = store.node(&node).and_then(|n| {
        let l = n.metadata.labels.as_ref()?;
        let get = |k: &str| l.get(k).cloned().unwrap_or_default();
        let loc = wl::Locality {
            region: get("topology.kubernetes.io/region"),
            zone: get("topology.kubernetes.io/zone"),
            subzone: get("topology.istio.io/subzone"),
        };
        (loc != wl::Locality::default()).then_some(loc)
    });

    Some(wl::Workload {
        uid: uid(mesh, namespace, name),
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        addresses: addresses.into_iter().map(super::ip_bytes).collect(),
        network: mesh.network.clone(),
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        native_tunnel: super::waypoint::is_waypoint_pod(store, pod),
        trust_domain: mesh.trust_domain.clone(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        waypoint,
        node,
        canonical_name: label(
            pod,
            &[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ],
        )
        .map(str::to_owned)
        .unwrap_or_else(|| workload_name.clone()),
        canonical_revision: label(
            pod,
            &[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ],
        )
        .unwrap_or("latest")
        .to_owned(),
        workload_type: workload_type as i32,
        workload_name,
        services,
        authorization_policies,
        status: if ready(pod) {
            wl::WorkloadStatus::Healthy
        } else {
            wl::WorkloadStatus::Unhealthy
        } as i32,
        cluster_id: mesh.cluster_id.clone(),
        locality,
        ..Default::default()
    })
}
