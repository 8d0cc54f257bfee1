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
    while let Ok((s, _)) = echo.accept().await {
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let (mut r, mut w) = s.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

// === client mode ===

/// Where the client connects: straight to the server pod, or to the client pod's
/// explicit outbound entry with a PROXY header naming the server pod.
#[derive(Clone, Copy)]
enum Path {
    Direct,
    Mesh,
}

async fn open(path: Path, port: u16) -> TcpStream {
    let dst: SocketAddr = format!("{SERVER_POD}:{port}").parse().expect("addr");
    let s = match path {
        Path::Direct => TcpStream::connect(dst).await.expect("connect"),
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

async fn client(args: &[String]) {
    let path = match args[0].as_str() {
        "direct" => Path::Direct,
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
        other => panic!("unknown client mode {other}"),
    }
}

// === orchestration ===

struct Scale {
    bulk: u64,
    pings: u64,
    conns: u64,
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

fn ztunnel_cpu(lab: &Lab) -> f64 {
    lab.ztunnels.iter().map(|p| cpu_seconds(*p)).sum()
}

fn orchestrate(full: bool) {
    if let Err(why) = can_run() {
        println!("SKIPPED l4 benchmark: {why}");
        return;
    }
    let scale = if full {
        Scale {
            bulk: 2 << 30,
            pings: 20_000,
            conns: 3_000,
        }
    } else {
        Scale {
            bulk: 16 << 20,
            pings: 200,
            conns: 50,
        }
    };
    let manifests = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bench\n  labels: {{istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: bench}}\nspec: {{serviceAccountName: client, nodeName: node-a, containers: [{{name: c, image: t}}]}}\nstatus: {{phase: Running, podIP: {CLIENT_POD}, conditions: [{{type: Ready, status: \"True\"}}]}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: server, namespace: bench}}\nspec: {{serviceAccountName: server, nodeName: node-b, containers: [{{name: c, image: t}}]}}\nstatus: {{phase: Running, podIP: {SERVER_POD}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
    );
    let mut lab = Lab::start(&manifests, &[CLIENT_POD], &[SERVER_POD], [1, 1]);
    let me = std::env::current_exe().expect("exe").display().to_string();
    lab.spawn(NODE_B, &[&me, "serve"], &[], "server.log");
    std::thread::sleep(Duration::from_millis(300));
    let idle: f64 = lab.ztunnels.iter().map(|p| kib(*p, "VmRSS:")).sum::<f64>() / 2.0;

    let b = scale.bulk.to_string();
    let d1 = run(&lab, &["direct", "bulk", &b, "1"])[0];
    let cpu0 = ztunnel_cpu(&lab);
    let m1 = run(&lab, &["mesh", "bulk", &b, "1"])[0];
    let cpu_per_gb = (ztunnel_cpu(&lab) - cpu0) / (scale.bulk as f64 / 1e9);
    let hwm1: f64 = lab
        .ztunnels
        .iter()
        .map(|p| kib(*p, "VmHWM:"))
        .fold(0.0, f64::max);
    let d4 = run(&lab, &["direct", "bulk", &b, "4"])[0];
    let m4 = run(&lab, &["mesh", "bulk", &b, "4"])[0];
    let hwm4: f64 = lab
        .ztunnels
        .iter()
        .map(|p| kib(*p, "VmHWM:"))
        .fold(0.0, f64::max);
    let p = scale.pings.to_string();
    let dp = run(&lab, &["direct", "ping", &p]);
    let cpu0 = ztunnel_cpu(&lab);
    let mp = run(&lab, &["mesh", "ping", &p]);
    let cpu_per_req_us = (ztunnel_cpu(&lab) - cpu0) / scale.pings as f64 * 1e6;
    let c = scale.conns.to_string();
    let dc = run(&lab, &["direct", "conns", &c])[0];
    let mc = run(&lab, &["mesh", "conns", &c])[0];

    let gbit = |v: f64| format!("{:.2} Gbit/s", v * 8.0 / 1e9);
    println!("<!-- l4:begin -->");
    println!(
        "Two network namespaces joined by a veth pair, one ztunnel per namespace (release build under `cargo xtask bench`), client pod on A, server pod on B. Bulk: {} MiB to a sink. CPU is both ztunnels' user+system time; RSS per ztunnel.\n",
        scale.bulk >> 20
    );
    println!("| figure | through both ztunnels | direct TCP (same run) | ratio | goal |");
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
        "| 64 B ping-pong p50 / p99 | {:.1} / {:.1} µs | {:.1} / {:.1} µs | +{:.1} µs at p50 | <= +60 µs |",
        mp[0],
        mp[1],
        dp[0],
        dp[1],
        mp[0] - dp[0]
    );
    println!(
        "| new connections per second | {mc:.0} | {dc:.0} | {:.0}% | >= 45% |",
        100.0 * mc / dc
    );
    println!("| ztunnel CPU per GB (1 stream) | {cpu_per_gb:.2} CPU-s | - | - | <= 1.4 CPU-s |");
    println!(
        "| ztunnel CPU per round trip | {cpu_per_req_us:.1} µs | - | - | <= 25 µs per request |"
    );
    println!(
        "| ztunnel RSS idle / peak under 1 stream / under 4 | {:.1} / {:.1} / {:.1} MB | - | - | <= 8 MB idle, <= 16 MB under one stream |",
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
        Some("client") => tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(client(&args[1..])),
        _ => orchestrate(args.iter().any(|a| a == "--bench")),
    }
}
