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
//! (reported). A backendRef's own filters may edit headers (applied only to requests
//! sent to that backend and their responses); others are reported and ignored.

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
            GRPCRouteSpec, GrpcRouteMatch, HeaderModifier, HttpHeaderMatch, HttpPathMatch,
            HttpRouteFilter, HttpRouteMatch, HttpRouteRule, ParentReference, PathModifier,
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
            // By whole segments; `/foo/` and `/foo` are the same prefix in the API.
            _ => K::PathPrefix(value),
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
        ..Default::default()
    }
}

fn header_ops(m: &HeaderModifier) -> l7::HeaderOps {
    let pairs = |hs: &[crate::resources::gateway::HttpHeader]| {
        hs.iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect()
    };
    l7::HeaderOps {
        set: pairs(&m.set),
        add: pairs(&m.add),
        remove: m.remove.clone(),
    }
}

/// A redirect's or rewrite's path as (the new path, whether it replaces only the
/// matched prefix). An empty `ReplacePrefixMatch` drops the prefix, which the
/// waypoint's segment rules spell `/` (an empty path there means "unchanged").
fn path_modifier(p: Option<&PathModifier>) -> (String, bool) {
    match p {
        Some(p) if p.type_ == "ReplacePrefixMatch" => {
            let new = p.replace_prefix_match.as_deref().unwrap_or_default();
            (if new.is_empty() { "/" } else { new }.to_owned(), true)
        }
        Some(p) => (p.replace_full_path.clone().unwrap_or_default(), false),
        None => (String::new(), false),
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
                for f in &b.filters {
                    match f.type_.as_str() {
                        "RequestHeaderModifier" => {
                            w.request_headers = f.request_header_modifier.as_ref().map(header_ops)
                        }
                        "ResponseHeaderModifier" => {
                            w.response_headers = f.response_header_modifier.as_ref().map(header_ops)
                        }
                        other => self.notice(format!(
                            "rule {label}: backendRef {} filter {other} is not supported; ignored",
                            b.name
                        )),
                    }
                }
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
        match f.type_.as_str() {
            "RequestHeaderModifier" => {
                out.request_headers = f.request_header_modifier.as_ref().map(header_ops)
            }
            "ResponseHeaderModifier" => {
                out.response_headers = f.response_header_modifier.as_ref().map(header_ops)
            }
            "RequestRedirect" => {
                let Some(r) = &f.request_redirect else { return };
                let (uri, replace_prefix) = path_modifier(r.path.as_ref());
                let scheme = r.scheme.clone().unwrap_or_default();
                *redirect = Some(l7::Redirect {
                    authority: r.hostname.clone().unwrap_or_default(),
                    uri,
                    // The API's default is 302 (Istio's VirtualService: 301).
                    status: r.status_code.unwrap_or(302),
                    // The API: without a port, a new scheme's well-known port, else
                    // the listener's (for the mesh: the service port); the waypoint
                    // leaves default ports out of the Location.
                    port: r.port.unwrap_or(if scheme.is_empty() {
                        port
                    } else {
                        super::l7::scheme_port(&scheme)
                    }),
                    scheme,
                    replace_prefix,
                });
            }
            "URLRewrite" => {
                let Some(r) = &f.url_rewrite else { return };
                let (uri, replace_prefix) = path_modifier(r.path.as_ref());
                out.rewrite = Some(l7::Rewrite {
                    uri,
                    authority: r.hostname.clone().unwrap_or_default(),
                    full_path: !replace_prefix,
                    ..Default::default()
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
            "CORS" => out.cors = f.cors.as_ref().map(cors),
            other => self.notice(format!(
                "rule {label}: filter {other} is not supported; ignored"
            )),
        }
    }
}

/// The `CORS` filter as the waypoint's CORS policy: origins with `*` become anchored
/// regexes (`*` matching any labels to its left), `*` alone every origin; `maxAge`
/// defaults to the API's 5 s; a preflight from another origin is answered without
/// CORS headers rather than forwarded.
fn cors(c: &crate::resources::gateway::HttpCorsFilter) -> l7::CorsPolicy {
    use l7::string_match::Kind;
    let origin = |o: &String| l7::StringMatch {
        kind: Some(match o.as_str() {
            "*" => Kind::Exact("*".into()),
            o if o.contains('*') => Kind::Regex(
                o.split('*')
                    .map(regex::escape)
                    .collect::<Vec<_>>()
                    .join(".*"),
            ),
            o => Kind::Exact(o.to_owned()),
        }),
    };
    l7::CorsPolicy {
        allow_origins: c.allow_origins.iter().map(origin).collect(),
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        max_age: c.max_age.unwrap_or(5).to_string(),
        allow_credentials: c.allow_credentials.unwrap_or(false),
        ignore_unmatched_preflights: true,
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

    /// The route configs (and notices) compiled from `text`, which must load cleanly.
    fn compiled(text: &str) -> (BTreeMap<String, l7::RouteConfig>, Vec<Notice>) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("x.yaml"), text).expect("write");
        let mut store = Store::default();
        let scan = LocalSource::new(dir.path()).scan(&mut store);
        assert!(scan.errors.is_empty(), "{:?}", scan.errors);
        super::super::l7::route_configs(&store, &MeshConfig::default())
    }

    #[test]
    fn service_parents_get_routes_filters_and_timeouts_and_a_virtual_service_wins() {
        let (configs, notices) = compiled(MANIFESTS);
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
        let (configs, notices) = compiled(text);
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
            Some(l7::string_match::Kind::PathPrefix("/old/".into())),
            "a PathPrefix matches by segments"
        );
        let rewrite = old.rewrite.as_ref().expect("rewrite");
        assert_eq!((rewrite.uri.as_str(), rewrite.full_path), ("/new", false));
        assert_eq!(old.mirrors[0].percent, 5.0);
        assert_eq!(old.timeout_ms, 2000);
        assert_eq!(old.retry.as_ref().map(|r| r.per_try_timeout_ms), Some(500));
        match &c.rules[0].action {
            Some(l7::rule::Action::Redirect(r)) => {
                assert_eq!(
                    (r.authority.as_str(), r.port, r.status),
                    ("ratings", 9080, 302)
                )
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

    #[test]
    fn a_backend_refs_header_filters_apply_to_that_backend_only() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.20\n  ports: [{name: http, port: 8080}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web-v2, namespace: shop}\nspec:\n  clusterIP: 10.96.0.21\n  ports: [{name: http, port: 8080}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: shop}\nspec:\n  parentRefs: [{kind: Service, name: web}]\n  rules:\n  - backendRefs:\n    - {name: web, port: 8080, weight: 90}\n    - name: web-v2\n      port: 8080\n      weight: 10\n      filters:\n      - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-canary, value: 'true'}]}}\n      - {type: ResponseHeaderModifier, responseHeaderModifier: {remove: [server]}}\n      - {type: RequestMirror, requestMirror: {backendRef: {name: web, port: 8080}}}\n";
        let (configs, notices) = compiled(text);
        let Some(l7::rule::Action::Forward(f)) =
            &configs["shop/web.shop.svc.cluster.local:8080"].rules[0].action
        else {
            panic!("forward")
        };
        assert!(f.backends[0].request_headers.is_none());
        let canary = &f.backends[1];
        assert_eq!(
            canary.request_headers.as_ref().map(|h| h.set.clone()),
            Some([("x-canary".to_string(), "true".to_string())].into())
        );
        assert_eq!(
            canary.response_headers.as_ref().map(|h| h.remove.clone()),
            Some(vec!["server".to_string()])
        );
        assert!(
            notices
                .iter()
                .any(|n| n.message.contains("backendRef web-v2 filter RequestMirror")),
            "{notices:?}"
        );
    }

    /// Redirect scheme, port and path modifiers as the API defines them.
    #[test]
    fn redirects_and_rewrites_carry_scheme_port_and_path_modifiers() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.20\n  ports: [{name: http, port: 8080}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: shop}\nspec:\n  parentRefs: [{kind: Service, name: web}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /secure}}]\n    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, path: {type: ReplacePrefixMatch, replacePrefixMatch: ''}}}]\n  - matches: [{path: {type: PathPrefix, value: /a}}]\n    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /b}}}]\n  - matches: [{path: {type: Exact, value: /c}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /d}}}]\n    backendRefs: [{name: web, port: 8080}]\n";
        let (configs, notices) = compiled(text);
        assert!(notices.is_empty(), "{notices:?}");
        let c = &configs["shop/web.shop.svc.cluster.local:8080"];
        let redirect = |i: usize| match &c.rules[i].action {
            Some(l7::rule::Action::Redirect(r)) => r.clone(),
            other => panic!("rule {i}: {other:?}"),
        };
        let secure = redirect(1);
        assert_eq!(
            (secure.scheme.as_str(), secure.port, secure.uri.as_str()),
            ("https", 443, "/"),
            "a new scheme's well-known port; an empty prefix replacement is /"
        );
        assert!(secure.replace_prefix);
        let full = redirect(2);
        assert_eq!(
            (
                full.scheme.as_str(),
                full.port,
                full.uri.as_str(),
                full.replace_prefix
            ),
            ("", 8080, "/b", false),
            "no scheme: the listener's (service's) port"
        );
        let rewrite = c.rules[0].rewrite.as_ref().expect("rewrite");
        assert_eq!((rewrite.uri.as_str(), rewrite.full_path), ("/d", true));
    }
}
