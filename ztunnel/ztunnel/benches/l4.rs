//! L4 data-path benchmark on loopback, in one process: direct TCP vs the full ztunnel
//! path (captured socket -> outbound proxy -> HBONE mTLS -> inbound proxy -> app),
//! measured side by side in the same run.
//!
//! `cargo bench -p cairn-ztunnel --bench l4 -- --bench` for the full run (what
//! `cargo xtask bench l4-loopback` does); under `cargo test` a small smoke run.
//!
//! Everything (client, both proxies, app) shares the machine's cores here, so ratios
//! are pessimistic against a layout with one proxy per node.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use cairn_api::model::{Address, TunnelProtocol, Workload};
use cairn_hbone::{
    H2Settings,
    client::{Client, PoolSettings},
    tls::WorkloadCertificate,
};
use cairn_identity::{SpiffeId, verify::MeshRoots};
use cairn_ztunnel::{
    SharedState,
    certs::{Certificates, StaticCertificates},
    inbound::{self, HboneInbound},
    outbound::Outbound,
    state::ProxyState,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

struct Scale {
    bulk_bytes: u64,
    pings: usize,
    connections: usize,
}

const FULL: Scale = Scale {
    bulk_bytes: 1 << 30,
    pings: 20_000,
    connections: 3_000,
};
const SMOKE: Scale = Scale {
    bulk_bytes: 4 << 20,
    pings: 200,
    connections: 50,
};

const CLIENT_IP: [u8; 4] = [127, 60, 0, 1];
const SERVER_IP: [u8; 4] = [127, 60, 0, 2];

fn workload(name: &str, ip: [u8; 4]) -> Workload {
    Workload {
        uid: format!("Kubernetes//Pod/bench/{name}"),
        name: name.into(),
        namespace: "bench".into(),
        addresses: vec![IpAddr::from(ip)],
        network: String::new(),
        identity: SpiffeId::new("cluster.local", "bench", name).expect("id"),
        tunnel_protocol: TunnelProtocol::Hbone,
        native_tunnel: false,
        waypoint: None,
        node: "node".into(),
        canonical_name: name.into(),
        canonical_revision: "v1".into(),
        workload_name: name.into(),
        services: BTreeMap::new(),
        authorization_policies: vec![],
        healthy: true,
        locality: None,
        cluster_id: "Kubernetes".into(),
    }
}

fn certs(ids: &[&SpiffeId]) -> Arc<dyn Certificates> {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = params.self_signed(&key).expect("root");
    let issuer = Issuer::new(params, key);
    let leaves = ids.iter().map(|id| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().expect("ia5"))];
        let c = p.signed_by(&key, &issuer).expect("leaf");
        WorkloadCertificate::from_pem(&c.pem(), &key.serialize_pem()).expect("cert")
    });
    Arc::new(StaticCertificates::new(
        MeshRoots::from_pem(root.pem().as_bytes()).expect("roots"),
        leaves.collect::<Vec<_>>(),
    ))
}

/// The app: echoes whatever it reads (so bulk senders also read it back).
async fn app(addr: SocketAddr) {
    let l = TcpListener::bind(addr).await.expect("bind app");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

/// Starts the proxies; returns the "capture" address a client connects to.
async fn mesh(app_addr: SocketAddr) -> SocketAddr {
    let (c, s) = (workload("client", CLIENT_IP), workload("server", SERVER_IP));
    let certs = certs(&[&c.identity, &s.identity]);
    let addresses = BTreeMap::from([
        (c.uid.clone(), Address::Workload(Box::new(c.clone()))),
        (s.uid.clone(), Address::Workload(Box::new(s.clone()))),
    ]);
    let state: SharedState = Arc::new(ArcSwap::from_pointee(ProxyState::new(
        &addresses,
        &BTreeMap::new(),
    )));
    let hbone = TcpListener::bind(SocketAddr::new(IpAddr::from(SERVER_IP), 15008))
        .await
        .expect("bind hbone");
    tokio::spawn(inbound::serve_hbone(
        hbone,
        certs.clone(),
        s.identity.clone(),
        H2Settings::default(),
        Arc::new(HboneInbound {
            state: state.clone(),
            workload_uid: s.uid.clone(),
            dialer: cairn_hbone::dialer::Dialer::host(),
        }),
        inbound::MAX_PENDING_HANDSHAKES,
    ));
    let outbound = Arc::new(Outbound {
        state,
        client: Client::new(H2Settings::default(), PoolSettings::default()),
        certs,
        bind_source_ip: true,
    });
    let capture = TcpListener::bind("127.60.0.1:0")
        .await
        .expect("bind capture");
    let addr = capture.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = capture.accept().await {
            let _ = s.set_nodelay(true);
            let ob = outbound.clone();
            let source = c.clone();
            tokio::spawn(async move {
                let _ = ob
                    .proxy(&source, app_addr, s, &cairn_hbone::dialer::Dialer::host())
                    .await;
            });
        }
    });
    addr
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// Bytes per second over `streams` parallel connections, each sending its share and
/// reading the echo back.
async fn bulk(addr: SocketAddr, total: u64, streams: u64) -> f64 {
    let per = total / streams;
    let start = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            tokio::spawn(async move {
                let s = connect(addr).await;
                let (mut r, mut w) = s.into_split();
                let writer = tokio::spawn(async move {
                    let buf = vec![7u8; 256 * 1024];
                    let mut left = per;
                    while left > 0 {
                        let n = left.min(buf.len() as u64) as usize;
                        w.write_all(&buf[..n]).await.expect("write");
                        left -= n as u64;
                    }
                    w.shutdown().await.expect("shutdown");
                });
                let mut buf = vec![0u8; 256 * 1024];
                let mut got = 0u64;
                while got < per {
                    let n = r.read(&mut buf).await.expect("read");
                    assert!(n > 0, "early EOF");
                    got += n as u64;
                }
                writer.await.expect("writer");
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("stream");
    }
    (per * streams) as f64 / start.elapsed().as_secs_f64()
}

/// Round trips of 64 bytes on one connection: (p50, p99).
async fn ping_pong(addr: SocketAddr, n: usize) -> (Duration, Duration) {
    let mut s = connect(addr).await;
    let msg = [1u8; 64];
    let mut buf = [0u8; 64];
    let mut rtts = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg).await.expect("write");
        s.read_exact(&mut buf).await.expect("read");
        rtts.push(t.elapsed());
    }
    rtts.sort();
    (rtts[n / 2], rtts[(n * 99 / 100).min(n - 1)])
}

/// New connections per second, each carrying one byte each way.
async fn connection_rate(addr: SocketAddr, n: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        let mut s = connect(addr).await;
        s.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("read");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn gbit(bps: f64) -> String {
    format!("{:.2} Gbit/s", bps * 8.0 / 1e9)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full { FULL } else { SMOKE };
    let app_addr = SocketAddr::new(IpAddr::from(SERVER_IP), 9000);
    app(app_addr).await;
    let meshed = mesh(app_addr).await;

    let d1 = bulk(app_addr, scale.bulk_bytes, 1).await;
    let m1 = bulk(meshed, scale.bulk_bytes, 1).await;
    let d4 = bulk(app_addr, scale.bulk_bytes, 4).await;
    let m4 = bulk(meshed, scale.bulk_bytes, 4).await;
    let (dp50, dp99) = ping_pong(app_addr, scale.pings).await;
    let (mp50, mp99) = ping_pong(meshed, scale.pings).await;
    let dc = connection_rate(app_addr, scale.connections).await;
    let mc = connection_rate(meshed, scale.connections).await;

    println!("<!-- l4-loopback:begin -->");
    println!(
        "In one process on loopback (client, outbound proxy, inbound proxy and app share 2 cores); bulk = {} MiB echoed back.\n",
        scale.bulk_bytes >> 20
    );
    println!("| figure | through ztunnel pair | direct TCP (same run) | ratio | goal |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| bulk throughput, 1 stream | {} | {} | {:.0}% | >= 40% |",
        gbit(m1),
        gbit(d1),
        100.0 * m1 / d1
    );
    println!(
        "| bulk throughput, 4 streams | {} | {} | {:.0}% | >= 30% |",
        gbit(m4),
        gbit(d4),
        100.0 * m4 / d4
    );
    println!(
        "| 64 B ping-pong p50 / p99 | {} / {} | {} / {} | +{} at p50 | <= +60 µs |",
        us(mp50),
        us(mp99),
        us(dp50),
        us(dp99),
        us(mp50.saturating_sub(dp50))
    );
    println!(
        "| new connections per second | {mc:.0} | {dc:.0} | {:.0}% | >= 45% |",
        100.0 * mc / dc
    );
    println!("<!-- l4-loopback:end -->");
}
