//! The waypoint's HBONE ingress over loopback: real mTLS + HTTP/2 CONNECT from a mesh
//! client, the inner stream served as HTTP/1.1, HTTP/2 or opaque TCP by what it
//! starts with, and the limits a hostile client meets.

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
use cairn_hbone::{
    H2Settings,
    client::{Client, ClientError, PoolKey, PoolSettings},
    server::Server,
    stream::H2Stream,
    test_ca::TestCa,
    tls::{client_config, server_config},
};
use cairn_waypoint::{
    authz::{Effect, Operation, Policies, Policy, PolicyRule, Source, Values},
    cluster::Clusters,
    ingress::{ConnLimits, Declared, Ingress, Service},
    matching::{HeaderRule, RequestMatch, StringMatch},
    route::{Action, RouteTable, Rule, WeightedBackend},
    router::{Body, Router, full},
};
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

const CLIENT: &str = "spiffe://cluster.local/ns/bookinfo/sa/productpage";
const WAYPOINT: &str = "spiffe://cluster.local/ns/bookinfo/sa/waypoint";
const REVIEWS: &str = "10.96.0.12:9080";
const MYSQL: &str = "10.96.0.13:3306";
/// reviews again, on a port declared HTTP (named `http`).
const REVIEWS_HTTP: &str = "10.96.0.14:9080";

/// An HTTP/1.1 backend answering `<name>:<path>`; counts requests.
async fn http_backend(name: &'static str, delay: Duration, hits: Arc<AtomicUsize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let hits = hits.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    async move {
                        tokio::time::sleep(delay).await;
                        let body = format!("{name}:{}", req.uri().path());
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A server-first TCP backend: greets, then echoes until the client half-closes,
/// then says goodbye and closes.
async fn greeter() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 hello\n").await;
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let _ = s.write_all(&buf[..n]).await;
                        }
                    }
                }
                let _ = s.write_all(b"bye\n").await;
            });
        }
    });
    addr
}

struct Waypoint {
    addr: SocketAddr,
    mesh: TestCa,
    v1_hits: Arc<AtomicUsize>,
    ingress: Arc<Ingress>,
    upstream: Arc<Clusters>,
}

async fn waypoint(limits: ConnLimits) -> Waypoint {
    waypoint_with(limits, Policies::default()).await
}

async fn waypoint_with(limits: ConnLimits, policies: Policies) -> Waypoint {
    let mesh = TestCa::new("mesh");
    let v1_hits = Arc::new(AtomicUsize::new(0));
    let endpoints = HashMap::from([
        (
            "reviews|v1".to_string(),
            http_backend("v1", Duration::ZERO, v1_hits.clone()).await,
        ),
        (
            "reviews|v2".to_string(),
            http_backend("v2", Duration::ZERO, Arc::default()).await,
        ),
        ("mysql".to_string(), greeter().await),
    ]);
    let upstream = Arc::new(Clusters::plain_http(endpoints));
    let forward = |backend: &str| {
        Action::Forward(vec![WeightedBackend {
            backend: backend.into(),
            weight: 1,
            headers: None,
        }])
    };
    let rule = Rule::new;
    let jason = RequestMatch {
        headers: vec![(
            HeaderName::from_static("end-user"),
            HeaderRule::Value(StringMatch::Exact("jason".into())),
        )],
        ..Default::default()
    };
    let table = RouteTable {
        rules: vec![
            rule("jason", vec![jason], forward("reviews|v2")),
            rule("rest", vec![], forward("reviews|v1")),
        ],
        policies,
        ..Default::default()
    };
    let reviews = Arc::new(Service {
        name: "reviews.bookinfo.svc.cluster.local:9080".into(),
        router: Arc::new(Router::new(table, upstream.clone(), Some(1))),
        opaque_backend: "reviews|v1".into(),
        declared: Declared::Unknown,
    });
    let declared_http = Arc::new(Service {
        name: reviews.name.clone(),
        router: reviews.router.clone(),
        opaque_backend: reviews.opaque_backend.clone(),
        declared: Declared::Http,
    });
    let mysql = Arc::new(Service {
        name: "mysql.bookinfo.svc.cluster.local:3306".into(),
        router: Arc::new(Router::new(
            RouteTable::default(),
            upstream.clone(),
            Some(1),
        )),
        opaque_backend: "mysql".into(),
        declared: Declared::Unknown,
    });
    let ingress = Arc::new(Ingress::new(limits));
    ingress.set_services(HashMap::from([
        (REVIEWS.parse().expect("addr"), reviews),
        (MYSQL.parse().expect("addr"), mysql),
        (REVIEWS_HTTP.parse().expect("addr"), declared_http),
    ]));
    let cert = mesh.workload(WAYPOINT);
    let server = Server::new(
        server_config(&cert, &mesh.roots()).expect("server config"),
        H2Settings::default(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handler = ingress.clone();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            let (server, ingress) = (server.clone(), handler.clone());
            tokio::spawn(async move {
                if let Ok((tls, who)) = server.handshake(tcp, peer).await {
                    let _ = server.serve(tls, peer, who, ingress).await;
                }
            });
        }
    });
    Waypoint {
        addr,
        mesh,
        v1_hits,
        ingress,
        upstream,
    }
}

impl Waypoint {
    async fn tunnel(&self, client: &Client, authority: &str) -> Result<H2Stream, ClientError> {
        self.tunnel_as(client, authority, CLIENT).await
    }

    async fn tunnel_as(
        &self,
        client: &Client,
        authority: &str,
        me: &str,
    ) -> Result<H2Stream, ClientError> {
        let key = PoolKey {
            source: me.parse().expect("id"),
            destination: WAYPOINT.parse().expect("id"),
            address: self.addr,
            source_ip: None,
            dialer: Default::default(),
        };
        let tls = client_config(
            &self.mesh.workload(me),
            &self.mesh.roots(),
            WAYPOINT.parse().expect("id"),
        )
        .expect("client config");
        client
            .connect(&key, tls, authority.parse().expect("authority"))
            .await
    }
}

fn client() -> Client {
    Client::new(H2Settings::default(), PoolSettings::default())
}

async fn text(resp: Response<hyper::body::Incoming>) -> String {
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

fn get(path: &str, user: Option<&str>) -> Request<Body> {
    let mut b = Request::get(path).header("host", "reviews:9080");
    if let Some(u) = user {
        b = b.header("end-user", u);
    }
    b.body(full("")).expect("request")
}

/// A router sending every request to one mesh endpoint (`REVIEWS`, which must prove
/// `endpoint_id`) over HBONE as the waypoint, dialling the test server at `hbone`
/// (not the endpoint's own address and 15008) through `client`.
fn hbone_router(
    mesh: &TestCa,
    client: Client,
    hbone: SocketAddr,
    endpoint_id: &str,
    policy: cairn_waypoint::cluster::TrafficPolicy,
) -> Router {
    use cairn_waypoint::{cluster::Cluster, hbone_upstream::HboneTransport};
    let me = Arc::new(mesh.workload(WAYPOINT));
    let roots = mesh.roots();
    let tls: cairn_waypoint::hbone_upstream::TlsFor =
        Arc::new(move |peer: &cairn_identity::SpiffeId| {
            client_config(&me, &roots, peer.clone()).map_err(|e| e.into())
        });
    let vip: SocketAddr = REVIEWS.parse().expect("addr");
    let transport = HboneTransport::new(
        client,
        WAYPOINT.parse().expect("id"),
        tls,
        HashMap::from([(vip, endpoint_id.parse().expect("id"))]),
    )
    .with_hbone_port(hbone.port())
    .with_hbone_ip(hbone.ip());
    Router::new(
        RouteTable {
            rules: vec![Rule::new("all", vec![], Action::to("reviews"))],
            ..Default::default()
        },
        Arc::new(Clusters::new(
            vec![Cluster::new("reviews", vec![vip], policy, None)],
            Arc::new(transport),
        )),
        Some(1),
    )
}

#[tokio::test]
async fn http1_and_http2_inside_hbone_are_routed_per_request() {
    let wp = waypoint(ConnLimits::default()).await;
    let client = client();

    let tunnel = wp.tunnel(&client, REVIEWS).await.expect("tunnel");
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel))
        .await
        .expect("http/1.1");
    tokio::spawn(conn);
    for i in 0..5 {
        let user = (i % 2 == 0).then_some("jason");
        let resp = h1
            .send_request(get("/reviews/1", user))
            .await
            .expect("response");
        let want = if user.is_some() {
            "v2:/reviews/1"
        } else {
            "v1:/reviews/1"
        };
        assert_eq!(
            text(resp).await,
            want,
            "HTTP/1.1 request {i} on one connection"
        );
    }

    let tunnel = wp.tunnel(&client, REVIEWS).await.expect("tunnel");
    let (h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tunnel))
            .await
            .expect("http/2");
    tokio::spawn(conn);
    let mut answers = Vec::new();
    for i in 0..20 {
        let mut h2 = h2.clone();
        let user = (i % 2 == 0).then_some("jason");
        answers.push(tokio::spawn(async move {
            let uri = format!("http://reviews:9080/r/{i}");
            let resp = h2.send_request(get(&uri, user)).await.expect("response");
            (user.is_some(), text(resp).await)
        }));
    }
    for (i, a) in answers.into_iter().enumerate() {
        let (jason, body) = a.await.expect("task");
        let want = format!("{}:/r/{i}", if jason { "v2" } else { "v1" });
        assert_eq!(body, want, "concurrent HTTP/2 streams routed one by one");
    }
    assert_eq!(
        client.connections_opened(),
        1,
        "both tunnels shared one HBONE connection"
    );
}

#[tokio::test]
async fn opaque_tcp_passes_through_even_when_the_server_speaks_first() {
    let wp = waypoint(ConnLimits::default()).await;
    let client = client();
    let mut tunnel = wp.tunnel(&client, MYSQL).await.expect("tunnel");
    let mut greeting = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_exact(&mut greeting))
        .await
        .expect("greeting after the sniff timeout")
        .expect("read");
    assert_eq!(&greeting, b"220 hello\n");
    tunnel.write_all(b"ping\n").await.expect("write");
    tunnel.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    tunnel.read_to_end(&mut rest).await.expect("read to EOF");
    assert_eq!(rest, b"ping\nbye\n", "half-close carried both ways");

    // A client-first non-HTTP protocol on the HTTP service port goes through too.
    let mut tunnel = wp.tunnel(&client, REVIEWS).await.expect("tunnel");
    tunnel
        .write_all(b"\x16\x03\x01 not http\r\n\r\n")
        .await
        .expect("write");
    tunnel.shutdown().await.expect("half-close");
    let mut answer = Vec::new();
    tunnel.read_to_end(&mut answer).await.expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "the HTTP backend itself answered the bytes it got: {answer}"
    );
}

#[tokio::test]
async fn a_client_that_connects_then_waits_is_http_on_a_declared_http_port() {
    let wp = waypoint(ConnLimits::default()).await;
    let client = client();
    // Pooling HTTP clients open connections before they have a request for them;
    // the first bytes come after the 100 ms sniff timeout.
    let late_request = |authority: &'static str| {
        let (wp, client) = (&wp, &client);
        async move {
            let tunnel = wp.tunnel(client, authority).await.expect("tunnel");
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel))
                .await
                .expect("http/1.1");
            tokio::spawn(conn);
            let resp = h1
                .send_request(get("/reviews/1", Some("jason")))
                .await
                .expect("response");
            text(resp).await
        }
    };
    assert_eq!(
        late_request(REVIEWS_HTTP).await,
        "v2:/reviews/1",
        "port named http: routed per request (jason goes to v2)"
    );
    assert_eq!(
        late_request(REVIEWS).await,
        "v1:/reviews/1",
        "nothing declared: a silent client is opaque TCP, passed to the service's own backend"
    );
}

#[tokio::test]
async fn a_route_change_applies_to_the_next_request_on_an_open_connection() {
    let wp = waypoint(ConnLimits::default()).await;
    let client = client();
    let tunnel = wp.tunnel(&client, REVIEWS).await.expect("tunnel");
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel))
        .await
        .expect("http/1.1");
    tokio::spawn(conn);
    let resp = h1.send_request(get("/r", None)).await.expect("response");
    assert_eq!(text(resp).await, "v1:/r");

    // The canary moves: everything to v2.
    let table = RouteTable {
        rules: vec![Rule::new(
            "all-v2",
            vec![],
            Action::Forward(vec![WeightedBackend {
                backend: "reviews|v2".into(),
                weight: 1,
                headers: None,
            }]),
        )],
        ..Default::default()
    };
    wp.ingress.set_services(HashMap::from([(
        REVIEWS.parse().expect("addr"),
        Arc::new(Service {
            name: "reviews.bookinfo.svc.cluster.local:9080".into(),
            router: Arc::new(Router::new(table, wp.upstream.clone(), Some(1))),
            opaque_backend: "reviews|v1".into(),
            declared: Declared::Unknown,
        }),
    )]));
    let resp = h1.send_request(get("/r", None)).await.expect("response");
    assert_eq!(
        text(resp).await,
        "v2:/r",
        "the same keep-alive connection follows the new routes"
    );
}

#[tokio::test]
async fn a_connect_to_an_address_it_does_not_serve_is_refused() {
    let wp = waypoint(ConnLimits::default()).await;
    match wp.tunnel(&client(), "10.96.0.99:80").await {
        Err(ClientError::Refused { status, .. }) => assert_eq!(status, StatusCode::NOT_FOUND),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn oversized_and_slow_request_heads_are_cut_off() {
    let limits = ConnLimits {
        header_read_timeout: Duration::from_millis(300),
        max_header_bytes: 16 * 1024,
        ..ConnLimits::default()
    };
    let wp = waypoint(limits).await;
    let client = client();

    // 40 KiB of headers: 431, and nothing reaches the backend.
    let mut tunnel = wp.tunnel(&client, REVIEWS).await.expect("tunnel");
    let mut head = b"GET /big HTTP/1.1\r\nhost: reviews\r\n".to_vec();
    for i in 0..400 {
        head.extend_from_slice(format!("x-pad-{i}: {}\r\n", "a".repeat(90)).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    let _ = tunnel.write_all(&head).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // Slowloris: a head that never ends is dropped after the header timeout.
    let mut tunnel = wp.tunnel(&client, REVIEWS).await.expect("tunnel");
    tunnel
        .write_all(b"GET /slow HTTP/1.1\r\nhost: reviews\r\nx-a: 1\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut answer)).await;
    assert!(ended.is_ok(), "the waypoint closed the stalled connection");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert_eq!(
        wp.v1_hits.load(Ordering::SeqCst),
        0,
        "neither reached the backend"
    );

    // The waypoint still serves well-behaved clients.
    let tunnel = wp.tunnel(&client, REVIEWS).await.expect("tunnel");
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel))
        .await
        .expect("http/1.1");
    tokio::spawn(conn);
    let resp = h1.send_request(get("/ok", None)).await.expect("response");
    assert_eq!(text(resp).await, "v1:/ok");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_in_order_not_reset() {
    // Idle connections may wait 600 ms; a head, once begun, 100 ms.
    let limits = ConnLimits {
        idle_timeout: Duration::from_millis(600),
        header_read_timeout: Duration::from_millis(100),
        ..ConnLimits::default()
    };
    let wp = waypoint(limits).await;
    let client = client();
    // Reads until the waypoint closes: an EOF (END_STREAM, a FIN for the client
    // behind ztunnel), not a reset that a client reusing the connection would take
    // for a failed request.
    let until_closed = async |tunnel: &mut H2Stream| {
        let mut answer = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut answer))
            .await
            .expect("the waypoint closed the idle connection");
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert!(ended.is_ok(), "closed with {ended:?} after {answer:?}");
        answer
    };
    for (service, wait) in [
        (REVIEWS, Duration::ZERO),
        (REVIEWS_HTTP, Duration::from_millis(300)),
    ] {
        let mut tunnel = wp.tunnel(&client, service).await.expect("tunnel");
        // A pooled connection used late: idle, not a slow head.
        tokio::time::sleep(wait).await;
        tunnel
            .write_all(b"GET /idle HTTP/1.1\r\nhost: reviews\r\n\r\n")
            .await
            .expect("write");
        let answer = until_closed(&mut tunnel).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{service}: {answer}");
        assert!(answer.ends_with("v1:/idle"), "{service}: {answer}");
    }
    // Opened and never used: closed in order too.
    let mut tunnel = wp.tunnel(&client, REVIEWS_HTTP).await.expect("tunnel");
    assert_eq!(until_closed(&mut tunnel).await, "");
}

#[tokio::test]
async fn an_http2_reset_flood_costs_the_flooder_its_connection_not_others_their_service() {
    let wp = waypoint(ConnLimits::default()).await;
    let client = client();
    let tunnel = wp.tunnel(&client, REVIEWS).await.expect("tunnel");
    let (mut flood, conn) = h2::client::handshake(tunnel).await.expect("h2");
    let flooder = tokio::spawn(conn);
    let mut opened = 0;
    for _ in 0..5000 {
        let req = Request::get("http://reviews:9080/flood")
            .body(())
            .expect("request");
        let Ok(ready) = flood.ready().await else {
            break;
        };
        flood = ready;
        let Ok((resp, mut stream)) = flood.send_request(req, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        drop(resp);
        opened += 1;
    }
    assert!(opened > 0);
    let flooder = tokio::time::timeout(Duration::from_secs(10), flooder).await;
    assert!(
        flooder.is_ok(),
        "the flooding connection was closed ({opened} streams opened and reset)"
    );

    // Another client on the same waypoint is unaffected.
    let tunnel = wp.tunnel(&client, REVIEWS).await.expect("tunnel");
    let (mut h2c, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tunnel))
            .await
            .expect("http/2");
    tokio::spawn(conn);
    let resp = h2c
        .send_request(get("http://reviews:9080/after", None))
        .await
        .expect("response");
    assert_eq!(text(resp).await, "v1:/after");
}

#[tokio::test]
async fn l7_policy_admits_the_listed_principal_and_denies_the_rest_with_403() {
    let allow = Policy {
        name: "bookinfo/reviews-viewers".into(),
        effect: Effect::Allow,
        rules: vec![PolicyRule {
            from: vec![Source {
                principals: Values::parse(&[CLIENT.trim_start_matches("spiffe://").into()], &[]),
                ..Default::default()
            }],
            to: vec![Operation {
                methods: Values::parse(&["GET".into()], &[]),
                ..Default::default()
            }],
            when: vec![],
        }],
    };
    let deny = Policy {
        name: "bookinfo/no-admin".into(),
        effect: Effect::Deny,
        rules: vec![PolicyRule {
            to: vec![Operation {
                paths: Values::parse(&["/admin*".into()], &[]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let wp = waypoint_with(
        ConnLimits::default(),
        Policies {
            policies: vec![allow, deny],
        },
    )
    .await;
    let client = client();
    const RATINGS: &str = "spiffe://cluster.local/ns/bookinfo/sa/ratings";
    for (who, method, path, want) in [
        (CLIENT, "GET", "/reviews/1", StatusCode::OK),
        (CLIENT, "POST", "/reviews/1", StatusCode::FORBIDDEN),
        (CLIENT, "GET", "/admin/users", StatusCode::FORBIDDEN),
        (RATINGS, "GET", "/reviews/1", StatusCode::FORBIDDEN),
    ] {
        for http2 in [false, true] {
            let tunnel = wp.tunnel_as(&client, REVIEWS, who).await.expect("tunnel");
            let req = Request::builder()
                .method(method)
                .uri(format!("http://reviews:9080{path}"))
                .header("host", "reviews:9080")
                .body(full(""))
                .expect("request");
            let resp = if http2 {
                let (mut h2, conn) = hyper::client::conn::http2::handshake(
                    TokioExecutor::new(),
                    TokioIo::new(tunnel),
                )
                .await
                .expect("http/2");
                tokio::spawn(conn);
                h2.send_request(req).await.expect("response")
            } else {
                let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel))
                    .await
                    .expect("http/1.1");
                tokio::spawn(conn);
                h1.send_request(req).await.expect("response")
            };
            assert_eq!(resp.status(), want, "{who} {method} {path} (h2: {http2})");
            if want == StatusCode::FORBIDDEN {
                assert_eq!(text(resp).await, "RBAC: access denied");
            }
        }
    }
    assert_eq!(
        wp.v1_hits.load(Ordering::SeqCst),
        2,
        "only the allowed GETs (HTTP/1.1 and HTTP/2) reached the backend"
    );
}

#[tokio::test]
async fn the_waypoint_reaches_mesh_endpoints_over_hbone_as_its_own_identity() {
    use cairn_waypoint::cluster::TrafficPolicy;
    // The "endpoint": an HBONE server whose ingress only admits the waypoint's
    // principal (as a destination ztunnel with policy would), in front of v1.
    let only_waypoint = Policy {
        name: "bookinfo/from-waypoint".into(),
        effect: Effect::Allow,
        rules: vec![PolicyRule {
            from: vec![Source {
                principals: Values::parse(&[WAYPOINT.trim_start_matches("spiffe://").into()], &[]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let endpoint = waypoint_with(
        ConnLimits::default(),
        Policies {
            policies: vec![only_waypoint],
        },
    )
    .await;
    // The endpoint's HBONE port is not 15008 here: CONNECT goes to the server's
    // address, the tunnel's authority is the service address it routes by.
    let hbone = Client::new(H2Settings::default(), PoolSettings::default());
    let run = |expected: &str| {
        hbone_router(
            &endpoint.mesh,
            hbone.clone(),
            endpoint.addr,
            expected,
            TrafficPolicy::default(),
        )
    };
    let router = run(WAYPOINT);
    for i in 0..5 {
        let resp = router.handle(get(&format!("/r/{i}"), None)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], format!("v1:/r/{i}").as_bytes());
    }
    assert_eq!(
        hbone.connections_opened(),
        1,
        "one pooled HBONE connection carried every request"
    );
    // An endpoint that does not prove the identity the config gives it is refused.
    let impostor = run("spiffe://cluster.local/ns/bookinfo/sa/reviews");
    let resp = impostor.handle(get("/r/x", None)).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(endpoint.v1_hits.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_stalled_endpoint_fails_after_its_clusters_connect_timeout() {
    use cairn_waypoint::cluster::TrafficPolicy;
    // Accepts TCP and never answers the TLS handshake: a wedged peer.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let stalled = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let policy = TrafficPolicy {
        connect_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let router = hbone_router(
        &TestCa::new("mesh"),
        client(),
        stalled,
        "spiffe://cluster.local/ns/bookinfo/sa/reviews",
        policy,
    );
    let start = std::time::Instant::now();
    let resp = router.handle(get("/", None)).await;
    let took = start.elapsed();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "gave up after {took:?}, the cluster's connectTimeout is 300ms"
    );
}

/// An HBONE endpoint that counts CONNECTs and answers HTTP/1.1 inside each tunnel.
struct CountingEndpoint {
    connects: Arc<AtomicUsize>,
}

impl cairn_hbone::server::Handler for CountingEndpoint {
    fn handle(
        &self,
        _connect: cairn_hbone::server::Connect,
        responder: cairn_hbone::server::Responder,
    ) -> cairn_hbone::server::HandlerFuture {
        self.connects.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let Ok(stream) = responder.accept() else {
                return;
            };
            let svc = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                    Bytes::from_static(b"ok"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        })
    }
}

#[tokio::test]
async fn max_requests_per_connection_opens_a_new_tunnel_after_that_many_requests() {
    use cairn_waypoint::cluster::{PoolLimits, TrafficPolicy};
    const ENDPOINT: &str = "spiffe://cluster.local/ns/bookinfo/sa/reviews";
    let mesh = TestCa::new("mesh");
    let connects = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = Server::new(
        server_config(&mesh.workload(ENDPOINT), &mesh.roots()).expect("server config"),
        H2Settings::default(),
    );
    let handler = Arc::new(CountingEndpoint {
        connects: connects.clone(),
    });
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            let (server, handler) = (server.clone(), handler.clone());
            tokio::spawn(async move {
                if let Ok((tls, who)) = server.handshake(tcp, peer).await {
                    let _ = server.serve(tls, peer, who, handler).await;
                }
            });
        }
    });
    let router_with = |max_requests_per_connection| {
        let policy = TrafficPolicy {
            pool: PoolLimits {
                max_requests_per_connection,
                ..Default::default()
            },
            ..Default::default()
        };
        hbone_router(&mesh, client(), addr, ENDPOINT, policy)
    };
    for (limit, tunnels) in [(None, 1), (Some(2), 3), (Some(1), 6)] {
        connects.store(0, Ordering::SeqCst);
        let router = router_with(limit);
        for _ in 0..6 {
            let resp = router.handle(get("/", None)).await;
            assert_eq!(resp.status(), StatusCode::OK);
            // The body read to its end: the connection is free for the next request.
            resp.into_body().collect().await.expect("body");
        }
        assert_eq!(
            connects.load(Ordering::SeqCst),
            tunnels,
            "maxRequestsPerConnection {limit:?}: 6 requests"
        );
    }
}
