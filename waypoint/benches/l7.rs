//! L7 benchmark: the same 90/10 weighted route served by the waypoint engine, nginx
//! and HAProxy (Debian packages, installed when missing and root), against direct
//! requests to the backend, all in one run on loopback. Each proxy is its own
//! process with one worker thread, so its CPU and RSS are its own:
//!
//! - requests/s at saturation (16 keep-alive connections; three rounds alternating
//!   the proxies, each round starting with another, the median per proxy);
//! - p50/p99 latency at a fixed 1,000 requests/s (8 connections, paced), and the
//!   proxy's CPU (vCPU = CPU-seconds per second at that rate) and RSS there.
//!
//! `cargo bench -p cairn-waypoint --bench l7 -- --bench` (what `cargo xtask bench l7`
//! runs). Under `cargo test` a smoke version runs (waypoint and direct only, briefly).
//! The waypoint process is this executable re-run with `CAIRN_L7_ROLE=waypoint`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use cairn_waypoint::{
    cluster::Clusters,
    route::{Action, HeaderOps, RouteTable, Rule, WeightedBackend},
    router::{Router, serve},
};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

const BODY: &[u8] = &[b'x'; 256];

// === waypoint role (child process) ===

fn waypoint_role() {
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} unset"));
    let listen: SocketAddr = env("CAIRN_L7_LISTEN").parse().expect("listen");
    let v1: SocketAddr = env("CAIRN_L7_V1").parse().expect("v1");
    let v2: SocketAddr = env("CAIRN_L7_V2").parse().expect("v2");
    // The runtime the `waypoint` binary runs with one worker.
    let rt = cairn_client::process::runtime(1).expect("runtime");
    rt.block_on(async move {
        let backends = |w1, w2| {
            Action::Forward(vec![
                WeightedBackend {
                    backend: "v1".into(),
                    weight: w1,
                    headers: None,
                },
                WeightedBackend {
                    backend: "v2".into(),
                    weight: w2,
                    headers: None,
                },
            ])
        };
        let table = RouteTable {
            rules: vec![Rule {
                name: "bench/reviews/canary".into(),
                matches: vec![],
                action: backends(90, 10),
                fault: None,
                timeout: Some(Duration::from_secs(15)),
                retry: None,
                rewrite: None,
                mirrors: vec![],
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
                cors: None,
            }],
            ..Default::default()
        };
        let upstream = Clusters::plain_http(HashMap::from([
            ("v1".to_string(), v1),
            ("v2".to_string(), v2),
        ]));
        let router = Arc::new(Router::new(table, Arc::new(upstream), None));
        let listener = TcpListener::bind(listen).await.expect("bind");
        serve(listener, router).await;
    });
}

// === backends, load ===

async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(BODY),
                        )))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let _ = tcp.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send
}

async fn one(send: &mut Sender) -> bool {
    let req = Request::get("/reviews/1")
        .header("host", "reviews:9080")
        .body(Empty::new())
        .expect("request");
    match send.send_request(req).await {
        Ok(resp) => resp.status().is_success() && resp.into_body().collect().await.is_ok(),
        Err(_) => false,
    }
}

/// Requests per second over `conns` keep-alive connections for `dur`.
async fn saturate(addr: SocketAddr, conns: usize, dur: Duration) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            tokio::spawn(async move {
                let mut send = connect(addr).await;
                let mut n = 0u64;
                while start.elapsed() < dur {
                    if one(&mut send).await {
                        n += 1;
                    } else {
                        send = connect(addr).await;
                    }
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// Latencies (µs) of requests paced at `rate`/s over 8 connections for `dur`.
async fn paced(addr: SocketAddr, rate: u32, dur: Duration) -> Vec<f64> {
    let conns = 8u32;
    let per = Duration::from_secs_f64(f64::from(conns) / f64::from(rate));
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            tokio::spawn(async move {
                let mut send = connect(addr).await;
                // Stagger the connections across one period.
                tokio::time::sleep(per.mul_f64(f64::from(i) / f64::from(conns))).await;
                let mut tick = tokio::time::interval(per);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let start = Instant::now();
                let mut lat = Vec::new();
                while start.elapsed() < dur {
                    tick.tick().await;
                    let t = Instant::now();
                    if one(&mut send).await {
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                    } else {
                        send = connect(addr).await;
                    }
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort_by(|a, b| a.total_cmp(b));
    all
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

// === proxies ===

/// CPU-seconds (user + system) and RSS (KiB) of a process.
fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command: utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (cpu, rss)
}

struct Proxy {
    name: &'static str,
    addr: SocketAddr,
    child: Option<Child>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

async fn wait_ready(addr: SocketAddr) -> bool {
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// nginx and HAProxy from Debian, when missing and allowed (root).
fn install_peers() {
    let missing: Vec<&str> = [("nginx", "nginx-light"), ("haproxy", "haproxy")]
        .into_iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| pkg)
        .collect();
    if missing.is_empty() || !have("apt-get") {
        return;
    }
    eprintln!(
        "installing {} (Debian packages) for the comparison",
        missing.join(", ")
    );
    let _ = Command::new("apt-get").args(["update", "-qq"]).status();
    let _ = Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cairn-l7-{name}-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

fn nginx(v1: SocketAddr, v2: SocketAddr) -> Option<Proxy> {
    if !have("nginx") {
        return None;
    }
    let addr = free_port();
    let dir = scratch("nginx");
    let d = dir.display();
    let conf = format!(
        "worker_processes 1; daemon off; master_process off; pid {d}/nginx.pid; error_log {d}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
         upstream reviews {{ server {v1} weight=9; server {v2} weight=1; keepalive 64; }}\n\
         server {{ listen {addr}; location / {{ proxy_pass http://reviews; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).ok()?;
    let child = Command::new("nginx")
        .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf")])
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    Some(Proxy {
        name: "nginx",
        addr,
        child: Some(child),
    })
}

fn haproxy(v1: SocketAddr, v2: SocketAddr) -> Option<Proxy> {
    if !have("haproxy") {
        return None;
    }
    let addr = free_port();
    let dir = scratch("haproxy");
    let conf = format!(
        "global\n  nbthread 1\n  maxconn 8192\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n\
         frontend f\n  bind {addr}\n  default_backend reviews\n\
         backend reviews\n  balance roundrobin\n  server v1 {v1} weight 90\n  server v2 {v2} weight 10\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, conf).ok()?;
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    Some(Proxy {
        name: "HAProxy",
        addr,
        child: Some(child),
    })
}

fn waypoint(v1: SocketAddr, v2: SocketAddr) -> Proxy {
    let addr = free_port();
    let child = Command::new(std::env::current_exe().expect("exe"))
        .env("CAIRN_L7_ROLE", "waypoint")
        .env("CAIRN_L7_LISTEN", addr.to_string())
        .env("CAIRN_L7_V1", v1.to_string())
        .env("CAIRN_L7_V2", v2.to_string())
        .env("RUST_LOG", "off")
        .spawn()
        .expect("waypoint process");
    Proxy {
        name: "waypoint",
        addr,
        child: Some(child),
    }
}

struct Row {
    name: &'static str,
    rps: f64,
    p50: f64,
    p99: f64,
    vcpu: Option<f64>,
    rss_mb: Option<f64>,
}

/// Requests/s at saturation: `rounds` rounds over all proxies, each round starting
/// with a different one (the machine's load drifts; no proxy always goes first), the
/// median per proxy.
async fn saturation(proxies: &[&Proxy], rounds: usize, sat: Duration) -> Vec<f64> {
    let mut seen: Vec<Vec<f64>> = vec![Vec::new(); proxies.len()];
    for round in 0..rounds {
        for i in 0..proxies.len() {
            let at = (i + round) % proxies.len();
            let p = proxies[at];
            let _ = saturate(p.addr, 4, Duration::from_millis(300)).await; // warm-up
            seen[at].push(saturate(p.addr, 16, sat).await);
        }
    }
    seen.into_iter()
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect()
}

/// Latency, CPU and RSS at a fixed 1,000 req/s.
async fn measure(p: &Proxy, rps: f64, fixed: Duration) -> Row {
    let pid = p.child.as_ref().map(Child::id);
    let before = pid.map(usage);
    let start = Instant::now();
    let lat = paced(p.addr, 1000, fixed).await;
    let secs = start.elapsed().as_secs_f64();
    let after = pid.map(usage);
    let (vcpu, rss_mb) = match (before, after) {
        (Some((c0, _)), Some((c1, rss))) => (Some((c1 - c0) / secs), Some(rss as f64 / 1024.0)),
        _ => (None, None),
    };
    Row {
        name: p.name,
        rps,
        p50: pct(&lat, 0.50),
        p99: pct(&lat, 0.99),
        vcpu,
        rss_mb,
    }
}

fn main() {
    if std::env::var("CAIRN_L7_ROLE").as_deref() == Ok("waypoint") {
        waypoint_role();
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let (sat, fixed, rounds) = if full {
        (Duration::from_secs(3), Duration::from_secs(5), 3)
    } else {
        (Duration::from_millis(300), Duration::from_millis(300), 1)
    };
    if full {
        install_peers();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let v1 = backend().await;
        let v2 = backend().await;
        let mut proxies = vec![
            Proxy {
                name: "direct",
                addr: v1,
                child: None,
            },
            waypoint(v1, v2),
        ];
        if full {
            proxies.extend(nginx(v1, v2));
            proxies.extend(haproxy(v1, v2));
        }
        let mut ready = Vec::new();
        for p in &proxies {
            match wait_ready(p.addr).await {
                true => ready.push(p),
                false => eprintln!("{} did not start; left out", p.name),
            }
        }
        let rates = saturation(&ready, rounds, sat).await;
        let mut rows = Vec::new();
        for (p, rps) in ready.into_iter().zip(rates) {
            rows.push(measure(p, rps, fixed).await);
        }
        report(&rows, full, rounds, sat);
        let waypoint = rows
            .iter()
            .find(|r| r.name == "waypoint")
            .expect("waypoint measured");
        assert!(waypoint.rps > 0.0, "the waypoint answered");
    });
}

fn report(rows: &[Row], full: bool, rounds: usize, sat: Duration) {
    let direct = rows.iter().find(|r| r.name == "direct");
    let nginx = rows.iter().find(|r| r.name == "nginx");
    let opt = |v: Option<f64>, unit: &str| v.map_or("-".into(), |v| format!("{v:.3}{unit}"));
    println!("<!-- l7:begin -->");
    println!(
        "One route, 90/10 weighted over two HTTP/1.1 backends on loopback; each proxy one process with one worker thread; load from 16 keep-alive connections (saturation: {rounds} rounds of {} s alternating the paths, medians) and 8 paced connections at 1,000 req/s (latency, CPU, RSS){}.\n",
        sat.as_secs_f64(),
        if full {
            ""
        } else {
            " — smoke run (short, no nginx/HAProxy)"
        }
    );
    println!(
        "| path | req/s at saturation | vs direct | vs nginx | p50 µs @1k/s | p99 µs @1k/s | p99 added µs | vCPU per 1k req/s | RSS MB @1k req/s |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        let vs = |base: Option<&Row>| base.map_or("-".into(), |b| format!("{:.2}", r.rps / b.rps));
        let added = direct.map_or("-".into(), |d| format!("{:.0}", r.p99 - d.p99));
        println!(
            "| {} | {:.0} | {} | {} | {:.0} | {:.0} | {} | {} | {} |",
            r.name,
            r.rps,
            vs(direct),
            vs(nginx),
            r.p50,
            r.p99,
            added,
            opt(r.vcpu, ""),
            opt(r.rss_mb, ""),
        );
    }
    println!(
        "\nGoals (waypoint issue): ≤ 0.08 vCPU and ≤ 20 MB per 1,000 req/s, p99 added ≤ 500 µs, saturation not below nginx's."
    );
    println!("<!-- l7:end -->");
}
