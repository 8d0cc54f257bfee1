//! L4 benchmark in the ztunnel issue's layout: two network namespaces joined by a veth
//! pair, one ztunnel each, the client pod on A and the server pod on B. Direct TCP
//! (pod to pod over the veth) and the path through both ztunnels (explicit outbound
//! entry on A -> HBONE mTLS -> B -> app) are measured in the same run.
//!
//! `cargo bench -p cairn-tests --bench l4 -- --bench` (what `cargo xtask bench l4`
//! runs). Under `cargo test` it runs a small smoke version. Needs root; without it, it
//! says so and stops.
//!
//! The client and server are this same executable re-run inside the namespaces
//! (`serve` / `client` modes).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use cairn_tests::lab::{Lab, NODE_A, NODE_B, can_run};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const CLIENT_POD: &str = "10.77.1.10";
const SERVER_POD: &str = "10.77.2.12";
const ECHO_PORT: u16 = 9080;
const SINK_PORT: u16 = 9090;
const HTTP_PORT: u16 = 8080;

// === serve mode ===

async fn serve() {
    let echo = TcpListener::bind((SERVER_POD, ECHO_PORT))
        .await
        .expect("bind echo");
    let sink = TcpListener::bind((SERVER_POD, SINK_PORT))
        .await
        .expect("bind sink");
    tokio::spawn(async move {
        while let Ok((s, _)) = sink.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = w.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    let http = TcpListener::bind((SERVER_POD, HTTP_PORT))
        .await
        .expect("bind http");
    tokio::spawn(serve_http(http));
    while let Ok((s, _)) = echo.accept().await {
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let (mut r, mut w) = s.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// A keep-alive HTTP/1.1 server (hyper) answering every request with a short body.
async fn serve_http(listener: TcpListener) {
    use http_body_util::Full;
    use hyper::{Response, body::Bytes, server::conn::http1, service::service_fn};
    while let Ok((s, _)) = listener.accept().await {
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                    b"ok",
                ))))
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(hyper_util::rt::TokioIo::new(s), service)
                .await;
        });
    }
}

// === relay mode ===

/// Ports the plain relays listen on: the target port plus this, on node A...
const RELAY_A: u16 = 10_000;
/// ...and plus this on node B.
const RELAY_B: u16 = 20_000;

/// A plain TCP relay in a ztunnel's place (same hops, no mTLS, no HTTP/2, one worker
/// thread like the lab's ztunnels): the floor the extra hops alone cost. Listens on
/// `listen`:`port + from` for each bench port and forwards to `next`:`port + to`.
async fn relay(listen: &str, from: u16, next: &str, to: u16) {
    for port in [ECHO_PORT, SINK_PORT, HTTP_PORT] {
        let listener = TcpListener::bind((listen, port + from))
            .await
            .expect("bind relay");
        let next: SocketAddr = format!("{next}:{}", port + to).parse().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(next).await else {
                        return;
                    };
                    let _ = (down.set_nodelay(true), up.set_nodelay(true));
                    let _ = tokio::io::copy_bidirectional_with_sizes(
                        &mut down,
                        &mut up,
                        128 * 1024,
                        128 * 1024,
                    )
                    .await;
                });
            }
        });
    }
    std::future::pending::<()>().await;
}

// === client mode ===

/// Where the client connects: straight to the server pod, to the client pod's
/// explicit outbound entry with a PROXY header naming the server pod, or to the
/// plain relay on A.
#[derive(Clone, Copy)]
enum Path {
    Direct,
    Mesh,
    Relay,
}

async fn open(path: Path, port: u16) -> TcpStream {
    let dst: SocketAddr = format!("{SERVER_POD}:{port}").parse().expect("addr");
    let s = match path {
        Path::Direct => TcpStream::connect(dst).await.expect("connect"),
        Path::Relay => TcpStream::connect((CLIENT_POD, port + RELAY_A))
            .await
            .expect("connect relay"),
        Path::Mesh => {
            let mut s = TcpStream::connect((CLIENT_POD, 15001))
                .await
                .expect("connect entry");
            let header = format!("PROXY TCP4 {CLIENT_POD} {SERVER_POD} 40000 {port}\r\n");
            s.write_all(header.as_bytes()).await.expect("header");
            s
        }
    };
    s.set_nodelay(true).expect("nodelay");
    s
}

async fn bulk(path: Path, total: u64, streams: u64) -> f64 {
    let per = total / streams;
    let start = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = open(path, SINK_PORT).await;
                let buf = vec![7u8; 256 * 1024];
                let mut left = per;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    s.write_all(&buf[..n]).await.expect("write");
                    left -= n as u64;
                }
                s.shutdown().await.expect("shutdown");
                let got = s.read_u64().await.expect("sink total");
                assert_eq!(got, per, "sink received everything");
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("stream");
    }
    (per * streams) as f64 / start.elapsed().as_secs_f64()
}

async fn ping(path: Path, n: usize) -> (f64, f64) {
    let mut s = open(path, ECHO_PORT).await;
    let msg = [1u8; 64];
    let mut buf = [0u8; 64];
    let mut rtts = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg).await.expect("write");
        s.read_exact(&mut buf).await.expect("read");
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(f64::total_cmp);
    (rtts[n / 2], rtts[(n * 99 / 100).min(n - 1)])
}

async fn conns(path: Path, n: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        let mut s = open(path, ECHO_PORT).await;
        s.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("read");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Reads one HTTP/1.1 response (headers plus a Content-Length body) and returns its
/// status code; `buf` keeps whatever arrived beyond it.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> u16 {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).expect("utf-8 head");
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .expect("status");
            let length: usize = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .expect("content-length");
            let total = end + 4 + length;
            if buf.len() >= total {
                buf.drain(..total);
                return status;
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.expect("read response");
        assert!(n > 0, "server closed a keep-alive connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Keep-alive HTTP/1.1 GETs on `connections` connections for `run`; requests/s.
async fn http(path: Path, connections: usize, run: Duration) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = open(path, HTTP_PORT).await;
                let request = format!("GET / HTTP/1.1\r\nHost: {SERVER_POD}\r\n\r\n");
                let mut buf = Vec::new();
                let mut done = 0u64;
                while start.elapsed() < run {
                    s.write_all(request.as_bytes()).await.expect("request");
                    assert_eq!(read_response(&mut s, &mut buf).await, 200);
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("http connection");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

async fn client(args: &[String]) {
    let path = match args[0].as_str() {
        "direct" => Path::Direct,
        "relay" => Path::Relay,
        _ => Path::Mesh,
    };
    let num = |i: usize| args[i].parse::<u64>().expect("number");
    match args[1].as_str() {
        "bulk" => println!("RESULT {}", bulk(path, num(2), num(3)).await),
        "ping" => {
            let (p50, p99) = ping(path, num(2) as usize).await;
            println!("RESULT {p50} {p99}");
        }
        "conns" => println!("RESULT {}", conns(path, num(2) as usize).await),
        "http" => {
            let run = Duration::from_millis(num(3));
            println!("RESULT {}", http(path, num(2) as usize, run).await);
        }
        other => panic!("unknown client mode {other}"),
    }
}

// === orchestration ===

struct Scale {
    bulk: u64,
    /// Bulk runs per path; the median is reported (the machines are shared and noisy).
    rounds: usize,
    pings: u64,
    conns: u64,
    http_ms: u64,
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15 (1-based).
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0
}

fn kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn run(lab: &Lab, args: &[&str]) -> Vec<f64> {
    let me = std::env::current_exe().expect("exe").display().to_string();
    let out = lab
        .exec(NODE_A, &[&me, "client"])
        .args(args)
        .output()
        .expect("client");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| {
            panic!(
                "client {args:?} printed no result:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .split_whitespace()
        .map(|v| v.parse().expect("number"))
        .collect()
}

/// The processes whose CPU a path costs: the ztunnels for the mesh, the relays for
/// the relay path, nothing for direct.
struct Procs {
    ztunnels: [u32; 2],
    relays: [u32; 2],
}

impl Procs {
    fn cpu(&self, path: &str) -> f64 {
        let pids: &[u32] = match path {
            "mesh" => &self.ztunnels,
            "relay" => &self.relays,
            _ => &[],
        };
        pids.iter().map(|p| cpu_seconds(*p)).sum()
    }
}

/// Direct, through the ztunnels, through the plain relays: every measurement runs
/// on each, in this order, back to back.
const PATHS: [&str; 3] = ["direct", "mesh", "relay"];

fn peak_rss(lab: &Lab) -> f64 {
    lab.ztunnels
        .iter()
        .map(|p| kib(*p, "VmHWM:"))
        .fold(0.0, f64::max)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One figure per path, and the CPU its processes spent per unit of work.
#[derive(Clone, Copy, Default)]
struct Figure {
    value: f64,
    cpu_per_unit: f64,
}

/// Bulk throughput (bytes/s) per path: rounds alternate between the paths so that
/// all see the same background load; medians, and CPU-s per GB.
fn bulk_all(lab: &Lab, procs: &Procs, scale: &Scale, streams: &str) -> [Figure; 3] {
    let b = scale.bulk.to_string();
    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut cpu = [0.0; 3];
    for _ in 0..scale.rounds {
        for (i, path) in PATHS.iter().enumerate() {
            let cpu0 = procs.cpu(path);
            rates[i].push(run(lab, &[path, "bulk", &b, streams])[0]);
            cpu[i] += procs.cpu(path) - cpu0;
        }
    }
    let gb = (scale.bulk * scale.rounds as u64) as f64 / 1e9;
    std::array::from_fn(|i| Figure {
        value: median(rates[i].clone()),
        cpu_per_unit: cpu[i] / gb,
    })
}

/// Keep-alive HTTP req/s per path on `connections` connections, and CPU µs per request.
fn http_all(lab: &Lab, procs: &Procs, scale: &Scale, connections: &str) -> [Figure; 3] {
    let ms = scale.http_ms.to_string();
    PATHS.map(|path| {
        let cpu0 = procs.cpu(path);
        let rate = run(lab, &[path, "http", connections, &ms])[0];
        let requests = rate * scale.http_ms as f64 / 1000.0;
        Figure {
            value: rate,
            cpu_per_unit: (procs.cpu(path) - cpu0) / requests * 1e6,
        }
    })
}

/// 64-byte ping-pong p50 and p99 per path, and CPU µs per round trip.
fn ping_all(lab: &Lab, procs: &Procs, scale: &Scale) -> [(f64, f64, f64); 3] {
    let n = scale.pings.to_string();
    PATHS.map(|path| {
        let cpu0 = procs.cpu(path);
        let r = run(lab, &[path, "ping", &n]);
        let cpu = (procs.cpu(path) - cpu0) / scale.pings as f64 * 1e6;
        (r[0], r[1], cpu)
    })
}

fn orchestrate(full: bool) {
    if let Err(why) = can_run() {
        println!("SKIPPED l4 benchmark: {why}");
        return;
    }
    let scale = if full {
        Scale {
            bulk: 1 << 30,
            rounds: 3,
            pings: 20_000,
            conns: 3_000,
            http_ms: 3_000,
        }
    } else {
        Scale {
            bulk: 16 << 20,
            rounds: 1,
            pings: 200,
            conns: 50,
            http_ms: 200,
        }
    };
    let manifests = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bench\n  labels: {{istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: bench}}\nspec: {{serviceAccountName: client, nodeName: node-a, containers: [{{name: c, image: t}}]}}\nstatus: {{phase: Running, podIP: {CLIENT_POD}, conditions: [{{type: Ready, status: \"True\"}}]}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: server, namespace: bench}}\nspec: {{serviceAccountName: server, nodeName: node-b, containers: [{{name: c, image: t}}]}}\nstatus: {{phase: Running, podIP: {SERVER_POD}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
    );
    let mut lab = Lab::start(&manifests, &[CLIENT_POD], &[SERVER_POD], [1, 1]);
    let me = std::env::current_exe().expect("exe").display().to_string();
    lab.spawn(NODE_B, &[&me, "serve"], &[], "server.log");
    let (a, b) = (RELAY_A.to_string(), RELAY_B.to_string());
    let relays = [
        lab.spawn(
            NODE_A,
            &[&me, "relay", CLIENT_POD, &a, SERVER_POD, &b],
            &[],
            "relay-a.log",
        ),
        lab.spawn(
            NODE_B,
            &[&me, "relay", SERVER_POD, &b, SERVER_POD, "0"],
            &[],
            "relay-b.log",
        ),
    ];
    let procs = Procs {
        ztunnels: lab.ztunnels,
        relays,
    };
    std::thread::sleep(Duration::from_millis(300));
    let idle: f64 = lab.ztunnels.iter().map(|p| kib(*p, "VmRSS:")).sum::<f64>() / 2.0;

    let [d1, m1, r1] = bulk_all(&lab, &procs, &scale, "1");
    let hwm1 = peak_rss(&lab);
    let [d4, m4, r4] = bulk_all(&lab, &procs, &scale, "4");
    let hwm4 = peak_rss(&lab);
    let [dp, mp, rp] = ping_all(&lab, &procs, &scale);
    let [dh1, mh1, rh1] = http_all(&lab, &procs, &scale, "1");
    let [dh16, mh16, rh16] = http_all(&lab, &procs, &scale, "16");
    let c = scale.conns.to_string();
    let [dc, mc, rc] = PATHS.map(|path| run(&lab, &[path, "conns", &c])[0]);

    let gbit = |v: f64| format!("{:.2} Gbit/s", v * 8.0 / 1e9);
    let pct = |m: f64, d: f64| format!("{:.0}%", 100.0 * m / d);
    println!("<!-- l4:begin -->");
    println!(
        "Two network namespaces joined by a veth pair, one ztunnel per namespace (release build under `cargo xtask bench`, one worker thread each), client pod on A, server pod on B. Bulk: {} MiB to a sink, {} rounds alternating the paths, medians. HTTP: keep-alive HTTP/1.1 GETs to a hyper server for {} ms. CPU is both ztunnels' user+system time; RSS per ztunnel. Last column: the same hops through two plain TCP relays (tokio, one worker, no mTLS, no HTTP/2) in the ztunnels' places: what the extra hops alone cost on this machine.\n",
        scale.bulk >> 20,
        scale.rounds,
        scale.http_ms
    );
    println!(
        "| figure | through both ztunnels | direct TCP (same run) | ratio | goal | plain relays (ratio to direct) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    // A rate row: mesh, direct, ratio, goal, relays (ratio).
    let rate_row = |what: &str, [d, m, r]: [f64; 3], show: &dyn Fn(f64) -> String, goal: &str| {
        println!(
            "| {what} | {} | {} | {} | {goal} | {} ({}) |",
            show(m),
            show(d),
            pct(m, d),
            show(r),
            pct(r, d)
        );
    };
    let count = |v: f64| format!("{v:.0}");
    rate_row(
        "bulk throughput, 1 stream",
        [d1.value, m1.value, r1.value],
        &gbit,
        ">= 40%",
    );
    rate_row(
        "bulk throughput, 4 streams",
        [d4.value, m4.value, r4.value],
        &gbit,
        ">= 30%",
    );
    println!(
        "| 64 B ping-pong p50 / p99 | {:.1} / {:.1} µs | {:.1} / {:.1} µs | +{:.1} µs at p50 | <= +60 µs | {:.1} / {:.1} µs (+{:.1} µs) |",
        mp.0,
        mp.1,
        dp.0,
        dp.1,
        mp.0 - dp.0,
        rp.0,
        rp.1,
        rp.0 - dp.0
    );
    rate_row(
        "keep-alive HTTP req/s, 1 connection",
        [dh1.value, mh1.value, rh1.value],
        &count,
        "-",
    );
    rate_row(
        "keep-alive HTTP req/s, 16 connections",
        [dh16.value, mh16.value, rh16.value],
        &count,
        ">= 35%",
    );
    rate_row("new connections per second", [dc, mc, rc], &count, ">= 45%");
    println!(
        "| CPU per GB (1 stream) | {:.2} CPU-s | - | - | <= 1.4 CPU-s | {:.2} CPU-s |",
        m1.cpu_per_unit, r1.cpu_per_unit
    );
    println!(
        "| CPU per request (HTTP, 16 connections) | {:.1} µs ({:.1} ms per 1,000) | - | - | <= 25 µs | {:.1} µs |",
        mh16.cpu_per_unit, mh16.cpu_per_unit, rh16.cpu_per_unit
    );
    println!(
        "| CPU per 64 B round trip (one connection, no batching) | {:.1} µs | - | - | - | {:.1} µs |",
        mp.2, rp.2
    );
    println!(
        "| ztunnel RSS idle / peak under 1 stream / under 4 | {:.1} / {:.1} / {:.1} MB | - | - | <= 8 MB idle, <= 16 MB under one stream | - |",
        idle / 1024.0,
        hwm1 / 1024.0,
        hwm4 / 1024.0
    );
    println!("<!-- l4:end -->");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(serve()),
        Some("relay") => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(relay(
                &args[1],
                args[2].parse().expect("port offset"),
                &args[3],
                args[4].parse().expect("port offset"),
            )),
        Some("client") => tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(client(&args[1..])),
        _ => orchestrate(args.iter().any(|a| a == "--bench")),
    }
}
