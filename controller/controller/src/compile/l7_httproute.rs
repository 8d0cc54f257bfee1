//! Gateway API HTTPRoutes and GRPCRoutes for the mesh (GAMMA): a route whose
//! `parentRefs` name a Service (kind `Service`, core group) routes that service's
//! traffic at its waypoint. A GRPCRoute is compiled as the HTTP/2 routes it is: a
//! method match is a match on the path `/<service>/<method>`.
//!
//! Rules of every HTTPRoute attached to one service port are merged and ordered by
//! Gateway API precedence (exact path, then the longest prefix, then method, then the
//! most header and query matches; ties in route name order, where the API uses the
//! routes' age), one compiled rule per match, so the waypoint's first-match-wins
//! order is the API's.
//! A service port a VirtualService already routes keeps the VirtualService's routes
//! (reported). Differences from the API are reported as notices: `PathPrefix` matches
//! as a string prefix (`/foo` also matches `/foobar`), redirect `scheme` and
//! per-backend filters are not applied.

use std::collections::BTreeMap;

use cairn_api::proto::cairn::l7::v1 as l7;

use super::{
    MeshConfig, Notice,
    l7::{millis, resource_name},
};
use crate::{
    resources::{
        Kind, Object,
        gateway::{
            GRPCRouteSpec, GrpcRouteMatch, HttpHeaderMatch, HttpPathMatch, HttpRouteFilter,
            HttpRouteMatch, HttpRouteRule, ParentReference,
        },
    },
    store::Store,
};

/// Precedence of one match: larger sorts first.
type Precedence = (u8, usize, bool, usize, usize);

fn precedence(m: Option<&HttpRouteMatch>) -> Precedence {
    let Some(m) = m else {
        return (0, 1, false, 0, 0);
    };
    let (kind, len) = match m.path.as_ref() {
        None => (1, 1),
        Some(p) => {
            let value = p.value.as_deref().unwrap_or("/");
            match p.type_.as_deref() {
                Some("Exact") => (3, value.len()),
                Some("RegularExpression") => (2, value.len()),
                // As compiled: `/foo/` is the prefix `/foo`.
                _ => (1, value.trim_end_matches('/').len().max(1)),
            }
        }
    };
    (
        kind,
        len,
        m.method.is_some(),
        m.headers.len(),
        m.query_params.len(),
    )
}

fn exact_or_regex(type_: Option<&str>, value: &str) -> l7::StringMatch {
    use l7::string_match::Kind as K;
    let kind = match type_ {
        Some("RegularExpression") => K::Regex(value.to_owned()),
        _ => K::Exact(value.to_owned()),
    };
    l7::StringMatch { kind: Some(kind) }
}

fn header_match(h: &HttpHeaderMatch) -> l7::HeaderMatch {
    l7::HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        rule: Some(l7::header_match::Rule::Value(exact_or_regex(
            h.type_.as_deref(),
            &h.value,
        ))),
    }
}

fn compile_match(m: &HttpRouteMatch) -> l7::Match {
    use l7::string_match::Kind as K;
    let uri = m.path.as_ref().map(|p| {
        let value = p.value.clone().unwrap_or_else(|| "/".into());
        let kind = match p.type_.as_deref() {
            Some("Exact") => K::Exact(value),
            Some("RegularExpression") => K::Regex(value),
            // `/foo/` and `/foo` are the same prefix in the API.
            _ if value.len() > 1 => K::Prefix(value.trim_end_matches('/').to_owned()),
            _ => K::Prefix(value),
        };
        l7::StringMatch { kind: Some(kind) }
    });
    l7::Match {
        uri,
        method: m.method.as_ref().map(|v| l7::StringMatch {
            kind: Some(K::Exact(v.clone())),
        }),
        authority: None,
        headers: m.headers.iter().map(header_match).collect(),
        query_params: m
            .query_params
            .iter()
            .map(|q| l7::QueryMatch {
                name: q.name.clone(),
                value: Some(exact_or_regex(q.type_.as_deref(), &q.value)),
            })
            .collect(),
        source_namespace: String::new(),
        source_addresses: None,
    }
}

/// The service ports a parentRef attaches to, as `(namespace, name, port or all)`.
fn service_parent<'a>(
    route_ns: &'a str,
    p: &'a ParentReference,
) -> Option<(&'a str, &'a str, Option<u32>)> {
    let core = matches!(p.group.as_deref(), None | Some("") | Some("core"));
    (core && p.kind.as_deref() == Some("Service")).then(|| {
        (
            p.namespace.as_deref().unwrap_or(route_ns),
            p.name.as_str(),
            p.port,
        )
    })
}

struct Route<'a> {
    store: &'a Store,
    mesh: &'a MeshConfig,
    namespace: &'a str,
    name: &'a str,
    notices: &'a mut Vec<Notice>,
}

impl Route<'_> {
    fn notice(&mut self, message: String) {
        self.notices.push(Notice {
            kind: None,
            policy: format!("{}/{}", self.namespace, self.name),
            message,
        });
    }

    fn backend(
        &self,
        namespace: Option<&str>,
        name: &str,
        port: Option<u32>,
        route_port: u32,
    ) -> l7::WeightedBackend {
        let ns = namespace.unwrap_or(self.namespace);
        l7::WeightedBackend {
            hostname: self.mesh.service_hostname(ns, name),
            subset: String::new(),
            port: port.unwrap_or(route_port),
            weight: 0,
            ..Default::default()
        }
    }

    /// One compiled rule (for one of the API rule's matches, or all requests).
    fn rule(
        &mut self,
        label: &str,
        rule: &HttpRouteRule,
        m: Option<&HttpRouteMatch>,
        port: u32,
    ) -> l7::Rule {
        let mut out = l7::Rule {
            name: format!("{}/{}/{label}", self.namespace, self.name),
            matches: m.map(compile_match).into_iter().collect(),
            retry: Some(super::l7::default_retry()),
            ..Default::default()
        };
        let mut redirect = None;
        for f in &rule.filters {
            self.filter(label, f, port, &mut out, &mut redirect);
        }
        if let Some(t) = &rule.timeouts {
            out.timeout_ms = millis(&t.request);
            if let Some(retry) = out.retry.as_mut() {
                retry.per_try_timeout_ms = millis(&t.backend_request);
            }
        }
        if rule.backend_refs.iter().any(|b| !b.filters.is_empty()) {
            self.notice(format!(
                "rule {label}: per-backend filters are not applied yet by waypoints"
            ));
        }
        let action = if let Some(r) = redirect {
            l7::rule::Action::Redirect(r)
        } else if rule.backend_refs.is_empty() {
            // The API: no backend and nothing that answers -> 500.
            l7::rule::Action::DirectResponse(l7::DirectResponse {
                status: 500,
                body: Vec::new(),
            })
        } else {
            let mut backends = Vec::new();
            for b in &rule.backend_refs {
                let core = matches!(b.group.as_deref(), None | Some("") | Some("core"));
                if !core || !matches!(b.kind.as_deref(), None | Some("Service")) {
                    self.notice(format!(
                        "rule {label}: backendRef {} is not a Service; left out",
                        b.name
                    ));
                    continue;
                }
                let mut w = self.backend(b.namespace.as_deref(), &b.name, b.port, port);
                w.weight = b.weight.unwrap_or(1);
                backends.push(w);
            }
            l7::rule::Action::Forward(l7::Forward { backends })
        };
        out.action = Some(action);
        out
    }

    fn filter(
        &mut self,
        label: &str,
        f: &HttpRouteFilter,
        port: u32,
        out: &mut l7::Rule,
        redirect: &mut Option<l7::Redirect>,
    ) {
        let ops = |m: &crate::resources::gateway::HeaderModifier| l7::HeaderOps {
            set: m
                .set
                .iter()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect(),
            add: m
                .add
                .iter()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect(),
            remove: m.remove.clone(),
        };
        match f.type_.as_str() {
            "RequestHeaderModifier" => {
                out.request_headers = f.request_header_modifier.as_ref().map(ops)
            }
            "ResponseHeaderModifier" => {
                out.response_headers = f.response_header_modifier.as_ref().map(ops)
            }
            "RequestRedirect" => {
                let Some(r) = &f.request_redirect else { return };
                if r.scheme.is_some() {
                    self.notice(format!("rule {label}: redirect scheme is not applied yet"));
                }
                let authority = match (&r.hostname, r.port) {
                    (Some(h), Some(p)) => format!("{h}:{p}"),
                    (Some(h), None) => h.clone(),
                    (None, _) => String::new(),
                };
                let uri = match &r.path {
                    Some(p) if p.type_ == "ReplaceFullPath" => {
                        p.replace_full_path.clone().unwrap_or_default()
                    }
                    Some(_) => {
                        self.notice(format!(
                            "rule {label}: redirect ReplacePrefixMatch is not applied yet; the path is kept"
                        ));
                        String::new()
                    }
                    None => String::new(),
                };
                *redirect = Some(l7::Redirect {
                    authority,
                    uri,
                    // The API's default is 302 (Istio's VirtualService: 301).
                    status: r.status_code.unwrap_or(302),
                });
            }
            "URLRewrite" => {
                let Some(r) = &f.url_rewrite else { return };
                let uri = match &r.path {
                    Some(p) if p.type_ == "ReplacePrefixMatch" => {
                        p.replace_prefix_match.clone().unwrap_or_default()
                    }
                    Some(p) => {
                        let prefix_matched = out.matches.iter().any(|m| {
                            matches!(
                                m.uri.as_ref().and_then(|u| u.kind.as_ref()),
                                Some(l7::string_match::Kind::Prefix(_))
                            )
                        });
                        if prefix_matched {
                            self.notice(format!(
                                "rule {label}: ReplaceFullPath on a PathPrefix match replaces only the prefix"
                            ));
                        }
                        p.replace_full_path.clone().unwrap_or_default()
                    }
                    None => String::new(),
                };
                out.rewrite = Some(l7::Rewrite {
                    uri,
                    authority: r.hostname.clone().unwrap_or_default(),
                });
            }
            "RequestMirror" => {
                let Some(m) = &f.request_mirror else { return };
                let b = &m.backend_ref;
                out.mirrors.push(l7::Mirror {
                    backend: Some(self.backend(b.namespace.as_deref(), &b.name, b.port, port)),
                    percent: f64::from(m.percent.unwrap_or(100).min(100)),
                });
            }
            other => self.notice(format!(
                "rule {label}: filter {other} is not supported; ignored"
            )),
        }
    }
}

/// An HTTPRoute, or a GRPCRoute in HTTPRoute terms.
struct MeshRoute<'a> {
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    parents: &'a [ParentReference],
    rules: Vec<HttpRouteRule>,
}

/// A GRPCRoute's rules as HTTPRoute rules: a gRPC method is the HTTP/2 path
/// `/<service>/<method>`.
fn grpc_rules(spec: &GRPCRouteSpec) -> Vec<HttpRouteRule> {
    spec.rules
        .iter()
        .map(|r| HttpRouteRule {
            name: r.name.clone(),
            matches: r.matches.iter().map(grpc_match).collect(),
            filters: r.filters.clone(),
            backend_refs: r.backend_refs.clone(),
            timeouts: None,
        })
        .collect()
}

fn grpc_match(m: &GrpcRouteMatch) -> HttpRouteMatch {
    let path = m.method.as_ref().map(|mm| {
        let any = "[^/]+";
        let (type_, value) = match (
            mm.type_.as_deref() == Some("RegularExpression"),
            mm.service.as_deref(),
            mm.method.as_deref(),
        ) {
            (false, Some(s), Some(m)) => ("Exact", format!("/{s}/{m}")),
            (false, Some(s), None) => ("RegularExpression", format!("/{}/{any}", regex::escape(s))),
            (false, None, Some(m)) => ("RegularExpression", format!("/{any}/{}", regex::escape(m))),
            (false, None, None) => ("PathPrefix", "/".into()),
            (true, s, m) => (
                "RegularExpression",
                format!("/{}/{}", s.unwrap_or(any), m.unwrap_or(any)),
            ),
        };
        HttpPathMatch {
            type_: Some(type_.into()),
            value: Some(value),
        }
    });
    HttpRouteMatch {
        path,
        headers: m.headers.clone(),
        query_params: Vec::new(),
        method: None,
    }
}

/// The rules attached to one service port: (precedence, attachment order, rule).
struct Attached {
    namespace: String,
    hostname: String,
    port: u32,
    rules: Vec<(Precedence, usize, l7::Rule)>,
}

/// Adds the routes of every mesh HTTPRoute to `out` (keyed as
/// [`resource_name`]); service ports a VirtualService routes are left as they are.
pub fn merge(
    store: &Store,
    mesh: &MeshConfig,
    out: &mut BTreeMap<String, l7::RouteConfig>,
    notices: &mut Vec<Notice>,
) {
    // HTTPRoutes, then GRPCRoutes as the HTTP/2 routes they are, each in name order.
    let mut routes: Vec<MeshRoute> = Vec::new();
    for o in store.of_kind(Kind::HttpRoute) {
        if let Object::HttpRoute(r) = o {
            routes.push(MeshRoute {
                meta: &r.metadata,
                parents: &r.spec.parent_refs,
                rules: r.spec.rules.clone(),
            });
        }
    }
    for o in store.of_kind(Kind::GrpcRoute) {
        if let Object::GrpcRoute(r) = o {
            routes.push(MeshRoute {
                meta: &r.metadata,
                parents: &r.spec.parent_refs,
                rules: grpc_rules(&r.spec),
            });
        }
    }
    let mut attached: BTreeMap<String, Attached> = BTreeMap::new();
    let owned_by_vs: Vec<String> = out.keys().cloned().collect();
    let mut order = 0usize;
    for r in &routes {
        let namespace = r.meta.namespace.as_deref().unwrap_or_default();
        let name = r.meta.name.as_deref().unwrap_or_default();
        let mut cx = Route {
            store,
            mesh,
            namespace,
            name,
            notices,
        };
        for parent in r.parents {
            let Some((svc_ns, svc_name, port)) = service_parent(namespace, parent) else {
                continue;
            };
            let Some(svc) = cx.store.service(svc_ns, svc_name) else {
                cx.notice(format!(
                    "parentRef Service {svc_ns}/{svc_name}: no such service; ignored"
                ));
                continue;
            };
            let ports: Vec<u32> = svc
                .spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .into_iter()
                .flatten()
                .map(|p| p.port as u32)
                .filter(|p| port.is_none_or(|want| want == *p))
                .collect();
            let hostname = cx.mesh.service_hostname(svc_ns, svc_name);
            for p in ports {
                let key = resource_name(svc_ns, &hostname, p);
                if owned_by_vs.contains(&key) {
                    cx.notice(format!(
                        "{hostname}:{p} is routed by a VirtualService; this HTTPRoute is ignored there"
                    ));
                    continue;
                }
                let entry = attached.entry(key).or_insert_with(|| Attached {
                    namespace: svc_ns.to_owned(),
                    hostname: hostname.clone(),
                    port: p,
                    rules: Vec::new(),
                });
                for (i, rule) in r.rules.iter().enumerate() {
                    let label = rule.name.clone().unwrap_or_else(|| i.to_string());
                    if rule.matches.is_empty() {
                        order += 1;
                        entry
                            .rules
                            .push((precedence(None), order, cx.rule(&label, rule, None, p)));
                    }
                    for (j, m) in rule.matches.iter().enumerate() {
                        let label = if rule.matches.len() > 1 {
                            format!("{label}.{j}")
                        } else {
                            label.clone()
                        };
                        order += 1;
                        entry.rules.push((
                            precedence(Some(m)),
                            order,
                            cx.rule(&label, rule, Some(m), p),
                        ));
                    }
                }
            }
        }
    }
    for (key, mut a) in attached {
        a.rules.sort_by(|x, y| y.0.cmp(&x.0).then(x.1.cmp(&y.1)));
        out.insert(
            key,
            l7::RouteConfig {
                namespace: a.namespace,
                hostname: a.hostname,
                port: a.port,
                rules: a.rules.into_iter().map(|(_, _, r)| r).collect(),
                ..Default::default()
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::LocalSource;

    const MANIFESTS: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  clusterIP: 10.96.0.12\n  ports: [{name: http, port: 9080}, {name: grpc, port: 9090}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: to-gateway, namespace: bookinfo}\nspec:\n  parentRefs: [{name: ingress}]\n  rules: [{backendRefs: [{name: reviews, port: 9080}]}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  parentRefs: [{kind: Service, name: reviews}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /old/}}]\n    filters:\n    - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}\n    - {type: RequestMirror, requestMirror: {backendRef: {name: reviews, port: 9080}, percent: 5}}\n    backendRefs: [{name: reviews, port: 9080}]\n    timeouts: {request: 2s, backendRequest: 500ms}\n  - matches: [{path: {type: PathPrefix, value: /moved}}]\n    filters: [{type: RequestRedirect, requestRedirect: {hostname: ratings, port: 9080}}]\n  - matches: [{method: DELETE}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews, port: {number: 9090}}}]\n";

    fn compiled() -> (BTreeMap<String, l7::RouteConfig>, Vec<Notice>) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("x.yaml"), MANIFESTS).expect("write");
        let mut store = Store::default();
        let scan = LocalSource::new(dir.path()).scan(&mut store);
        assert!(scan.errors.is_empty(), "{:?}", scan.errors);
        super::super::l7::route_configs(&store, &MeshConfig::default())
    }

    #[test]
    fn service_parents_get_routes_filters_and_timeouts_and_a_virtual_service_wins() {
        let (configs, notices) = compiled();
        // The VirtualService routes both ports; the HTTPRoute is reported, not merged.
        let vs = &configs["bookinfo/reviews.bookinfo.svc.cluster.local:9090"];
        assert_eq!(vs.rules.len(), 1);
        assert!(
            notices
                .iter()
                .any(|n| n.policy == "bookinfo/reviews" && n.message.contains("VirtualService")),
            "{notices:?}"
        );
        assert!(
            notices.iter().all(|n| n.policy != "bookinfo/to-gateway"),
            "a route for a Gateway parent is not the mesh's: silently not ours"
        );
    }

    #[test]
    fn rules_compile_to_waypoint_rules() {
        // The same route without the VirtualService.
        let text = MANIFESTS
            .split("---\napiVersion: networking.istio.io/v1")
            .next()
            .expect("split");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("x.yaml"), text).expect("write");
        let mut store = Store::default();
        LocalSource::new(dir.path()).scan(&mut store);
        let (configs, notices) = super::super::l7::route_configs(&store, &MeshConfig::default());
        assert!(notices.is_empty(), "{notices:?}");
        let c = &configs["bookinfo/reviews.bookinfo.svc.cluster.local:9080"];
        let names: Vec<&str> = c.rules.iter().map(|r| r.name.as_str()).collect();
        // Longest prefix first (`/moved` over `/old`); the method-only match last.
        assert_eq!(
            names,
            [
                "bookinfo/reviews/1",
                "bookinfo/reviews/0",
                "bookinfo/reviews/2"
            ]
        );
        let old = &c.rules[1];
        assert_eq!(
            old.matches[0].uri.as_ref().and_then(|u| u.kind.clone()),
            Some(l7::string_match::Kind::Prefix("/old".into()))
        );
        assert_eq!(old.rewrite.as_ref().map(|r| r.uri.as_str()), Some("/new"));
        assert_eq!(old.mirrors[0].percent, 5.0);
        assert_eq!(old.timeout_ms, 2000);
        assert_eq!(old.retry.as_ref().map(|r| r.per_try_timeout_ms), Some(500));
        match &c.rules[0].action {
            Some(l7::rule::Action::Redirect(r)) => {
                assert_eq!((r.authority.as_str(), r.status), ("ratings:9080", 302))
            }
            other => panic!("redirect: {other:?}"),
        }
        match &c.rules[2].action {
            Some(l7::rule::Action::DirectResponse(r)) => assert_eq!(r.status, 500),
            other => panic!("no backend answers 500: {other:?}"),
        }
        assert!(
            configs.contains_key("bookinfo/reviews.bookinfo.svc.cluster.local:9090"),
            "a parentRef without a port attaches to every port"
        );
    }
}
