//! Upstream clusters: load balancers, connection pool overflow (503 `UO`), outlier
//! ejection and its end (paused time), over an in-memory transport whose endpoints
//! answer as each test scripts them.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use cairn_waypoint::{
    cluster::{
        Cluster, Clusters, HashKey, LoadBalancer, OutlierDetection, PoolLimits, RetryBudget,
        TrafficPolicy, Transport,
    },
    ingress::Downstream,
    retry::{RetryOn, RetryPolicy},
    route::{Action, RouteTable, Rule},
    router::{Body, OpenFuture, RetrySlot, Router, UpstreamError, UpstreamFuture, full},
};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;

#[derive(Clone)]
enum Answer {
    Ok,
    Status(StatusCode),
    /// Answers once the gate opens.
    Wait(Arc<tokio::sync::Semaphore>),
    /// Answers with this status once the gate opens.
    WaitThen(Arc<tokio::sync::Semaphore>, StatusCode),
}

#[derive(Default)]
struct Scripted {
    answers: Mutex<HashMap<SocketAddr, Answer>>,
    seen: Mutex<Vec<SocketAddr>>,
}

impl Scripted {
    fn set(&self, addr: SocketAddr, a: Answer) {
        self.answers.lock().expect("lock").insert(addr, a);
    }

    fn take_seen(&self) -> Vec<SocketAddr> {
        std::mem::take(&mut *self.seen.lock().expect("lock"))
    }
}

impl Transport for Scripted {
    fn send(&self, endpoint: SocketAddr, _req: Request<Body>) -> UpstreamFuture {
        self.seen.lock().expect("lock").push(endpoint);
        let answer = self
            .answers
            .lock()
            .expect("lock")
            .get(&endpoint)
            .cloned()
            .unwrap_or(Answer::Ok);
        Box::pin(async move {
            let mut resp = Response::new(full(endpoint.to_string()));
            match answer {
                Answer::Ok => {}
                Answer::Status(s) => *resp.status_mut() = s,
                Answer::Wait(gate) => {
                    let _permit = gate.acquire().await;
                }
                Answer::WaitThen(gate, s) => {
                    let _permit = gate.acquire().await;
                    *resp.status_mut() = s;
                }
            }
            Ok(resp)
        })
    }

    fn open(&self, endpoint: SocketAddr) -> OpenFuture {
        Box::pin(async move { Err(UpstreamError::OpaqueUnsupported(endpoint.to_string())) })
    }
}

fn addrs(n: u8) -> Vec<SocketAddr> {
    (1..=n)
        .map(|i| SocketAddr::from(([10, 0, 0, i], 9080)))
        .collect()
}

fn router(policy: TrafficPolicy, endpoints: Vec<SocketAddr>, t: Arc<Scripted>) -> Router {
    router_with(None, policy, endpoints, t)
}

/// [`router`], with a rule that retries 5xx twice.
fn retrying_router(policy: TrafficPolicy, endpoints: Vec<SocketAddr>, t: Arc<Scripted>) -> Router {
    let mut on = RetryOn::default();
    on.add("5xx").expect("condition");
    let retry = RetryPolicy {
        retries: 2,
        per_try_timeout: None,
        on,
        status_codes: vec![],
    };
    router_with(Some(retry), policy, endpoints, t)
}

/// Every request to the cluster `reviews` of `endpoints`, with `retry`.
fn router_with(
    retry: Option<RetryPolicy>,
    policy: TrafficPolicy,
    endpoints: Vec<SocketAddr>,
    t: Arc<Scripted>,
) -> Router {
    let clusters = Clusters::new(vec![Cluster::new("reviews", endpoints, policy, Some(4))], t);
    router_over(retry, Arc::new(clusters))
}

/// A router over `clusters` with one rule to `reviews`, with `retry`.
fn router_over(retry: Option<RetryPolicy>, clusters: Arc<Clusters>) -> Router {
    let mut rule = Rule::new("r", vec![], Action::to("reviews"));
    rule.retry = retry;
    Router::new(
        RouteTable {
            rules: vec![rule],
            ..Default::default()
        },
        clusters,
        Some(4),
    )
}

/// Two 5xx in a row eject an endpoint for 30 s (and more each time).
fn ejecting(max_ejection_percent: u32) -> TrafficPolicy {
    TrafficPolicy {
        outlier: Some(OutlierDetection {
            consecutive_5xx: Some(2),
            consecutive_gateway_errors: None,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent,
            min_health_percent: 0,
            interval: Duration::from_secs(10),
        }),
        ..Default::default()
    }
}

fn lb(lb: LoadBalancer) -> TrafficPolicy {
    TrafficPolicy {
        lb,
        ..Default::default()
    }
}

fn get() -> Request<Body> {
    Request::get("/").body(full("")).expect("request")
}

fn counts(seen: &[SocketAddr]) -> HashMap<SocketAddr, usize> {
    let mut m = HashMap::new();
    for a in seen {
        *m.entry(*a).or_default() += 1;
    }
    m
}

#[tokio::test]
async fn round_robin_random_and_least_request_spread_load() {
    let t = Arc::new(Scripted::default());
    let eps = addrs(3);
    let rr = router(lb(LoadBalancer::RoundRobin), eps.clone(), t.clone());
    for _ in 0..300 {
        rr.handle(get())
            .await
            .into_body()
            .collect()
            .await
            .expect("body");
    }
    let c = counts(&t.take_seen());
    assert!(eps.iter().all(|e| c[e] == 100), "round robin: {c:?}");

    let random = router(lb(LoadBalancer::Random), eps.clone(), t.clone());
    for _ in 0..3000 {
        random.handle(get()).await;
    }
    let c = counts(&t.take_seen());
    assert!(
        eps.iter().all(|e| (850..=1150).contains(&c[e])),
        "random: {c:?}"
    );

    // Least request: one endpoint never finishes its requests, so they pile up
    // there; it is chosen only when both random picks land on it (~1/9), where
    // random choice would give it 1/3.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    t.set(eps[0], Answer::Wait(gate.clone()));
    let least = Arc::new(router(
        lb(LoadBalancer::LeastRequest),
        eps.clone(),
        t.clone(),
    ));
    let mut sent = Vec::new();
    for _ in 0..300 {
        let r = least.clone();
        sent.push(tokio::spawn(async move { r.handle(get()).await.status() }));
        // Let the request reach its endpoint (and finish, where it can).
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
    }
    let c = counts(&t.take_seen());
    let slow = c.get(&eps[0]).copied().unwrap_or(0);
    assert!(slow < 60, "the loaded endpoint is mostly avoided: {c:?}");
    gate.add_permits(1000);
    for h in sent {
        assert_eq!(h.await.expect("task"), StatusCode::OK);
    }
}

#[tokio::test]
async fn consistent_hash_sticks_a_key_to_an_endpoint() {
    let t = Arc::new(Scripted::default());
    let by_user = router(
        lb(LoadBalancer::ConsistentHash(HashKey::Header(
            http::HeaderName::from_static("x-user"),
        ))),
        addrs(4),
        t.clone(),
    );
    let mut home = HashMap::new();
    for round in 0..5 {
        for user in 0..40 {
            let req = Request::get("/")
                .header("x-user", format!("user-{user}"))
                .body(full(""))
                .expect("request");
            by_user.handle(req).await;
            let ep = t.take_seen()[0];
            let first = *home.entry(user).or_insert(ep);
            assert_eq!(first, ep, "user-{user} moved in round {round}");
        }
    }
    let spread = counts(&home.values().copied().collect::<Vec<_>>());
    assert!(spread.len() >= 3, "40 keys over 4 endpoints: {spread:?}");

    let by_cookie = router(
        lb(LoadBalancer::ConsistentHash(HashKey::Cookie(
            "session".into(),
        ))),
        addrs(4),
        t.clone(),
    );
    for _ in 0..10 {
        let req = Request::get("/")
            .header("cookie", "theme=dark; session=abc123")
            .body(full(""))
            .expect("request");
        by_cookie.handle(req).await;
    }
    assert_eq!(counts(&t.take_seen()).len(), 1, "one session, one endpoint");

    let by_ip = router(
        lb(LoadBalancer::ConsistentHash(HashKey::SourceIp)),
        addrs(4),
        t.clone(),
    );
    for _ in 0..10 {
        let mut req = get();
        req.extensions_mut().insert(Arc::new(Downstream {
            identity: None,
            peer: SocketAddr::from(([10, 1, 2, 3], 5555)),
            service: "reviews:9080".into(),
            destination: SocketAddr::from(([10, 96, 0, 1], 9080)),
        }));
        by_ip.handle(req).await;
    }
    assert_eq!(counts(&t.take_seen()).len(), 1, "one source, one endpoint");
}

#[tokio::test]
async fn pool_overflow_answers_503_and_admits_again_when_requests_finish() {
    let t = Arc::new(Scripted::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let eps = addrs(1);
    t.set(eps[0], Answer::Wait(gate.clone()));
    let policy = TrafficPolicy {
        pool: PoolLimits {
            max_connections: Some(1),
            http1_max_pending_requests: Some(1),
            ..Default::default()
        },
        ..Default::default()
    };
    let r = Arc::new(router(policy, eps.clone(), t.clone()));
    let mut held = Vec::new();
    for _ in 0..2 {
        let r = r.clone();
        held.push(tokio::spawn(async move { r.handle(get()).await.status() }));
    }
    while t.seen.lock().expect("lock").len() < 2 {
        tokio::task::yield_now().await;
    }
    let resp = r.handle(get()).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("overflow"));
    assert_eq!(t.take_seen().len(), 2, "the overflowing request never left");
    gate.add_permits(10);
    for h in held {
        assert_eq!(h.await.expect("task"), StatusCode::OK);
    }
    t.set(eps[0], Answer::Ok);
    assert_eq!(r.handle(get()).await.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn an_ejected_endpoint_gets_no_traffic_until_its_ejection_ends() {
    let t = Arc::new(Scripted::default());
    let eps = addrs(2);
    let (good, bad) = (eps[0], eps[1]);
    t.set(bad, Answer::Status(StatusCode::INTERNAL_SERVER_ERROR));
    let r = router(ejecting(50), eps.clone(), t.clone());
    // Round robin: the bad endpoint fails twice in the first four requests.
    for _ in 0..4 {
        r.handle(get()).await;
    }
    assert_eq!(counts(&t.take_seen())[&bad], 2);
    for _ in 0..50 {
        assert_eq!(r.handle(get()).await.status(), StatusCode::OK);
    }
    assert!(
        t.take_seen().iter().all(|a| *a == good),
        "no traffic to the ejected endpoint"
    );
    tokio::time::advance(Duration::from_secs(31)).await;
    for _ in 0..4 {
        r.handle(get()).await;
    }
    assert_eq!(
        counts(&t.take_seen())[&bad],
        2,
        "back after 30 s, and ejected again after two more failures"
    );
    // The second ejection lasts twice as long.
    tokio::time::advance(Duration::from_secs(45)).await;
    for _ in 0..10 {
        r.handle(get()).await;
    }
    assert!(
        t.take_seen().iter().all(|a| *a == good),
        "still ejected at 45 s of 60"
    );
    tokio::time::advance(Duration::from_secs(16)).await;
    for _ in 0..4 {
        r.handle(get()).await;
    }
    assert!(t.take_seen().contains(&bad), "back after 60 s");
}

/// `bad`, ejected just now, stays out for `secs` and no longer: still out a second
/// before, back a second after (and, if it still fails, ejected again then).
async fn ejection_lasts(r: &Router, t: &Scripted, bad: SocketAddr, secs: u64) {
    tokio::time::advance(Duration::from_secs(secs - 1)).await;
    for _ in 0..10 {
        r.handle(get()).await;
    }
    assert!(
        !t.take_seen().contains(&bad),
        "still ejected at {} s of {secs}",
        secs - 1
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    for _ in 0..4 {
        r.handle(get()).await;
    }
    assert!(t.take_seen().contains(&bad), "back after {secs} s");
}

/// Two endpoints, round robin, the second answering 500: ejected (for 30 s, the
/// first time) by the first four requests.
async fn one_failing_endpoint_ejected() -> (Router, Arc<Scripted>, SocketAddr) {
    let t = Arc::new(Scripted::default());
    let eps = addrs(2);
    let bad = eps[1];
    t.set(bad, Answer::Status(StatusCode::INTERNAL_SERVER_ERROR));
    let r = router(ejecting(50), eps, t.clone());
    for _ in 0..4 {
        r.handle(get()).await;
    }
    assert_eq!(counts(&t.take_seen())[&bad], 2, "ejected");
    (r, t, bad)
}

#[tokio::test(start_paused = true)]
async fn ejections_back_off_to_five_minutes_at_most() {
    let (r, t, bad) = one_failing_endpoint_ejected().await;
    // Back one second after each ejection and failing again at once: 30 s more each
    // time, up to Envoy's 300 s.
    for n in 1..=12 {
        ejection_lasts(&r, &t, bad, (30 * n).min(300)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn each_interval_back_takes_one_off_the_next_ejection() {
    let (r, t, bad) = one_failing_endpoint_ejected().await;
    ejection_lasts(&r, &t, bad, 30).await;
    ejection_lasts(&r, &t, bad, 60).await;
    // Third ejection (90 s); this time the endpoint comes back healthy.
    tokio::time::advance(Duration::from_secs(91)).await;
    t.set(bad, Answer::Ok);
    for _ in 0..4 {
        assert_eq!(r.handle(get()).await.status(), StatusCode::OK);
    }
    assert!(t.take_seen().contains(&bad));
    // Two intervals (10 s) back take the multiplier from 3 to 1: the next ejection
    // lasts 60 s, not 120.
    tokio::time::advance(Duration::from_secs(24)).await;
    t.set(bad, Answer::Status(StatusCode::INTERNAL_SERVER_ERROR));
    for _ in 0..4 {
        r.handle(get()).await;
    }
    assert_eq!(counts(&t.take_seen())[&bad], 2, "ejected again");
    ejection_lasts(&r, &t, bad, 60).await;
}

#[tokio::test(start_paused = true)]
async fn max_retries_caps_the_retries_in_flight_to_a_cluster() {
    let failing = |max_retries| {
        let t = Arc::new(Scripted::default());
        let eps = addrs(1);
        t.set(eps[0], Answer::Status(StatusCode::SERVICE_UNAVAILABLE));
        let policy = TrafficPolicy {
            pool: PoolLimits {
                max_retries,
                ..Default::default()
            },
            ..Default::default()
        };
        (retrying_router(policy, eps, t.clone()), t)
    };
    let (r, t) = failing(None);
    assert_eq!(
        r.handle(get()).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        t.take_seen().len(),
        3,
        "no cap: the first attempt and two retries"
    );
    let (r, t) = failing(Some(0));
    assert_eq!(
        r.handle(get()).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(t.take_seen().len(), 1, "maxRetries 0: never retried");

    // The cap counts retries in flight, and frees a slot when one ends.
    let count = Arc::default();
    let a = RetrySlot::counted(&count, 2).expect("first");
    let _b = RetrySlot::counted(&count, 2).expect("second");
    assert!(
        RetrySlot::counted(&count, 2).is_none(),
        "third over the cap"
    );
    drop(a);
    assert!(RetrySlot::counted(&count, 2).is_some(), "a slot freed");
}

#[tokio::test(start_paused = true)]
async fn a_config_change_keeps_an_ejected_endpoint_out_until_its_ejection_ends() {
    let t = Arc::new(Scripted::default());
    let eps = addrs(3);
    let (good, bad, added) = (eps[0], eps[1], eps[2]);
    t.set(bad, Answer::Status(StatusCode::INTERNAL_SERVER_ERROR));
    let cluster = |endpoints: Vec<SocketAddr>, policy| {
        vec![Cluster::new("reviews", endpoints, policy, Some(4))]
    };
    let before = Arc::new(Clusters::new(
        cluster(vec![good, bad], ejecting(50)),
        t.clone(),
    ));
    let r = router_over(None, before.clone());
    for _ in 0..4 {
        r.handle(get()).await;
    }
    assert_eq!(counts(&t.take_seen())[&bad], 2, "ejected after two 5xx");

    // An endpoint is added: the new config's cluster takes the old one's state.
    let after = Arc::new(Clusters::replacing(
        cluster(vec![good, bad, added], ejecting(50)),
        t.clone(),
        &before,
    ));
    let r = router_over(None, after.clone());
    for _ in 0..30 {
        assert_eq!(r.handle(get()).await.status(), StatusCode::OK);
    }
    let seen = counts(&t.take_seen());
    assert_eq!(seen.get(&bad), None, "still ejected under the new config");
    assert_eq!(seen[&added], 15, "the new endpoint takes its share");
    tokio::time::advance(Duration::from_secs(31)).await;
    for _ in 0..3 {
        r.handle(get()).await;
    }
    assert_eq!(
        counts(&t.take_seen())[&bad],
        1,
        "back once its ejection ends"
    );

    // Changed outlier settings start every endpoint afresh.
    for _ in 0..6 {
        r.handle(get()).await;
    }
    assert_eq!(counts(&t.take_seen())[&bad], 1, "ejected again");
    let changed = Arc::new(Clusters::replacing(
        cluster(vec![good, bad, added], ejecting(34)),
        t.clone(),
        &after,
    ));
    let r = router_over(None, changed);
    for _ in 0..3 {
        r.handle(get()).await;
    }
    assert_eq!(
        counts(&t.take_seen())[&bad],
        1,
        "its ejection was forgotten"
    );
}

#[tokio::test]
async fn requests_in_flight_under_the_old_config_count_against_the_new_one() {
    let t = Arc::new(Scripted::default());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let eps = addrs(1);
    t.set(eps[0], Answer::Wait(gate.clone()));
    let policy = TrafficPolicy {
        pool: PoolLimits {
            http2_max_requests: Some(1),
            ..Default::default()
        },
        ..Default::default()
    };
    let cluster = || {
        vec![Cluster::new(
            "reviews",
            eps.clone(),
            policy.clone(),
            Some(4),
        )]
    };
    let before = Arc::new(Clusters::new(cluster(), t.clone()));
    let old = Arc::new(router_over(None, before.clone()));
    let held = tokio::spawn({
        let old = old.clone();
        async move { old.handle(get()).await.status() }
    });
    while t.seen.lock().expect("lock").is_empty() {
        tokio::task::yield_now().await;
    }
    let new = router_over(
        None,
        Arc::new(Clusters::replacing(cluster(), t.clone(), &before)),
    );
    // (Admitted, it would wait at the gate: the timeout makes that a failure.)
    let answered = tokio::time::timeout(Duration::from_secs(5), new.handle(get()))
        .await
        .expect("answered at once");
    assert_eq!(
        answered.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the old config's request holds the one slot"
    );
    gate.add_permits(10);
    assert_eq!(held.await.expect("task"), StatusCode::OK);
    t.set(eps[0], Answer::Ok);
    assert_eq!(new.handle(get()).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_retry_budget_bounds_retries_by_the_requests_in_flight() {
    // Every endpoint answers 503 after the gate opens; every request may retry twice.
    let run = |retry_budget| async move {
        let t = Arc::new(Scripted::default());
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let eps = addrs(1);
        t.set(
            eps[0],
            Answer::WaitThen(gate.clone(), StatusCode::SERVICE_UNAVAILABLE),
        );
        let policy = TrafficPolicy {
            retry_budget,
            ..Default::default()
        };
        let r = Arc::new(retrying_router(policy, eps.clone(), t.clone()));
        let held: Vec<_> = (0..10)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move { r.handle(get()).await.status() })
            })
            .collect();
        while t.seen.lock().expect("lock").len() < 10 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(1000);
        for h in held {
            assert_eq!(h.await.expect("task"), StatusCode::SERVICE_UNAVAILABLE);
        }
        t.take_seen().len() - 10
    };
    // No budget (Istio's default): every failure is retried, twice.
    assert_eq!(run(None).await, 20);
    // 10% of 10 in flight is 1, floor 2: at most two retries in flight at once.
    // The ten first attempts fail together, so two of them get a retry; the others
    // answer with their 503 (their requests leave the count as they do).
    let budget = RetryBudget {
        percent: 10.0,
        min_concurrency: 2,
    };
    let retried = run(Some(budget)).await;
    assert!(
        (2..20).contains(&retried),
        "{retried} retries under a budget of 2 in flight"
    );
}

#[test]
fn a_retry_budget_allows_a_floor_then_a_share_of_requests_in_flight() {
    let budget = RetryBudget {
        percent: 20.0,
        min_concurrency: 3,
    };
    assert_eq!(budget.allows(0), 3);
    assert_eq!(budget.allows(5), 3, "the floor");
    assert_eq!(budget.allows(50), 10, "20% of 50");
}
