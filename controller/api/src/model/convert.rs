//! Proto -> model conversions: the one place protos are validated.

use std::net::IpAddr;

use cairn_identity::SpiffeId;
use ipnet::IpNet;

use super::*;
use crate::proto::istio::{security as sec, workload as wl};

/// Trust domain a workload has when its resource leaves `trust_domain` empty.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Service account a workload has when its resource leaves `service_account` empty.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Why a resource from the control plane was refused (the proxy NACKs it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("{field}: address of {len} bytes is neither IPv4 (4) nor IPv6 (16)")]
    BadAddress { field: &'static str, len: usize },
    #[error("{field}: prefix length {len} is too long for {addr}")]
    BadPrefix {
        field: &'static str,
        addr: IpAddr,
        len: u32,
    },
    #[error("{field}: port {port} is out of range")]
    BadPort { field: &'static str, port: u32 },
    #[error("{field}: {value} is not a known enum value")]
    BadEnum { field: &'static str, value: i32 },
    #[error("{field}: required but empty")]
    Missing { field: &'static str },
    #[error("workload identity: {0}")]
    Identity(#[from] cairn_identity::ParseError),
}

fn ip(field: &'static str, bytes: &[u8]) -> Result<IpAddr, ConvertError> {
    match bytes.len() {
        4 => Ok(IpAddr::from(
            <[u8; 4]>::try_from(bytes).map_err(|_| ConvertError::BadAddress { field, len: 4 })?,
        )),
        16 => {
            Ok(IpAddr::from(<[u8; 16]>::try_from(bytes).map_err(|_| {
                ConvertError::BadAddress { field, len: 16 }
            })?))
        }
        len => Err(ConvertError::BadAddress { field, len }),
    }
}

fn port(field: &'static str, p: u32) -> Result<u16, ConvertError> {
    u16::try_from(p).map_err(|_| ConvertError::BadPort { field, port: p })
}

fn non_empty(field: &'static str, s: String) -> Result<String, ConvertError> {
    if s.is_empty() {
        Err(ConvertError::Missing { field })
    } else {
        Ok(s)
    }
}

impl TryFrom<wl::Address> for Address {
    type Error = ConvertError;

    fn try_from(a: wl::Address) -> Result<Self, Self::Error> {
        match a.r#type {
            Some(wl::address::Type::Workload(w)) => Ok(Self::Workload(Box::new(w.try_into()?))),
            Some(wl::address::Type::Service(s)) => Ok(Self::Service(Box::new(s.try_into()?))),
            None => Err(ConvertError::Missing {
                field: "address.type",
            }),
        }
    }
}

impl TryFrom<wl::Port> for Port {
    type Error = ConvertError;

    fn try_from(p: wl::Port) -> Result<Self, Self::Error> {
        let app_protocol = match wl::AppProtocol::try_from(p.app_protocol) {
            Ok(wl::AppProtocol::Unknown) => AppProtocol::Unknown,
            Ok(wl::AppProtocol::Http11) => AppProtocol::Http11,
            Ok(wl::AppProtocol::Http2) => AppProtocol::Http2,
            Ok(wl::AppProtocol::Grpc) => AppProtocol::Grpc,
            Ok(wl::AppProtocol::Tcp) => AppProtocol::Tcp,
            Ok(wl::AppProtocol::Tls) => AppProtocol::Tls,
            Err(_) => {
                return Err(ConvertError::BadEnum {
                    field: "port.app_protocol",
                    value: p.app_protocol,
                });
            }
        };
        Ok(Self {
            service_port: port("port.service_port", p.service_port)?,
            target_port: port("port.target_port", p.target_port)?,
            app_protocol,
        })
    }
}

impl TryFrom<wl::GatewayAddress> for GatewayAddress {
    type Error = ConvertError;

    fn try_from(g: wl::GatewayAddress) -> Result<Self, Self::Error> {
        let destination = match g.destination {
            Some(wl::gateway_address::Destination::Hostname(h)) => {
                GatewayDestination::Hostname(NamespacedHostname {
                    namespace: h.namespace,
                    hostname: non_empty("waypoint.hostname", h.hostname)?,
                })
            }
            Some(wl::gateway_address::Destination::Address(a)) => GatewayDestination::Address {
                network: a.network,
                address: ip("waypoint.address", &a.address)?,
            },
            None => {
                return Err(ConvertError::Missing {
                    field: "waypoint.destination",
                });
            }
        };
        Ok(Self {
            destination,
            hbone_mtls_port: port("waypoint.hbone_mtls_port", g.hbone_mtls_port)?,
        })
    }
}

impl TryFrom<wl::Workload> for Workload {
    type Error = ConvertError;

    fn try_from(w: wl::Workload) -> Result<Self, Self::Error> {
        let tunnel_protocol = match wl::TunnelProtocol::try_from(w.tunnel_protocol) {
            Ok(wl::TunnelProtocol::None) => TunnelProtocol::None,
            Ok(wl::TunnelProtocol::Hbone) => TunnelProtocol::Hbone,
            _ => {
                return Err(ConvertError::BadEnum {
                    field: "workload.tunnel_protocol",
                    value: w.tunnel_protocol,
                });
            }
        };
        let trust_domain = if w.trust_domain.is_empty() {
            DEFAULT_TRUST_DOMAIN
        } else {
            &w.trust_domain
        };
        let service_account = if w.service_account.is_empty() {
            DEFAULT_SERVICE_ACCOUNT
        } else {
            &w.service_account
        };
        let namespace = non_empty("workload.namespace", w.namespace)?;
        let identity = SpiffeId::new(trust_domain, namespace.as_str(), service_account)?;
        let addresses = w
            .addresses
            .iter()
            .map(|a| ip("workload.addresses", a))
            .collect::<Result<_, _>>()?;
        let services = w
            .services
            .into_iter()
            .map(|(k, v)| {
                let ports = v
                    .ports
                    .into_iter()
                    .map(Port::try_from)
                    .collect::<Result<_, _>>()?;
                Ok((k, ports))
            })
            .collect::<Result<_, ConvertError>>()?;
        Ok(Self {
            uid: non_empty("workload.uid", w.uid)?,
            name: w.name,
            namespace,
            addresses,
            network: w.network,
            identity,
            tunnel_protocol,
            native_tunnel: w.native_tunnel,
            waypoint: w.waypoint.map(TryInto::try_into).transpose()?,
            node: w.node,
            canonical_name: w.canonical_name,
            canonical_revision: w.canonical_revision,
            workload_name: w.workload_name,
            services,
            authorization_policies: w.authorization_policies,
            healthy: w.status == wl::WorkloadStatus::Healthy as i32,
            locality: w.locality.map(|l| Locality {
                region: l.region,
                zone: l.zone,
                subzone: l.subzone,
            }),
            cluster_id: w.cluster_id,
        })
    }
}

impl TryFrom<wl::LoadBalancing> for LoadBalancing {
    type Error = ConvertError;

    fn try_from(lb: wl::LoadBalancing) -> Result<Self, Self::Error> {
        use wl::load_balancing::{HealthPolicy, Mode, Scope};
        let routing_preference = lb
            .routing_preference
            .iter()
            .map(|&s| match Scope::try_from(s) {
                Ok(Scope::Region) => Ok(LocalityScope::Region),
                Ok(Scope::Zone) => Ok(LocalityScope::Zone),
                Ok(Scope::Subzone) => Ok(LocalityScope::Subzone),
                Ok(Scope::Node) => Ok(LocalityScope::Node),
                Ok(Scope::Cluster) => Ok(LocalityScope::Cluster),
                Ok(Scope::Network) => Ok(LocalityScope::Network),
                _ => Err(ConvertError::BadEnum {
                    field: "load_balancing.routing_preference",
                    value: s,
                }),
            })
            .collect::<Result<_, _>>()?;
        let mode = match Mode::try_from(lb.mode) {
            Ok(Mode::UnspecifiedMode) => LoadBalancingMode::Unspecified,
            Ok(Mode::Strict) => LoadBalancingMode::Strict,
            Ok(Mode::Failover) => LoadBalancingMode::Failover,
            Ok(Mode::Passthrough) => LoadBalancingMode::Passthrough,
            Err(_) => {
                return Err(ConvertError::BadEnum {
                    field: "load_balancing.mode",
                    value: lb.mode,
                });
            }
        };
        Ok(Self {
            routing_preference,
            mode,
            only_healthy: lb.health_policy != HealthPolicy::AllowAll as i32,
        })
    }
}

impl TryFrom<wl::Service> for Service {
    type Error = ConvertError;

    fn try_from(s: wl::Service) -> Result<Self, Self::Error> {
        let addresses = s
            .addresses
            .into_iter()
            .map(|a| {
                Ok(NetworkAddress {
                    network: a.network,
                    address: ip("service.addresses", &a.address)?,
                })
            })
            .collect::<Result<_, ConvertError>>()?;
        Ok(Self {
            name: s.name,
            namespace: non_empty("service.namespace", s.namespace)?,
            hostname: non_empty("service.hostname", s.hostname)?,
            addresses,
            ports: s
                .ports
                .into_iter()
                .map(Port::try_from)
                .collect::<Result<_, _>>()?,
            subject_alt_names: s.subject_alt_names,
            waypoint: s.waypoint.map(TryInto::try_into).transpose()?,
            load_balancing: s.load_balancing.map(TryInto::try_into).transpose()?,
        })
    }
}

fn string_match(m: sec::StringMatch) -> Result<StringMatch, ConvertError> {
    use sec::string_match::MatchType;
    match m.match_type {
        Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s)),
        Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s)),
        Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s)),
        Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
        None => Err(ConvertError::Missing {
            field: "match.string_match",
        }),
    }
}

fn cidr(field: &'static str, a: sec::Address) -> Result<IpNet, ConvertError> {
    let addr = ip(field, &a.address)?;
    let len = u8::try_from(a.length).map_err(|_| ConvertError::BadPrefix {
        field,
        addr,
        len: a.length,
    })?;
    IpNet::new(addr, len).map_err(|_| ConvertError::BadPrefix {
        field,
        addr,
        len: a.length,
    })
}

fn strings(v: Vec<sec::StringMatch>) -> Result<Vec<StringMatch>, ConvertError> {
    v.into_iter().map(string_match).collect()
}

fn cidrs(field: &'static str, v: Vec<sec::Address>) -> Result<Vec<IpNet>, ConvertError> {
    v.into_iter().map(|a| cidr(field, a)).collect()
}

fn ports(field: &'static str, v: Vec<u32>) -> Result<Vec<u16>, ConvertError> {
    v.into_iter().map(|p| port(field, p)).collect()
}

fn service_accounts(v: Vec<sec::ServiceAccountMatch>) -> Vec<ServiceAccountMatch> {
    v.into_iter()
        .map(|s| ServiceAccountMatch {
            namespace: s.namespace,
            service_account: s.service_account,
        })
        .collect()
}

impl TryFrom<sec::Match> for Match {
    type Error = ConvertError;

    fn try_from(m: sec::Match) -> Result<Self, Self::Error> {
        Ok(Self {
            namespaces: strings(m.namespaces)?,
            not_namespaces: strings(m.not_namespaces)?,
            service_accounts: service_accounts(m.service_accounts),
            not_service_accounts: service_accounts(m.not_service_accounts),
            principals: strings(m.principals)?,
            not_principals: strings(m.not_principals)?,
            source_ips: cidrs("match.source_ips", m.source_ips)?,
            not_source_ips: cidrs("match.not_source_ips", m.not_source_ips)?,
            destination_ips: cidrs("match.destination_ips", m.destination_ips)?,
            not_destination_ips: cidrs("match.not_destination_ips", m.not_destination_ips)?,
            destination_ports: ports("match.destination_ports", m.destination_ports)?,
            not_destination_ports: ports("match.not_destination_ports", m.not_destination_ports)?,
        })
    }
}

impl TryFrom<sec::Authorization> for Authorization {
    type Error = ConvertError;

    fn try_from(a: sec::Authorization) -> Result<Self, Self::Error> {
        let scope = match sec::Scope::try_from(a.scope) {
            Ok(sec::Scope::Global) => PolicyScope::Global,
            Ok(sec::Scope::Namespace) => PolicyScope::Namespace,
            Ok(sec::Scope::WorkloadSelector) => PolicyScope::WorkloadSelector,
            Err(_) => {
                return Err(ConvertError::BadEnum {
                    field: "authorization.scope",
                    value: a.scope,
                });
            }
        };
        let action = match sec::Action::try_from(a.action) {
            Ok(sec::Action::Allow) => PolicyAction::Allow,
            Ok(sec::Action::Deny) => PolicyAction::Deny,
            Err(_) => {
                return Err(ConvertError::BadEnum {
                    field: "authorization.action",
                    value: a.action,
                });
            }
        };
        let rules = a
            .rules
            .into_iter()
            .map(|r| {
                r.clauses
                    .into_iter()
                    .map(|c| c.matches.into_iter().map(Match::try_from).collect())
                    .collect()
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: non_empty("authorization.name", a.name)?,
            namespace: a.namespace,
            scope,
            action,
            rules,
            dry_run: a.dry_run,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_defaults_identity_and_checks_addresses() {
        let w = wl::Workload {
            uid: "Kubernetes//Pod/default/a".into(),
            name: "a".into(),
            namespace: "default".into(),
            addresses: vec![vec![10, 0, 0, 1]],
            ..Default::default()
        };
        let m = Workload::try_from(w.clone()).expect("valid workload");
        assert_eq!(
            m.identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/default"
        );
        assert_eq!(m.addresses, vec![IpAddr::from([10, 0, 0, 1])]);

        let bad = wl::Workload {
            addresses: vec![vec![1, 2, 3]],
            ..w.clone()
        };
        assert_eq!(
            Workload::try_from(bad),
            Err(ConvertError::BadAddress {
                field: "workload.addresses",
                len: 3
            })
        );
        let no_uid = wl::Workload {
            uid: String::new(),
            ..w
        };
        assert!(Workload::try_from(no_uid).is_err());
    }

    #[test]
    fn authorization_rejects_bad_prefix_and_port() {
        let a = sec::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            rules: vec![sec::Rule {
                clauses: vec![sec::Clause {
                    matches: vec![sec::Match {
                        source_ips: vec![sec::Address {
                            address: vec![10, 0, 0, 0],
                            length: 33,
                        }],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        assert!(matches!(
            Authorization::try_from(a),
            Err(ConvertError::BadPrefix { len: 33, .. })
        ));
        let a = sec::Authorization {
            name: "p".into(),
            rules: vec![sec::Rule {
                clauses: vec![sec::Clause {
                    matches: vec![sec::Match {
                        destination_ports: vec![70000],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        assert!(matches!(
            Authorization::try_from(a),
            Err(ConvertError::BadPort { port: 70000, .. })
        ));
    }
}
