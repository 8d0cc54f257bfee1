//! The validated config model that proxies run on.
//!
//! Everything here has been checked: addresses are IPs, ports fit in `u16`, identities
//! are SPIFFE ids. It is what ztunnel and the waypoint keep in their snapshots; the
//! conversions from protos live in [`convert`].

use std::{collections::BTreeMap, net::IpAddr};

use cairn_identity::SpiffeId;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub mod convert;

/// One `istio.workload.Address` resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Address {
    Workload(Box<Workload>),
    Service(Box<Service>),
}

/// A `namespace/hostname` pair naming a service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NamespacedHostname {
    pub namespace: String,
    pub hostname: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TunnelProtocol {
    /// Plain TCP: the workload is not in the mesh.
    #[default]
    None,
    /// HTTP/2 CONNECT over mutual TLS on port 15008.
    Hbone,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AppProtocol {
    #[default]
    Unknown,
    Http11,
    Http2,
    Grpc,
    Tcp,
    Tls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    pub service_port: u16,
    /// `0` means "same as `service_port`, or as the workload says".
    pub target_port: u16,
    #[serde(default)]
    pub app_protocol: AppProtocol,
}

/// Where a waypoint (or another gateway) is reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    pub hbone_mtls_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum GatewayDestination {
    Hostname(NamespacedHostname),
    Address { network: String, address: IpAddr },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub network: String,
    pub identity: SpiffeId,
    pub tunnel_protocol: TunnelProtocol,
    /// The workload terminates HBONE itself (a waypoint): reached over HBONE at its
    /// own address, never captured or served by a ztunnel.
    #[serde(default)]
    pub native_tunnel: bool,
    #[serde(default)]
    pub waypoint: Option<GatewayAddress>,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub canonical_name: String,
    #[serde(default)]
    pub canonical_revision: String,
    #[serde(default)]
    pub workload_name: String,
    /// Services this workload backs, with the ports it serves them on.
    #[serde(default)]
    pub services: BTreeMap<String, Vec<Port>>,
    /// Selector-scoped authorization policies (`namespace/name`) that apply to it.
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    pub healthy: bool,
    #[serde(default)]
    pub locality: Option<Locality>,
    #[serde(default)]
    pub cluster_id: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LocalityScope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadBalancingMode {
    #[default]
    Unspecified,
    Strict,
    Failover,
    Passthrough,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancing {
    pub routing_preference: Vec<LocalityScope>,
    pub mode: LoadBalancingMode,
    pub only_healthy: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkAddress {
    #[serde(default)]
    pub network: String,
    pub address: IpAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub addresses: Vec<NetworkAddress>,
    pub ports: Vec<Port>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub waypoint: Option<GatewayAddress>,
    #[serde(default)]
    pub load_balancing: Option<LoadBalancing>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PolicyScope {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// An L4 authorization policy. The action applies when any rule matches; a rule
/// matches when all its clauses do; a clause matches when any of its matches does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: PolicyScope,
    pub action: PolicyAction,
    pub rules: Vec<Vec<Vec<Match>>>,
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(s) => value == s,
            Self::Prefix(s) => value.starts_with(s.as_str()),
            Self::Suffix(s) => value.ends_with(s.as_str()),
            Self::Presence => !value.is_empty(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// Values of one field are OR-ed, fields are AND-ed; an empty field matches anything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}
