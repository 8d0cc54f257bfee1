//! L4 authorization, with Istio's semantics: any matching DENY denies; then, if any
//! ALLOW policy applies, one of them must match; with no ALLOW policy, allow.

use std::net::IpAddr;

use cairn_api::model::{Authorization, Match, PolicyAction, StringMatch, Workload};
use cairn_identity::SpiffeId;

use crate::state::ProxyState;

/// What policy sees of a connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's proven identity; `None` for plaintext.
    pub source: Option<SpiffeId>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied by the named policy (`namespace/name`), or by the absence of a
    /// matching ALLOW policy.
    Deny {
        reason: DenyReason,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    DenyPolicy(String),
    NoAllowMatch,
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DenyReason::DenyPolicy(p) => write!(f, "denied by policy {p}"),
            DenyReason::NoAllowMatch => f.write_str("no ALLOW policy matched"),
        }
    }
}

fn any_str(ms: &[StringMatch], v: &str) -> bool {
    ms.iter().any(|m| m.matches(v))
}

fn matches(m: &Match, c: &ConnInfo) -> bool {
    let principal = c
        .source
        .as_ref()
        .map(SpiffeId::principal)
        .unwrap_or_default();
    let namespace = c.source.as_ref().map(|s| s.namespace()).unwrap_or_default();
    let sa_match = |list: &[cairn_api::model::ServiceAccountMatch]| {
        c.source.as_ref().is_some_and(|s| {
            list.iter()
                .any(|m| m.namespace == s.namespace() && m.service_account == s.service_account())
        })
    };
    (m.namespaces.is_empty() || any_str(&m.namespaces, namespace))
        && !any_str(&m.not_namespaces, namespace)
        && (m.principals.is_empty() || any_str(&m.principals, &principal))
        && !any_str(&m.not_principals, &principal)
        && (m.service_accounts.is_empty() || sa_match(&m.service_accounts))
        && !sa_match(&m.not_service_accounts)
        && (m.source_ips.is_empty() || m.source_ips.iter().any(|n| n.contains(&c.source_ip)))
        && !m.not_source_ips.iter().any(|n| n.contains(&c.source_ip))
        && (m.destination_ips.is_empty()
            || m.destination_ips
                .iter()
                .any(|n| n.contains(&c.destination_ip)))
        && !m
            .not_destination_ips
            .iter()
            .any(|n| n.contains(&c.destination_ip))
        && (m.destination_ports.is_empty() || m.destination_ports.contains(&c.destination_port))
        && !m.not_destination_ports.contains(&c.destination_port)
}

/// Whether the policy's rules match: any rule whose clauses all have a matching match.
pub fn policy_matches(p: &Authorization, c: &ConnInfo) -> bool {
    p.rules.iter().any(|rule| {
        rule.iter()
            .all(|clause| clause.iter().any(|m| matches(m, c)))
    })
}

/// Decides a connection to `destination`.
pub fn authorize(state: &ProxyState, destination: &Workload, c: &ConnInfo) -> Decision {
    let mut allow_policies = false;
    let mut allowed = false;
    for p in state.policies_for(destination) {
        if p.dry_run {
            continue;
        }
        match p.action {
            PolicyAction::Deny => {
                if policy_matches(p, c) {
                    return Decision::Deny {
                        reason: DenyReason::DenyPolicy(format!("{}/{}", p.namespace, p.name)),
                    };
                }
            }
            PolicyAction::Allow => {
                allow_policies = true;
                allowed = allowed || policy_matches(p, c);
            }
        }
    }
    if allow_policies && !allowed {
        Decision::Deny {
            reason: DenyReason::NoAllowMatch,
        }
    } else {
        Decision::Allow
    }
}

#[cfg(test)]
mod tests;
