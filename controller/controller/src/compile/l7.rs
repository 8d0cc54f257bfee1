//! VirtualService -> `cairn.l7.v1.RouteConfig`, one per service port a waypoint serves.
//!
//! Hosts resolve like Istio's: a short name (`reviews`) is the service of that name in
//! the VirtualService's namespace, a FQDN (`reviews.bookinfo.svc.cluster.local`) names
//! it directly. Only VirtualServices bound to the mesh (no `gateways`, or `mesh`
//! among them) apply. What is not compiled yet (per-destination headers, source
//! matches) is reported as a notice, never silently dropped.
//!
//! Retries follow Istio: a route without `retries` gets Istio's default policy (2
//! retries on connect-failure, refused-stream, unavailable, cancelled and 503);
//! `attempts: 0` turns retries off; `retryOn` names Envoy conditions, and a number
//! in it is a retriable status code.

use std::collections::BTreeMap;

use cairn_api::proto::cairn::l7::v1 as l7;

use super::{
    MeshConfig, Notice, l7_backend, l7_policy,
    waypoint::{For, resolve_name},
};
use crate::{
    resources::{Kind, Object, istio},
    store::Store,
    validate::parse_duration,
};

/// Resource name: `<namespace>/<hostname>:<port>`.
pub fn resource_name(namespace: &str, hostname: &str, port: u32) -> String {
    format!("{namespace}/{hostname}:{port}")
}

/// The service a VirtualService host names, as (namespace, name), if it exists.
fn resolve_host(
    store: &Store,
    mesh: &MeshConfig,
    vs_namespace: &str,
    host: &str,
) -> Option<(String, String)> {
    let suffix = format!(".svc.{}", mesh.domain_suffix);
    let (name, namespace) = match host.strip_suffix(&suffix) {
        Some(rest) => {
            let (name, ns) = rest.split_once('.')?;
            (name.to_owned(), ns.to_owned())
        }
        None if !host.contains('.') => (host.to_owned(), vs_namespace.to_owned()),
        None => return None,
    };
    store.service(&namespace, &name)?;
    Some((namespace, name))
}

fn string_match(m: &istio::StringMatch) -> Option<l7::StringMatch> {
    use l7::string_match::Kind as K;
    let kind = if let Some(v) = &m.exact {
        K::Exact(v.clone())
    } else if let Some(v) = &m.prefix {
        K::Prefix(v.clone())
    } else {
        K::Regex(m.regex.clone()?)
    };
    Some(l7::StringMatch { kind: Some(kind) })
}

fn header_ops(ops: Option<&istio::HeaderOperations>) -> Option<l7::HeaderOps> {
    let ops = ops?;
    Some(l7::HeaderOps {
        set: ops.set.clone(),
        add: ops.add.clone(),
        remove: ops.remove.clone(),
    })
}

/// Percent of requests a fault applies to: Istio's default is all of them.
fn percent(p: &Option<istio::Percent>) -> f64 {
    p.as_ref().map_or(100.0, |p| p.value)
}

/// Istio's retry policy for a route that names none.
const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";
const DEFAULT_RETRIES: u32 = 2;
const DEFAULT_RETRIABLE_STATUS: u32 = 503;

/// Condition names the waypoint knows (`crate::retry::RetryOn` there).
const RETRY_CONDITIONS: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",
    "retriable-4xx",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// A redirect scheme's well-known port: 443 for https, else 80 (the only schemes
/// both APIs redirect to).
pub(crate) fn scheme_port(scheme: &str) -> u32 {
    if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    }
}

/// A duration field in milliseconds; absent or unparsable (already reported by
/// validation): 0.
pub(crate) fn millis(s: &Option<String>) -> u64 {
    s.as_deref()
        .and_then(|d| parse_duration(d).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

struct Context<'a> {
    store: &'a Store,
    mesh: &'a MeshConfig,
    vs_namespace: &'a str,
    vs_name: &'a str,
    notices: &'a mut Vec<Notice>,
}

impl Context<'_> {
    fn notice(&mut self, message: String) {
        self.notices.push(Notice {
            kind: Some(crate::resources::Kind::VirtualService),
            policy: format!("{}/{}", self.vs_namespace, self.vs_name),
            message,
        });
    }

    /// Addresses of the mesh's pods carrying every one of `labels` (`sourceLabels`).
    fn pods_labelled(&self, labels: &BTreeMap<String, String>) -> Vec<Vec<u8>> {
        self.store
            .pods()
            .filter(|p| super::workload::enrolled(self.store, p))
            .filter(|p| {
                let own = p.metadata.labels.as_ref();
                labels
                    .iter()
                    .all(|(k, v)| own.and_then(|l| l.get(k)) == Some(v))
            })
            .flat_map(|p| super::workload::pod_ips(p))
            .map(super::ip_bytes)
            .collect()
    }

    /// A route or mirror destination: its host resolved to the service's FQDN, the
    /// route's port unless it names one.
    fn backend(&self, d: &istio::Destination, port: u32) -> l7::WeightedBackend {
        let hostname = resolve_host(self.store, self.mesh, self.vs_namespace, &d.host)
            .map(|(ns, name)| self.mesh.service_hostname(&ns, &name))
            .unwrap_or_else(|| d.host.clone());
        l7::WeightedBackend {
            hostname,
            subset: d.subset.clone().unwrap_or_default(),
            port: d.port.as_ref().map_or(port, |p| p.number),
            weight: 0,
            ..Default::default()
        }
    }

    /// `mirror` (with `mirrorPercentage`) and `mirrors`; Istio's default percentage
    /// is all requests.
    fn mirrors(&self, route: &istio::HttpRoute, port: u32) -> Vec<l7::Mirror> {
        let single = route.mirror.iter().map(|d| l7::Mirror {
            backend: Some(self.backend(d, port)),
            percent: percent(&route.mirror_percentage),
        });
        let many = route.mirrors.iter().map(|m| l7::Mirror {
            backend: Some(self.backend(&m.destination, port)),
            percent: percent(&m.percentage),
        });
        single.chain(many).collect()
    }

    /// `retries` of a route (`None` when off); unknown conditions are reported and
    /// left out.
    fn retry(&mut self, label: &str, retries: Option<&istio::HttpRetry>) -> Option<l7::Retry> {
        let (attempts, per_try, retry_on) = match retries {
            None => return Some(default_retry()),
            Some(r) if r.attempts <= 0 => return None,
            Some(r) => (
                r.attempts as u32,
                millis(&r.per_try_timeout),
                r.retry_on.as_deref().unwrap_or(DEFAULT_RETRY_ON),
            ),
        };
        let mut out = l7::Retry {
            attempts,
            per_try_timeout_ms: per_try,
            ..Default::default()
        };
        for item in retry_on.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Ok(code) = item.parse::<u32>() {
                if !(100..=599).contains(&code) {
                    self.notice(format!(
                        "http route {label}: retryOn {item}: not an HTTP status; ignored"
                    ));
                    continue;
                }
                out.retriable_status_codes.push(code);
                item_once(&mut out.retry_on, "retriable-status-codes");
            } else if RETRY_CONDITIONS.contains(&item) {
                item_once(&mut out.retry_on, item);
            } else {
                self.notice(format!(
                    "http route {label}: retryOn {item}: unknown condition; ignored"
                ));
            }
        }
        if retries.is_some_and(|r| r.retry_on.is_none()) {
            out.retriable_status_codes.push(DEFAULT_RETRIABLE_STATUS);
        }
        Some(out)
    }

    /// The compiled rule for one service port; `None` when every match of the route
    /// names another port (a match's `port` selects the service port it applies to).
    fn rule(&mut self, index: usize, route: &istio::HttpRoute, port: u32) -> Option<l7::Rule> {
        let label = route.name.clone().unwrap_or_else(|| index.to_string());
        let on_port = |m: &&istio::HttpMatchRequest| m.port.is_none_or(|p| p == port);
        if !route.matches.is_empty() && !route.matches.iter().any(|m| on_port(&m)) {
            return None;
        }
        let matches = route
            .matches
            .iter()
            .filter(on_port)
            .map(|m| {
                let mut headers: Vec<l7::HeaderMatch> = m
                    .headers
                    .iter()
                    .map(|(name, v)| l7::HeaderMatch {
                        name: name.to_ascii_lowercase(),
                        rule: Some(match string_match(v) {
                            Some(s) => l7::header_match::Rule::Value(s),
                            None => l7::header_match::Rule::Present(true),
                        }),
                    })
                    .collect();
                headers.extend(m.without_headers.keys().map(|name| l7::HeaderMatch {
                    name: name.to_ascii_lowercase(),
                    rule: Some(l7::header_match::Rule::Absent(true)),
                }));
                l7::Match {
                    uri: m.uri.as_ref().and_then(string_match),
                    ignore_uri_case: m.ignore_uri_case,
                    scheme: m.scheme.as_ref().and_then(string_match),
                    method: m.method.as_ref().and_then(string_match),
                    authority: m.authority.as_ref().and_then(string_match),
                    headers,
                    query_params: m
                        .query_params
                        .iter()
                        .filter_map(|(k, v)| {
                            Some(l7::QueryMatch {
                                name: k.clone(),
                                value: Some(string_match(v)?),
                            })
                        })
                        .collect(),
                    source_namespace: m.source_namespace.clone().unwrap_or_default(),
                    source_addresses: (!m.source_labels.is_empty()).then(|| l7::SourceAddresses {
                        addresses: self.pods_labelled(&m.source_labels),
                    }),
                }
            })
            .collect();
        let action = if let Some(r) = &route.direct_response {
            let body = r
                .body
                .as_ref()
                .and_then(|b| b.string.clone())
                .unwrap_or_default();
            l7::rule::Action::DirectResponse(l7::DirectResponse {
                status: r.status,
                body: body.into_bytes(),
            })
        } else if let Some(r) = &route.redirect {
            l7::rule::Action::Redirect(l7::Redirect {
                authority: r.authority.clone().unwrap_or_default(),
                uri: r.uri.clone().unwrap_or_default(),
                status: r.redirect_code.unwrap_or(301),
                scheme: r.scheme.clone().unwrap_or_default(),
                port: r.port.unwrap_or(match r.derive_port {
                    // The scheme's own port, which the waypoint leaves out of the
                    // Location (mesh requests are http unless the redirect says).
                    Some(istio::DerivePort::FromProtocolDefault) => {
                        scheme_port(r.scheme.as_deref().unwrap_or("http"))
                    }
                    _ => 0,
                }),
                replace_prefix: false,
            })
        } else {
            let n = route.route.len();
            let mut backends: Vec<l7::WeightedBackend> = route
                .route
                .iter()
                .map(|d| {
                    let mut b = self.backend(&d.destination, port);
                    let h = d.headers.as_ref();
                    b.request_headers = header_ops(h.and_then(|h| h.request.as_ref()));
                    b.response_headers = header_ops(h.and_then(|h| h.response.as_ref()));
                    b.weight = d
                        .weight
                        .map_or(if n == 1 { 100 } else { 0 }, |w| w.max(0) as u32);
                    b
                })
                .collect();
            // No weights given for several destinations: an even split.
            if n > 1
                && backends.iter().all(|b| b.weight == 0)
                && route.route.iter().all(|d| d.weight.is_none())
            {
                backends.iter_mut().for_each(|b| b.weight = 1);
            }
            l7::rule::Action::Forward(l7::Forward { backends })
        };
        let fault = route.fault.as_ref().map(|f| l7::Fault {
            delay: f.delay.as_ref().map(|d| l7::Delay {
                fixed_delay_ms: millis(&d.fixed_delay),
                percent: percent(&d.percentage),
            }),
            abort: f.abort.as_ref().and_then(|a| {
                let grpc_status = match a.grpc_status.as_deref().map(grpc_code) {
                    None => 0,
                    Some(Some(code)) => code,
                    Some(None) => {
                        self.notice(format!(
                            "http route {label}: abort grpcStatus {:?} is not a gRPC status; ignored",
                            a.grpc_status.as_deref().unwrap_or_default()
                        ));
                        return None;
                    }
                };
                Some(l7::Abort {
                    http_status: a.http_status.unwrap_or(0),
                    percent: percent(&a.percentage),
                    grpc_status,
                })
            }),
        });
        Some(l7::Rule {
            name: format!("{}/{}/{label}", self.vs_namespace, self.vs_name),
            matches,
            action: Some(action),
            fault,
            timeout_ms: millis(&route.timeout),
            retry: self.retry(&label, route.retries.as_ref()),
            rewrite: route.rewrite.as_ref().map(|r| {
                let (regex, substitution) = r
                    .uri_regex_rewrite
                    .as_ref()
                    .map(|x| (x.match_.clone(), x.rewrite.clone()))
                    .unwrap_or_default();
                l7::Rewrite {
                    uri: r.uri.clone().unwrap_or_default(),
                    authority: r.authority.clone().unwrap_or_default(),
                    full_path: false,
                    regex,
                    substitution,
                }
            }),
            mirrors: self.mirrors(route, port),
            request_headers: header_ops(route.headers.as_ref().and_then(|h| h.request.as_ref())),
            response_headers: header_ops(route.headers.as_ref().and_then(|h| h.response.as_ref())),
            cors: route.cors_policy.as_ref().map(cors),
        })
    }
}

/// Istio's translation of `corsPolicy` for Envoy: `allowOrigins`, else the deprecated
/// `allowOrigin` as exact origins; lists comma-joined; `maxAge` in whole seconds.
fn cors(c: &istio::CorsPolicy) -> l7::CorsPolicy {
    let allow_origins = if c.allow_origins.is_empty() {
        c.allow_origin
            .iter()
            .map(|o| l7::StringMatch {
                kind: Some(l7::string_match::Kind::Exact(o.clone())),
            })
            .collect()
    } else {
        c.allow_origins.iter().filter_map(string_match).collect()
    };
    l7::CorsPolicy {
        allow_origins,
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        max_age: c
            .max_age
            .as_deref()
            .and_then(|d| parse_duration(d).ok())
            .map(|d| d.as_secs().to_string())
            .unwrap_or_default(),
        allow_credentials: c.allow_credentials.unwrap_or(false),
        ignore_unmatched_preflights: c.unmatched_preflights
            == Some(istio::UnmatchedPreflights::Ignore),
    }
}

/// A gRPC status code from its name (`UNAVAILABLE`) or number (`14`); 1..=16.
fn grpc_code(s: &str) -> Option<u32> {
    const NAMES: [&str; 16] = [
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    match s.parse::<u32>() {
        Ok(n) => (1..=16).contains(&n).then_some(n),
        Err(_) => NAMES.iter().position(|n| *n == s).map(|i| i as u32 + 1),
    }
}

fn item_once(list: &mut Vec<String>, item: &str) {
    if !list.iter().any(|i| i == item) {
        list.push(item.to_owned());
    }
}

/// Every service port's routes; VirtualServices in name order, the first one naming a
/// host owns its routes (as Istio merges them: later ones for the same host are
/// reported and ignored).
pub fn route_configs(
    store: &Store,
    mesh: &MeshConfig,
) -> (BTreeMap<String, l7::RouteConfig>, Vec<Notice>) {
    let mut out = BTreeMap::new();
    let mut notices = Vec::new();
    for obj in store.of_kind(Kind::VirtualService) {
        let Object::VirtualService(vs) = obj else {
            continue;
        };
        let vs_namespace = vs.metadata.namespace.as_deref().unwrap_or_default();
        let vs_name = vs.metadata.name.as_deref().unwrap_or_default();
        let for_mesh = vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh");
        if !for_mesh {
            continue;
        }
        let mut cx = Context {
            store,
            mesh,
            vs_namespace,
            vs_name,
            notices: &mut notices,
        };
        for host in &vs.spec.hosts {
            let Some((ns, name)) = resolve_host(store, mesh, vs_namespace, host) else {
                cx.notice(format!("host {host}: no such service in the mesh; ignored"));
                continue;
            };
            let Some(svc) = store.service(&ns, &name) else {
                continue;
            };
            let hostname = mesh.service_hostname(&ns, &name);
            let ports: Vec<u32> = svc
                .spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .map(|ps| ps.iter().map(|p| p.port as u32).collect())
                .unwrap_or_default();
            for port in ports {
                let key = resource_name(&ns, &hostname, port);
                if out.contains_key(&key) {
                    cx.notice(format!("host {host} port {port}: routes already defined by an earlier VirtualService; ignored"));
                    continue;
                }
                let rules = vs
                    .spec
                    .http
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| cx.rule(i, r, port))
                    .collect();
                out.insert(
                    key,
                    l7::RouteConfig {
                        namespace: ns.clone(),
                        hostname: hostname.clone(),
                        port,
                        rules,
                        ..Default::default()
                    },
                );
            }
        }
    }
    super::l7_httproute::merge(store, mesh, &mut out, &mut notices);
    // Every service port a waypoint serves gets a config, routes or not: the
    // waypoint must know the service to serve it (default route, policies).
    let bound: Vec<&istio::AuthorizationPolicy> = store
        .authorization_policies()
        .map(|p| p.as_ref())
        .filter(|p| p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty())
        .collect();
    let compiled: Vec<(&istio::AuthorizationPolicy, Option<l7::Policy>)> = bound
        .iter()
        .map(|p| (*p, l7_policy::compile(p, &mut notices)))
        .collect();
    let request_authns: Vec<(&istio::RequestAuthentication, Vec<l7::JwtRule>)> = store
        .of_kind(Kind::RequestAuthentication)
        .filter_map(|o| match o {
            Object::RequestAuthentication(ra)
                if ra.spec.target_ref.is_some() || !ra.spec.target_refs.is_empty() =>
            {
                Some(ra.as_ref())
            }
            _ => None,
        })
        .map(|ra| (ra, l7_policy::jwt_rules(ra, &mut notices)))
        .collect();
    for obj in store.of_kind(Kind::Service) {
        let Object::Service(svc) = obj else { continue };
        let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let waypoint = resolve_name(store, ns, svc.metadata.labels.as_ref(), For::Service);
        let hostname = mesh.service_hostname(ns, name);
        let ports = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .map(|p| p.port as u32);
        for port in ports {
            let key = resource_name(ns, &hostname, port);
            if waypoint.is_some() && !out.contains_key(&key) {
                out.insert(key.clone(), default_config(ns, name, &hostname, port));
            }
            let Some(config) = out.get_mut(&key) else {
                continue;
            };
            config.waypoint = waypoint
                .as_ref()
                .map(|(ns, name)| format!("{ns}/{name}"))
                .unwrap_or_default();
            let wp = waypoint.as_ref().map(|(a, b)| (a.as_str(), b.as_str()));
            config.policies = compiled
                .iter()
                .filter(|(p, _)| {
                    let p_ns = p.metadata.namespace.as_deref().unwrap_or_default();
                    let refs = p.spec.target_ref.iter().chain(&p.spec.target_refs);
                    l7_policy::covers(p_ns, refs, ns, name, wp)
                })
                .filter_map(|(_, c)| c.clone())
                .collect();
            config.jwt_rules = request_authns
                .iter()
                .filter(|(ra, _)| {
                    let ra_ns = ra.metadata.namespace.as_deref().unwrap_or_default();
                    let refs = ra.spec.target_ref.iter().chain(&ra.spec.target_refs);
                    l7_policy::covers(ra_ns, refs, ns, name, wp)
                })
                .flat_map(|(_, rules)| rules.iter().cloned())
                .collect();
        }
    }
    for config in out.values_mut() {
        config.backends = l7_backend::backends(store, mesh, config, &mut notices);
    }
    (out, notices)
}

/// A service without a VirtualService: every request to its own endpoints, with
/// Istio's default retries.
fn default_config(namespace: &str, name: &str, hostname: &str, port: u32) -> l7::RouteConfig {
    l7::RouteConfig {
        namespace: namespace.to_owned(),
        hostname: hostname.to_owned(),
        port,
        rules: vec![l7::Rule {
            name: format!("{namespace}/{name}/default"),
            action: Some(l7::rule::Action::Forward(l7::Forward {
                backends: vec![l7::WeightedBackend {
                    hostname: hostname.to_owned(),
                    subset: String::new(),
                    port,
                    weight: 100,
                    ..Default::default()
                }],
            })),
            retry: Some(default_retry()),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Istio's retry policy for routes that name none.
pub(crate) fn default_retry() -> l7::Retry {
    l7::Retry {
        attempts: DEFAULT_RETRIES,
        per_try_timeout_ms: 0,
        retry_on: DEFAULT_RETRY_ON.split(',').map(str::to_owned).collect(),
        retriable_status_codes: vec![DEFAULT_RETRIABLE_STATUS],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::LocalSource;

    fn store_of(yaml: &str) -> Store {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("x.yaml"), yaml).expect("write");
        let mut store = Store::default();
        let scan = LocalSource::new(dir.path()).scan(&mut store);
        assert!(scan.errors.is_empty(), "{:?}", scan.errors);
        store
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  clusterIP: 10.96.0.12\n  ports: [{name: http, port: 9080}]\n";

    #[test]
    fn canary_header_route_fault_and_timeout_compile() {
        let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - name: jason\n    match:\n    - headers: {end-user: {exact: jason}}\n    route:\n    - destination: {host: reviews, subset: v2}\n  - fault:\n      abort: {httpStatus: 503, percentage: {value: 50}}\n      delay: {fixedDelay: 2s}\n    timeout: 500ms\n    headers:\n      response: {set: {x-canary: \"true\"}}\n    route:\n    - destination: {host: reviews.bookinfo.svc.cluster.local, subset: v1}\n      weight: 90\n    - destination: {host: reviews, subset: v2}\n      weight: 10\n";
        let (configs, notices) =
            route_configs(&store_of(&format!("{SERVICE}{vs}")), &MeshConfig::default());
        // Without a DestinationRule the subsets have no endpoints (reported).
        assert!(
            notices
                .iter()
                .all(|n| n.message.contains("no DestinationRule defines subsets")),
            "{notices:?}"
        );
        let c = configs
            .get("bookinfo/reviews.bookinfo.svc.cluster.local:9080")
            .expect("route config");
        assert_eq!(c.rules.len(), 2);
        let jason = &c.rules[0];
        assert_eq!(jason.name, "bookinfo/reviews/jason");
        assert_eq!(jason.matches[0].headers[0].name, "end-user");
        let Some(l7::rule::Action::Forward(f)) = &jason.action else {
            panic!("forward")
        };
        assert_eq!(
            f.backends,
            vec![l7::WeightedBackend {
                hostname: "reviews.bookinfo.svc.cluster.local".into(),
                subset: "v2".into(),
                port: 9080,
                weight: 100,
                ..Default::default()
            }]
        );
        let canary = &c.rules[1];
        let Some(l7::rule::Action::Forward(f)) = &canary.action else {
            panic!("forward")
        };
        assert_eq!(
            f.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
            [90, 10]
        );
        let fault = canary.fault.as_ref().expect("fault");
        assert_eq!(
            fault.abort.as_ref().map(|a| (a.http_status, a.percent)),
            Some((503, 50.0))
        );
        assert_eq!(
            fault.delay.as_ref().map(|d| (d.fixed_delay_ms, d.percent)),
            Some((2000, 100.0))
        );
        assert_eq!(canary.timeout_ms, 500);
        assert_eq!(
            canary
                .response_headers
                .as_ref()
                .map(|h| h.set.get("x-canary").cloned()),
            Some(Some("true".into()))
        );
    }

    #[test]
    fn retries_compile_with_istios_default_and_its_opt_out() {
        let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - name: given\n    match: [{uri: {prefix: /given}}]\n    retries: {attempts: 4, perTryTimeout: 250ms, retryOn: \"gateway-error,reset,429\"}\n    route:\n    - destination: {host: reviews}\n  - name: off\n    match: [{uri: {prefix: /off}}]\n    retries: {attempts: 0}\n    route:\n    - destination: {host: reviews}\n  - name: default\n    route:\n    - destination: {host: reviews}\n";
        let (configs, notices) =
            route_configs(&store_of(&format!("{SERVICE}{vs}")), &MeshConfig::default());
        assert!(notices.is_empty(), "{notices:?}");
        let c = configs
            .get("bookinfo/reviews.bookinfo.svc.cluster.local:9080")
            .expect("route config");
        let given = c.rules[0].retry.as_ref().expect("retry");
        assert_eq!(
            (given.attempts, given.per_try_timeout_ms),
            (4, 250),
            "{given:?}"
        );
        assert_eq!(
            given.retry_on,
            ["gateway-error", "reset", "retriable-status-codes"]
        );
        assert_eq!(given.retriable_status_codes, [429]);
        assert_eq!(c.rules[1].retry, None, "attempts: 0 turns retries off");
        let default = c.rules[2].retry.as_ref().expect("Istio's default");
        assert_eq!(default.attempts, 2);
        assert_eq!(default.retry_on.join(","), DEFAULT_RETRY_ON);
        assert_eq!(default.retriable_status_codes, [503]);
    }

    const WAYPOINT: &str = "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: bookinfo\n  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: bookinfo}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: ratings, namespace: bookinfo}\nspec:\n  clusterIP: 10.96.0.13\n  ports: [{name: http, port: 9080}]\n";

    #[test]
    fn waypoint_services_get_default_routes_and_their_bound_policies() {
        let policies = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: viewers, namespace: bookinfo}\nspec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/bookinfo/sa/productpage]}}]\n    to: [{operation: {methods: [GET]}}]\n  - from: [{source: {ipBlocks: [10.0.0.0/8]}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: bookinfo}\nspec:\n  targetRefs: [{kind: Service, group: \"\", name: reviews}]\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/admin*]}}]\n    when: [{key: source.ip, values: [10.1.0.0/16]}]\n";
        let (configs, notices) = route_configs(
            &store_of(&format!("{SERVICE}{WAYPOINT}{policies}")),
            &MeshConfig::default(),
        );
        let ratings = configs
            .get("bookinfo/ratings.bookinfo.svc.cluster.local:9080")
            .expect("a default config for a service without a VirtualService");
        assert_eq!(ratings.rules.len(), 1);
        assert_eq!(ratings.rules[0].name, "bookinfo/ratings/default");
        assert_eq!(ratings.rules[0].retry.as_ref().map(|r| r.attempts), Some(2));
        let names = |c: &l7::RouteConfig| {
            c.policies
                .iter()
                .map(|p| p.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(ratings),
            ["bookinfo/viewers"],
            "bound through the waypoint"
        );
        let reviews = configs
            .get("bookinfo/reviews.bookinfo.svc.cluster.local:9080")
            .expect("reviews");
        assert_eq!(names(reviews), ["bookinfo/no-admin", "bookinfo/viewers"]);
        let viewers = &ratings.policies[0];
        assert_eq!(
            viewers.rules.len(),
            1,
            "the ipBlocks ALLOW rule is dropped (fails closed)"
        );
        let no_admin = &reviews.policies[0];
        assert_eq!(no_admin.action, l7::policy::Action::Deny as i32);
        assert!(
            no_admin.rules[0].when.is_empty(),
            "the DENY keeps its paths, loses source.ip"
        );
        assert_eq!(no_admin.rules[0].to[0].paths, ["/admin*"]);
        let text: Vec<&str> = notices.iter().map(|n| n.message.as_str()).collect();
        assert!(
            text.iter()
                .any(|m| m.contains("from.source.ipBlocks") && m.contains("allows less")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|m| m.contains("when[source.ip]") && m.contains("denies more")),
            "{text:?}"
        );
        assert_eq!(
            text.len(),
            2,
            "each policy reported once, not per service: {text:?}"
        );
    }

    #[test]
    fn mirrors_and_rewrites_compile() {
        let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - rewrite: {uri: /v2/, authority: reviews-v2}\n    mirror: {host: reviews, subset: v3}\n    mirrorPercentage: {value: 25}\n    mirrors:\n    - destination: {host: reviews, subset: v4, port: {number: 9443}}\n    route:\n    - destination: {host: reviews, subset: v1}\n";
        let (configs, notices) =
            route_configs(&store_of(&format!("{SERVICE}{vs}")), &MeshConfig::default());
        // Without a DestinationRule the subsets have no endpoints (reported).
        assert!(
            notices
                .iter()
                .all(|n| n.message.contains("no DestinationRule defines subsets")),
            "{notices:?}"
        );
        let rule = &configs["bookinfo/reviews.bookinfo.svc.cluster.local:9080"].rules[0];
        let rw = rule.rewrite.as_ref().expect("rewrite");
        assert_eq!(
            (rw.uri.as_str(), rw.authority.as_str()),
            ("/v2/", "reviews-v2")
        );
        let mirrors: Vec<(String, u32, f64)> = rule
            .mirrors
            .iter()
            .map(|m| {
                let b = m.backend.as_ref().expect("backend");
                (b.subset.clone(), b.port, m.percent)
            })
            .collect();
        assert_eq!(
            mirrors,
            [("v3".into(), 9080, 25.0), ("v4".into(), 9443, 100.0)]
        );
    }

    /// A match's `port` picks the service port it applies to; `ignoreUriCase`, `scheme`
    /// and a redirect's scheme and port reach the waypoint.
    #[test]
    fn match_ports_case_scheme_and_redirect_scheme_compile() {
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  clusterIP: 10.96.0.12\n  ports: [{name: http, port: 9080}, {name: admin, port: 9090}]\n";
        let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - name: admin-only\n    match: [{port: 9090, uri: {prefix: /Admin}, ignoreUriCase: true}]\n    redirect: {scheme: https, port: 8443, uri: /console}\n  - name: either\n    match: [{port: 9080, uri: {exact: /a}}, {port: 9090, scheme: {exact: http}}]\n    route: [{destination: {host: reviews}}]\n  - name: to-default\n    match: [{port: 9090, uri: {exact: /old}}]\n    redirect: {scheme: https, derivePort: FROM_PROTOCOL_DEFAULT}\n  - route: [{destination: {host: reviews}}]\n";
        let (configs, notices) =
            route_configs(&store_of(&format!("{svc}{vs}")), &MeshConfig::default());
        assert!(notices.is_empty(), "{notices:?}");
        let names = |port: u32| -> Vec<String> {
            configs[&format!("bookinfo/reviews.bookinfo.svc.cluster.local:{port}")]
                .rules
                .iter()
                .map(|r| r.name.clone())
                .collect()
        };
        assert_eq!(
            names(9080),
            ["bookinfo/reviews/either", "bookinfo/reviews/3"],
            "a route whose matches all name another port is not on this one"
        );
        assert_eq!(names(9090).len(), 4);
        let on_9090 = &configs["bookinfo/reviews.bookinfo.svc.cluster.local:9090"].rules;
        let admin = &on_9090[0];
        assert!(admin.matches[0].ignore_uri_case);
        match &admin.action {
            Some(l7::rule::Action::Redirect(r)) => assert_eq!(
                (r.scheme.as_str(), r.port, r.uri.as_str(), r.replace_prefix),
                ("https", 8443, "/console", false)
            ),
            other => panic!("redirect: {other:?}"),
        }
        match &on_9090[2].action {
            Some(l7::rule::Action::Redirect(r)) => assert_eq!(
                (r.scheme.as_str(), r.port),
                ("https", 443),
                "derivePort FROM_PROTOCOL_DEFAULT: the scheme's port"
            ),
            other => panic!("redirect: {other:?}"),
        }
        // Only the match for this port is kept.
        let either = &on_9090[1];
        assert_eq!(either.matches.len(), 1);
        assert!(either.matches[0].uri.is_none());
        assert!(either.matches[0].scheme.is_some());
    }

    #[test]
    fn a_regex_rewrite_compiles() {
        let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - rewrite:\n      uriRegexRewrite: {match: '^/v1/(.*)$', rewrite: '/v2/\\1'}\n    route: [{destination: {host: reviews}}]\n";
        let (configs, notices) =
            route_configs(&store_of(&format!("{SERVICE}{vs}")), &MeshConfig::default());
        assert!(notices.is_empty(), "{notices:?}");
        let rw = configs["bookinfo/reviews.bookinfo.svc.cluster.local:9080"].rules[0]
            .rewrite
            .clone()
            .expect("rewrite");
        assert_eq!(
            (rw.regex.as_str(), rw.substitution.as_str(), rw.uri.as_str()),
            ("^/v1/(.*)$", "/v2/\\1", "")
        );
    }

    #[test]
    fn what_is_not_compiled_is_reported() {
        let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews, ratings]\n  http:\n  - retries: {attempts: 3, retryOn: \"5xx,sometimes\"}\n    route:\n    - destination: {host: reviews}\n      headers: {request: {set: {x-a: b}}}\n";
        let (configs, notices) =
            route_configs(&store_of(&format!("{SERVICE}{vs}")), &MeshConfig::default());
        assert_eq!(configs.len(), 1);
        let text: Vec<&str> = notices.iter().map(|n| n.message.as_str()).collect();
        assert!(
            text.iter().all(|m| !m.contains("headers")),
            "per-destination headers compile now: {text:?}"
        );
        assert!(
            text.iter()
                .any(|m| m.contains("retryOn sometimes: unknown condition")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|m| m.contains("host ratings: no such service")),
            "{text:?}"
        );
    }

    #[test]
    fn source_matches_compile_to_the_selected_pods_addresses() {
        let pods = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: bookinfo, labels: {app: web, tier: front}}\nstatus: {phase: Running, podIP: 10.244.1.5}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: batch, namespace: bookinfo, labels: {app: batch}}\nstatus: {phase: Running, podIP: 10.244.1.6}\n";
        let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - match:\n    - sourceLabels: {app: web}\n      sourceNamespace: bookinfo\n    - sourceLabels: {app: nobody}\n    route:\n    - destination: {host: reviews}\n";
        let (configs, notices) = route_configs(
            &store_of(&format!("{SERVICE}{pods}{vs}")),
            &MeshConfig::default(),
        );
        assert!(notices.is_empty(), "{notices:?}");
        let rule = &configs["bookinfo/reviews.bookinfo.svc.cluster.local:9080"].rules[0];
        let web = &rule.matches[0];
        assert_eq!(web.source_namespace, "bookinfo");
        assert_eq!(
            web.source_addresses.as_ref().map(|s| s.addresses.clone()),
            Some(vec![vec![10, 244, 1, 5]])
        );
        assert_eq!(
            rule.matches[1]
                .source_addresses
                .as_ref()
                .map(|s| s.addresses.len()),
            Some(0),
            "labels no pod carries: set and empty (matches no client), not unset"
        );
    }

    #[test]
    fn a_grpc_abort_compiles_by_name_or_number() {
        let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - fault:\n      abort: {grpcStatus: UNAVAILABLE, percentage: {value: 50}}\n    route:\n    - destination: {host: reviews}\n";
        let (configs, notices) =
            route_configs(&store_of(&format!("{SERVICE}{vs}")), &MeshConfig::default());
        assert!(notices.is_empty(), "{notices:?}");
        let rule = &configs["bookinfo/reviews.bookinfo.svc.cluster.local:9080"].rules[0];
        let abort = rule
            .fault
            .as_ref()
            .and_then(|f| f.abort.as_ref())
            .expect("abort");
        assert_eq!((abort.grpc_status, abort.percent), (14, 50.0));
        assert_eq!(grpc_code("14"), Some(14));
        assert_eq!(grpc_code("UNAUTHENTICATED"), Some(16));
        assert_eq!(grpc_code("OK"), None, "OK is no abort");
        assert_eq!(grpc_code("17"), None);
    }

    #[test]
    fn per_destination_headers_compile_onto_their_backend() {
        let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n      weight: 90\n    - destination: {host: reviews, port: {number: 9080}}\n      weight: 10\n      headers:\n        request: {set: {x-canary: \"1\"}}\n        response: {remove: [x-internal]}\n";
        let (configs, notices) =
            route_configs(&store_of(&format!("{SERVICE}{vs}")), &MeshConfig::default());
        assert!(notices.is_empty(), "{notices:?}");
        let rule = &configs["bookinfo/reviews.bookinfo.svc.cluster.local:9080"].rules[0];
        let Some(l7::rule::Action::Forward(f)) = &rule.action else {
            panic!("forward: {rule:?}")
        };
        assert!(f.backends[0].request_headers.is_none());
        let canary = &f.backends[1];
        assert_eq!(
            canary
                .request_headers
                .as_ref()
                .and_then(|h| h.set.get("x-canary")),
            Some(&"1".to_string())
        );
        assert_eq!(
            canary.response_headers.as_ref().map(|h| h.remove.clone()),
            Some(vec!["x-internal".to_string()])
        );
    }
}
