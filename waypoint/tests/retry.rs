//! Retries with real HTTP backends: a flaky backend hidden from HTTP/1.1 and HTTP/2
//! clients, bodies sent again, per-try timeouts, what is not retried, and the
//! whole-request timeout bounding all attempts.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use cairn_waypoint::{
    cluster::Clusters,
    retry::{RetryOn, RetryPolicy},
    route::{Action, HeaderOps, RouteTable, Rule, WeightedBackend},
    router::{Body, BoxError, Router, full, serve},
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

/// Answers 503 to its first `fail_first` requests, then 200 with `ok:<body>`; the
/// first `slow_first` requests wait `slow` before answering.
struct Flaky {
    addr: SocketAddr,
    seen: Arc<AtomicUsize>,
}

async fn flaky(fail_first: usize, slow_first: usize, slow: Duration) -> Flaky {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        if n < slow_first {
                            tokio::time::sleep(slow).await;
                        }
                        let mut resp = Response::new(http_body_util::Full::new(Bytes::from(
                            format!("ok:{}", String::from_utf8_lossy(&body.unwrap_or_default())),
                        )));
                        if n < fail_first {
                            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Flaky { addr, seen }
}

fn policy(retries: u32, on: &[&str], per_try: Option<Duration>) -> RetryPolicy {
    let mut conditions = RetryOn::default();
    for c in on {
        conditions.add(c).expect("known condition");
    }
    RetryPolicy {
        retries,
        per_try_timeout: per_try,
        on: conditions,
        status_codes: vec![],
    }
}

fn router_to(addr: SocketAddr, retry: Option<RetryPolicy>, timeout: Option<Duration>) -> Router {
    let rule = Rule {
        name: "flaky".into(),
        matches: vec![],
        action: Action::Forward(vec![WeightedBackend {
            backend: "flaky".into(),
            weight: 1,
            headers: None,
        }]),
        fault: None,
        timeout,
        retry,
        rewrite: None,
        mirrors: vec![],
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        cors: None,
    };
    Router::new(
        RouteTable {
            rules: vec![rule],
            ..Default::default()
        },
        Arc::new(Clusters::plain_http(HashMap::from([(
            "flaky".into(),
            addr,
        )]))),
        Some(5),
    )
}

async fn text(resp: Response<Body>) -> String {
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

fn post(body: &'static str) -> Request<Body> {
    Request::post("http://reviews:9080/")
        .body(full(body))
        .expect("request")
}

#[tokio::test]
async fn retries_hide_a_backend_that_fails_its_first_two_attempts_over_http1_and_http2() {
    for proto in ["HTTP/1.1", "HTTP/2"] {
        let backend = flaky(2, 0, Duration::ZERO).await;
        let router = Arc::new(router_to(
            backend.addr,
            Some(policy(2, &["5xx"], None)),
            None,
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve(listener, router));
        let client = Client::builder(TokioExecutor::new())
            .http2_only(proto == "HTTP/2")
            .build_http::<Body>();
        let req = Request::post(format!("http://{addr}/"))
            .body(full("the body"))
            .expect("request");
        let resp = client.request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK, "{proto}");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(
            &body[..],
            b"ok:the body",
            "{proto}: the body was sent again"
        );
        assert_eq!(backend.seen.load(Ordering::SeqCst), 3, "{proto}");
        server.abort();
    }
}

#[tokio::test]
async fn the_last_answer_is_returned_when_retries_run_out() {
    let backend = flaky(5, 0, Duration::ZERO).await;
    let router = router_to(backend.addr, Some(policy(1, &["5xx"], None)), None);
    let resp = router.handle(post("x")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(text(resp).await, "ok:x", "the backend's own answer");
    assert_eq!(
        backend.seen.load(Ordering::SeqCst),
        2,
        "first try + 1 retry"
    );
}

#[tokio::test]
async fn conditions_decide_what_is_retried() {
    // connect-failure does not retry an answer.
    let backend = flaky(1, 0, Duration::ZERO).await;
    let router = router_to(
        backend.addr,
        Some(policy(3, &["connect-failure"], None)),
        None,
    );
    assert_eq!(
        router.handle(post("")).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(backend.seen.load(Ordering::SeqCst), 1);
    // No policy: sent once.
    let backend = flaky(1, 0, Duration::ZERO).await;
    let router = router_to(backend.addr, None, None);
    assert_eq!(
        router.handle(post("")).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(backend.seen.load(Ordering::SeqCst), 1);
    // A refused connection is retried under connect-failure, then answered 503.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let router = router_to(closed, Some(policy(2, &["connect-failure"], None)), None);
    let resp = router.handle(post("")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        text(resp).await,
        "upstream connect error or disconnect/reset before headers"
    );
}

#[tokio::test]
async fn a_streamed_body_of_unknown_size_is_not_retried() {
    let backend = flaky(1, 0, Duration::ZERO).await;
    let router = router_to(backend.addr, Some(policy(2, &["5xx"], None)), None);
    let chunks = futures_chunks(&["part1", "part2"]);
    let req = Request::post("http://reviews:9080/")
        .body(chunks)
        .expect("request");
    let resp = router.handle(req).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(text(resp).await, "ok:part1part2", "streamed through whole");
    assert_eq!(backend.seen.load(Ordering::SeqCst), 1);
}

fn futures_chunks(parts: &[&'static str]) -> Body {
    let frames: Vec<Result<hyper::body::Frame<Bytes>, BoxError>> = parts
        .iter()
        .map(|p| Ok(hyper::body::Frame::data(Bytes::from_static(p.as_bytes()))))
        .collect();
    StreamBody::new(tokio_stream::iter(frames)).boxed()
}

#[tokio::test]
async fn a_per_try_timeout_moves_on_to_the_next_attempt() {
    // The first attempt hangs for 10 s; the per-try timeout cuts it at 200 ms and the
    // retry is answered at once.
    let backend = flaky(0, 1, Duration::from_secs(10)).await;
    let router = router_to(
        backend.addr,
        Some(policy(2, &["reset"], Some(Duration::from_millis(200)))),
        None,
    );
    let start = std::time::Instant::now();
    let resp = router.handle(post("again")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(text(resp).await, "ok:again");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(backend.seen.load(Ordering::SeqCst), 2);

    // Every attempt slow: the last per-try timeout answers 504.
    let backend = flaky(0, 10, Duration::from_secs(10)).await;
    let router = router_to(
        backend.addr,
        Some(policy(1, &["5xx"], Some(Duration::from_millis(100)))),
        None,
    );
    let resp = router.handle(post("")).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(text(resp).await, "upstream request timeout");
    assert_eq!(backend.seen.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_route_timeout_bounds_all_attempts_together() {
    let backend = flaky(0, 10, Duration::from_secs(10)).await;
    let router = router_to(
        backend.addr,
        Some(policy(5, &["5xx"], Some(Duration::from_millis(300)))),
        Some(Duration::from_millis(500)),
    );
    let start = std::time::Instant::now();
    let resp = router.handle(post("")).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let seen = backend.seen.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&seen),
        "500 ms hold one 300 ms try and the start of a second, not six: {seen}"
    );
}
