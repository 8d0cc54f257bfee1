//! The router with real HTTP on loopback (hyper backends, the router's own server,
//! HTTP/1.1 and HTTP/2 clients), plus an in-memory upstream where only the router's
//! decisions matter (weights over 10,000 requests, delays on paused time).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use cairn_waypoint::{
    cluster::Clusters,
    cors::CorsPolicy,
    fault::{Abort, Fault, Percent},
    matching::{HeaderRule, RequestMatch, StringMatch},
    redirect::{PathRedirect, Redirect},
    route::{Action, BackendHeaders, RouteTable, Rule, WeightedBackend},
    router::{Body, Router, Upstream, UpstreamFuture, full, serve},
};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

fn rule(name: &str, matches: Vec<RequestMatch>, action: Action) -> Rule {
    Rule::new(name, matches, action)
}

fn split(v1: u32, v2: u32) -> Action {
    Action::Forward(vec![
        WeightedBackend {
            backend: "reviews|v1".into(),
            weight: v1,
            headers: None,
        },
        WeightedBackend {
            backend: "reviews|v2".into(),
            weight: v2,
            headers: None,
        },
    ])
}

fn path(p: &str) -> RequestMatch {
    RequestMatch {
        path: Some(StringMatch::Exact(p.into())),
        ..Default::default()
    }
}

/// Answers with the backend's name; counts what it got.
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
        let body = backend.to_owned();
        Box::pin(async move { Ok(Response::new(full(body))) })
    }
}

async fn text(resp: Response<Body>) -> String {
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::test]
async fn a_90_10_split_holds_over_10000_requests() {
    let recorder = Arc::new(Recorder::default());
    let router = Router::new(
        RouteTable {
            rules: vec![rule("canary", vec![], split(90, 10))],
            ..Default::default()
        },
        recorder.clone(),
        Some(42),
    );
    for _ in 0..10_000 {
        let resp = router
            .handle(Request::get("/").body(full("")).expect("request"))
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let seen = recorder.seen.lock().expect("lock").clone();
    let v1 = seen.get("reviews|v1").copied().unwrap_or(0) as f64 / 100.0;
    assert!((v1 - 90.0).abs() <= 1.5, "v1 got {v1}% ({seen:?})");
    // Weights of zero everywhere: no backend to choose, 503.
    router.set_table(RouteTable {
        rules: vec![rule("none", vec![], split(0, 0))],
        ..Default::default()
    });
    let resp = router
        .handle(Request::get("/").body(full("")).expect("request"))
        .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(start_paused = true)]
async fn a_delay_fault_holds_the_request_for_its_duration() {
    let mut delayed = rule("slow", vec![], split(100, 0));
    delayed.fault = Some(Fault {
        delay: Some((Duration::from_secs(7), Percent(100.0))),
        abort: None,
    });
    let router = Router::new(
        RouteTable {
            rules: vec![delayed],
            ..Default::default()
        },
        Arc::new(Recorder::default()),
        Some(1),
    );
    let start = tokio::time::Instant::now();
    let resp = router
        .handle(Request::get("/").body(full("")).expect("request"))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        start.elapsed() >= Duration::from_secs(7),
        "{:?}",
        start.elapsed()
    );
    assert!(start.elapsed() < Duration::from_secs(8));
}

#[tokio::test]
async fn a_grpc_abort_answers_trailers_only_with_the_status_for_its_share() {
    let mut chaos = rule("chaos", vec![], split(100, 0));
    chaos.fault = Some(Fault {
        delay: None,
        abort: Some((Abort::Grpc(14), Percent(50.0))),
    });
    let recorder = Arc::new(Recorder::default());
    let router = Router::new(
        RouteTable {
            rules: vec![chaos],
            ..Default::default()
        },
        recorder.clone(),
        Some(3),
    );
    let mut aborted = 0usize;
    const N: usize = 2_000;
    for _ in 0..N {
        let req = Request::post("/reviews.Reviews/Get")
            .header("content-type", "application/grpc")
            .body(full(""))
            .expect("request");
        let resp = router.handle(req).await;
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "gRPC errors ride on HTTP 200"
        );
        if let Some(status) = resp.headers().get("grpc-status") {
            assert_eq!(status, "14");
            assert_eq!(resp.headers()["content-type"], "application/grpc");
            assert_eq!(text(resp).await, "", "trailers-only: no message");
            aborted += 1;
        }
    }
    let share = aborted as f64 * 100.0 / N as f64;
    assert!((share - 50.0).abs() <= 3.0, "aborted {share}%");
    let reached = recorder.seen.lock().expect("lock").values().sum::<usize>();
    assert_eq!(
        reached + aborted,
        N,
        "an aborted call never reaches the backend"
    );
}

/// An HTTP backend answering `<name>:<x-route header>:<path>`, after `delay`.
async fn backend(name: &'static str, delay: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| async move {
                        tokio::time::sleep(delay).await;
                        let route = req
                            .headers()
                            .get("x-route")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned();
                        let body = format!("{name}:{route}:{}", req.uri().path());
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from(body),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A route at `p` to the backend that answers after 5 s, with a 200 ms timeout.
fn slow_rule(name: &str, p: &str) -> Rule {
    let mut slow = rule(
        name,
        vec![path(p)],
        Action::Forward(vec![WeightedBackend {
            backend: "slow".into(),
            weight: 1,
            headers: None,
        }]),
    );
    slow.timeout = Some(Duration::from_millis(200));
    slow
}

/// `table` served on loopback over real backends (`reviews|v1`, `reviews|v2`, and
/// `slow`, which answers after 5 s), with HTTP/1.1 and HTTP/2 clients.
struct Served {
    addr: SocketAddr,
    router: Arc<Router>,
    h1: Client<hyper_util::client::legacy::connect::HttpConnector, Body>,
    h2: Client<hyper_util::client::legacy::connect::HttpConnector, Body>,
}

async fn serve_table(table: RouteTable) -> Served {
    let endpoints = HashMap::from([
        (
            "reviews|v1".to_string(),
            backend("v1", Duration::ZERO).await,
        ),
        (
            "reviews|v2".to_string(),
            backend("v2", Duration::ZERO).await,
        ),
        (
            "slow".to_string(),
            backend("slow", Duration::from_secs(5)).await,
        ),
    ]);
    let router = Arc::new(Router::new(
        table,
        Arc::new(Clusters::plain_http(endpoints)),
        Some(7),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve(listener, router.clone()));
    Served {
        addr,
        router,
        h1: Client::builder(TokioExecutor::new()).build_http::<Body>(),
        h2: Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http::<Body>(),
    }
}

fn table() -> RouteTable {
    let jason = RequestMatch {
        headers: vec![(
            HeaderName::from_static("end-user"),
            HeaderRule::Value(StringMatch::Exact("jason".into())),
        )],
        ..Default::default()
    };
    let mut by_user = rule("jason", vec![jason], split(0, 100));
    by_user.request_headers.set.push((
        HeaderName::from_static("x-route"),
        HeaderValue::from_static("jason"),
    ));
    by_user.response_headers.add.push((
        HeaderName::from_static("x-waypoint"),
        HeaderValue::from_static("cairn"),
    ));
    let mut aborted = rule("abort", vec![path("/abort")], split(100, 0));
    aborted.fault = Some(Fault {
        delay: None,
        abort: Some((StatusCode::SERVICE_UNAVAILABLE.into(), Percent(100.0))),
    });
    let slow = slow_rule("slow", "/slow");
    // Per-destination headers (VirtualService `route[].headers`) on v2 only.
    let mut canary = split(90, 10);
    if let Action::Forward(backends) = &mut canary {
        let mut h = BackendHeaders::default();
        h.request.set.push((
            HeaderName::from_static("x-route"),
            HeaderValue::from_static("canary-v2"),
        ));
        h.response.set.push((
            HeaderName::from_static("x-version"),
            HeaderValue::from_static("v2"),
        ));
        backends[1].headers = Some(Arc::new(h));
    }
    RouteTable {
        rules: vec![
            rule(
                "health",
                vec![path("/health")],
                Action::Respond {
                    status: StatusCode::OK,
                    body: Bytes::from_static(b"ok"),
                },
            ),
            rule(
                "moved",
                vec![path("/old")],
                Action::Redirect(Redirect {
                    scheme: None,
                    authority: None,
                    port: None,
                    path: Some(PathRedirect::Full("/new".into())),
                    status: StatusCode::MOVED_PERMANENTLY,
                }),
            ),
            aborted,
            slow,
            by_user,
            rule(
                "canary",
                vec![RequestMatch {
                    path: Some(StringMatch::Prefix("/reviews".into())),
                    ..Default::default()
                }],
                canary,
            ),
        ],
        ..Default::default()
    }
}

#[tokio::test]
async fn routes_real_http_requests_over_http1_and_http2() {
    let Served {
        addr,
        router,
        h1,
        h2,
    } = serve_table(table()).await;
    for (proto, client) in [("HTTP/1.1", &h1), ("HTTP/2", &h2)] {
        let get = |path: &str, user: Option<&str>| {
            let mut b = Request::get(format!("http://{addr}{path}")).header("host", "reviews:9080");
            if let Some(u) = user {
                b = b.header("end-user", u);
            }
            b.body(full("")).expect("request")
        };
        let send = |req| async {
            client.request(req).await.expect("response").map(|b| {
                b.map_err(|e| -> cairn_waypoint::router::BoxError { e.into() })
                    .boxed()
            })
        };
        // Weighted split: both versions answer, mostly v1.
        let mut v1 = 0;
        for _ in 0..200 {
            let resp = send(get("/reviews/1", None)).await;
            let version = resp.headers().get("x-version").cloned();
            let body = text(resp).await;
            // v2's destination headers reach v2's requests and responses only.
            match body.as_str() {
                "v1:-:/reviews/1" => assert_eq!(version, None, "{proto}"),
                "v2:canary-v2:/reviews/1" => {
                    assert_eq!(version, Some(HeaderValue::from_static("v2")), "{proto}")
                }
                other => panic!("{proto}: {other}"),
            }
            v1 += usize::from(body.starts_with("v1"));
        }
        assert!(
            (160..=199).contains(&v1),
            "{proto}: v1 answered {v1} of 200"
        );
        // Header match: always v2, with the request header set and a response header added.
        for _ in 0..20 {
            let resp = send(get("/reviews/1", Some("jason"))).await;
            assert_eq!(
                resp.headers().get("x-waypoint").map(|v| v.as_bytes()),
                Some(&b"cairn"[..])
            );
            assert_eq!(text(resp).await, "v2:jason:/reviews/1", "{proto}");
        }
        // Direct response, redirect, abort, timeout, no route.
        let resp = send(get("/health", None)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(text(resp).await, "ok");
        let resp = send(get("/old", None)).await;
        assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
        // The request's authority: Host on HTTP/1.1, :authority on HTTP/2 (where the
        // client puts the URI's authority).
        let want = if proto == "HTTP/2" {
            format!("http://{addr}/new")
        } else {
            "http://reviews:9080/new".into()
        };
        assert_eq!(
            resp.headers().get("location").and_then(|v| v.to_str().ok()),
            Some(want.as_str()),
            "{proto}"
        );
        let resp = send(get("/abort", None)).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(text(resp).await, "fault filter abort");
        let resp = send(get("/slow", None)).await;
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT, "{proto}");
        let resp = send(get("/elsewhere", None)).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }

    // A new config applies to the next request.
    router.set_table(RouteTable {
        rules: vec![rule("all-v2", vec![], split(0, 1))],
        ..Default::default()
    });
    let req = Request::get(format!("http://{addr}/reviews/9"))
        .body(full(""))
        .expect("request");
    let resp = h1.request(req).await.expect("response");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"v2:-:/reviews/9");
}

/// The `api` route allows `https://shop.example` (credentials, an exposed header);
/// `/cors-abort` is the same policy on a route whose fault answers 503, `/cors-slow`
/// on one that times out.
fn cors_table() -> RouteTable {
    let policy = Arc::new(CorsPolicy {
        allow_origins: vec![StringMatch::Exact("https://shop.example".into())],
        allow_methods: Some(HeaderValue::from_static("GET,PUT")),
        allow_headers: Some(HeaderValue::from_static("x-token")),
        expose_headers: Some(HeaderValue::from_static("x-trace")),
        max_age: Some(HeaderValue::from_static("600")),
        allow_credentials: true,
        forward_unmatched_preflights: true,
    });
    let mut api = rule("api", vec![path("/api")], split(1, 0));
    api.cors = Some(policy.clone());
    let mut aborted = rule("cors-abort", vec![path("/cors-abort")], split(1, 0));
    aborted.fault = Some(Fault {
        delay: None,
        abort: Some((StatusCode::SERVICE_UNAVAILABLE.into(), Percent(100.0))),
    });
    aborted.cors = Some(policy.clone());
    let mut slow = slow_rule("cors-slow", "/cors-slow");
    slow.cors = Some(policy);
    RouteTable {
        rules: vec![api, aborted, slow],
        ..Default::default()
    }
}

#[tokio::test]
async fn cors_preflights_are_answered_and_allowed_origins_get_their_headers() {
    let Served { addr, h1, h2, .. } = serve_table(cors_table()).await;
    let header = |resp: &Response<hyper::body::Incoming>, name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    for (proto, client) in [("HTTP/1.1", &h1), ("HTTP/2", &h2)] {
        let send = |method: http::Method, path: &str, origin: Option<&str>, preflight: bool| {
            let mut b = Request::builder()
                .method(method)
                .uri(format!("http://{addr}{path}"))
                .header("host", "reviews:9080");
            if let Some(o) = origin {
                b = b.header("origin", o);
            }
            if preflight {
                b = b.header("access-control-request-method", "PUT");
            }
            client.request(b.body(full("")).expect("request"))
        };
        let body = |resp: Response<hyper::body::Incoming>| async {
            let b = resp.into_body().collect().await.expect("body").to_bytes();
            String::from_utf8_lossy(&b).into_owned()
        };

        // A preflight from the allowed origin: answered here, never forwarded.
        let resp = send(
            http::Method::OPTIONS,
            "/api",
            Some("https://shop.example"),
            true,
        )
        .await
        .expect("preflight");
        assert_eq!(resp.status(), StatusCode::OK, "{proto}");
        for (name, want) in [
            ("access-control-allow-origin", "https://shop.example"),
            ("access-control-allow-credentials", "true"),
            ("access-control-allow-methods", "GET,PUT"),
            ("access-control-allow-headers", "x-token"),
            ("access-control-max-age", "600"),
            ("access-control-expose-headers", "x-trace"),
        ] {
            assert_eq!(header(&resp, name).as_deref(), Some(want), "{proto} {name}");
        }
        assert_eq!(body(resp).await, "", "{proto}: the backend never saw it");

        // The request itself goes to the backend; its answer names the origin.
        let resp = send(
            http::Method::GET,
            "/api",
            Some("https://shop.example"),
            false,
        )
        .await
        .expect("cross-origin GET");
        assert_eq!(
            header(&resp, "access-control-allow-origin").as_deref(),
            Some("https://shop.example"),
            "{proto}"
        );
        assert_eq!(
            header(&resp, "access-control-expose-headers").as_deref(),
            Some("x-trace"),
            "{proto}"
        );
        assert_eq!(header(&resp, "access-control-allow-methods"), None);
        assert_eq!(body(resp).await, "v1:-:/api", "{proto}");

        // The waypoint's own answer on a forwarding route (a timeout) carries them
        // too; a fault abort comes before CORS, as in Istio's filter chain.
        let resp = send(
            http::Method::GET,
            "/cors-slow",
            Some("https://shop.example"),
            false,
        )
        .await
        .expect("timed out");
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT, "{proto}");
        assert_eq!(
            header(&resp, "access-control-allow-origin").as_deref(),
            Some("https://shop.example"),
            "{proto}"
        );
        let resp = send(
            http::Method::GET,
            "/cors-abort",
            Some("https://shop.example"),
            false,
        )
        .await
        .expect("aborted");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "{proto}");
        assert_eq!(
            header(&resp, "access-control-allow-origin"),
            None,
            "{proto}"
        );

        // Another origin, or none: routed as usual, no CORS headers; an unmatched
        // preflight is forwarded (Istio's default).
        for (origin, preflight) in [
            (Some("https://evil.example"), false),
            (None, false),
            (Some("https://evil.example"), true),
        ] {
            let method = if preflight {
                http::Method::OPTIONS
            } else {
                http::Method::GET
            };
            let resp = send(method, "/api", origin, preflight)
                .await
                .expect("response");
            assert_eq!(
                header(&resp, "access-control-allow-origin"),
                None,
                "{proto} {origin:?}"
            );
            assert_eq!(body(resp).await, "v1:-:/api", "{proto} {origin:?}");
        }
    }
}
