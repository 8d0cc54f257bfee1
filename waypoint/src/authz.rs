//! L7 authorization: the AuthorizationPolicies bound to the waypoint or to a service
//! it serves, evaluated per request with Istio's semantics.
//!
//! - DENY policies first: any matching one denies. Then, if ALLOW policies exist,
//!   one of them must match. No policies: allowed.
//! - A policy matches when any of its rules does; an ALLOW policy without rules
//!   matches nothing (it denies everything), a rule with no fields matches all.
//! - A rule matches when one of its `from` sources, one of its `to` operations and
//!   all of its `when` conditions match; an empty list is no constraint.
//! - Within a source/operation every field set must hold; a value list holds when
//!   the attribute matches one of the values and none of the `not` values. An
//!   attribute the request lacks (no principal on plaintext) matches no value but
//!   satisfies every `not` list.
//! - Values are Istio's patterns: `*` (present), `prefix*`, `*suffix`, or exact.
//!   Hosts compare case-insensitively and ignore the request's port unless the
//!   pattern names one.
//!
//! A denied request gets `403 RBAC: access denied`, as from Envoy.

use http::HeaderMap;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// `*`: any value, but the attribute must be present.
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    pub fn parse(s: &str) -> Pattern {
        if s == "*" {
            Pattern::Any
        } else if let Some(p) = s.strip_suffix('*') {
            Pattern::Prefix(p.to_owned())
        } else if let Some(p) = s.strip_prefix('*') {
            Pattern::Suffix(p.to_owned())
        } else {
            Pattern::Exact(s.to_owned())
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => v == e,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Suffix(s) => v.ends_with(s.as_str()),
        }
    }

    fn matches_ignore_case(&self, v: &str) -> bool {
        let lower = |s: &str| s.to_ascii_lowercase();
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => v.eq_ignore_ascii_case(e),
            Pattern::Prefix(p) => lower(v).starts_with(&lower(p)),
            Pattern::Suffix(s) => lower(v).ends_with(&lower(s)),
        }
    }
}

/// A field's values and `not` values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Values {
    pub any_of: Vec<Pattern>,
    pub none_of: Vec<Pattern>,
}

impl Values {
    pub fn parse(values: &[String], not_values: &[String]) -> Self {
        Values {
            any_of: values.iter().map(|v| Pattern::parse(v)).collect(),
            none_of: not_values.iter().map(|v| Pattern::parse(v)).collect(),
        }
    }

    fn holds_with(&self, value: Option<&str>, eq: impl Fn(&Pattern, &str) -> bool) -> bool {
        let hit = |ps: &[Pattern]| value.is_some_and(|v| ps.iter().any(|p| eq(p, v)));
        (self.any_of.is_empty() || hit(&self.any_of)) && !hit(&self.none_of)
    }

    fn holds(&self, value: Option<&str>) -> bool {
        self.holds_with(value, Pattern::matches)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    /// `cluster.local/ns/<ns>/sa/<sa>` (the SPIFFE id without `spiffe://`).
    pub principals: Values,
    pub namespaces: Values,
    /// `<iss>/<sub>` of a validated JWT.
    pub request_principals: Values,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operation {
    pub hosts: Values,
    pub ports: Values,
    pub methods: Values,
    pub paths: Values,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute {
    Header(http::HeaderName),
    SourcePrincipal,
    SourceNamespace,
    RequestPrincipal,
    DestinationPort,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub attribute: Attribute,
    pub values: Values,
}

#[derive(Debug, thiserror::Error)]
#[error("condition key {0:?} is not supported by the waypoint")]
pub struct UnsupportedKey(pub String);

impl Attribute {
    /// Istio's condition keys the waypoint evaluates.
    pub fn parse(key: &str) -> Result<Attribute, UnsupportedKey> {
        let unsupported = || UnsupportedKey(key.to_owned());
        if let Some(name) = key
            .strip_prefix("request.headers[")
            .and_then(|k| k.strip_suffix(']'))
        {
            return http::HeaderName::try_from(name.to_ascii_lowercase())
                .map(Attribute::Header)
                .map_err(|_| unsupported());
        }
        Ok(match key {
            "source.principal" => Attribute::SourcePrincipal,
            "source.namespace" => Attribute::SourceNamespace,
            "request.auth.principal" => Attribute::RequestPrincipal,
            "destination.port" => Attribute::DestinationPort,
            _ => return Err(unsupported()),
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyRule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `namespace/name`, for logs.
    pub name: String,
    pub effect: Effect,
    pub rules: Vec<PolicyRule>,
}

/// What the request is, as policies see it.
#[derive(Clone, Copy, Debug)]
pub struct Attributes<'a> {
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub request_principal: Option<&'a str>,
    pub host: Option<&'a str>,
    pub port: u16,
    pub method: &'a str,
    /// The path without the query.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

impl Attributes<'_> {
    fn header(&self, name: &http::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn host_matches(p: &Pattern, host: &str) -> bool {
    let names_port = match p {
        Pattern::Exact(s) | Pattern::Prefix(s) | Pattern::Suffix(s) => s.contains(':'),
        Pattern::Any => false,
    };
    let host = match host.rsplit_once(':') {
        Some((h, port)) if !names_port && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    p.matches_ignore_case(host)
}

impl Source {
    fn matches(&self, a: &Attributes<'_>) -> bool {
        self.principals.holds(a.principal)
            && self.namespaces.holds(a.namespace)
            && self.request_principals.holds(a.request_principal)
    }
}

impl Operation {
    fn matches(&self, a: &Attributes<'_>) -> bool {
        let port = a.port.to_string();
        self.hosts.holds_with(a.host, host_matches)
            && self.ports.holds(Some(&port))
            && self.methods.holds(Some(a.method))
            && self.paths.holds(Some(a.path))
    }
}

impl Condition {
    fn matches(&self, a: &Attributes<'_>) -> bool {
        let port;
        let value = match &self.attribute {
            Attribute::Header(h) => a.header(h),
            Attribute::SourcePrincipal => a.principal,
            Attribute::SourceNamespace => a.namespace,
            Attribute::RequestPrincipal => a.request_principal,
            Attribute::DestinationPort => {
                port = a.port.to_string();
                Some(port.as_str())
            }
        };
        self.values.holds(value)
    }
}

impl PolicyRule {
    fn matches(&self, a: &Attributes<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(a)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(a)))
            && self.when.iter().all(|c| c.matches(a))
    }
}

impl Policy {
    fn matches(&self, a: &Attributes<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(a))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Denied by this DENY policy, or (`None`) by no ALLOW policy matching.
    Deny(Option<String>),
}

/// Every policy that applies to one service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policies {
    pub policies: Vec<Policy>,
}

impl Policies {
    pub fn evaluate(&self, a: &Attributes<'_>) -> Verdict {
        let of = |e| self.policies.iter().filter(move |p| p.effect == e);
        if let Some(p) = of(Effect::Deny).find(|p| p.matches(a)) {
            return Verdict::Deny(Some(p.name.clone()));
        }
        let mut allow = of(Effect::Allow).peekable();
        if allow.peek().is_none() || allow.any(|p| p.matches(a)) {
            Verdict::Allow
        } else {
            Verdict::Deny(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(v: &[&str]) -> Values {
        Values {
            any_of: v.iter().map(|s| Pattern::parse(s)).collect(),
            none_of: vec![],
        }
    }

    fn not(v: &[&str]) -> Values {
        Values {
            any_of: vec![],
            none_of: v.iter().map(|s| Pattern::parse(s)).collect(),
        }
    }

    fn attrs<'a>(
        principal: Option<&'a str>,
        method: &'a str,
        path: &'a str,
        h: &'a HeaderMap,
    ) -> Attributes<'a> {
        Attributes {
            principal,
            namespace: principal.and_then(|p| p.split('/').nth(2)),
            request_principal: None,
            host: Some("reviews.bookinfo.svc.cluster.local:9080"),
            port: 9080,
            method,
            path,
            headers: h,
        }
    }

    fn policy(effect: Effect, rules: Vec<PolicyRule>) -> Policy {
        Policy {
            name: "bookinfo/p".into(),
            effect,
            rules,
        }
    }

    const PRODUCTPAGE: &str = "cluster.local/ns/bookinfo/sa/productpage";
    const EVIL: &str = "cluster.local/ns/evil/sa/x";

    #[test]
    fn patterns_and_not_lists() {
        assert!(Pattern::parse("*").matches("x"));
        assert!(Pattern::parse("/api/*").matches("/api/v1"));
        assert!(Pattern::parse("*.local").matches("a.local"));
        assert!(!Pattern::parse("/api").matches("/api/v1"));
        let v = Values::parse(&["/api/*".into()], &["/api/admin*".into()]);
        assert!(v.holds(Some("/api/x")) && !v.holds(Some("/api/admin/1")));
        assert!(!vals(&["*"]).holds(None), "`*` needs the attribute present");
        assert!(not(&["*"]).holds(None), "absent satisfies a not list");
        assert!(host_matches(
            &Pattern::parse("Reviews.bookinfo.svc.cluster.local"),
            "reviews.bookinfo.svc.cluster.local:9080"
        ));
        assert!(!host_matches(&Pattern::parse("reviews:80"), "reviews:9080"));
    }

    #[test]
    fn deny_before_allow_and_allow_lists_admit_only_the_listed() {
        let h = HeaderMap::new();
        let get_from = |p| attrs(p, "GET", "/reviews/1", &h);
        let allow_productpage_get = policy(
            Effect::Allow,
            vec![PolicyRule {
                from: vec![Source {
                    principals: vals(&[PRODUCTPAGE]),
                    ..Default::default()
                }],
                to: vec![Operation {
                    methods: vals(&["GET"]),
                    paths: vals(&["/reviews/*"]),
                    ..Default::default()
                }],
                when: vec![],
            }],
        );
        let deny_admin = policy(
            Effect::Deny,
            vec![PolicyRule {
                to: vec![Operation {
                    paths: vals(&["/reviews/admin*"]),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        );
        let ps = Policies {
            policies: vec![allow_productpage_get.clone(), deny_admin],
        };
        assert_eq!(ps.evaluate(&get_from(Some(PRODUCTPAGE))), Verdict::Allow);
        assert_eq!(ps.evaluate(&get_from(Some(EVIL))), Verdict::Deny(None));
        assert_eq!(
            ps.evaluate(&get_from(None)),
            Verdict::Deny(None),
            "plaintext has no principal"
        );
        assert_eq!(
            ps.evaluate(&attrs(Some(PRODUCTPAGE), "POST", "/reviews/1", &h)),
            Verdict::Deny(None)
        );
        assert_eq!(
            ps.evaluate(&attrs(Some(PRODUCTPAGE), "GET", "/reviews/admin/x", &h)),
            Verdict::Deny(Some("bookinfo/p".into())),
            "DENY wins over a matching ALLOW"
        );
        // No policies: everything allowed; an ALLOW without rules: nothing.
        assert_eq!(
            Policies::default().evaluate(&get_from(None)),
            Verdict::Allow
        );
        let deny_all = Policies {
            policies: vec![policy(Effect::Allow, vec![])],
        };
        assert_eq!(
            deny_all.evaluate(&get_from(Some(PRODUCTPAGE))),
            Verdict::Deny(None)
        );
        let allow_all = Policies {
            policies: vec![policy(Effect::Allow, vec![PolicyRule::default()])],
        };
        assert_eq!(allow_all.evaluate(&get_from(None)), Verdict::Allow);
    }

    #[test]
    fn namespaces_and_header_conditions() {
        let mut h = HeaderMap::new();
        h.insert("x-canary", "yes".parse().expect("value"));
        let deny_other_ns_canaries = Policies {
            policies: vec![policy(
                Effect::Deny,
                vec![PolicyRule {
                    from: vec![Source {
                        namespaces: not(&["bookinfo"]),
                        ..Default::default()
                    }],
                    when: vec![Condition {
                        attribute: Attribute::parse("request.headers[X-Canary]").expect("key"),
                        values: vals(&["yes"]),
                    }],
                    ..Default::default()
                }],
            )],
        };
        let from = |p| attrs(p, "GET", "/", &h);
        assert!(matches!(
            deny_other_ns_canaries.evaluate(&from(Some(EVIL))),
            Verdict::Deny(_)
        ));
        assert_eq!(
            deny_other_ns_canaries.evaluate(&from(Some(PRODUCTPAGE))),
            Verdict::Allow
        );
        let plain = HeaderMap::new();
        assert_eq!(
            deny_other_ns_canaries.evaluate(&attrs(Some(EVIL), "GET", "/", &plain)),
            Verdict::Allow,
            "the condition needs the header"
        );
        assert!(Attribute::parse("source.ip").is_err());
        assert!(Attribute::parse("request.auth.claims[groups]").is_err());
    }
}
