//! AuthorizationPolicy -> `istio.security.Authorization` (the L4 part ztunnel enforces).
//!
//! Istio's rules for policies with L7 conditions, which ztunnel cannot see, are kept:
//! an ALLOW rule with L7 conditions is dropped (it can never match, so less is allowed),
//! and a DENY rule keeps only its L4 conditions (so more is denied). Both fail closed,
//! and both are reported as [`Notice`]s naming the policy.

use std::collections::BTreeMap;

use cairn_api::proto::istio::security as sec;
use k8s_openapi::api::core::v1::Pod;

use super::{MeshConfig, Notice, ip_bytes, selector_matches};
use crate::{
    resources::istio::{AuthorizationAction, AuthorizationPolicy, AuthorizationRule},
    store::Store,
    validate::{L4_CONDITION_KEYS, parse_ip_block},
};

/// Whether ztunnel enforces this policy at all: policies bound to a waypoint with
/// `targetRef(s)` are the waypoint's; AUDIT and CUSTOM have no L4 meaning.
pub fn is_l4(p: &AuthorizationPolicy) -> bool {
    p.spec.target_ref.is_none()
        && p.spec.target_refs.is_empty()
        && matches!(
            p.spec.action,
            AuthorizationAction::Allow | AuthorizationAction::Deny
        )
}

/// Names (`namespace/name`) of selector-scoped L4 policies that select `pod`: those in
/// its namespace and those in the root namespace.
pub fn selecting(store: &Store, mesh: &MeshConfig, pod: &Pod) -> Vec<String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let mut names: Vec<String> = store
        .authorization_policies_in(ns)
        .chain(
            (ns != mesh.root_namespace)
                .then(|| store.authorization_policies_in(&mesh.root_namespace))
                .into_iter()
                .flatten(),
        )
        .filter(|p| is_l4(p))
        .filter(|p| {
            p.spec
                .selector
                .as_ref()
                .is_some_and(|s| selector_matches(&s.match_labels, labels))
        })
        .map(|p| {
            format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            )
        })
        .collect();
    names.sort();
    names
}

/// Turns an Istio principal/namespace pattern into a StringMatch.
pub fn string_match(s: &str) -> sec::StringMatch {
    use sec::string_match::MatchType;
    let m = if s == "*" {
        MatchType::Presence(())
    } else if let Some(p) = s.strip_suffix('*') {
        MatchType::Prefix(p.to_owned())
    } else if let Some(p) = s.strip_prefix('*') {
        MatchType::Suffix(p.to_owned())
    } else {
        MatchType::Exact(s.to_owned())
    };
    sec::StringMatch {
        match_type: Some(m),
    }
}

fn cidrs(values: &[String]) -> Vec<sec::Address> {
    values
        .iter()
        .filter_map(|v| parse_ip_block(v).ok())
        .map(|net| sec::Address {
            address: ip_bytes(net.network()),
            length: u32::from(net.prefix_len()),
        })
        .collect()
}

fn ports(values: &[String]) -> Vec<u32> {
    values.iter().filter_map(|v| v.parse().ok()).collect()
}

fn service_accounts(values: &[String]) -> Vec<sec::ServiceAccountMatch> {
    values
        .iter()
        .filter_map(|v| v.split_once('/'))
        .map(|(ns, sa)| sec::ServiceAccountMatch {
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
        })
        .collect()
}

fn strings(values: &[String]) -> Vec<sec::StringMatch> {
    values.iter().map(|v| string_match(v)).collect()
}

/// The L7 attributes a rule uses, by field name; empty when the rule is pure L4.
fn l7_fields(rule: &AuthorizationRule) -> Vec<String> {
    let mut out = Vec::new();
    for f in &rule.from {
        let s = &f.source;
        if !s.request_principals.is_empty() {
            out.push("from.source.requestPrincipals".to_owned());
        }
        if !s.not_request_principals.is_empty() {
            out.push("from.source.notRequestPrincipals".to_owned());
        }
    }
    for t in &rule.to {
        let o = &t.operation;
        for (name, v) in [
            ("hosts", &o.hosts),
            ("notHosts", &o.not_hosts),
            ("methods", &o.methods),
            ("notMethods", &o.not_methods),
            ("paths", &o.paths),
            ("notPaths", &o.not_paths),
        ] {
            if !v.is_empty() {
                out.push(format!("to.operation.{name}"));
            }
        }
    }
    for c in &rule.when {
        if !L4_CONDITION_KEYS.contains(&c.key.as_str()) {
            out.push(format!("when[{}]", c.key));
        }
    }
    out.dedup();
    out
}

/// Converts the L4 parts of one rule.
fn rule(r: &AuthorizationRule) -> sec::Rule {
    let mut clauses = Vec::new();
    if !r.from.is_empty() {
        let matches = r
            .from
            .iter()
            .map(|f| {
                let s = &f.source;
                let mut source_ips = cidrs(&s.ip_blocks);
                // At L4 the remote address is the peer address: no proxy headers exist.
                source_ips.extend(cidrs(&s.remote_ip_blocks));
                let mut not_source_ips = cidrs(&s.not_ip_blocks);
                not_source_ips.extend(cidrs(&s.not_remote_ip_blocks));
                sec::Match {
                    namespaces: strings(&s.namespaces),
                    not_namespaces: strings(&s.not_namespaces),
                    service_accounts: service_accounts(&s.service_accounts),
                    not_service_accounts: service_accounts(&s.not_service_accounts),
                    principals: strings(&s.principals),
                    not_principals: strings(&s.not_principals),
                    source_ips,
                    not_source_ips,
                    ..Default::default()
                }
            })
            .collect();
        clauses.push(sec::Clause { matches });
    }
    if !r.to.is_empty() {
        let matches =
            r.to.iter()
                .map(|t| sec::Match {
                    destination_ports: ports(&t.operation.ports),
                    not_destination_ports: ports(&t.operation.not_ports),
                    ..Default::default()
                })
                .collect();
        clauses.push(sec::Clause { matches });
    }
    for c in &r.when {
        let mut pos = sec::Match::default();
        let mut neg = sec::Match::default();
        match c.key.as_str() {
            "source.ip" | "remote.ip" => {
                pos.source_ips = cidrs(&c.values);
                neg.not_source_ips = cidrs(&c.not_values);
            }
            "source.namespace" => {
                pos.namespaces = strings(&c.values);
                neg.not_namespaces = strings(&c.not_values);
            }
            "source.principal" => {
                pos.principals = strings(&c.values);
                neg.not_principals = strings(&c.not_values);
            }
            "destination.ip" => {
                pos.destination_ips = cidrs(&c.values);
                neg.not_destination_ips = cidrs(&c.not_values);
            }
            "destination.port" => {
                pos.destination_ports = ports(&c.values);
                neg.not_destination_ports = ports(&c.not_values);
            }
            // L7 keys: not evaluated here (see module docs).
            _ => continue,
        }
        // values and notValues are AND-ed: each becomes its own clause.
        if !c.values.is_empty() {
            clauses.push(sec::Clause { matches: vec![pos] });
        }
        if !c.not_values.is_empty() {
            clauses.push(sec::Clause { matches: vec![neg] });
        }
    }
    // A clause with an empty match (e.g. an operation whose fields were all L7)
    // matches everything: leave it out rather than send a no-op.
    clauses.retain(|c| !c.matches.iter().any(|m| m == &sec::Match::default()));
    sec::Rule { clauses }
}

/// Compiles one AuthorizationPolicy. `None` for policies ztunnel does not enforce.
pub fn compile(
    mesh: &MeshConfig,
    p: &AuthorizationPolicy,
    notices: &mut Vec<Notice>,
) -> Option<sec::Authorization> {
    let name = p.metadata.name.as_deref()?;
    let namespace = p.metadata.namespace.as_deref()?;
    let policy = format!("{namespace}/{name}");
    if !is_l4(p) {
        if matches!(
            p.spec.action,
            AuthorizationAction::Audit | AuthorizationAction::Custom
        ) {
            notices.push(Notice {
                kind: Some(crate::resources::Kind::AuthorizationPolicy),
                policy: policy.clone(),
                message: format!(
                    "action {:?} is not enforced by ztunnel (L4); it needs a waypoint",
                    p.spec.action
                ),
            });
        }
        return None;
    }
    let action = match p.spec.action {
        AuthorizationAction::Deny => sec::Action::Deny,
        _ => sec::Action::Allow,
    };
    let scope = match (&p.spec.selector, namespace == mesh.root_namespace) {
        (Some(_), _) => sec::Scope::WorkloadSelector,
        (None, true) => sec::Scope::Global,
        (None, false) => sec::Scope::Namespace,
    };
    let mut rules = Vec::new();
    for (i, r) in p.spec.rules.iter().flatten().enumerate() {
        let l7 = l7_fields(r);
        if !l7.is_empty() {
            let effect = match action {
                sec::Action::Allow => "the rule is ignored at L4, so it allows nothing",
                sec::Action::Deny => "only its L4 conditions are kept, so it denies more",
            };
            notices.push(Notice {
                kind: Some(crate::resources::Kind::AuthorizationPolicy),
                policy: policy.clone(),
                message: format!(
                    "rules[{i}] uses L7 attributes ({}) that ztunnel cannot enforce: {effect}; \
                     bind the policy to a waypoint with targetRefs",
                    l7.join(", ")
                ),
            });
            if action == sec::Action::Allow {
                continue;
            }
        }
        rules.push(rule(r));
    }
    Some(sec::Authorization {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        scope: scope as i32,
        action: action as i32,
        rules,
        dry_run: p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("istio.io/dry-run"))
            .is_some_and(|v| v == "true"),
        extensions: Vec::new(),
    })
}
