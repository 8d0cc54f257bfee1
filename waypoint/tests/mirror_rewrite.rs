//! Mirroring and rewrites with real HTTP backends: copies reach the mirror (with
//! `-shadow` hosts and the body) while the client sees only the primary, even when
//! the mirror never answers; the mirror percentage holds; paths and authorities are
//! rewritten before forwarding.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use cairn_waypoint::{
    cluster::Clusters,
    fault::Percent,
    matching::{RequestMatch, StringMatch},
    route::{Action, HeaderOps, Mirror, PathRegex, Rewrite, RouteTable, Rule, WeightedBackend},
    router::{Body, Router, Upstream, UpstreamFuture, full, serve},
};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

/// What a backend received: (host, path and query, body).
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// Records each request; answers `<name>` at once, or never when `hang`.
async fn backend(name: &'static str, hang: bool) -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move {
                        let host = req
                            .headers()
                            .get("host")
                            .and_then(|h| h.to_str().ok())
                            .unwrap_or("-")
                            .to_owned();
                        let pq = req
                            .uri()
                            .path_and_query()
                            .map_or("/".into(), |p| p.to_string());
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let body = String::from_utf8_lossy(&body.unwrap_or_default()).into_owned();
                        log.lock().expect("lock").push((host, pq, body));
                        if hang {
                            std::future::pending::<()>().await;
                        }
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from(name),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn rule(matches: Vec<RequestMatch>, backend: &str) -> Rule {
    Rule {
        name: "r".into(),
        matches,
        action: Action::Forward(vec![WeightedBackend {
            backend: backend.into(),
            weight: 1,
            headers: None,
        }]),
        fault: None,
        timeout: None,
        retry: None,
        rewrite: None,
        mirrors: vec![],
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        cors: None,
    }
}

async fn text(resp: Response<hyper::body::Incoming>) -> String {
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::test]
async fn the_mirror_gets_copies_while_the_client_sees_only_the_primary() {
    let (primary, primary_seen) = backend("primary", false).await;
    // The mirror takes every request and never answers.
    let (shadow, shadow_seen) = backend("shadow", true).await;
    let mut mirrored = rule(vec![], "primary");
    mirrored.mirrors = vec![Mirror {
        backend: "shadow".into(),
        percent: Percent(100.0),
    }];
    let router = Arc::new(Router::new(
        RouteTable {
            rules: vec![mirrored],
            ..Default::default()
        },
        Arc::new(Clusters::plain_http(HashMap::from([
            ("primary".to_string(), primary),
            ("shadow".to_string(), shadow),
        ]))),
        Some(3),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve(listener, router));
    for proto in ["HTTP/1.1", "HTTP/2"] {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(proto == "HTTP/2")
            .build_http::<Body>();
        for i in 0..10 {
            let req = Request::post(format!("http://{addr}/reviews/{i}"))
                .header("host", "reviews:9080")
                .body(full(format!("body {i}")))
                .expect("request");
            let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
                .await
                .expect("the client is answered although the mirror hangs")
                .expect("response");
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(text(resp).await, "primary", "{proto}");
        }
    }
    assert_eq!(primary_seen.lock().expect("lock").len(), 20);
    // Copies are sent in the background; give them a moment to land.
    for _ in 0..100 {
        if shadow_seen.lock().expect("lock").len() == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let copies = shadow_seen.lock().expect("lock").clone();
    assert_eq!(copies.len(), 20, "every request mirrored: {copies:?}");
    assert!(
        copies
            .iter()
            .all(|(host, _, _)| host == "reviews-shadow:9080"),
        "{copies:?}"
    );
    let h1_copy = copies
        .iter()
        .find(|(_, path, _)| path == "/reviews/3")
        .expect("copy of request 3");
    assert_eq!(h1_copy.2, "body 3", "the body went with the copy");
}

/// Counts requests per backend; answers at once.
#[derive(Default)]
struct Counter(Mutex<HashMap<String, usize>>);

impl Upstream for Counter {
    fn send(&self, backend: &str, _req: Request<Body>) -> UpstreamFuture {
        *self
            .0
            .lock()
            .expect("lock")
            .entry(backend.into())
            .or_default() += 1;
        Box::pin(async { Ok(Response::new(full("ok"))) })
    }
}

#[tokio::test]
async fn a_mirror_percentage_holds_over_many_requests() {
    let counter = Arc::new(Counter::default());
    let mut mirrored = rule(vec![], "primary");
    mirrored.mirrors = vec![Mirror {
        backend: "shadow".into(),
        percent: Percent(25.0),
    }];
    let router = Router::new(
        RouteTable {
            rules: vec![mirrored],
            ..Default::default()
        },
        counter.clone(),
        Some(11),
    );
    for _ in 0..4000 {
        let resp = router
            .handle(Request::get("/").body(full("")).expect("request"))
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    tokio::task::yield_now().await;
    let counts = counter.0.lock().expect("lock").clone();
    assert_eq!(counts.get("primary"), Some(&4000));
    let shadow = counts.get("shadow").copied().unwrap_or(0) as f64 / 40.0;
    assert!(
        (shadow - 25.0).abs() <= 2.0,
        "mirrored {shadow}% ({counts:?})"
    );
}

#[tokio::test]
async fn prefix_and_whole_path_rewrites_and_authority_rewrite() {
    let (addr, seen) = backend("v1", false).await;
    // A rule for paths matching `path`, rewritten by `rewrite`.
    let on = |path: StringMatch, rewrite: Rewrite| {
        let mut r = rule(
            vec![RequestMatch {
                path: Some(path),
                ..Default::default()
            }],
            "v1",
        );
        r.rewrite = Some(rewrite);
        r
    };
    let by_prefix = on(
        StringMatch::Prefix("/old/".into()),
        Rewrite {
            path: Some("/new/".into()),
            authority: Some(HeaderValue::from_static("reviews-v2:9080")),
            ..Default::default()
        },
    );
    let whole = on(
        StringMatch::Exact("/login".into()),
        Rewrite {
            path: Some("/auth/login".into()),
            ..Default::default()
        },
    );
    // Gateway API: ReplacePrefixMatch by segments, ReplaceFullPath after a prefix.
    let by_segments = on(
        StringMatch::path_prefix("/api/"),
        Rewrite {
            path: Some("/".into()),
            ..Default::default()
        },
    );
    let full_after_prefix = on(
        StringMatch::path_prefix("/legacy"),
        Rewrite {
            path: Some("/current".into()),
            full_path: true,
            ..Default::default()
        },
    );
    // VirtualService uriRegexRewrite: Envoy's `\1` for the first group.
    let by_regex = on(
        StringMatch::Prefix("/users/".into()),
        Rewrite {
            regex: Some(
                PathRegex::new("^/users/([0-9]+)/profile$", "/profiles/\\1").expect("regex"),
            ),
            ..Default::default()
        },
    );
    let router = Router::new(
        RouteTable {
            rules: vec![by_prefix, whole, by_segments, full_after_prefix, by_regex],
            ..Default::default()
        },
        Arc::new(Clusters::plain_http(HashMap::from([(
            "v1".to_string(),
            addr,
        )]))),
        Some(1),
    );
    for path in [
        "/old/a/b?x=1",
        "/login?next=/",
        "/api/v1/users?id=7",
        "/legacy/x/y",
        "/users/42/profile?tab=2",
    ] {
        let resp = router
            .handle(
                Request::get(path)
                    .header("host", "reviews:9080")
                    .body(full(""))
                    .expect("request"),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen[0],
        (
            "reviews-v2:9080".into(),
            "/new/a/b?x=1".into(),
            String::new()
        )
    );
    assert_eq!(
        seen[1],
        (
            "reviews:9080".into(),
            "/auth/login?next=/".into(),
            String::new()
        )
    );
    assert_eq!(
        seen[2].1, "/v1/users?id=7",
        "the /api segment replaced by /"
    );
    assert_eq!(seen[3].1, "/current", "the whole path replaced");
    assert_eq!(
        seen[4].1, "/profiles/42?tab=2",
        "the regex's group, query kept"
    );
}

/// Answers `primary` at once; copies to any other backend never answer, and each
/// counts as pending until its future is dropped.
#[derive(Default)]
struct StalledMirror {
    pending: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts one pending copy for as long as it lives.
struct PendingCopy(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for PendingCopy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Upstream for StalledMirror {
    fn send(&self, backend: &str, _req: Request<Body>) -> UpstreamFuture {
        if backend == "primary" {
            return Box::pin(async { Ok(Response::new(full("primary"))) });
        }
        self.pending
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let copy = PendingCopy(self.pending.clone());
        Box::pin(async move {
            let _copy = copy;
            std::future::pending().await
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_mirror_is_given_up_on_after_the_route_timeout_or_the_default() {
    use std::sync::atomic::Ordering;
    for (route_timeout, expected) in [
        (Some(Duration::from_secs(2)), Duration::from_secs(2)),
        (None, cairn_waypoint::router::MIRROR_TIMEOUT),
    ] {
        let upstream = Arc::new(StalledMirror::default());
        let mut mirrored = rule(vec![], "primary");
        mirrored.timeout = route_timeout;
        mirrored.mirrors = vec![Mirror {
            backend: "shadow".into(),
            percent: Percent(100.0),
        }];
        let router = Router::new(
            RouteTable {
                rules: vec![mirrored],
                ..Default::default()
            },
            upstream.clone(),
            Some(5),
        );
        for _ in 0..3 {
            let resp = router
                .handle(Request::get("/").body(full("")).expect("request"))
                .await;
            assert_eq!(resp.status(), StatusCode::OK);
        }
        tokio::task::yield_now().await;
        assert_eq!(upstream.pending.load(Ordering::SeqCst), 3, "copies sent");
        tokio::time::sleep(expected - Duration::from_millis(10)).await;
        assert_eq!(
            upstream.pending.load(Ordering::SeqCst),
            3,
            "still waiting just before {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            upstream.pending.load(Ordering::SeqCst),
            0,
            "given up on after {expected:?}"
        );
    }
}
