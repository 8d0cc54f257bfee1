//! HBONE over loopback: real TLS 1.3 + HTTP/2 CONNECT between an in-process client and
//! server, with certificates from a test mesh CA.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use cairn_hbone::{
    H2Settings,
    client::{Client, ClientError, PoolKey, PoolSettings},
    server::{Connect, Handler, HandlerFuture, Responder, Server},
    test_ca::TestCa,
    tls::{WorkloadCertificate, client_config, server_config},
};
use cairn_identity::{SpiffeId, verify::MeshRoots};
use http::StatusCode;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

type Ca = TestCa;

fn ca(name: &str) -> Ca {
    TestCa::new(name)
}

fn workload(ca: &Ca, id: &str) -> WorkloadCertificate {
    ca.workload(id)
}

const CLIENT: &str = "spiffe://cluster.local/ns/a/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/b/sa/server";

fn id(s: &str) -> SpiffeId {
    s.parse().expect("spiffe id")
}

/// Echoes what it reads, prefixed with who asked and where to, after the client
/// half-closes. Port 9999 is refused with 403. Port 7777 answers the first chunk it
/// reads with `answer`, half-closes and drops the stream while the client's side is
/// still open (what a server closing a keep-alive connection does).
struct Echo;

impl Handler for Echo {
    fn handle(&self, c: Connect, r: Responder) -> HandlerFuture {
        Box::pin(async move {
            if c.authority.port() == 9999 {
                r.refuse(StatusCode::FORBIDDEN);
                return;
            }
            let Ok(mut s) = r.accept() else { return };
            if c.authority.port() == 7777 {
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"answer").await;
                let _ = s.shutdown().await;
                return;
            }
            let mut got = Vec::new();
            if s.read_to_end(&mut got).await.is_err() {
                return;
            }
            let head = format!("{} -> {}: ", c.peer_identity, c.authority);
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&got).await;
            let _ = s.shutdown().await;
        })
    }
}

struct TestServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Connections that have ended (the client closed them, or they failed).
    ended: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
}

async fn start_server(ca: &Ca) -> TestServer {
    start_server_with(ca, None).await
}

/// An HBONE server with `ca`'s certificate for [`SERVER`], trusting `ca`.
fn mesh_server(ca: &Ca) -> Server {
    let roots = MeshRoots::from_pem(ca.root_pem().as_bytes()).expect("roots");
    Server::new(
        server_config(&workload(ca, SERVER), &roots).expect("server config"),
        H2Settings::default(),
    )
}

/// [`start_server`] whose connections drain once `drain` turns true.
async fn start_server_with(
    ca: &Ca,
    drain: Option<tokio::sync::watch::Receiver<bool>>,
) -> TestServer {
    let mut server = mesh_server(ca);
    if let Some(drain) = drain {
        server = server.with_drain(drain);
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let (acc, end, fail) = (accepted.clone(), ended.clone(), failures.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                return;
            };
            acc.fetch_add(1, Ordering::SeqCst);
            let server = server.clone();
            let (end, fail) = (end.clone(), fail.clone());
            tokio::spawn(async move {
                match server.handshake(tcp, peer).await {
                    Ok((tls, who)) => {
                        if let Err(e) = server.serve(tls, peer, who, Arc::new(Echo)).await {
                            fail.lock().expect("lock").push(e.to_string());
                        }
                    }
                    Err(e) => fail.lock().expect("lock").push(e.to_string()),
                }
                end.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    TestServer {
        addr,
        accepted,
        ended,
        failures,
    }
}

fn key(addr: SocketAddr) -> PoolKey {
    PoolKey {
        source: id(CLIENT),
        destination: id(SERVER),
        address: addr,
        source_ip: None,
        dialer: Default::default(),
    }
}

fn tls_for(ca: &Ca, roots_of: &Ca, me: &str, expect: &str) -> Arc<rustls::ClientConfig> {
    let roots = MeshRoots::from_pem(roots_of.root_pem().as_bytes()).expect("roots");
    client_config(&workload(ca, me), &roots, id(expect)).expect("client config")
}

async fn round_trip(
    client: &Client,
    k: &PoolKey,
    tls: Arc<rustls::ClientConfig>,
    msg: &[u8],
) -> Vec<u8> {
    let mut s = client
        .connect(k, tls, "10.0.0.7:8080".parse().expect("addr"))
        .await
        .expect("tunnel");
    s.write_all(msg).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read to EOF");
    out
}

#[tokio::test]
async fn tunnel_carries_bytes_both_ways_with_half_close() {
    let mesh = ca("mesh");
    let srv = start_server(&mesh).await;
    let client = Client::new(H2Settings::default(), PoolSettings::default());
    let out = round_trip(
        &client,
        &key(srv.addr),
        tls_for(&mesh, &mesh, CLIENT, SERVER),
        b"hello",
    )
    .await;
    assert_eq!(
        String::from_utf8(out).expect("utf8"),
        format!("{CLIENT} -> 10.0.0.7:8080: hello"),
        "server saw the client's proven identity and the CONNECT authority"
    );
}

#[tokio::test]
async fn bulk_transfer_respects_flow_control() {
    let mesh = ca("mesh");
    let srv = start_server(&mesh).await;
    // Small windows: the 8 MiB must cross many window updates each way.
    let small = H2Settings {
        stream_window: 65_535,
        connection_window: 65_535,
        max_frame_size: 16_384,
        ..H2Settings::default()
    };
    let client = Client::new(small, PoolSettings::default());
    let payload: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut s = client
        .connect(
            &key(srv.addr),
            tls_for(&mesh, &mesh, CLIENT, SERVER),
            "10.0.0.7:80".parse().expect("a"),
        )
        .await
        .expect("tunnel");
    let (mut r, mut w) = tokio::io::split(&mut s);
    let send = async {
        w.write_all(&payload).await.expect("write");
        w.shutdown().await.expect("shutdown");
    };
    let mut out = Vec::new();
    let recv = r.read_to_end(&mut out);
    let (_, n) = tokio::join!(send, recv);
    n.expect("read");
    let head = format!("{CLIENT} -> 10.0.0.7:80: ");
    assert_eq!(&out[..head.len()], head.as_bytes());
    assert!(out[head.len()..] == payload[..], "payload intact");
}

#[tokio::test]
async fn wrong_server_identity_is_refused() {
    let mesh = ca("mesh");
    let srv = start_server(&mesh).await;
    let client = Client::new(H2Settings::default(), PoolSettings::default());
    let tls = tls_for(
        &mesh,
        &mesh,
        CLIENT,
        "spiffe://cluster.local/ns/b/sa/someone-else",
    );
    let err = client
        .connect(&key(srv.addr), tls, "10.0.0.7:80".parse().expect("a"))
        .await
        .expect_err("identity mismatch");
    assert!(matches!(err, ClientError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("expected"), "{err}");
}

#[tokio::test]
async fn foreign_client_certificate_is_refused_by_the_server() {
    let mesh = ca("mesh");
    let other = ca("other");
    let srv = start_server(&mesh).await;
    let client = Client::new(H2Settings::default(), PoolSettings::default());
    // Trusts the mesh (so the server checks out) but proves itself with a foreign CA.
    let tls = tls_for(&other, &mesh, CLIENT, SERVER);
    let res = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = client
            .connect(&key(srv.addr), tls, "10.0.0.7:80".parse().expect("a"))
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| ClientError::Tls {
                addr: srv.addr,
                source: e,
            })?;
        Ok::<_, ClientError>(buf)
    })
    .await
    .expect("no hang");
    assert!(res.is_err(), "foreign client got through: {res:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let failures = srv.failures.lock().expect("lock").join("\n");
    assert!(failures.contains("UnknownIssuer"), "server log: {failures}");
}

#[tokio::test]
async fn refusals_reach_the_client_with_their_status() {
    let mesh = ca("mesh");
    let srv = start_server(&mesh).await;
    let client = Client::new(H2Settings::default(), PoolSettings::default());
    let err = client
        .connect(
            &key(srv.addr),
            tls_for(&mesh, &mesh, CLIENT, SERVER),
            "10.0.0.7:9999".parse().expect("a"),
        )
        .await
        .expect_err("refused");
    assert!(
        matches!(
            err,
            ClientError::Refused {
                status: StatusCode::FORBIDDEN,
                ..
            }
        ),
        "{err}"
    );
    // The connection stays usable after a refusal.
    let out = round_trip(
        &client,
        &key(srv.addr),
        tls_for(&mesh, &mesh, CLIENT, SERVER),
        b"x",
    )
    .await;
    assert!(out.ends_with(b"x"));
    assert_eq!(client.connections_opened(), 1);
}

#[tokio::test]
async fn streams_share_connections_up_to_the_limit() {
    let mesh = ca("mesh");
    let srv = start_server(&mesh).await;
    let client = Client::new(
        H2Settings::default(),
        PoolSettings {
            max_streams_per_connection: 4,
            ..PoolSettings::default()
        },
    );
    let tls = tls_for(&mesh, &mesh, CLIENT, SERVER);
    let mut open = Vec::new();
    for _ in 0..10 {
        open.push(
            client
                .connect(
                    &key(srv.addr),
                    tls.clone(),
                    "10.0.0.7:80".parse().expect("a"),
                )
                .await
                .expect("tunnel"),
        );
    }
    assert_eq!(
        client.connections_opened(),
        3,
        "10 streams at 4 per connection"
    );
    assert_eq!(srv.accepted.load(Ordering::SeqCst), 3);
    drop(open);
    // Released slots are reused: no new connection for the next tunnels.
    for _ in 0..4 {
        let out = round_trip(&client, &key(srv.addr), tls.clone(), b"again").await;
        assert!(out.ends_with(b"again"));
    }
    assert_eq!(client.connections_opened(), 3);
    // Another source identity never shares those connections.
    let other_key = PoolKey {
        source: id("spiffe://cluster.local/ns/a/sa/other"),
        ..key(srv.addr)
    };
    let tls_other = tls_for(&mesh, &mesh, "spiffe://cluster.local/ns/a/sa/other", SERVER);
    round_trip(&client, &other_key, tls_other, b"y").await;
    assert_eq!(client.connections_opened(), 4);
}

#[tokio::test]
async fn a_burst_of_first_connections_to_a_peer_shares_one_dial() {
    let mesh = ca("mesh");
    let srv = start_server(&mesh).await;
    let client = Client::new(H2Settings::default(), PoolSettings::default());
    let tls = tls_for(&mesh, &mesh, CLIENT, SERVER);
    let burst: Vec<_> = (0..20)
        .map(|i| {
            let (client, tls, k) = (client.clone(), tls.clone(), key(srv.addr));
            tokio::spawn(
                async move { round_trip(&client, &k, tls, format!("m{i}").as_bytes()).await },
            )
        })
        .collect();
    for (i, t) in burst.into_iter().enumerate() {
        let out = t.await.expect("task");
        assert!(out.ends_with(format!("m{i}").as_bytes()), "tunnel {i}");
    }
    assert_eq!(
        client.connections_opened(),
        1,
        "one dial for the whole burst"
    );
    assert_eq!(srv.accepted.load(Ordering::SeqCst), 1);
}

/// Accepts TCP connections and never answers on them (a peer stuck before TLS);
/// counts them.
async fn silent_listener() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(tcp);
        }
    });
    (addr, accepted)
}

fn client_with_connect_timeout(timeout: Duration) -> Client {
    Client::new(
        H2Settings::default(),
        PoolSettings {
            connect_timeout: timeout,
            ..PoolSettings::default()
        },
    )
}

#[tokio::test]
async fn a_failed_dial_fails_its_waiters_without_dialing_again() {
    let mesh = ca("mesh");
    let (addr, accepted) = silent_listener().await;
    let client = client_with_connect_timeout(Duration::from_millis(300));
    let tls = tls_for(&mesh, &mesh, CLIENT, SERVER);
    let burst: Vec<_> = (0..10)
        .map(|_| {
            let (client, tls, k) = (client.clone(), tls.clone(), key(addr));
            tokio::spawn(async move {
                client
                    .connect(&k, tls, "10.0.0.7:8080".parse().expect("addr"))
                    .await
            })
        })
        .collect();
    let mut timeouts = 0;
    for t in burst {
        let err = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("no caller hangs")
            .expect("task")
            .expect_err("the peer never speaks TLS");
        match err {
            ClientError::ConnectTimeout { .. } => timeouts += 1,
            ClientError::SharedDial { ref reason, .. } => {
                assert!(reason.contains("timed out"), "{err}")
            }
            other => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!(
        timeouts, 1,
        "one caller dialed, the others shared its failure"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one TCP connection");
}

#[tokio::test]
async fn an_abandoned_dial_hands_over_to_a_waiting_caller() {
    let mesh = ca("mesh");
    let (addr, accepted) = silent_listener().await;
    let client = client_with_connect_timeout(Duration::from_millis(500));
    let tls = tls_for(&mesh, &mesh, CLIENT, SERVER);
    let start = |client: &Client| {
        let (client, tls, k) = (client.clone(), tls.clone(), key(addr));
        tokio::spawn(async move {
            client
                .connect(&k, tls, "10.0.0.7:8080".parse().expect("addr"))
                .await
        })
    };
    let first = start(&client);
    while accepted.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The second caller finds the first one's dial in flight and waits for it.
    let second = start(&client);
    tokio::time::sleep(Duration::from_millis(50)).await;
    first.abort();
    let err = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the waiter does not hang on an abandoned dial")
        .expect("task")
        .expect_err("the peer never speaks TLS");
    assert!(matches!(err, ClientError::ConnectTimeout { .. }), "{err}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the waiter dialed itself once the first caller went away"
    );
}

#[tokio::test]
async fn idle_connections_close_and_leave_the_pool() {
    let mesh = ca("mesh");
    let srv = start_server(&mesh).await;
    let idle = Duration::from_millis(300);
    let client = Client::new(
        H2Settings::default(),
        PoolSettings {
            idle_timeout: idle,
            ..PoolSettings::default()
        },
    );
    let tls = tls_for(&mesh, &mesh, CLIENT, SERVER);
    // A tunnel held open past the idle timeout keeps its connection.
    let held = client
        .connect(
            &key(srv.addr),
            tls.clone(),
            "10.0.0.7:80".parse().expect("a"),
        )
        .await
        .expect("tunnel");
    tokio::time::sleep(idle * 2).await;
    assert_eq!(srv.ended.load(Ordering::SeqCst), 0, "in use: open");
    assert_eq!(client.connections_pooled(), 1);
    drop(held);
    // Idle from now: closed by the client within the timeout (and some slack),
    // without the pool being asked for that peer again.
    let deadline = tokio::time::Instant::now() + idle * 10;
    while srv.ended.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle connection was not closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(client.connections_pooled(), 0, "and it left the pool");
    // The next tunnel to that peer dials a new connection and works.
    let out = round_trip(&client, &key(srv.addr), tls, b"later").await;
    assert!(out.ends_with(b"later"));
    assert_eq!(client.connections_opened(), 2);
}

/// A raw HTTP/2 request over mesh TLS, for requests our client would never send.
async fn raw_request(ca: &Ca, addr: SocketAddr, req: http::Request<()>) -> StatusCode {
    let tls = tls_for(ca, ca, CLIENT, SERVER);
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(rustls_pki_types::ServerName::from(addr.ip()), tcp)
        .await
        .expect("tls");
    let (send, conn) = h2::client::handshake(tls).await.expect("h2");
    tokio::spawn(conn);
    let mut send = send.ready().await.expect("ready");
    let (resp, _) = send.send_request(req, true).expect("send");
    resp.await.expect("response").status()
}

#[tokio::test]
async fn malformed_requests_are_answered_without_reaching_the_handler() {
    let mesh = ca("mesh");
    let srv = start_server(&mesh).await;
    let get = http::Request::builder()
        .method("GET")
        .uri("https://10.0.0.7:80/")
        .body(())
        .expect("req");
    assert_eq!(
        raw_request(&mesh, srv.addr, get).await,
        StatusCode::METHOD_NOT_ALLOWED
    );
    let by_name = http::Request::builder()
        .method("CONNECT")
        .uri("reviews.default.svc:9080")
        .body(())
        .expect("req");
    assert_eq!(
        raw_request(&mesh, srv.addr, by_name).await,
        StatusCode::BAD_REQUEST
    );
}

/// A server of `mesh`'s that gives clients 200 ms for each handshake step.
fn impatient_server(mesh: &Ca) -> Server {
    mesh_server(mesh).with_handshake_timeout(Duration::from_millis(200))
}

#[tokio::test]
async fn a_peer_that_stalls_the_handshake_is_dropped() {
    let mesh = ca("mesh");
    let server = impatient_server(&mesh);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let result = tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.expect("accept");
        server.handshake(tcp, peer).await.map(|_| ())
    });
    // Connect and send half a ClientHello, then nothing.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .expect("write");
    let err = tokio::time::timeout(Duration::from_secs(5), result)
        .await
        .expect("the server gives up on its own")
        .expect("task")
        .expect_err("stalled handshake");
    assert!(err.to_string().contains("did not finish within"), "{err}");
}

#[tokio::test]
async fn a_peer_silent_after_tls_is_dropped_after_the_handshake_timeout() {
    let mesh = ca("mesh");
    let server = impatient_server(&mesh);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let served = tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.expect("accept");
        let (tls, id) = server.handshake(tcp, peer).await.expect("tls");
        let handler: Arc<dyn Handler> = Arc::new(Echo);
        server.serve(tls, peer, id, handler).await
    });
    // A valid mesh client that finishes TLS and then says nothing.
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(tls_for(&mesh, &mesh, CLIENT, SERVER))
        .connect(rustls_pki_types::ServerName::from(addr.ip()), tcp)
        .await
        .expect("tls");
    let err = tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("the server gives up on its own")
        .expect("task")
        .expect_err("no preface");
    assert!(err.to_string().contains("no HTTP/2 preface"), "{err}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the connection is closed, not left open: {closed:?}"
    );
}

/// A connected loopback pair: (the application's end, the proxy's end).
async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let app = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (proxied, _) = listener.accept().await.expect("accept");
    (app, proxied)
}

#[tokio::test]
async fn early_splice_sends_before_the_answer_and_reports_refusals() {
    let mesh = ca("mesh");
    let srv = start_server(&mesh).await;
    let client = Client::new(H2Settings::default(), PoolSettings::default());
    let tls = tls_for(&mesh, &mesh, CLIENT, SERVER);
    // Accepted: the bytes written before any answer arrive, the echo comes back.
    let tunnel = client
        .connect_early(
            &key(srv.addr),
            tls.clone(),
            "10.0.0.7:8080".parse().expect("a"),
        )
        .await
        .expect("CONNECT sent");
    let (mut app, mut proxied) = tcp_pair().await;
    app.write_all(b"early").await.expect("write");
    app.shutdown().await.expect("half-close");
    let (up, down) = cairn_hbone::splice::splice_early(&mut proxied, tunnel)
        .await
        .expect("splice");
    drop(proxied);
    let mut out = Vec::new();
    app.read_to_end(&mut out).await.expect("read");
    assert_eq!(out, format!("{CLIENT} -> 10.0.0.7:8080: early").as_bytes());
    assert_eq!((up, down), (5, out.len() as u64));
    // Refused (port 9999 answers 403) after the client already sent: still reported
    // as the refusal, not as a copy error.
    let tunnel = client
        .connect_early(&key(srv.addr), tls, "10.0.0.7:9999".parse().expect("a"))
        .await
        .expect("CONNECT sent");
    let (mut app, mut proxied) = tcp_pair().await;
    app.write_all(b"too early").await.expect("write");
    let result = cairn_hbone::splice::splice_early(&mut proxied, tunnel).await;
    assert!(
        matches!(
            result,
            Err(cairn_hbone::splice::SpliceError::Tunnel(
                ClientError::Refused {
                    status: StatusCode::FORBIDDEN,
                    ..
                }
            ))
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_server_that_answers_and_closes_first_ends_the_splice_in_order() {
    let mesh = ca("mesh");
    let srv = start_server(&mesh).await;
    let client = Client::new(H2Settings::default(), PoolSettings::default());
    let tunnel = client
        .connect_early(
            &key(srv.addr),
            tls_for(&mesh, &mesh, CLIENT, SERVER),
            "10.0.0.7:7777".parse().expect("a"),
        )
        .await
        .expect("CONNECT sent");
    let (mut app, mut proxied) = tcp_pair().await;
    let splice = tokio::spawn(async move {
        let r = cairn_hbone::splice::splice_early(&mut proxied, tunnel).await;
        (r, proxied)
    });
    app.write_all(b"req").await.expect("write");
    // The answer, then the server's close as an EOF (FIN), not a reset.
    let mut out = Vec::new();
    app.read_to_end(&mut out).await.expect("an orderly close");
    assert_eq!(out, b"answer");
    // The server dropped its stream (RST_STREAM NO_ERROR after END_STREAM); our
    // close reaches a stream the peer finished: that is the end, not a failure.
    app.shutdown().await.expect("half-close");
    let (result, _proxied) = splice.await.expect("task");
    let (up, down) = result.expect("an orderly close is not a copy error");
    assert_eq!((up, down), (3, 6));
}

#[tokio::test]
async fn splice_carries_a_tcp_connection_through_a_tunnel_with_half_close() {
    let mesh = ca("mesh");
    let srv = start_server(&mesh).await;
    let client = Client::new(H2Settings::default(), PoolSettings::default());
    let tls = tls_for(&mesh, &mesh, CLIENT, SERVER);
    let tunnel = client
        .connect(&key(srv.addr), tls, "10.0.0.7:8080".parse().expect("addr"))
        .await
        .expect("tunnel");
    let (mut app, mut proxied) = tcp_pair().await;
    let splice =
        tokio::spawn(async move { cairn_hbone::splice::splice(&mut proxied, tunnel).await });
    // 300 KiB: several read chunks, more than one flow-control grant.
    let msg: Vec<u8> = (0..300 * 1024).map(|i| (i % 251) as u8).collect();
    app.write_all(&msg).await.expect("write");
    app.shutdown().await.expect("half-close");
    let mut out = Vec::new();
    app.read_to_end(&mut out).await.expect("read to EOF");
    let head = format!("{CLIENT} -> 10.0.0.7:8080: ");
    assert_eq!(&out[..head.len()], head.as_bytes());
    assert!(out[head.len()..] == msg[..], "echoed bytes differ");
    let (up, down) = splice.await.expect("task").expect("splice");
    assert_eq!((up, down), (msg.len() as u64, out.len() as u64));
}

type RawConnection =
    h2::server::Connection<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, bytes::Bytes>;

/// A bare mesh-TLS HTTP/2 server whose behaviour the test writes: `serve(n, conn)`
/// runs for the n-th connection (from 0), after the TLS and HTTP/2 handshakes.
async fn raw_h2_server<F, Fut>(ca: &Ca, serve: F) -> SocketAddr
where
    F: Fn(usize, RawConnection) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let roots = MeshRoots::from_pem(ca.root_pem().as_bytes()).expect("roots");
    let config = server_config(&workload(ca, SERVER), &roots).expect("config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((tcp, _)) = listener.accept().await {
            let (config, serve) = (config.clone(), serve.clone());
            tokio::spawn(async move {
                let tls = tokio_rustls::TlsAcceptor::from(config)
                    .accept(tcp)
                    .await
                    .expect("tls");
                let conn = h2::server::handshake(tls).await.expect("h2");
                serve(n, conn).await;
            });
            n += 1;
        }
    });
    addr
}

#[tokio::test]
async fn a_reset_after_the_answer_ended_is_a_copy_error_not_a_crash() {
    let mesh = ca("mesh");
    // Answers 200, sends its bytes with END_STREAM, then cancels the stream while
    // the client still sends.
    let addr = raw_h2_server(&mesh, |_, mut conn| async move {
        let Some(Ok((request, mut respond))) = conn.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let _request = request;
            let response = http::Response::builder().status(200).body(()).expect("200");
            let mut send = respond.send_response(response, false).expect("200");
            send.send_data(bytes::Bytes::from_static(b"bye"), true)
                .expect("data");
            tokio::time::sleep(Duration::from_millis(100)).await;
            send.send_reset(h2::Reason::CANCEL);
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        // The connection is driven by polling it: keep doing so.
        while conn.accept().await.is_some() {}
    })
    .await;
    let client = Client::new(H2Settings::default(), PoolSettings::default());
    let tunnel = client
        .connect_early(
            &key(addr),
            tls_for(&mesh, &mesh, CLIENT, SERVER),
            "10.0.0.7:8080".parse().expect("a"),
        )
        .await
        .expect("CONNECT sent");
    let (mut app, mut proxied) = tcp_pair().await;
    let splice =
        tokio::spawn(async move { cairn_hbone::splice::splice_early(&mut proxied, tunnel).await });
    let mut out = Vec::new();
    app.read_to_end(&mut out)
        .await
        .expect("the answer, then EOF");
    assert_eq!(out, b"bye");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The peer cancelled: sending more fails the splice with a copy error.
    let _ = app.write_all(b"more").await;
    let result = splice.await.expect("the splice task must not panic");
    assert!(
        matches!(result, Err(cairn_hbone::splice::SpliceError::Io(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn bytes_sent_before_a_reset_reach_the_client_then_the_splice_fails() {
    let mesh = ca("mesh");
    // Answers 200, sends three 100 KiB DATA frames, then cancels the stream (after a
    // pause: h2 drops what it has not sent yet when a stream is reset).
    let addr = raw_h2_server(&mesh, |_, mut conn| async move {
        let Some(Ok((request, mut respond))) = conn.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let _request = request;
            let response = http::Response::builder().status(200).body(()).expect("200");
            let mut send = respond.send_response(response, false).expect("200");
            tokio::time::sleep(Duration::from_millis(200)).await;
            for i in 0..3u8 {
                send.send_data(bytes::Bytes::from(vec![i; 100 * 1024]), false)
                    .expect("data");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            send.send_reset(h2::Reason::CANCEL);
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        while conn.accept().await.is_some() {}
    })
    .await;
    let client = Client::new(H2Settings::default(), PoolSettings::default());
    let tunnel = client
        .connect(
            &key(addr),
            tls_for(&mesh, &mesh, CLIENT, SERVER),
            "10.0.0.7:8080".parse().expect("a"),
        )
        .await
        .expect("tunnel");
    let (mut app, mut proxied) = tcp_pair().await;
    let splice =
        tokio::spawn(async move { cairn_hbone::splice::splice(&mut proxied, tunnel).await });
    let mut out = Vec::new();
    // The reset ends the splice, which closes the connection: an EOF or a reset.
    let _ = app.read_to_end(&mut out).await;
    let want: Vec<u8> = (0..3u8).flat_map(|i| vec![i; 100 * 1024]).collect();
    assert!(out == want, "got {} bytes of {}", out.len(), want.len());
    let result = splice.await.expect("the splice task must not panic");
    assert!(result.is_err(), "a reset is a copy error: {result:?}");
}

#[tokio::test]
async fn a_connect_that_is_never_answered_times_out() {
    let mesh = ca("mesh");
    // Completes TLS and HTTP/2, takes the CONNECT, never answers it.
    let addr = raw_h2_server(&mesh, |_, mut conn| async move {
        let mut held = Vec::new();
        while let Some(Ok(request)) = conn.accept().await {
            held.push(request);
        }
    })
    .await;
    let client = Client::new(
        H2Settings::default(),
        PoolSettings {
            connect_timeout: Duration::from_millis(300),
            ..PoolSettings::default()
        },
    );
    let tls = tls_for(&mesh, &mesh, CLIENT, SERVER);
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        client.connect(&key(addr), tls, "10.0.0.7:8080".parse().expect("addr")),
    )
    .await
    .expect("the client gives up on its own")
    .expect_err("no answer");
    assert!(matches!(err, ClientError::ConnectTimeout { .. }), "{err}");
}

/// Forwards TCP to `to`; `freeze` makes every pair accepted so far stop forwarding
/// (sockets stay open: a black-holed path), while new pairs work.
struct Relay {
    addr: SocketAddr,
    pairs: Arc<Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pairs: Arc<Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>> = Arc::default();
        let list = pairs.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let up = tokio::net::TcpStream::connect(to).await.expect("upstream");
                let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
                list.lock().expect("lock").push(frozen.clone());
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(forward(dr, uw, frozen.clone()));
                tokio::spawn(forward(ur, dw, frozen));
            }
        });
        Relay { addr, pairs }
    }

    fn freeze(&self) {
        for f in self.pairs.lock().expect("lock").iter() {
            f.store(true, Ordering::SeqCst);
        }
    }
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || frozen.load(Ordering::SeqCst) {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    // Frozen or done: hold both halves open without moving bytes.
    if frozen.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
}

#[tokio::test]
async fn an_unresponsive_peer_is_detected_by_keepalive() {
    let mesh = ca("mesh");
    let srv = start_server(&mesh).await;
    let relay = Relay::start(srv.addr).await;
    let settings = H2Settings {
        keepalive_interval: Duration::from_millis(100),
        keepalive_timeout: Duration::from_millis(200),
        ..H2Settings::default()
    };
    let client = Client::new(settings, PoolSettings::default());
    let tls = tls_for(&mesh, &mesh, CLIENT, SERVER);
    let k = key(relay.addr);
    // Healthy: keepalives are answered, the connection stays and is reused.
    round_trip(&client, &k, tls.clone(), b"a").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    round_trip(&client, &k, tls.clone(), b"b").await;
    assert_eq!(client.connections_opened(), 1);
    // A tunnel is open when the path goes dark: it ends instead of hanging.
    let mut stuck = client
        .connect(&k, tls.clone(), "10.0.0.7:8080".parse().expect("addr"))
        .await
        .expect("tunnel");
    relay.freeze();
    let mut buf = [0u8; 16];
    let ended = tokio::time::timeout(Duration::from_secs(5), stuck.read(&mut buf)).await;
    assert!(ended.is_ok(), "a tunnel over a dead connection hangs");
    // The dead connection left the pool: the next tunnel dials a new one.
    let out = tokio::time::timeout(Duration::from_secs(5), round_trip(&client, &k, tls, b"c"))
        .await
        .expect("the pool hands out a dead connection");
    assert!(out.ends_with(b"c"));
    assert_eq!(client.connections_opened(), 2);
}

#[tokio::test]
async fn a_draining_peer_gets_new_streams_on_a_new_connection() {
    let mesh = ca("mesh");
    // Answers every CONNECT with 200 and holds it; the first connection starts
    // draining (GOAWAY) right after its first stream, as a peer shutting down would.
    let addr = raw_h2_server(&mesh, |n, mut conn| async move {
        let mut held = Vec::new();
        while let Some(Ok((request, mut respond))) = conn.accept().await {
            let send = respond
                .send_response(http::Response::new(()), false)
                .expect("200");
            held.push((request, send));
            if n == 0 {
                conn.graceful_shutdown();
            }
        }
    })
    .await;
    let client = Client::new(H2Settings::default(), PoolSettings::default());
    let tls = tls_for(&mesh, &mesh, CLIENT, SERVER);
    let authority: SocketAddr = "10.0.0.7:8080".parse().expect("addr");
    let _first = client
        .connect(&key(addr), tls.clone(), authority)
        .await
        .expect("first tunnel");
    tokio::time::sleep(Duration::from_millis(200)).await;
    client
        .connect(&key(addr), tls, authority)
        .await
        .expect("a tunnel despite the peer draining its connection");
    assert_eq!(client.connections_opened(), 2);
}

#[tokio::test]
async fn a_draining_server_lets_tunnels_finish_and_sends_new_ones_elsewhere() {
    let mesh = ca("mesh");
    let (drain, rx) = tokio::sync::watch::channel(false);
    let srv = start_server_with(&mesh, Some(rx)).await;
    let client = Client::new(H2Settings::default(), PoolSettings::default());
    let tls = tls_for(&mesh, &mesh, CLIENT, SERVER);
    let mut open = client
        .connect(
            &key(srv.addr),
            tls.clone(),
            "10.0.0.7:8080".parse().expect("a"),
        )
        .await
        .expect("tunnel");
    open.write_all(b"in flight").await.expect("write");
    drain.send_replace(true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New tunnels go over a new connection (the drained one refuses new streams)...
    let out = round_trip(&client, &key(srv.addr), tls, b"new").await;
    assert!(out.ends_with(b"new"));
    assert_eq!(client.connections_opened(), 2);
    // ...while the one in flight finishes normally.
    open.shutdown().await.expect("half-close");
    let mut out = Vec::new();
    open.read_to_end(&mut out).await.expect("read to EOF");
    assert!(
        out.ends_with(b"in flight"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

/// Between Cairn's own proxies AES-128-GCM is chosen; a peer preferring AES-256-GCM
/// (rustls' default order, as Istio's ztunnel offers) still gets a handshake, with its
/// choice.
#[tokio::test]
async fn the_cipher_suite_is_aes_128_gcm_between_cairn_proxies_and_the_peers_choice_otherwise() {
    use rustls::CipherSuite;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    let mesh = ca("mesh");
    let server = server_config(&workload(&mesh, SERVER), &mesh.roots()).expect("server");
    let ours = tls_for(&mesh, &mesh, CLIENT, SERVER);
    let default_order = Arc::new(rustls::crypto::ring::default_provider());
    assert_eq!(
        default_order.cipher_suites[0].suite(),
        CipherSuite::TLS13_AES_256_GCM_SHA384,
        "rustls' own order starts with AES-256"
    );
    let cert = workload(&mesh, CLIENT);
    let theirs = rustls::ClientConfig::builder_with_provider(default_order.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(cairn_identity::verify::ServerVerifier::new(
            mesh.roots(),
            id(SERVER),
            &default_order,
        )))
        .with_client_auth_cert(cert.chain, cert.key)
        .expect("client config");
    for (client, expected) in [
        (ours, CipherSuite::TLS13_AES_128_GCM_SHA256),
        (Arc::new(theirs), CipherSuite::TLS13_AES_256_GCM_SHA384),
    ] {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let accept = TlsAcceptor::from(server.clone()).accept(b);
        let name = rustls_pki_types::ServerName::try_from("server").expect("name");
        let connect = TlsConnector::from(client).connect(name, a);
        let (accepted, connected) = tokio::join!(accept, connect);
        let (accepted, connected) = (accepted.expect("accept"), connected.expect("connect"));
        let suite = |c: Option<rustls::SupportedCipherSuite>| c.map(|s| s.suite());
        assert_eq!(
            suite(connected.get_ref().1.negotiated_cipher_suite()),
            Some(expected)
        );
        assert_eq!(
            suite(accepted.get_ref().1.negotiated_cipher_suite()),
            Some(expected)
        );
    }
}
