//! Service and ServiceEntry -> `istio.workload.Service` (and ServiceEntry endpoints ->
//! workloads).

use std::net::IpAddr;

use cairn_api::proto::istio::workload as wl;
use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::util::intstr::IntOrString};

use super::{
    MeshConfig, ip_bytes,
    waypoint::{self, For},
};
use crate::{resources::istio::ServiceEntry, store::Store};

pub mod service_port_list {
    use cairn_api::proto::istio::workload::AppProtocol;
    use k8s_openapi::api::core::v1::ServicePort;

    /// The app protocol from `appProtocol`, else from the port name's prefix (Istio's
    /// protocol selection convention: `http-web`, `grpc`, `tcp-db`, ...).
    pub fn app_protocol(p: &ServicePort) -> AppProtocol {
        let explicit = p.app_protocol.as_deref().map(str::to_ascii_lowercase);
        let from_name = p
            .name
            .as_deref()
            .map(|n| n.split('-').next().unwrap_or_default().to_ascii_lowercase());
        from_protocol_name(explicit.or(from_name).as_deref().unwrap_or_default())
    }

    pub fn from_protocol_name(s: &str) -> AppProtocol {
        match s.to_ascii_lowercase().as_str() {
            "http" | "http1" | "http/1.1" => AppProtocol::Http11,
            "http2" | "h2c" | "kubernetes.io/h2c" => AppProtocol::Http2,
            "grpc" | "grpc-web" => AppProtocol::Grpc,
            "tcp" | "mongo" | "mysql" | "redis" => AppProtocol::Tcp,
            "tls" | "https" => AppProtocol::Tls,
            _ => AppProtocol::Unknown,
        }
    }
}

/// Compiles a Kubernetes Service. ExternalName services are not mesh services.
pub fn compile(store: &Store, mesh: &MeshConfig, svc: &Service) -> Option<wl::Service> {
    let name = svc.metadata.name.as_deref()?;
    let namespace = svc.metadata.namespace.as_deref()?;
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = &spec.cluster_ip
    {
        ips.push(ip.clone());
    }
    let addresses = ips
        .iter()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| wl::NetworkAddress {
            network: mesh.network.clone(),
            address: ip_bytes(ip),
            length: None,
        })
        .collect();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .map(|p| wl::Port {
            service_port: u32::try_from(p.port).unwrap_or(0),
            target_port: match &p.target_port {
                Some(IntOrString::Int(t)) => u32::try_from(*t).unwrap_or(0),
                // Named target ports are resolved per workload.
                Some(IntOrString::String(_)) => 0,
                None => u32::try_from(p.port).unwrap_or(0),
            },
            app_protocol: service_port_list::app_protocol(p) as i32,
        })
        .collect();
    let prefer_close = spec.traffic_distribution.as_deref() == Some("PreferClose")
        || svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("networking.istio.io/traffic-distribution"))
            .is_some_and(|v| v == "PreferClose");
    let load_balancing = prefer_close.then(|| {
        use wl::load_balancing::{Mode, Scope};
        wl::LoadBalancing {
            routing_preference: vec![
                Scope::Network as i32,
                Scope::Region as i32,
                Scope::Zone as i32,
                Scope::Subzone as i32,
            ],
            mode: Mode::Failover as i32,
            health_policy: 0,
        }
    });
    Some(wl::Service {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        hostname: mesh.service_hostname(namespace, name),
        addresses,
        ports,
        waypoint: waypoint::resolve(
            store,
            mesh,
            namespace,
            svc.metadata.labels.as_ref(),
            For::Service,
        ),
        load_balancing,
        ..Default::default()
    })
}

/// Compiles a ServiceEntry: one Service per host, one Workload per inline endpoint
/// with an IP address. Returns `(services, workloads)`.
pub fn compile_entry(
    store: &Store,
    mesh: &MeshConfig,
    se: &ServiceEntry,
) -> (Vec<wl::Service>, Vec<wl::Workload>) {
    let (Some(name), Some(namespace)) = (
        se.metadata.name.as_deref(),
        se.metadata.namespace.as_deref(),
    ) else {
        return Default::default();
    };
    let spec = &se.spec;
    let addresses: Vec<wl::NetworkAddress> = spec
        .addresses
        .iter()
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| wl::NetworkAddress {
            network: mesh.network.clone(),
            address: ip_bytes(ip),
            length: None,
        })
        .collect();
    let ports: Vec<wl::Port> = spec
        .ports
        .iter()
        .map(|p| wl::Port {
            service_port: p.number,
            target_port: p.target_port.unwrap_or(p.number),
            app_protocol: service_port_list::from_protocol_name(
                p.protocol.as_deref().unwrap_or_default(),
            ) as i32,
        })
        .collect();
    let waypoint = waypoint::resolve(
        store,
        mesh,
        namespace,
        se.metadata.labels.as_ref(),
        For::Service,
    );
    let services = spec
        .hosts
        .iter()
        .map(|host| wl::Service {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            hostname: host.clone(),
            addresses: addresses.clone(),
            ports: ports.clone(),
            subject_alt_names: spec.subject_alt_names.clone(),
            waypoint: waypoint.clone(),
            ..Default::default()
        })
        .collect();
    let workloads = spec
        .endpoints
        .iter()
        .filter_map(|ep| {
            let ip: IpAddr = ep.address.as_deref()?.parse().ok()?;
            let services = spec
                .hosts
                .iter()
                .map(|host| {
                    let ports = spec
                        .ports
                        .iter()
                        .map(|p| wl::Port {
                            service_port: p.number,
                            target_port: ep
                                .ports
                                .get(&p.name)
                                .copied()
                                .or(p.target_port)
                                .unwrap_or(p.number),
                            app_protocol: 0,
                        })
                        .collect();
                    (format!("{namespace}/{host}"), wl::PortList { ports })
                })
                .collect();
            Some(wl::Workload {
                uid: format!(
                    "{}/networking.istio.io/ServiceEntry/{namespace}/{name}/{ip}",
                    mesh.cluster_id
                ),
                name: name.to_owned(),
                namespace: namespace.to_owned(),
                addresses: vec![ip_bytes(ip)],
                network: ep.network.clone().unwrap_or_else(|| mesh.network.clone()),
                trust_domain: mesh.trust_domain.clone(),
                service_account: ep
                    .service_account
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                canonical_name: name.to_owned(),
                canonical_revision: "latest".into(),
                workload_name: name.to_owned(),
                workload_type: wl::WorkloadType::Pod as i32,
                services,
                cluster_id: mesh.cluster_id.clone(),
                ..Default::default()
            })
        })
        .collect();
    (services, workloads)
}
