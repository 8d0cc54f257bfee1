//! VirtualService -> controller compile -> `cairn.l7.v1.RouteConfig` -> the waypoint's
//! route table -> routing decisions: the L7 config path end to end, in process.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use cairn_api::proto::cairn::l7::v1::RouteConfig;
use cairn_controller::{
    compile::{MeshConfig, l7::route_configs},
    local::LocalSource,
    store::Store,
};
use cairn_waypoint::{
    route::RouteTable,
    router::{Body, Router, Upstream, UpstreamFuture, full},
};
use http::{Request, Response, StatusCode};

const MANIFESTS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
    route:
    - destination: {host: reviews, subset: v2}
  - name: chaos
    match:
    - uri: {prefix: /chaos}
    fault:
      abort: {httpStatus: 503, percentage: {value: 50}}
    route:
    - destination: {host: reviews, subset: v1}
  - name: canary
    route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

#[derive(Default)]
struct Recorder {
    seen: Mutex<HashMap<String, usize>>,
}

impl Upstream for Recorder {
    fn send(&self, backend: &str, _req: Request<Body>) -> UpstreamFuture {
        *self
            .seen
            .lock()
            .expect("lock")
            .entry(backend.into())
            .or_default() += 1;
        Box::pin(async { Ok(Response::new(full(""))) })
    }
}

/// The `reviews` service every case below routes.
const REVIEWS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.12
  ports: [{name: http, port: 9080}]
---
"#;

/// The route configs the controller compiles from [`REVIEWS`] and `manifests`, which
/// must load and compile without errors or notices.
fn compiled(manifests: &str) -> BTreeMap<String, RouteConfig> {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("bookinfo.yaml"),
        [REVIEWS, manifests].concat(),
    )
    .expect("write");
    let mut store = Store::default();
    let scan = LocalSource::new(dir.path()).scan(&mut store);
    assert!(scan.errors.is_empty(), "{:?}", scan.errors);
    let (configs, notices) = route_configs(&store, &MeshConfig::default());
    assert!(notices.is_empty(), "{notices:?}");
    configs
}

/// A waypoint router for `reviews:9080` as compiled from `manifests`, over a
/// recording upstream.
fn reviews_router(manifests: &str) -> (Router, Arc<Recorder>) {
    let configs = compiled(manifests);
    let config = &configs["bookinfo/reviews.bookinfo.svc.cluster.local:9080"];
    let table =
        RouteTable::try_from(config).expect("the waypoint accepts what the controller compiles");
    let recorder = Arc::new(Recorder::default());
    (Router::new(table, recorder.clone(), Some(2026)), recorder)
}

#[tokio::test]
async fn a_virtual_service_routes_the_waypoint() {
    let configs = compiled(MANIFESTS);
    let config = &configs["bookinfo/reviews.bookinfo.svc.cluster.local:9080"];
    let table =
        RouteTable::try_from(config).expect("the waypoint accepts what the controller compiles");
    let (clusters, _) = cairn_waypoint::config::clusters(config, Some(1))
        .expect("and the backends the controller compiles");
    assert_eq!(
        clusters.len(),
        3,
        "v1, v2, and the service itself (for opaque traffic)"
    );

    let recorder = Arc::new(Recorder::default());
    let router = Router::new(table, recorder.clone(), Some(2026));
    let get = |path: &str, user: Option<&str>| {
        let mut b = Request::get(path);
        if let Some(u) = user {
            b = b.header("end-user", u);
        }
        b.body(full("")).expect("request")
    };
    for _ in 0..100 {
        assert_eq!(
            router
                .handle(get("/reviews/1", Some("jason")))
                .await
                .status(),
            StatusCode::OK
        );
    }
    let v2 = "reviews.bookinfo.svc.cluster.local|v2|9080";
    let v1 = "reviews.bookinfo.svc.cluster.local|v1|9080";
    assert_eq!(
        recorder.seen.lock().expect("lock").get(v2),
        Some(&100),
        "jason always gets v2"
    );
    recorder.seen.lock().expect("lock").clear();

    for _ in 0..10_000 {
        router.handle(get("/reviews/1", None)).await;
    }
    let seen = recorder.seen.lock().expect("lock").clone();
    let share = seen.get(v1).copied().unwrap_or(0) as f64 / 100.0;
    assert!(
        (share - 90.0).abs() <= 1.5,
        "v1 {share}% of 10,000 ({seen:?})"
    );

    let mut aborted = 0;
    for _ in 0..2_000 {
        if router.handle(get("/chaos", None)).await.status() == StatusCode::SERVICE_UNAVAILABLE {
            aborted += 1;
        }
    }
    let share = f64::from(aborted) / 20.0;
    assert!((share - 50.0).abs() <= 3.0, "aborted {share}% of 2,000");
}

const HTTP_ROUTE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.13
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.14
  ports: [{name: http, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs:
  - {group: "", kind: Service, name: reviews, port: 9080}
  rules:
  - name: jason
    matches:
    - path: {type: PathPrefix, value: /api/}
      headers: [{name: X-User, value: jason}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - name: health
    matches:
    - path: {type: Exact, value: /api/health}
    backendRefs: [{name: reviews-v1, port: 9080}]
  - name: moved
    matches:
    - path: {type: PathPrefix, value: /old}
    filters:
    - type: RequestRedirect
      requestRedirect:
        scheme: https
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
  - name: canary
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: x-route, value: canary}]
    backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
"#;

#[tokio::test]
async fn an_http_route_routes_the_waypoint_in_gateway_api_precedence() {
    let configs = compiled(HTTP_ROUTE);
    let config = &configs["bookinfo/reviews.bookinfo.svc.cluster.local:9080"];
    let table = RouteTable::try_from(config).expect("the waypoint accepts it");
    let recorder = Arc::new(Recorder::default());
    let router = Router::new(table, recorder.clone(), Some(7));
    let get = |path: &str, user: Option<&str>| {
        let mut b = Request::get(path);
        if let Some(u) = user {
            b = b.header("x-user", u);
        }
        b.body(full("")).expect("request")
    };
    let v1 = "reviews-v1.bookinfo.svc.cluster.local||9080";
    let v2 = "reviews-v2.bookinfo.svc.cluster.local||9080";
    let only = |recorder: &Recorder| {
        let mut seen = recorder.seen.lock().expect("lock");
        let out: Vec<(String, usize)> = seen.drain().collect();
        out
    };

    // The exact path outranks the earlier prefix rule, even for jason.
    router.handle(get("/api/health", Some("jason"))).await;
    assert_eq!(only(&recorder), vec![(v1.to_string(), 1)]);
    router.handle(get("/api/reviews/1", Some("jason"))).await;
    assert_eq!(only(&recorder), vec![(v2.to_string(), 1)]);

    let resp = router.handle(get("/api/reviews/1", None)).await;
    assert_eq!(
        resp.headers().get("x-route").map(|v| v.as_bytes()),
        Some(&b"canary"[..]),
        "the catch-all rule's response header filter"
    );

    // A path prefix by segments; the redirect by the API's rules for scheme and port.
    let mut moved = get("/old/reviews/1?page=2", None);
    moved.headers_mut().insert(
        http::header::HOST,
        http::HeaderValue::from_static("reviews:9080"),
    );
    let resp = router.handle(moved).await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(
        resp.headers().get("location").map(|v| v.as_bytes()),
        Some(&b"https://reviews/new/reviews/1?page=2"[..])
    );
    let resp = router.handle(get("/oldies", None)).await;
    assert_eq!(
        resp.headers().get("x-route").map(|v| v.as_bytes()),
        Some(&b"canary"[..]),
        "/oldies is not under the path prefix /old"
    );
    only(&recorder);
    for _ in 1..2_000 {
        router.handle(get("/reviews/1", None)).await;
    }
    let seen: HashMap<String, usize> = only(&recorder).into_iter().collect();
    let share = seen.get(v2).copied().unwrap_or(0) as f64 / 20.0;
    assert!(
        (share - 10.0).abs() <= 2.0,
        "v2 {share}% of 2,000 ({seen:?})"
    );
}

const GRPC_ROUTE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.12
  ports: [{name: grpc, port: 9090, appProtocol: grpc}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.14
  ports: [{name: grpc, port: 9090}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 9090}]
  rules:
  - matches:
    - method: {service: reviews.v1.Reviews}
    backendRefs: [{name: reviews, port: 9090}]
  - matches:
    - method: {service: reviews.v1.Reviews, method: Rate}
      headers: [{name: x-canary, value: "yes"}]
    backendRefs: [{name: reviews-v2, port: 9090}]
"#;

#[tokio::test]
async fn a_grpc_route_routes_methods_at_the_waypoint() {
    let configs = compiled(GRPC_ROUTE);
    let config = &configs["bookinfo/reviews.bookinfo.svc.cluster.local:9090"];
    let table = RouteTable::try_from(config).expect("the waypoint accepts it");
    let recorder = Arc::new(Recorder::default());
    let router = Router::new(table, recorder.clone(), Some(1));
    let call = |path: &str, canary: bool| {
        let mut b = Request::post(path).header("content-type", "application/grpc");
        if canary {
            b = b.header("x-canary", "yes");
        }
        b.body(full("")).expect("request")
    };
    let last = |recorder: &Recorder| {
        let mut seen = recorder.seen.lock().expect("lock");
        let out: Vec<String> = seen.drain().map(|(k, _)| k).collect();
        out
    };
    let v1 = "reviews.bookinfo.svc.cluster.local||9090";
    let v2 = "reviews-v2.bookinfo.svc.cluster.local||9090";
    // The exact method with the header outranks the earlier service-wide rule.
    router.handle(call("/reviews.v1.Reviews/Rate", true)).await;
    assert_eq!(last(&recorder), [v2]);
    router.handle(call("/reviews.v1.Reviews/Rate", false)).await;
    assert_eq!(
        last(&recorder),
        [v1],
        "header missing: the service-wide rule"
    );
    router.handle(call("/reviews.v1.Reviews/Get", true)).await;
    assert_eq!(last(&recorder), [v1]);
    let resp = router.handle(call("/ratings.v1.Ratings/Get", false)).await;
    assert_eq!(
        resp.status(),
        StatusCode::NOT_FOUND,
        "another service: no route"
    );
    assert!(last(&recorder).is_empty());
}

const CORS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - corsPolicy:
      allowOrigins:
      - regex: "https://.*\\.shop\\.example"
      allowMethods: [GET, POST]
      allowHeaders: [x-token, content-type]
      exposeHeaders: [x-trace]
      maxAge: 24h
      allowCredentials: true
      unmatchedPreflights: IGNORE
    route:
    - destination: {host: reviews}
"#;

#[tokio::test]
async fn a_virtual_service_cors_policy_is_applied_by_the_waypoint() {
    let (router, recorder) = reviews_router(CORS);
    let request = |method: &str, origin: &str, preflight: bool| {
        let mut b = Request::builder()
            .method(method)
            .uri("/reviews/1")
            .header("origin", origin);
        if preflight {
            b = b.header("access-control-request-method", "POST");
        }
        b.body(full("")).expect("request")
    };
    let forwarded = || recorder.seen.lock().expect("lock").values().sum::<usize>();
    let cors_headers = |resp: &Response<Body>| -> Vec<(String, String)> {
        resp.headers()
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("access-control-"))
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_owned()))
            .collect()
    };
    let pairs = |p: &[(&str, &str)]| -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };

    let resp = router
        .handle(request("OPTIONS", "https://eu.shop.example", true))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        cors_headers(&resp),
        pairs(&[
            ("access-control-allow-origin", "https://eu.shop.example"),
            ("access-control-allow-credentials", "true"),
            ("access-control-allow-methods", "GET,POST"),
            ("access-control-allow-headers", "x-token,content-type"),
            ("access-control-max-age", "86400"),
            ("access-control-expose-headers", "x-trace"),
        ])
    );
    assert_eq!(forwarded(), 0, "the waypoint answers the preflight itself");

    // unmatchedPreflights: IGNORE answers another origin's preflight, without an
    // allowed origin.
    let resp = router
        .handle(request("OPTIONS", "https://evil.example", true))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers().get("access-control-allow-origin"),
        None,
        "{:?}",
        cors_headers(&resp)
    );
    assert_eq!(forwarded(), 0);

    let resp = router
        .handle(request("GET", "https://eu.shop.example", false))
        .await;
    assert_eq!(
        cors_headers(&resp),
        pairs(&[
            ("access-control-allow-origin", "https://eu.shop.example"),
            ("access-control-allow-credentials", "true"),
            ("access-control-expose-headers", "x-trace"),
        ])
    );
    let resp = router
        .handle(request("GET", "https://evil.example", false))
        .await;
    assert_eq!(cors_headers(&resp), pairs(&[]));
    assert_eq!(forwarded(), 2, "both requests reach the backend");
}

const HTTP_ROUTE_CORS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs:
  - {group: "", kind: Service, name: reviews, port: 9080}
  rules:
  - filters:
    - type: CORS
      cors:
        allowOrigins: ["https://*.shop.example", "http://localhost:3000"]
        allowMethods: [GET, PUT]
        allowCredentials: true
    backendRefs: [{name: reviews, port: 9080}]
"#;

#[tokio::test]
async fn an_http_route_cors_filter_is_applied_by_the_waypoint() {
    let (router, recorder) = reviews_router(HTTP_ROUTE_CORS);
    let preflight = |origin: &str| {
        Request::builder()
            .method("OPTIONS")
            .uri("/reviews/1")
            .header("origin", origin)
            .header("access-control-request-method", "PUT")
            .body(full(""))
            .expect("request")
    };
    let allow_origin = |resp: &Response<Body>| {
        resp.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    // `*` stands for any labels to its left; other origins match exactly.
    for origin in [
        "https://eu.shop.example",
        "https://a.b.shop.example",
        "http://localhost:3000",
    ] {
        let resp = router.handle(preflight(origin)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(allow_origin(&resp).as_deref(), Some(origin));
        let h = resp.headers();
        assert_eq!(h["access-control-allow-methods"], "GET,PUT");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(h["access-control-max-age"], "5", "the API's default");
    }
    // Other origins (dots are not wildcards): answered here, without an origin.
    for origin in [
        "https://shop.example",
        "https://evil-shop.example",
        "http://eu.shop.example",
        "http://localhost:3001",
    ] {
        let resp = router.handle(preflight(origin)).await;
        assert_eq!(resp.status(), StatusCode::OK, "{origin}");
        assert_eq!(allow_origin(&resp), None, "{origin}");
    }
    assert_eq!(
        recorder.seen.lock().expect("lock").values().sum::<usize>(),
        0,
        "no preflight reaches the backend"
    );
    let get = Request::get("/reviews/1")
        .header("origin", "https://eu.shop.example")
        .body(full(""))
        .expect("request");
    let resp = router.handle(get).await;
    assert_eq!(
        allow_origin(&resp).as_deref(),
        Some("https://eu.shop.example")
    );
}
