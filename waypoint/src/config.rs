//! `cairn.l7.v1.RouteConfig` (what the controller serves) -> [`RouteTable`] (what the
//! router reads). Conversion is all or nothing: one bad rule refuses the whole config
//! (the xDS client NACKs it and the last good table keeps serving).

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use cairn_api::proto::cairn::l7::v1 as l7;
use http::{HeaderName, HeaderValue, StatusCode};

use cairn_identity::SpiffeId;

use crate::{
    authz::{
        Attribute, Condition, Effect, Operation, Policies, Policy, PolicyRule, Source, Values,
    },
    cluster::{
        Cluster, HashKey, LoadBalancer, OutlierDetection, PoolLimits, RetryBudget, TrafficPolicy,
    },
    cors::CorsPolicy,
    fault::{Abort, Fault, Percent},
    jwt::{JwtAuthn, JwtRule, TokenSource, parse_jwks},
    matching::{BadRegex, HeaderRule, RequestMatch, StringMatch},
    redirect::{PathRedirect, Redirect},
    retry::{RetryOn, RetryPolicy},
    route::{
        Action, BackendHeaders, HeaderOps, Mirror, PathRegex, Rewrite, RouteTable, Rule,
        WeightedBackend,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("rule {rule}: {field}: {reason}")]
    Invalid {
        rule: String,
        field: &'static str,
        reason: String,
    },
    #[error("rule {rule}: {source}")]
    Regex { rule: String, source: BadRegex },
}

/// An address as the protos carry it: 4 or 16 bytes.
fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// The backend key the [`crate::router::Upstream`] resolves: `hostname|subset|port`.
pub fn backend_key(hostname: &str, subset: &str, port: u32) -> String {
    format!("{hostname}|{subset}|{port}")
}

struct Rules<'a> {
    rule: &'a str,
}

impl Rules<'_> {
    fn invalid(&self, field: &'static str, reason: impl ToString) -> ConfigError {
        ConfigError::Invalid {
            rule: self.rule.into(),
            field,
            reason: reason.to_string(),
        }
    }

    fn string(&self, field: &'static str, m: &l7::StringMatch) -> Result<StringMatch, ConfigError> {
        use l7::string_match::Kind;
        match &m.kind {
            Some(Kind::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
            Some(Kind::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
            Some(Kind::PathPrefix(s)) => Ok(StringMatch::path_prefix(s)),
            Some(Kind::Regex(r)) => StringMatch::regex(r).map_err(|source| ConfigError::Regex {
                rule: self.rule.into(),
                source,
            }),
            None => Err(self.invalid(field, "empty string match")),
        }
    }

    fn status(&self, field: &'static str, code: u32) -> Result<StatusCode, ConfigError> {
        u16::try_from(code)
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| self.invalid(field, format!("{code} is not an HTTP status")))
    }

    fn header_name(&self, field: &'static str, name: &str) -> Result<HeaderName, ConfigError> {
        HeaderName::try_from(name).map_err(|e| self.invalid(field, format!("{name:?}: {e}")))
    }

    fn header_ops(&self, ops: Option<&l7::HeaderOps>) -> Result<HeaderOps, ConfigError> {
        let Some(ops) = ops else {
            return Ok(HeaderOps::default());
        };
        let pairs = |map: &std::collections::BTreeMap<String, String>| {
            map.iter()
                .map(|(k, v)| {
                    Ok((
                        self.header_name("headers", k)?,
                        HeaderValue::try_from(v.as_str())
                            .map_err(|e| self.invalid("headers", format!("{k}: {e}")))?,
                    ))
                })
                .collect::<Result<Vec<_>, ConfigError>>()
        };
        Ok(HeaderOps {
            remove: ops
                .remove
                .iter()
                .map(|n| self.header_name("headers.remove", n))
                .collect::<Result<_, _>>()?,
            set: pairs(&ops.set)?,
            add: pairs(&ops.add)?,
        })
    }

    fn matches(&self, m: &l7::Match) -> Result<RequestMatch, ConfigError> {
        let opt = |field, s: &Option<l7::StringMatch>| {
            s.as_ref().map(|s| self.string(field, s)).transpose()
        };
        Ok(RequestMatch {
            path: opt("uri", &m.uri)?,
            ignore_path_case: m.ignore_uri_case,
            scheme: opt("scheme", &m.scheme)?,
            method: opt("method", &m.method)?,
            authority: opt("authority", &m.authority)?,
            headers: m
                .headers
                .iter()
                .map(|h| {
                    use l7::header_match::Rule as R;
                    let rule = match &h.rule {
                        Some(R::Value(v)) => HeaderRule::Value(self.string("headers", v)?),
                        Some(R::Present(true)) => HeaderRule::Present,
                        Some(R::Absent(true)) => HeaderRule::Absent,
                        _ => return Err(self.invalid("headers", format!("{}: no rule", h.name))),
                    };
                    Ok((self.header_name("headers", &h.name)?, rule))
                })
                .collect::<Result<_, _>>()?,
            query: m
                .query_params
                .iter()
                .map(|q| {
                    let v = q.value.as_ref().ok_or_else(|| {
                        self.invalid("query_params", format!("{}: no match", q.name))
                    })?;
                    Ok((q.name.clone(), self.string("query_params", v)?))
                })
                .collect::<Result<_, _>>()?,
            source_namespace: (!m.source_namespace.is_empty()).then(|| m.source_namespace.clone()),
            source_addresses: m
                .source_addresses
                .as_ref()
                .map(|s| {
                    s.addresses
                        .iter()
                        .map(|a| {
                            ip_of(a).ok_or_else(|| {
                                self.invalid("source_addresses", format!("{} bytes", a.len()))
                            })
                        })
                        .collect::<Result<HashSet<IpAddr>, _>>()
                })
                .transpose()?,
        })
    }

    /// A path to put in a request or a `Location`; empty: none.
    fn path(&self, field: &'static str, p: &str) -> Result<Option<String>, ConfigError> {
        if p.is_empty() {
            return Ok(None);
        }
        if !p.starts_with('/') || p.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(self.invalid(field, format!("{p:?} is not a path")));
        }
        Ok(Some(p.to_owned()))
    }

    /// An authority (`host[:port]`); empty: none.
    fn authority(
        &self,
        field: &'static str,
        a: &str,
    ) -> Result<Option<http::uri::Authority>, ConfigError> {
        if a.is_empty() {
            return Ok(None);
        }
        http::uri::Authority::try_from(a)
            .map(Some)
            .map_err(|e| self.invalid(field, format!("{a:?}: {e}")))
    }

    fn rewrite(&self, rw: &l7::Rewrite) -> Result<Rewrite, ConfigError> {
        let authority = self
            .authority("rewrite.authority", &rw.authority)?
            .map(|a| {
                HeaderValue::try_from(a.as_str())
                    .map_err(|e| self.invalid("rewrite.authority", format!("{a}: {e}")))
            })
            .transpose()?;
        let regex = if rw.regex.is_empty() {
            None
        } else {
            Some(
                PathRegex::new(&rw.regex, &rw.substitution).map_err(|source| {
                    ConfigError::Regex {
                        rule: self.rule.into(),
                        source,
                    }
                })?,
            )
        };
        Ok(Rewrite {
            path: self.path("rewrite.uri", &rw.uri)?,
            full_path: rw.full_path,
            regex,
            authority,
        })
    }

    fn redirect(&self, r: &l7::Redirect) -> Result<Redirect, ConfigError> {
        let scheme = Some(r.scheme.to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .map(|s| match http::uri::Scheme::try_from(s.as_str()) {
                Ok(_) => Ok(s),
                Err(e) => Err(self.invalid("redirect.scheme", format!("{s:?}: {e}"))),
            })
            .transpose()?;
        let port = match r.port {
            0 => None,
            p => Some(
                u16::try_from(p)
                    .map_err(|_| self.invalid("redirect.port", format!("{p} is not a TCP port")))?,
            ),
        };
        let path = self.path("redirect.uri", &r.uri)?.map(|p| {
            if r.replace_prefix {
                PathRedirect::MatchedPrefix(p)
            } else {
                PathRedirect::Full(p)
            }
        });
        Ok(Redirect {
            scheme,
            authority: self.authority("redirect.authority", &r.authority)?,
            port,
            path,
            status: self.status(
                "redirect.status",
                if r.status == 0 { 301 } else { r.status },
            )?,
        })
    }

    fn cors(&self, c: &l7::CorsPolicy) -> Result<CorsPolicy, ConfigError> {
        let joined = |field: &'static str, items: &[String]| {
            if items.is_empty() {
                return Ok(None);
            }
            HeaderValue::try_from(items.join(","))
                .map(Some)
                .map_err(|e| self.invalid(field, format!("{items:?}: {e}")))
        };
        let max_age = match c.max_age.as_str() {
            "" => None,
            s if s.bytes().all(|b| b.is_ascii_digit()) => Some(
                HeaderValue::try_from(s)
                    .map_err(|e| self.invalid("cors.max_age", format!("{s:?}: {e}")))?,
            ),
            s => return Err(self.invalid("cors.max_age", format!("{s:?} is not seconds"))),
        };
        Ok(CorsPolicy {
            allow_origins: c
                .allow_origins
                .iter()
                .map(|m| self.string("cors.allow_origins", m))
                .collect::<Result<_, _>>()?,
            allow_methods: joined("cors.allow_methods", &c.allow_methods)?,
            allow_headers: joined("cors.allow_headers", &c.allow_headers)?,
            expose_headers: joined("cors.expose_headers", &c.expose_headers)?,
            max_age,
            allow_credentials: c.allow_credentials,
            forward_unmatched_preflights: !c.ignore_unmatched_preflights,
        })
    }

    fn retry(&self, r: &l7::Retry) -> Result<RetryPolicy, ConfigError> {
        let mut on = RetryOn::default();
        for name in &r.retry_on {
            on.add(name)
                .map_err(|e| self.invalid("retry.retry_on", e))?;
        }
        Ok(RetryPolicy {
            retries: r.attempts,
            per_try_timeout: (r.per_try_timeout_ms > 0)
                .then(|| Duration::from_millis(r.per_try_timeout_ms)),
            on,
            status_codes: r
                .retriable_status_codes
                .iter()
                .map(|c| self.status("retry.retriable_status_codes", *c))
                .collect::<Result<_, _>>()?,
        })
    }

    fn percent(&self, field: &'static str, p: f64) -> Result<Percent, ConfigError> {
        if (0.0..=100.0).contains(&p) {
            Ok(Percent(p))
        } else {
            Err(self.invalid(field, format!("{p} is not a percentage")))
        }
    }
}

impl TryFrom<&l7::RouteConfig> for RouteTable {
    type Error = ConfigError;

    fn try_from(c: &l7::RouteConfig) -> Result<Self, ConfigError> {
        let mut rules = Vec::with_capacity(c.rules.len());
        for r in &c.rules {
            let cx = Rules { rule: &r.name };
            let action = match &r.action {
                Some(l7::rule::Action::Forward(f)) => Action::Forward(
                    f.backends
                        .iter()
                        .map(|b| {
                            let headers = match (&b.request_headers, &b.response_headers) {
                                (None, None) => None,
                                (req, resp) => Some(Arc::new(BackendHeaders {
                                    request: cx.header_ops(req.as_ref())?,
                                    response: cx.header_ops(resp.as_ref())?,
                                })),
                            };
                            Ok(WeightedBackend {
                                backend: backend_key(&b.hostname, &b.subset, b.port),
                                weight: b.weight,
                                headers,
                            })
                        })
                        .collect::<Result<_, ConfigError>>()?,
                ),
                Some(l7::rule::Action::Redirect(r)) => Action::Redirect(cx.redirect(r)?),
                Some(l7::rule::Action::DirectResponse(d)) => Action::Respond {
                    status: cx.status("direct_response.status", d.status)?,
                    body: Bytes::from(d.body.clone()),
                },
                None => return Err(cx.invalid("action", "none")),
            };
            let fault = match &r.fault {
                None => None,
                Some(f) => Some(Fault {
                    delay: f
                        .delay
                        .as_ref()
                        .map(|d| {
                            Ok::<_, ConfigError>((
                                Duration::from_millis(d.fixed_delay_ms),
                                cx.percent("fault.delay.percent", d.percent)?,
                            ))
                        })
                        .transpose()?,
                    abort: f
                        .abort
                        .as_ref()
                        .map(|a| {
                            let abort = match a.grpc_status {
                                0 => Abort::Http(
                                    cx.status("fault.abort.http_status", a.http_status)?,
                                ),
                                1..=16 => Abort::Grpc(a.grpc_status),
                                n => {
                                    return Err(cx.invalid(
                                        "fault.abort.grpc_status",
                                        format!("{n} is not a gRPC status code (1..=16)"),
                                    ));
                                }
                            };
                            Ok::<_, ConfigError>((
                                abort,
                                cx.percent("fault.abort.percent", a.percent)?,
                            ))
                        })
                        .transpose()?,
                }),
            };
            rules.push(Rule {
                name: r.name.clone(),
                matches: r
                    .matches
                    .iter()
                    .map(|m| cx.matches(m))
                    .collect::<Result<_, _>>()?,
                action,
                fault,
                timeout: (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms)),
                retry: r.retry.as_ref().map(|r| cx.retry(r)).transpose()?,
                rewrite: r.rewrite.as_ref().map(|rw| cx.rewrite(rw)).transpose()?,
                mirrors: r
                    .mirrors
                    .iter()
                    .map(|m| {
                        let b = m
                            .backend
                            .as_ref()
                            .ok_or_else(|| cx.invalid("mirrors", "no backend"))?;
                        Ok(Mirror {
                            backend: backend_key(&b.hostname, &b.subset, b.port),
                            percent: cx.percent("mirrors.percent", m.percent)?,
                        })
                    })
                    .collect::<Result<_, ConfigError>>()?,
                request_headers: cx.header_ops(r.request_headers.as_ref())?,
                response_headers: cx.header_ops(r.response_headers.as_ref())?,
                cors: r
                    .cors
                    .as_ref()
                    .map(|c| cx.cors(c).map(Arc::new))
                    .transpose()?,
            });
        }
        Ok(RouteTable {
            rules,
            policies: policies(&c.policies)?,
            jwt: jwt_rules(&c.jwt_rules)?,
        })
    }
}

fn jwt_rules(rules: &[l7::JwtRule]) -> Result<JwtAuthn, ConfigError> {
    let mut out = Vec::with_capacity(rules.len());
    for r in rules {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid {
            rule: format!("jwt issuer {}", r.issuer),
            field,
            reason,
        };
        let keys = parse_jwks(&r.jwks).map_err(|e| invalid("jwks", e.to_string()))?;
        let sources = r
            .from_headers
            .iter()
            .map(|h| {
                Ok(TokenSource {
                    header: HeaderName::try_from(h.name.as_str())
                        .map_err(|e| invalid("from_headers", format!("{}: {e}", h.name)))?,
                    prefix: h.prefix.clone(),
                })
            })
            .collect::<Result<_, ConfigError>>()?;
        out.push(JwtRule {
            issuer: r.issuer.clone(),
            audiences: r.audiences.clone(),
            keys,
            sources,
            forward_original_token: r.forward_original_token,
        });
    }
    Ok(JwtAuthn { rules: out })
}

/// A route config's backends: one [`Cluster`] each, and the identity every mesh
/// endpoint must prove (for [`crate::hbone_upstream::HboneTransport`]).
pub fn clusters(
    c: &l7::RouteConfig,
    seed: Option<u64>,
) -> Result<(Vec<Cluster>, HashMap<SocketAddr, SpiffeId>), ConfigError> {
    let mut identities = HashMap::new();
    let mut out = Vec::with_capacity(c.backends.len());
    for b in &c.backends {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid {
            rule: b.name.clone(),
            field,
            reason,
        };
        let mut endpoints = Vec::with_capacity(b.endpoints.len());
        for e in &b.endpoints {
            let ip = ip_of(&e.address).ok_or_else(|| {
                invalid("endpoints.address", format!("{} bytes", e.address.len()))
            })?;
            let port =
                u16::try_from(e.port).map_err(|_| invalid("endpoints.port", e.port.to_string()))?;
            let addr = SocketAddr::new(ip, port);
            if !e.identity.is_empty() {
                let id = e
                    .identity
                    .parse::<SpiffeId>()
                    .map_err(|err| invalid("endpoints.identity", err.to_string()))?;
                identities.insert(addr, id);
            }
            endpoints.push(addr);
        }
        let lb = match &b.load_balancer {
            None => LoadBalancer::RoundRobin,
            Some(lb) => {
                use l7::load_balancer::{Hash, Simple};
                match &lb.hash {
                    Some(Hash::HttpHeaderName(h)) => LoadBalancer::ConsistentHash(HashKey::Header(
                        HeaderName::try_from(h.as_str()).map_err(|e| {
                            invalid("load_balancer.http_header_name", e.to_string())
                        })?,
                    )),
                    Some(Hash::HttpCookie(c)) => {
                        LoadBalancer::ConsistentHash(HashKey::Cookie(c.clone()))
                    }
                    Some(Hash::UseSourceIp(true)) => {
                        LoadBalancer::ConsistentHash(HashKey::SourceIp)
                    }
                    _ => match Simple::try_from(lb.simple) {
                        Ok(Simple::LeastRequest) => LoadBalancer::LeastRequest,
                        Ok(Simple::Random) => LoadBalancer::Random,
                        _ => LoadBalancer::RoundRobin,
                    },
                }
            }
        };
        let limit = |n: u32| (n > 0).then_some(n as usize);
        let pool = b
            .pool
            .as_ref()
            .map_or(PoolLimits::default(), |p| PoolLimits {
                max_connections: limit(p.max_connections),
                http1_max_pending_requests: limit(p.http1_max_pending_requests),
                http2_max_requests: limit(p.http2_max_requests),
                max_requests_per_connection: limit(p.max_requests_per_connection),
                max_retries: limit(p.max_retries),
            });
        let outlier = b.outlier_detection.as_ref().map(|o| OutlierDetection {
            consecutive_5xx: (o.consecutive_5xx_errors > 0).then_some(o.consecutive_5xx_errors),
            consecutive_gateway_errors: (o.consecutive_gateway_errors > 0)
                .then_some(o.consecutive_gateway_errors),
            base_ejection_time: Duration::from_millis(o.base_ejection_time_ms),
            max_ejection_percent: o.max_ejection_percent.min(100),
            min_health_percent: o.min_health_percent.min(100),
            interval: match o.interval_ms {
                0 => OutlierDetection::default().interval,
                ms => Duration::from_millis(ms),
            },
        });
        let retry_budget = b.retry_budget.as_ref().map(|r| RetryBudget {
            percent: if r.percent.is_finite() {
                r.percent.clamp(0.0, 100.0)
            } else {
                0.0
            },
            min_concurrency: r.min_retry_concurrency as usize,
        });
        out.push(Cluster::new(
            b.name.clone(),
            endpoints,
            TrafficPolicy {
                lb,
                pool,
                outlier,
                retry_budget,
                connect_timeout: (b.connect_timeout_ms > 0)
                    .then(|| Duration::from_millis(b.connect_timeout_ms)),
            },
            seed,
        ));
    }
    Ok((out, identities))
}

/// The policies of a route config; an unknown condition key refuses the config.
fn policies(ps: &[l7::Policy]) -> Result<Policies, ConfigError> {
    let values = |v: &[String], n: &[String]| Values::parse(v, n);
    let mut out = Vec::with_capacity(ps.len());
    for p in ps {
        let effect = match l7::policy::Action::try_from(p.action) {
            Ok(l7::policy::Action::Allow) => Effect::Allow,
            Ok(l7::policy::Action::Deny) => Effect::Deny,
            Err(_) => {
                return Err(ConfigError::Invalid {
                    rule: p.name.clone(),
                    field: "policy.action",
                    reason: format!("unknown action {}", p.action),
                });
            }
        };
        let rules = p
            .rules
            .iter()
            .map(|r| {
                Ok(PolicyRule {
                    from: r
                        .from
                        .iter()
                        .map(|s| Source {
                            principals: values(&s.principals, &s.not_principals),
                            namespaces: values(&s.namespaces, &s.not_namespaces),
                            request_principals: values(
                                &s.request_principals,
                                &s.not_request_principals,
                            ),
                        })
                        .collect(),
                    to: r
                        .to
                        .iter()
                        .map(|o| Operation {
                            hosts: values(&o.hosts, &o.not_hosts),
                            ports: values(&o.ports, &o.not_ports),
                            methods: values(&o.methods, &o.not_methods),
                            paths: values(&o.paths, &o.not_paths),
                        })
                        .collect(),
                    when: r
                        .when
                        .iter()
                        .map(|c| {
                            Ok(Condition {
                                attribute: Attribute::parse(&c.key).map_err(|e| {
                                    ConfigError::Invalid {
                                        rule: p.name.clone(),
                                        field: "policy.when",
                                        reason: e.to_string(),
                                    }
                                })?,
                                values: values(&c.values, &c.not_values),
                            })
                        })
                        .collect::<Result<_, ConfigError>>()?,
                })
            })
            .collect::<Result<_, ConfigError>>()?;
        out.push(Policy {
            name: p.name.clone(),
            effect,
            rules,
        });
    }
    Ok(Policies { policies: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward_rule(name: &str) -> l7::Rule {
        l7::Rule {
            name: name.into(),
            action: Some(l7::rule::Action::Forward(l7::Forward {
                backends: vec![l7::WeightedBackend {
                    hostname: "reviews.bookinfo.svc.cluster.local".into(),
                    subset: "v1".into(),
                    port: 9080,
                    weight: 100,
                    ..Default::default()
                }],
            })),
            ..Default::default()
        }
    }

    #[test]
    fn bad_rules_refuse_the_whole_config_with_the_rule_named() {
        let mut bad_regex = forward_rule("bookinfo/reviews/0");
        bad_regex.matches.push(l7::Match {
            uri: Some(l7::StringMatch {
                kind: Some(l7::string_match::Kind::Regex("(".into())),
            }),
            ..Default::default()
        });
        let mut bad_status = forward_rule("bookinfo/reviews/1");
        bad_status.action = Some(l7::rule::Action::DirectResponse(l7::DirectResponse {
            status: 42,
            body: vec![],
        }));
        let mut bad_header = forward_rule("bookinfo/reviews/2");
        bad_header.request_headers = Some(l7::HeaderOps {
            remove: vec!["bad header".into()],
            ..Default::default()
        });
        let mut bad_retry = forward_rule("bookinfo/reviews/4");
        bad_retry.retry = Some(l7::Retry {
            attempts: 2,
            retry_on: vec!["5xx".into(), "when-it-rains".into()],
            ..Default::default()
        });
        let mut bad_percent = forward_rule("bookinfo/reviews/3");
        bad_percent.fault = Some(l7::Fault {
            abort: Some(l7::Abort {
                http_status: 503,
                percent: 150.0,
                grpc_status: 0,
            }),
            delay: None,
        });
        let mut bad_grpc = forward_rule("bookinfo/reviews/5");
        bad_grpc.fault = Some(l7::Fault {
            abort: Some(l7::Abort {
                http_status: 0,
                percent: 50.0,
                grpc_status: 99,
            }),
            delay: None,
        });
        let redirect = |r: l7::Redirect| {
            let mut rule = forward_rule("bookinfo/reviews/6");
            rule.action = Some(l7::rule::Action::Redirect(r));
            rule
        };
        let bad_scheme = redirect(l7::Redirect {
            scheme: "ht tp".into(),
            ..Default::default()
        });
        let bad_port = redirect(l7::Redirect {
            port: 70000,
            ..Default::default()
        });
        let bad_path = redirect(l7::Redirect {
            uri: "login".into(),
            ..Default::default()
        });
        let mut bad_rewrite = forward_rule("bookinfo/reviews/7");
        bad_rewrite.rewrite = Some(l7::Rewrite {
            regex: "([".into(),
            ..Default::default()
        });
        for (rule, want) in [
            (bad_rewrite, "invalid regex"),
            (bad_scheme, "redirect.scheme"),
            (bad_port, "70000 is not a TCP port"),
            (bad_path, "\"login\" is not a path"),
            (bad_regex, "invalid regex"),
            (bad_status, "42 is not an HTTP status"),
            (bad_header, "bad header"),
            (bad_percent, "150 is not a percentage"),
            (bad_retry, "when-it-rains"),
            (bad_grpc, "99 is not a gRPC status code"),
        ] {
            let name = rule.name.clone();
            let config = l7::RouteConfig {
                rules: vec![forward_rule("ok"), rule],
                ..Default::default()
            };
            let e = RouteTable::try_from(&config).expect_err("refused");
            assert!(
                e.to_string().contains(&name) && e.to_string().contains(want),
                "{e}"
            );
        }
        let good = l7::RouteConfig {
            rules: vec![forward_rule("ok")],
            ..Default::default()
        };
        let table = RouteTable::try_from(&good).expect("accepted");
        let Action::Forward(b) = &table.rules[0].action else {
            panic!("forward")
        };
        assert_eq!(b[0].backend, "reviews.bookinfo.svc.cluster.local|v1|9080");
    }

    #[test]
    fn matches_redirects_and_rewrites_convert() {
        let mut rule = forward_rule("bookinfo/reviews/0");
        rule.matches.push(l7::Match {
            uri: Some(l7::StringMatch {
                kind: Some(l7::string_match::Kind::PathPrefix("/api/".into())),
            }),
            ignore_uri_case: true,
            scheme: Some(l7::StringMatch {
                kind: Some(l7::string_match::Kind::Exact("http".into())),
            }),
            ..Default::default()
        });
        rule.action = Some(l7::rule::Action::Redirect(l7::Redirect {
            authority: "web:8080".into(),
            uri: "/v2".into(),
            status: 308,
            scheme: "HTTPS".into(),
            port: 8443,
            replace_prefix: true,
        }));
        rule.rewrite = Some(l7::Rewrite {
            uri: "/x".into(),
            authority: String::new(),
            full_path: true,
            regex: "^/a/(.*)$".into(),
            substitution: "/b/\\1".into(),
        });
        let config = l7::RouteConfig {
            rules: vec![rule],
            ..Default::default()
        };
        let table = RouteTable::try_from(&config).expect("accepted");
        let r = &table.rules[0];
        assert!(matches!(&r.matches[0].path, Some(StringMatch::PathPrefix(p)) if p == "/api"));
        assert!(r.matches[0].ignore_path_case);
        assert!(r.matches[0].scheme.is_some());
        let Action::Redirect(redirect) = &r.action else {
            panic!("redirect")
        };
        assert_eq!(
            redirect,
            &Redirect {
                scheme: Some("https".into()),
                authority: Some(http::uri::Authority::from_static("web:8080")),
                port: Some(8443),
                path: Some(PathRedirect::MatchedPrefix("/v2".into())),
                status: StatusCode::PERMANENT_REDIRECT,
            }
        );
        let rewrite = r.rewrite.as_ref().expect("rewrite");
        assert!(rewrite.full_path);
        assert_eq!(
            rewrite.regex.as_ref().map(|x| x.apply("/a/c")),
            Some("/b/c".to_string())
        );
    }

    #[test]
    fn policies_convert_and_an_unknown_condition_key_refuses_the_config() {
        let policy = |key: &str| l7::Policy {
            name: "bookinfo/p".into(),
            action: l7::policy::Action::Deny as i32,
            rules: vec![l7::PolicyRule {
                from: vec![l7::PolicySource {
                    not_namespaces: vec!["bookinfo".into()],
                    ..Default::default()
                }],
                when: vec![l7::PolicyCondition {
                    key: key.into(),
                    values: vec!["yes".into()],
                    not_values: vec![],
                }],
                ..Default::default()
            }],
        };
        let config = |p| l7::RouteConfig {
            rules: vec![forward_rule("ok")],
            policies: vec![p],
            ..Default::default()
        };
        let table =
            RouteTable::try_from(&config(policy("request.headers[x-canary]"))).expect("accepted");
        let p = &table.policies.policies[0];
        assert_eq!((p.name.as_str(), p.effect), ("bookinfo/p", Effect::Deny));
        assert_eq!(p.rules[0].from[0].namespaces.none_of.len(), 1);
        let e = RouteTable::try_from(&config(policy("source.ip"))).expect_err("refused");
        assert!(
            e.to_string().contains("bookinfo/p") && e.to_string().contains("source.ip"),
            "{e}"
        );
    }

    #[test]
    fn backends_become_clusters_with_mesh_identities() {
        let config = l7::RouteConfig {
            backends: vec![l7::Backend {
                name: "reviews.bookinfo.svc.cluster.local|v1|9080".into(),
                endpoints: vec![
                    l7::Endpoint {
                        address: vec![10, 244, 1, 12],
                        port: 9080,
                        identity: "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews".into(),
                    },
                    l7::Endpoint {
                        address: vec![10, 244, 9, 9],
                        port: 9080,
                        identity: String::new(),
                    },
                ],
                load_balancer: Some(l7::LoadBalancer {
                    simple: l7::load_balancer::Simple::Random as i32,
                    hash: None,
                }),
                retry_budget: Some(l7::RetryBudget {
                    percent: 25.0,
                    min_retry_concurrency: 3,
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (built, ids) = clusters(&config, Some(1)).expect("accepted");
        assert_eq!(built.len(), 1);
        assert_eq!(
            built[0].policy().retry_budget,
            Some(RetryBudget {
                percent: 25.0,
                min_concurrency: 3
            })
        );
        let mut unbudgeted = config.clone();
        unbudgeted.backends[0].retry_budget = None;
        let (built, _) = clusters(&unbudgeted, Some(1)).expect("accepted");
        assert_eq!(
            built[0].policy().retry_budget,
            None,
            "no budget: Istio's default"
        );
        assert_eq!(ids.len(), 1, "only the mesh endpoint gets HBONE");
        assert!(ids.contains_key(&"10.244.1.12:9080".parse().expect("addr")));
        let mut bad = config.clone();
        bad.backends[0].endpoints[0].address = vec![1, 2, 3];
        let e = clusters(&bad, None).err().expect("refused");
        assert!(e.to_string().contains("3 bytes"), "{e}");
    }
}
