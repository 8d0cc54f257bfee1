//! The backends a RouteConfig's rules name -> `cairn.l7.v1.Backend`: the service's
//! ready endpoints (narrowed to a DestinationRule subset's labels), each with the
//! identity it proves when it is in the mesh, and the DestinationRule traffic policy
//! (the subset's policy overriding the rule's, field group by field group, and
//! port-level settings overriding both for their port, as Istio merges them).

use std::collections::{BTreeMap, BTreeSet};

use cairn_api::proto::cairn::l7::v1 as l7;

use super::{MeshConfig, Notice, ip_bytes, l7::millis, selector_matches, workload};
use crate::{resources::istio, store::Store};

/// `name.namespace.svc.<suffix>` -> (namespace, name).
fn service_of<'a>(mesh: &MeshConfig, hostname: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = hostname.strip_suffix(&format!(".svc.{}", mesh.domain_suffix))?;
    let (name, ns) = rest.split_once('.')?;
    Some((ns, name))
}

/// The DestinationRule for a service: the first (name order) in its namespace, then
/// in the root namespace, whose host names it.
fn destination_rule<'a>(
    store: &'a Store,
    mesh: &'a MeshConfig,
    ns: &'a str,
    name: &str,
) -> Option<&'a istio::DestinationRule> {
    let fqdn = mesh.service_hostname(ns, name);
    let names_it = |dr: &istio::DestinationRule| {
        let dr_ns = dr.metadata.namespace.as_deref().unwrap_or_default();
        dr.spec.host == fqdn || (dr.spec.host == name && dr_ns == ns)
    };
    store
        .destination_rules_in(ns)
        .chain(store.destination_rules_in(&mesh.root_namespace))
        .map(|d| d.as_ref())
        .find(|d| names_it(d))
}

/// A policy's `portLevelSettings` for `port` replace its load balancer, connection
/// pool and outlier detection (all three; one left out falls back to the defaults).
fn at_port(mut p: istio::TrafficPolicy, port: u32) -> istio::TrafficPolicy {
    let own = p
        .port_level_settings
        .iter()
        .find(|s| s.port.as_ref().map(|x| x.number) == Some(port))
        .cloned();
    if let Some(s) = own {
        p.load_balancer = s.load_balancer;
        p.connection_pool = s.connection_pool;
        p.outlier_detection = s.outlier_detection;
    }
    p
}

/// Istio's merge for a service port: the top-level policy with its port-level
/// settings for the port, then the subset's policy replacing it per field group,
/// then the subset's port-level settings for the port.
fn merged(
    top: Option<&istio::TrafficPolicy>,
    subset: Option<&istio::TrafficPolicy>,
    port: u32,
) -> istio::TrafficPolicy {
    let top = at_port(top.cloned().unwrap_or_default(), port);
    let Some(sub) = subset else { return top };
    at_port(
        istio::TrafficPolicy {
            load_balancer: sub.load_balancer.clone().or(top.load_balancer),
            connection_pool: sub.connection_pool.clone().or(top.connection_pool),
            outlier_detection: sub.outlier_detection.clone().or(top.outlier_detection),
            retry_budget: sub.retry_budget.clone().or(top.retry_budget),
            port_level_settings: sub.port_level_settings.clone(),
        },
        port,
    )
}

fn policy(p: &istio::TrafficPolicy, backend: &mut l7::Backend) {
    if let Some(lb) = &p.load_balancer {
        use l7::load_balancer::{Hash, Simple};
        let simple = match lb.simple {
            Some(istio::SimpleLb::LeastRequest | istio::SimpleLb::LeastConn) => {
                Simple::LeastRequest
            }
            Some(istio::SimpleLb::Random) => Simple::Random,
            _ => Simple::RoundRobin,
        };
        let hash = lb.consistent_hash.as_ref().and_then(|h| {
            if let Some(name) = &h.http_header_name {
                Some(Hash::HttpHeaderName(name.to_ascii_lowercase()))
            } else if let Some(c) = &h.http_cookie {
                Some(Hash::HttpCookie(c.name.clone()))
            } else {
                h.use_source_ip.filter(|u| *u).map(Hash::UseSourceIp)
            }
        });
        backend.load_balancer = Some(l7::LoadBalancer {
            simple: simple as i32,
            hash,
        });
    }
    if let Some(pool) = &p.connection_pool {
        let n = |v: Option<i32>| v.map_or(0, |v| v.max(0) as u32);
        backend.pool = Some(l7::PoolLimits {
            max_connections: n(pool.tcp.as_ref().and_then(|t| t.max_connections)),
            http1_max_pending_requests: n(pool
                .http
                .as_ref()
                .and_then(|h| h.http1_max_pending_requests)),
            http2_max_requests: n(pool.http.as_ref().and_then(|h| h.http2_max_requests)),
            max_requests_per_connection: n(pool
                .http
                .as_ref()
                .and_then(|h| h.max_requests_per_connection)),
            max_retries: n(pool.http.as_ref().and_then(|h| h.max_retries)),
        });
        backend.connect_timeout_ms = pool.tcp.as_ref().map_or(0, |t| millis(&t.connect_timeout));
    }
    if let Some(b) = &p.retry_budget {
        // Istio's defaults for the fields left out.
        backend.retry_budget = Some(l7::RetryBudget {
            percent: b.percent.unwrap_or(20.0).clamp(0.0, 100.0),
            min_retry_concurrency: b.min_retry_concurrency.unwrap_or(3),
        });
    }
    if let Some(od) = &p.outlier_detection {
        // Istio's defaults for the fields left out.
        backend.outlier_detection = Some(l7::OutlierDetection {
            consecutive_5xx_errors: od.consecutive5xx_errors.unwrap_or(5),
            consecutive_gateway_errors: od.consecutive_gateway_errors.unwrap_or(0),
            base_ejection_time_ms: match millis(&od.base_ejection_time) {
                0 => 30_000,
                ms => ms,
            },
            max_ejection_percent: od
                .max_ejection_percent
                .map_or(10, |p| p.clamp(0, 100) as u32),
            min_health_percent: od.min_health_percent.map_or(0, |p| p.clamp(0, 100) as u32),
            interval_ms: match millis(&od.interval) {
                0 => 10_000,
                ms => ms,
            },
        });
    }
}

/// The backends `config`'s rules and mirrors name.
pub fn backends(
    store: &Store,
    mesh: &MeshConfig,
    config: &l7::RouteConfig,
    notices: &mut Vec<Notice>,
) -> Vec<l7::Backend> {
    // The service itself, always: opaque (non-HTTP) connections go to its endpoints.
    let mut wanted: BTreeSet<(String, String, u32)> =
        BTreeSet::from([(config.hostname.clone(), String::new(), config.port)]);
    for rule in &config.rules {
        if let Some(l7::rule::Action::Forward(f)) = &rule.action {
            wanted.extend(
                f.backends
                    .iter()
                    .map(|b| (b.hostname.clone(), b.subset.clone(), b.port)),
            );
        }
        wanted.extend(
            rule.mirrors
                .iter()
                .filter_map(|m| m.backend.as_ref())
                .map(|b| (b.hostname.clone(), b.subset.clone(), b.port)),
        );
    }
    let mut out = Vec::new();
    for (hostname, subset, port) in wanted {
        let mut backend = l7::Backend {
            name: format!("{hostname}|{subset}|{port}"),
            ..Default::default()
        };
        let Some((ns, name)) = service_of(mesh, &hostname) else {
            out.push(backend);
            continue;
        };
        let Some(svc) = store.service(ns, name) else {
            out.push(backend);
            continue;
        };
        let dr = destination_rule(store, mesh, ns, name);
        let subset_def = match (subset.as_str(), dr) {
            ("", _) => None,
            (s, Some(dr)) => match dr.spec.subsets.iter().find(|x| x.name == s) {
                Some(def) => Some(def),
                None => {
                    notices.push(Notice {
                        kind: None,
                        policy: config_name(config),
                        message: format!("subset {s} of {hostname} is not defined by DestinationRule {}; it has no endpoints", dr.metadata.name.as_deref().unwrap_or_default()),
                    });
                    out.push(backend);
                    continue;
                }
            },
            (s, None) => {
                notices.push(Notice {
                    kind: None,
                    policy: config_name(config),
                    message: format!("subset {s} of {hostname}: no DestinationRule defines subsets for it; it has no endpoints"),
                });
                out.push(backend);
                continue;
            }
        };
        policy(
            &merged(
                dr.and_then(|d| d.spec.traffic_policy.as_ref()),
                subset_def.and_then(|s| s.traffic_policy.as_ref()),
                port,
            ),
            &mut backend,
        );
        let spec = svc.spec.as_ref();
        let Some(selector) = spec
            .and_then(|s| s.selector.as_ref())
            .filter(|s| !s.is_empty())
        else {
            out.push(backend);
            continue;
        };
        let svc_port = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .find(|p| p.port as u32 == port);
        let empty = BTreeMap::new();
        for pod in store.pods_in(ns) {
            let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
            if !selector_matches(selector, labels)
                || subset_def.is_some_and(|s| !selector_matches(&s.labels, labels))
                || !workload::ready(pod)
            {
                continue;
            }
            let target = match svc_port {
                Some(p) => workload::target_port(pod, p.target_port.as_ref(), p.port),
                None => port,
            };
            if target == 0 {
                continue;
            }
            let identity = if workload::enrolled(store, pod) {
                let sa = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.as_deref())
                    .unwrap_or("default");
                format!("spiffe://{}/ns/{ns}/sa/{sa}", mesh.trust_domain)
            } else {
                String::new()
            };
            for ip in workload::pod_ips(pod) {
                backend.endpoints.push(l7::Endpoint {
                    address: ip_bytes(ip),
                    port: target,
                    identity: identity.clone(),
                });
            }
        }
        out.push(backend);
    }
    out
}

fn config_name(c: &l7::RouteConfig) -> String {
    format!("{}/{}:{}", c.namespace, c.hostname, c.port)
}
