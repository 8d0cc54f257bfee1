//! AuthorizationPolicies bound to waypoints (`targetRefs`) -> `cairn.l7.v1.Policy`,
//! attached to the RouteConfig of every service port they cover.
//!
//! A policy covers a service when a targetRef names the service itself (`Service`,
//! core group) or the waypoint Gateway that serves it, in the policy's namespace
//! (Istio's rule: targetRefs do not cross namespaces). What the waypoint cannot
//! evaluate fails closed, as in the L4 compile: an ALLOW rule using it is dropped
//! (allows less), a DENY rule loses only that field or condition (denies more); both
//! are reported.

use cairn_api::proto::cairn::l7::v1 as l7;

use super::Notice;
use crate::resources::istio::{AuthorizationAction, AuthorizationPolicy, PolicyTargetReference};

/// `when` keys the waypoint evaluates (`cairn_waypoint::authz::Attribute`).
fn supported_key(key: &str) -> bool {
    matches!(
        key,
        "source.principal" | "source.namespace" | "request.auth.principal" | "destination.port"
    ) || (key.starts_with("request.headers[") && key.ends_with(']'))
}

fn names(p: &AuthorizationPolicy) -> (&str, &str) {
    (
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default(),
    )
}

fn refs(p: &AuthorizationPolicy) -> impl Iterator<Item = &PolicyTargetReference> {
    p.spec.target_ref.iter().chain(p.spec.target_refs.iter())
}

/// Whether `p` covers service `namespace/service` served by waypoint `waypoint`
/// (namespace, name).
pub fn covers(
    p: &AuthorizationPolicy,
    namespace: &str,
    service: &str,
    waypoint: Option<(&str, &str)>,
) -> bool {
    let (p_ns, _) = names(p);
    refs(p).any(|r| {
        let ns = r.namespace.as_deref().unwrap_or(p_ns);
        if ns != p_ns {
            return false;
        }
        match (r.kind.as_str(), r.group.as_str()) {
            ("Service", "" | "core") => ns == namespace && r.name == service,
            ("Gateway", "gateway.networking.k8s.io") => {
                waypoint.is_some_and(|(wns, wname)| wns == ns && wname == r.name)
            }
            _ => false,
        }
    })
}

/// The waypoint's form of `p`, or `None` (reported) for actions it does not enforce.
pub fn compile(p: &AuthorizationPolicy, notices: &mut Vec<Notice>) -> Option<l7::Policy> {
    let (ns, name) = names(p);
    let policy = format!("{ns}/{name}");
    let mut notice = |message: String| {
        notices.push(Notice {
            policy: policy.clone(),
            message,
        })
    };
    let action = match p.spec.action {
        AuthorizationAction::Allow => l7::policy::Action::Allow,
        AuthorizationAction::Deny => l7::policy::Action::Deny,
        other => {
            notice(format!(
                "action {other:?} is not enforced by waypoints; policy ignored"
            ));
            return None;
        }
    };
    let deny = action == l7::policy::Action::Deny;
    let mut rules = Vec::new();
    for (i, r) in p.spec.rules.iter().flatten().enumerate() {
        let mut unsupported = Vec::new();
        let from = r
            .from
            .iter()
            .map(|f| {
                let s = &f.source;
                for (field, v) in [
                    ("ipBlocks", &s.ip_blocks),
                    ("notIpBlocks", &s.not_ip_blocks),
                    ("remoteIpBlocks", &s.remote_ip_blocks),
                    ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                    ("serviceAccounts", &s.service_accounts),
                    ("notServiceAccounts", &s.not_service_accounts),
                ] {
                    if !v.is_empty() {
                        unsupported.push(format!("from.source.{field}"));
                    }
                }
                l7::PolicySource {
                    principals: s.principals.clone(),
                    not_principals: s.not_principals.clone(),
                    namespaces: s.namespaces.clone(),
                    not_namespaces: s.not_namespaces.clone(),
                    request_principals: s.request_principals.clone(),
                    not_request_principals: s.not_request_principals.clone(),
                }
            })
            .collect();
        let to =
            r.to.iter()
                .map(|t| {
                    let o = &t.operation;
                    l7::PolicyOperation {
                        hosts: o.hosts.clone(),
                        not_hosts: o.not_hosts.clone(),
                        ports: o.ports.clone(),
                        not_ports: o.not_ports.clone(),
                        methods: o.methods.clone(),
                        not_methods: o.not_methods.clone(),
                        paths: o.paths.clone(),
                        not_paths: o.not_paths.clone(),
                    }
                })
                .collect();
        let mut when = Vec::new();
        for c in &r.when {
            if supported_key(&c.key) {
                when.push(l7::PolicyCondition {
                    key: c.key.clone(),
                    values: c.values.clone(),
                    not_values: c.not_values.clone(),
                });
            } else {
                unsupported.push(format!("when[{}]", c.key));
            }
        }
        if !unsupported.is_empty() {
            let effect = if deny {
                "those are left out, so it denies more"
            } else {
                "the rule is dropped, so it allows less"
            };
            notice(format!(
                "rules[{i}] uses attributes waypoints do not evaluate ({}): {effect}",
                unsupported.join(", ")
            ));
            if !deny {
                continue;
            }
        }
        rules.push(l7::PolicyRule { from, to, when });
    }
    Some(l7::Policy {
        name: policy.clone(),
        action: action as i32,
        rules,
    })
}
