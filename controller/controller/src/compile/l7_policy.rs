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
use crate::resources::istio::{
    AuthorizationAction, AuthorizationPolicy, PolicyTargetReference, RequestAuthentication,
};

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

/// Whether a policy in `p_ns` with these targetRefs covers service
/// `namespace/service` served by waypoint `waypoint` (namespace, name).
pub fn covers<'a>(
    p_ns: &str,
    mut refs: impl Iterator<Item = &'a PolicyTargetReference>,
    namespace: &str,
    service: &str,
    waypoint: Option<(&str, &str)>,
) -> bool {
    refs.any(|r| {
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
            kind: Some(crate::resources::Kind::AuthorizationPolicy),
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

/// A RequestAuthentication's rules as the waypoint checks them. JWKS inline, or
/// from a `file://` jwksUri read now (local mode); other URIs are not fetched: the
/// rule is left out (tokens of that issuer are then refused) and reported.
pub fn jwt_rules(ra: &RequestAuthentication, notices: &mut Vec<Notice>) -> Vec<l7::JwtRule> {
    let ns = ra.metadata.namespace.as_deref().unwrap_or_default();
    let name = ra.metadata.name.as_deref().unwrap_or_default();
    let mut out = Vec::new();
    for r in &ra.spec.jwt_rules {
        let jwks = match (&r.jwks, &r.jwks_uri) {
            (Some(inline), _) => inline.clone(),
            (None, Some(uri)) if uri.starts_with("file://") => {
                match std::fs::read_to_string(&uri["file://".len()..]) {
                    Ok(j) => j,
                    Err(e) => {
                        notices.push(Notice {
                            kind: Some(crate::resources::Kind::RequestAuthentication),
                            policy: format!("{ns}/{name}"),
                            message: format!(
                                "issuer {}: reading {uri}: {e}; rule left out",
                                r.issuer
                            ),
                        });
                        continue;
                    }
                }
            }
            (None, uri) => {
                notices.push(Notice {
                    kind: Some(crate::resources::Kind::RequestAuthentication),
                    policy: format!("{ns}/{name}"),
                    message: format!(
                        "issuer {}: jwksUri {} is not fetched by Cairn yet (give jwks inline or a file:// URI); rule left out",
                        r.issuer,
                        uri.as_deref().unwrap_or("(none)")
                    ),
                });
                continue;
            }
        };
        out.push(l7::JwtRule {
            issuer: r.issuer.clone(),
            audiences: r.audiences.clone(),
            jwks,
            from_headers: r
                .from_headers
                .iter()
                .map(|h| l7::JwtHeader {
                    name: h.name.to_ascii_lowercase(),
                    prefix: h.prefix.clone(),
                })
                .collect(),
            forward_original_token: r.forward_original_token,
        });
    }
    out
}
