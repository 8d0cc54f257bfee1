use std::collections::BTreeMap;

use cairn_api::proto::istio::{security as sec, workload as wl};
use prost::Message;

use super::*;
use crate::{decode::decode_documents, resources::Object};

const BOOKINFO: &str = include_str!("../../tests/fixtures/bookinfo.yaml");
const POLICIES: &str = include_str!("../../tests/fixtures/policies.yaml");

fn objects(yaml: &str) -> Vec<Object> {
    decode_documents(yaml)
        .into_iter()
        .map(|r| r.expect("fixture document is valid").object)
        .collect()
}

fn store_of(docs: &[&str]) -> Store {
    let mut store = Store::default();
    for d in docs {
        for o in objects(d) {
            store.apply(o);
        }
    }
    store
}

fn workload<'a>(c: &'a Compiled, ns: &str, pod: &str) -> Option<&'a wl::Workload> {
    match &c
        .addresses
        .get(&format!("Kubernetes//Pod/{ns}/{pod}"))?
        .r#type
    {
        Some(wl::address::Type::Workload(w)) => Some(w),
        _ => None,
    }
}

fn service<'a>(c: &'a Compiled, key: &str) -> Option<&'a wl::Service> {
    match &c.addresses.get(key)?.r#type {
        Some(wl::address::Type::Service(s)) => Some(s),
        _ => None,
    }
}

fn exact(s: &str) -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Exact(s.into())),
    }
}

fn presence() -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Presence(())),
    }
}

const REVIEWS_V1: &str = "reviews-v1-545db77b95-klmno";

#[test]
fn bookinfo_compiles_to_the_exact_workloads_and_services() {
    let c = compile(&store_of(&[BOOKINFO]), &MeshConfig::default());
    let workloads = c
        .addresses
        .values()
        .filter(|a| matches!(a.r#type, Some(wl::address::Type::Workload(_))))
        .count();
    assert_eq!(workloads, 5);
    assert_eq!(c.addresses.len(), 9, "5 workloads + 4 services");

    let w = workload(&c, "bookinfo", REVIEWS_V1).expect("reviews-v1 workload");
    let want = wl::Workload {
        uid: format!("Kubernetes//Pod/bookinfo/{REVIEWS_V1}"),
        name: REVIEWS_V1.into(),
        namespace: "bookinfo".into(),
        addresses: vec![vec![10, 244, 1, 12]],
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        trust_domain: "cluster.local".into(),
        service_account: "bookinfo-reviews".into(),
        node: "node-a".into(),
        canonical_name: "reviews".into(),
        canonical_revision: "v1".into(),
        workload_type: wl::WorkloadType::Deployment as i32,
        workload_name: "reviews-v1".into(),
        services: BTreeMap::from([(
            "bookinfo/reviews.bookinfo.svc.cluster.local".into(),
            wl::PortList {
                // targetPort "http" resolved against the container's named port.
                ports: vec![wl::Port {
                    service_port: 9080,
                    target_port: 9080,
                    app_protocol: wl::AppProtocol::Http11 as i32,
                }],
            },
        )]),
        status: wl::WorkloadStatus::Healthy as i32,
        cluster_id: "Kubernetes".into(),
        locality: Some(wl::Locality {
            region: "eu-west".into(),
            zone: "eu-west-1a".into(),
            subzone: String::new(),
        }),
        ..Default::default()
    };
    assert_eq!(w, &want);

    let s = service(&c, "bookinfo/reviews.bookinfo.svc.cluster.local").expect("reviews service");
    assert_eq!(
        s,
        &wl::Service {
            name: "reviews".into(),
            namespace: "bookinfo".into(),
            hostname: "reviews.bookinfo.svc.cluster.local".into(),
            addresses: vec![wl::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 12],
                length: None,
            }],
            ports: vec![wl::Port {
                service_port: 9080,
                target_port: 0,
                app_protocol: wl::AppProtocol::Http11 as i32,
            }],
            ..Default::default()
        }
    );
    // Every workload round-trips through the validated model.
    for a in c.addresses.values() {
        cairn_api::model::Address::try_from(a.clone()).expect("valid for proxies");
    }
}

fn set_namespace_label(store: &mut Store, value: Option<&str>) {
    let yaml = match value {
        Some(v) => format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bookinfo\n  labels:\n    istio.io/dataplane-mode: {v}\n"
        ),
        None => "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bookinfo\n".into(),
    };
    for o in objects(&yaml) {
        store.apply(o);
    }
}

#[test]
fn namespace_label_flip_adds_and_removes_workloads() {
    let mut store = store_of(&[BOOKINFO]);
    let mut compiler = Compiler::new(MeshConfig::default());
    let initial = compiler.full(&store);
    assert_eq!(
        initial.updated.len(),
        9 + 1,
        "addresses + static strict policy"
    );

    let ns_ref = ObjectRef {
        kind: Kind::Namespace,
        namespace: String::new(),
        name: "bookinfo".into(),
    };
    set_namespace_label(&mut store, None);
    let delta = compiler.changed(&store, std::slice::from_ref(&ns_ref));
    let removed: Vec<_> = delta.removed.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(removed.len(), 5, "{removed:?}");
    assert!(
        removed
            .iter()
            .all(|n| n.starts_with("Kubernetes//Pod/bookinfo/"))
    );
    assert!(compile(&store, compiler.mesh()).addresses.len() == 4);

    set_namespace_label(&mut store, Some("ambient"));
    let delta = compiler.changed(&store, &[ns_ref]);
    let added = delta
        .updated
        .iter()
        .filter(|e| e.name.starts_with("Kubernetes//Pod/"))
        .count();
    assert_eq!(added, 5);
    assert!(delta.removed.is_empty());
}

#[test]
fn pod_opt_out_and_pod_without_ip() {
    let opt_out = BOOKINFO.replacen(
        "    app: ratings\n    version: v1\n",
        "    app: ratings\n    version: v1\n    istio.io/dataplane-mode: none\n",
        1,
    );
    let c = compile(&store_of(&[&opt_out]), &MeshConfig::default());
    assert!(workload(&c, "bookinfo", "ratings-v1-7dc98c7588-uvwxy").is_none());
    assert!(workload(&c, "bookinfo", REVIEWS_V1).is_some());
    // The service stays: clients outside the mesh still resolve it.
    assert!(service(&c, "bookinfo/ratings.bookinfo.svc.cluster.local").is_some());

    let no_ip = BOOKINFO.replacen("  podIP: 10.244.1.12\n", "", 1);
    let c = compile(&store_of(&[&no_ip]), &MeshConfig::default());
    assert!(workload(&c, "bookinfo", REVIEWS_V1).is_none());
}

#[test]
fn authorization_policies_convert_like_istio() {
    let c = compile(&store_of(&[BOOKINFO, POLICIES]), &MeshConfig::default());
    let authz = |k: &str| {
        c.authorizations
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing"))
    };

    // `spec: {}`: namespace-wide ALLOW with no rules, i.e. allow nothing.
    let a = authz("bookinfo/allow-nothing");
    assert_eq!(a.scope, sec::Scope::Namespace as i32);
    assert_eq!(a.action, sec::Action::Allow as i32);
    assert!(a.rules.is_empty());

    assert_eq!(
        authz("bookinfo/reviews-viewer"),
        &sec::Authorization {
            name: "reviews-viewer".into(),
            namespace: "bookinfo".into(),
            scope: sec::Scope::WorkloadSelector as i32,
            action: sec::Action::Allow as i32,
            rules: vec![sec::Rule {
                clauses: vec![
                    sec::Clause {
                        matches: vec![sec::Match {
                            principals: vec![exact(
                                "cluster.local/ns/bookinfo/sa/bookinfo-productpage"
                            )],
                            ..Default::default()
                        }],
                    },
                    sec::Clause {
                        matches: vec![sec::Match {
                            destination_ports: vec![9080],
                            ..Default::default()
                        }],
                    },
                ],
            }],
            ..Default::default()
        }
    );

    // ALLOW with an L7 rule: that rule is dropped (fails closed), the L4 one stays.
    let a = authz("bookinfo/details-get");
    assert_eq!(a.rules.len(), 1);
    assert_eq!(
        a.rules[0].clauses[0].matches[0].principals,
        vec![exact("cluster.local/ns/monitoring/sa/prometheus")]
    );
    // DENY with L7 parts: only the L4 source clause remains, so it denies more.
    let a = authz("bookinfo/ratings-deny-post");
    assert_eq!(a.action, sec::Action::Deny as i32);
    assert_eq!(a.rules.len(), 1);
    assert_eq!(
        a.rules[0].clauses.len(),
        1,
        "operation clause had only L7 fields"
    );
    assert_eq!(
        a.rules[0].clauses[0].matches[0].not_namespaces,
        vec![exact("bookinfo")]
    );
    // Both are reported, naming the policy.
    let noticed: Vec<&str> = c.notices.iter().map(|n| n.policy.as_str()).collect();
    assert!(noticed.contains(&"bookinfo/details-get"), "{noticed:?}");
    assert!(
        noticed.contains(&"bookinfo/ratings-deny-post"),
        "{noticed:?}"
    );

    // Root namespace without selector: mesh-wide; ipBlocks and when conditions.
    let a = authz("istio-system/deny-bad-network");
    assert_eq!(a.scope, sec::Scope::Global as i32);
    let from = &a.rules[0].clauses[0].matches[0];
    assert_eq!(
        from.source_ips,
        vec![sec::Address {
            address: vec![203, 0, 113, 0],
            length: 24
        }]
    );
    assert_eq!(
        from.not_source_ips,
        vec![sec::Address {
            address: vec![203, 0, 113, 7],
            length: 32
        }]
    );
    let when = &a.rules[1].clauses;
    assert_eq!(
        when.len(),
        2,
        "values and notValues are separate AND-ed clauses"
    );
    assert_eq!(when[0].matches[0].destination_ports, vec![6379]);
    assert_eq!(when[1].matches[0].not_destination_ports, vec![6380]);

    // Selector policies are listed on the workloads they select, and only there.
    let reviews = workload(&c, "bookinfo", REVIEWS_V1).expect("reviews");
    assert!(
        reviews
            .authorization_policies
            .contains(&"bookinfo/reviews-viewer".to_string())
    );
    assert!(
        !reviews
            .authorization_policies
            .contains(&"bookinfo/details-get".to_string())
    );
}

#[test]
fn peer_authentication_strict_and_port_exceptions() {
    let c = compile(&store_of(&[BOOKINFO, POLICIES]), &MeshConfig::default());
    let strict = c
        .authorizations
        .get("istio-system/istio_converted_static_strict")
        .expect("static strict policy");
    assert_eq!(strict.action, sec::Action::Deny as i32);
    assert_eq!(
        strict.rules[0].clauses[0].matches[0].not_principals,
        vec![presence()]
    );

    // Mesh STRICT applies to reviews through the static policy.
    let reviews = workload(&c, "bookinfo", REVIEWS_V1).expect("reviews");
    assert!(
        reviews
            .authorization_policies
            .contains(&"istio-system/istio_converted_static_strict".to_string())
    );
    // ratings has a port exception: its own converted policy instead.
    let ratings = workload(&c, "bookinfo", "ratings-v1-7dc98c7588-uvwxy").expect("ratings");
    assert!(
        ratings
            .authorization_policies
            .contains(&"bookinfo/converted_peer_authentication_ratings-metrics".to_string())
    );
    assert!(
        !ratings
            .authorization_policies
            .contains(&"istio-system/istio_converted_static_strict".to_string())
    );
    let conv = c
        .authorizations
        .get("bookinfo/converted_peer_authentication_ratings-metrics")
        .expect("converted policy");
    assert_eq!(conv.action, sec::Action::Deny as i32);
    let clauses = &conv.rules[0].clauses;
    assert_eq!(clauses[0].matches[0].not_principals, vec![presence()]);
    assert_eq!(clauses[1].matches[0].not_destination_ports, vec![15090]);

    // Without the mesh-wide STRICT, nobody lists the static policy.
    let permissive = POLICIES.replacen("    mode: STRICT\n", "    mode: PERMISSIVE\n", 1);
    let c = compile(&store_of(&[BOOKINFO, &permissive]), &MeshConfig::default());
    let reviews = workload(&c, "bookinfo", REVIEWS_V1).expect("reviews");
    assert!(
        !reviews
            .authorization_policies
            .iter()
            .any(|p| p.contains("static_strict"))
    );
}

const WAYPOINT: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: bookinfo
  labels:
    istio.io/waypoint-for: FOR
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
";

#[test]
fn use_waypoint_label_precedence() {
    let labelled_ns = BOOKINFO.replacen(
        "    istio.io/dataplane-mode: ambient\n",
        "    istio.io/dataplane-mode: ambient\n    istio.io/use-waypoint: waypoint\n",
        1,
    );
    let hostname = |ns: &str| wl::GatewayAddress {
        destination: Some(wl::gateway_address::Destination::Hostname(
            wl::NamespacedHostname {
                namespace: ns.into(),
                hostname: "waypoint.bookinfo.svc.cluster.local".into(),
            },
        )),
        hbone_mtls_port: 15008,
    };
    // Default waypoint-for (service): services get it, workloads do not.
    let c = compile(
        &store_of(&[&labelled_ns, &WAYPOINT.replace("FOR", "service")]),
        &MeshConfig::default(),
    );
    let svc = service(&c, "bookinfo/reviews.bookinfo.svc.cluster.local").expect("svc");
    assert_eq!(svc.waypoint, Some(hostname("bookinfo")));
    assert_eq!(
        workload(&c, "bookinfo", REVIEWS_V1).expect("w").waypoint,
        None
    );

    // waypoint-for: all -> workloads too, except a pod that says none.
    let opted = labelled_ns.replacen(
        "    app: ratings\n    version: v1\n",
        "    app: ratings\n    version: v1\n    istio.io/use-waypoint: none\n",
        1,
    );
    let c = compile(
        &store_of(&[&opted, &WAYPOINT.replace("FOR", "all")]),
        &MeshConfig::default(),
    );
    assert_eq!(
        workload(&c, "bookinfo", REVIEWS_V1).expect("w").waypoint,
        Some(hostname("bookinfo"))
    );
    assert_eq!(
        workload(&c, "bookinfo", "ratings-v1-7dc98c7588-uvwxy")
            .expect("w")
            .waypoint,
        None
    );

    // No Gateway of that name: no waypoint (traffic is not sent into a void).
    let c = compile(&store_of(&[&labelled_ns]), &MeshConfig::default());
    let svc = service(&c, "bookinfo/reviews.bookinfo.svc.cluster.local").expect("svc");
    assert_eq!(svc.waypoint, None);
}

/// The incremental compiler, applied change after change, always ends where a full
/// compile of the same store does.
#[test]
fn incremental_matches_full_compile() {
    let mut store = store_of(&[BOOKINFO, POLICIES]);
    let mesh = MeshConfig::default();
    let mut compiler = Compiler::new(mesh.clone());
    let mut published: BTreeMap<(ResourceType, String), Vec<u8>> = BTreeMap::new();
    fn apply(published: &mut BTreeMap<(ResourceType, String), Vec<u8>>, d: Delta) {
        for e in d.updated {
            published.insert((e.type_, e.name), e.body);
        }
        for k in d.removed {
            published.remove(&k);
        }
    }
    apply(&mut published, compiler.full(&store));
    assert!(
        !compiler.notices().is_empty(),
        "the corpus has policies to report on"
    );

    let edits: Vec<String> = vec![
        // Pod changes node and readiness.
        BOOKINFO.split("---\n").find(|d| d.contains(REVIEWS_V1)).expect("pod doc")
            .replace("nodeName: node-a", "nodeName: node-b")
            .replace("status: \"True\"", "status: \"False\""),
        // Service selector moves to v2 only.
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: reviews\n  namespace: bookinfo\nspec:\n  clusterIP: 10.96.0.12\n  selector:\n    app: reviews\n    version: v2\n  ports:\n  - port: 9080\n".into(),
        // A policy now selects ratings instead of reviews.
        POLICIES.split("---\n").find(|d| d.contains("reviews-viewer")).expect("policy doc")
            .replace("app: reviews", "app: ratings"),
        // Mesh-wide mTLS relaxed.
        POLICIES.split("---\n").next().expect("pa doc").replace("STRICT", "PERMISSIVE"),
        WAYPOINT.replace("FOR", "all"),
        // Node topology changes reach the locality of its pods.
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-b\n  labels:\n    topology.kubernetes.io/region: us-east\n".into(),
        // Namespace points at the waypoint (waypoint-for: all).
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bookinfo\n  labels:\n    istio.io/dataplane-mode: ambient\n    istio.io/use-waypoint: waypoint\n".into(),
        // The waypoint gets a Service: its address becomes the VIP everywhere.
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: waypoint\n  namespace: bookinfo\nspec:\n  clusterIP: 10.96.0.99\n  ports:\n  - port: 15008\n".into(),
    ];
    for edit in edits {
        let objs = objects(&edit);
        let refs: Vec<ObjectRef> = objs.iter().map(Object::object_ref).collect();
        for o in objs {
            store.apply(o);
        }
        apply(&mut published, compiler.changed(&store, &refs));
        check_same(&published, &compile(&store, &mesh));
        check_same_notices(&compiler, &store, &mesh);
    }
    // Deletes, too.
    for r in [
        ObjectRef {
            kind: Kind::Pod,
            namespace: "bookinfo".into(),
            name: REVIEWS_V1.into(),
        },
        ObjectRef {
            kind: Kind::AuthorizationPolicy,
            namespace: "bookinfo".into(),
            name: "allow-nothing".into(),
        },
        ObjectRef {
            kind: Kind::Service,
            namespace: "bookinfo".into(),
            name: "details".into(),
        },
    ] {
        store.delete(&r);
        apply(&mut published, compiler.changed(&store, &[r]));
        check_same(&published, &compile(&store, &mesh));
        check_same_notices(&compiler, &store, &mesh);
    }
}

/// The notices the incremental compiler holds are a full compile's.
fn check_same_notices(compiler: &Compiler, store: &Store, mesh: &MeshConfig) {
    let key = |n: &Notice| (n.policy.clone(), n.message.clone(), n.kind);
    let mut got: Vec<_> = compiler.notices().iter().map(key).collect();
    let mut want: Vec<_> = Compiler::new(mesh.clone())
        .full(store)
        .notices
        .iter()
        .map(key)
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

fn check_same(published: &BTreeMap<(ResourceType, String), Vec<u8>>, full: &Compiled) {
    let mut want: BTreeMap<(ResourceType, String), Vec<u8>> = BTreeMap::new();
    for (n, a) in &full.addresses {
        want.insert((ResourceType::Address, n.clone()), a.encode_to_vec());
    }
    for (n, a) in &full.authorizations {
        want.insert((ResourceType::Authorization, n.clone()), a.encode_to_vec());
    }
    for (n, c) in &full.route_configs {
        want.insert((ResourceType::RouteConfig, n.clone()), c.encode_to_vec());
    }
    let got_keys: Vec<_> = published.keys().collect();
    let want_keys: Vec<_> = want.keys().collect();
    assert_eq!(got_keys, want_keys);
    assert_eq!(published, &want);
}

/// Istio's port-level merge: the port's settings replace load balancer, pool and
/// outlier detection wholesale (what they leave out is the default, not the
/// destination level's); a subset's own port-level settings replace them again.
#[test]
fn port_level_settings_replace_the_policy_for_their_port() {
    let routing = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews, subset: v2}
      weight: 50
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool:
      tcp: {maxConnections: 10}
    retryBudget: {percent: 30}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: RANDOM}
    - port: {number: 7777}
      connectionPool:
        tcp: {maxConnections: 1}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      outlierDetection: {consecutive5xxErrors: 2}
      portLevelSettings:
      - port: {number: 9080}
        connectionPool:
          http: {maxRetries: 7}
"#;
    use cairn_api::proto::cairn::l7::v1::load_balancer::Simple;
    let store = store_of(&[BOOKINFO, routing]);
    let (configs, _) = super::l7::route_configs(&store, &MeshConfig::default());
    let c = &configs["bookinfo/reviews.bookinfo.svc.cluster.local:9080"];
    let by_name: BTreeMap<&str, &cairn_api::proto::cairn::l7::v1::Backend> =
        c.backends.iter().map(|b| (b.name.as_str(), b)).collect();
    let v1 = by_name["reviews.bookinfo.svc.cluster.local|v1|9080"];
    assert_eq!(
        v1.load_balancer.as_ref().map(|l| l.simple),
        Some(Simple::Random as i32),
        "the port's load balancer"
    );
    assert!(
        v1.pool.is_none(),
        "the port's settings name no pool: the default, not the destination's"
    );
    assert_eq!(
        v1.retry_budget.as_ref().map(|b| b.percent),
        Some(30.0),
        "the retry budget is not port-level"
    );
    let v2 = by_name["reviews.bookinfo.svc.cluster.local|v2|9080"];
    assert_eq!(
        v2.pool.as_ref().map(|p| (p.max_retries, p.max_connections)),
        Some((7, 0)),
        "the subset's port-level pool"
    );
    assert!(
        v2.load_balancer.is_none() && v2.outlier_detection.is_none(),
        "the subset's port-level settings replace all three groups"
    );
}

#[test]
fn route_backends_carry_subset_endpoints_identities_and_destination_rule_policy() {
    let routing = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
    mirror: {host: reviews, subset: v3}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool:
      tcp: {maxConnections: 10, connectTimeout: 250ms}
      http: {http1MaxPendingRequests: 5, maxRequestsPerConnection: 3, maxRetries: 4}
    outlierDetection: {consecutive5xxErrors: 3, interval: 2s, baseEjectionTime: 10s, maxEjectionPercent: 50, minHealthPercent: 40}
    retryBudget: {percent: 25}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpHeaderName: X-User}
"#;
    let store = store_of(&[BOOKINFO, routing]);
    let (configs, notices) = super::l7::route_configs(&store, &MeshConfig::default());
    let c = &configs["bookinfo/reviews.bookinfo.svc.cluster.local:9080"];
    let by_name: BTreeMap<&str, &cairn_api::proto::cairn::l7::v1::Backend> =
        c.backends.iter().map(|b| (b.name.as_str(), b)).collect();
    let whole = by_name["reviews.bookinfo.svc.cluster.local||9080"];
    assert!(
        whole.endpoints.len() >= 2,
        "the service itself (for opaque traffic) has every endpoint: {whole:?}"
    );
    let v1 = by_name["reviews.bookinfo.svc.cluster.local|v1|9080"];
    assert_eq!(v1.endpoints.len(), 1, "{v1:?}");
    assert_eq!(v1.endpoints[0].address, vec![10, 244, 1, 12]);
    assert_eq!(v1.endpoints[0].port, 9080, "named targetPort resolved");
    assert_eq!(
        v1.endpoints[0].identity,
        "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
    );
    let lb = v1.load_balancer.as_ref().expect("lb");
    assert_eq!(
        lb.simple,
        cairn_api::proto::cairn::l7::v1::load_balancer::Simple::LeastRequest as i32
    );
    let pool = v1.pool.as_ref().expect("pool");
    assert_eq!(
        (pool.max_connections, pool.http1_max_pending_requests),
        (10, 5)
    );
    assert_eq!((pool.max_requests_per_connection, pool.max_retries), (3, 4));
    assert_eq!(v1.connect_timeout_ms, 250);
    let budget = v1.retry_budget.as_ref().expect("retry budget");
    assert_eq!(
        (budget.percent, budget.min_retry_concurrency),
        (25.0, 3),
        "Istio's default floor of 3"
    );
    let od = v1.outlier_detection.as_ref().expect("outlier detection");
    assert_eq!(
        (
            od.consecutive_5xx_errors,
            od.base_ejection_time_ms,
            od.max_ejection_percent,
            od.min_health_percent,
            od.interval_ms
        ),
        (3, 10_000, 50, 40, 2_000)
    );
    let v2 = by_name["reviews.bookinfo.svc.cluster.local|v2|9080"];
    assert_eq!(v2.endpoints[0].address, vec![10, 244, 2, 13]);
    assert!(
        matches!(
            v2.load_balancer.as_ref().and_then(|l| l.hash.as_ref()),
            Some(cairn_api::proto::cairn::l7::v1::load_balancer::Hash::HttpHeaderName(h)) if h == "x-user"
        ),
        "the subset's load balancer replaces the rule's"
    );
    assert!(v2.pool.is_some(), "the rest of the policy is inherited");
    let v3 = by_name["reviews.bookinfo.svc.cluster.local|v3|9080"];
    assert!(v3.endpoints.is_empty());
    assert!(
        notices
            .iter()
            .any(|n| n.message.contains("subset v3") && n.message.contains("not defined")),
        "{notices:?}"
    );
}
