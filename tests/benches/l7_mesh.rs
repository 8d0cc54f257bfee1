//! The L7 path as users run it, in the pod lab (tests/waypoint_lab.rs): a captured
//! client pod on node A, HTTP servers in pods on node B, the real ztunnels, the real
//! controller and the real `waypoint` binary. Three paths from node A to node B:
//!
//! - *direct*: a pod outside the mesh to a server outside the mesh, plain HTTP;
//! - *L4 mesh*: the mesh client to a service without a waypoint (`details`, the same
//!   v1 pod): ztunnel -> HBONE -> ztunnel;
//! - *waypoint*: the mesh client to `reviews` (90/10 VirtualService): ztunnel ->
//!   HBONE -> waypoint -> HBONE -> ztunnel, mTLS on both hops.
//!
//! Per path: requests/s at saturation (16 keep-alive connections) and p50/p99 at a
//! paced 1,000 req/s (8 connections, three rounds, medians); for the waypoint its CPU
//! and RSS at that rate.
//! The load generator and the servers are this executable re-run inside the pods.
//!
//! `cargo bench -p cairn-tests --bench l7_mesh -- --bench` (`cargo xtask bench
//! l7-mesh`); under `cargo test` a short smoke run that checks every path answers.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use cairn_tests::{
    pod_lab::{NODE_A, NODE_B, PodLab, can_run},
    waypoint_lab::{
        REVIEWS_VIP, apply_and_place, manifests, pod, spec, start_mesh, waypoint_admin,
    },
};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

const ROLE: &str = "CAIRN_L7M_ROLE";
const DETAILS_VIP: &str = "10.96.0.13";
const LEGACY_SERVER: &str = "10.77.2.20";
const BODY: &[u8] = b"{\"reviews\":[]}";

// === roles run inside pods ===

async fn serve() {
    let listener = TcpListener::bind("0.0.0.0:9080").await.expect("bind");
    while let Ok((s, _)) = listener.accept().await {
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                    BODY,
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> Option<Sender> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let _ = tcp.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(send)
}

async fn one(send: &mut Sender, host: &str) -> bool {
    let req = Request::get("/reviews/1")
        .header("host", host)
        .body(Empty::new())
        .expect("request");
    match send.send_request(req).await {
        Ok(resp) => resp.status().is_success() && resp.into_body().collect().await.is_ok(),
        Err(_) => false,
    }
}

/// `conns` connections for `dur`, each sending back to back, or every `period`
/// when paced; returns (latencies in µs, failures).
async fn load(
    addr: SocketAddr,
    host: &'static str,
    conns: u32,
    period: Option<Duration>,
    dur: Duration,
) -> (Vec<f64>, u64) {
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            tokio::spawn(async move {
                let (mut lat, mut failed) = (Vec::new(), 0u64);
                let Some(mut send) = connect(addr).await else {
                    return (lat, 1);
                };
                let mut tick = period.map(|p| {
                    let mut t = tokio::time::interval_at(
                        tokio::time::Instant::now() + p.mul_f64(f64::from(i) / f64::from(conns)),
                        p,
                    );
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    t
                });
                let start = Instant::now();
                while start.elapsed() < dur {
                    if let Some(t) = &mut tick {
                        t.tick().await;
                    }
                    let t = Instant::now();
                    if one(&mut send, host).await {
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                    } else {
                        failed += 1;
                        match connect(addr).await {
                            Some(s) => send = s,
                            None => break,
                        }
                    }
                }
                (lat, failed)
            })
        })
        .collect();
    let (mut all, mut failed) = (Vec::new(), 0);
    for t in tasks {
        let (l, f) = t.await.expect("task");
        all.extend(l);
        failed += f;
    }
    all.sort_by(|a, b| a.total_cmp(b));
    (all, failed)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// `load <ip> <rate or 0> <seconds>`: prints `ok failed secs p50 p99`.
fn role(args: &[String]) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    match args.first().map(String::as_str) {
        Some("serve") => rt.block_on(serve()),
        Some("load") => {
            let ip: std::net::IpAddr = args[1].parse().expect("ip");
            let rate: u32 = args[2].parse().expect("rate");
            let secs: f64 = args[3].parse().expect("seconds");
            let dur = Duration::from_secs_f64(secs);
            let addr = SocketAddr::new(ip, 9080);
            let start = Instant::now();
            let (lat, failed) = rt.block_on(if rate == 0 {
                load(addr, "reviews:9080", 16, None, dur)
            } else {
                let per = Duration::from_secs_f64(8.0 / f64::from(rate));
                load(addr, "reviews:9080", 8, Some(per), dur)
            });
            println!(
                "{} {failed} {} {} {}",
                lat.len(),
                start.elapsed().as_secs_f64(),
                pct(&lat, 0.5),
                pct(&lat, 0.99)
            );
        }
        other => panic!("unknown role {other:?}"),
    }
}

// === the lab ===

/// CPU-seconds (user + system) and RSS (KiB) of a process.
/// A process's CPU-seconds in user space and in the kernel so far, and its RSS (KiB).
fn usage(pid: u32) -> (f64, f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (ticks(11) / 100.0, ticks(12) / 100.0, rss)
}

struct Run {
    ok: u64,
    failed: u64,
    secs: f64,
    p50: f64,
    p99: f64,
}

/// Paced rounds as one: requests and time summed, the median round's p50 and p99.
fn medians(rounds: &[Run]) -> Run {
    let median = |f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    Run {
        ok: rounds.iter().map(|r| r.ok).sum(),
        failed: rounds.iter().map(|r| r.failed).sum(),
        secs: rounds.iter().map(|r| r.secs).sum(),
        p50: median(|r| r.p50),
        p99: median(|r| r.p99),
    }
}

/// Connections node B's ztunnel has accepted for its pods so far (tunnels and
/// plaintext alike): how often the paths above it open a new one.
fn inbound_opened(lab: &PodLab) -> f64 {
    let metrics = lab.fetch(NODE_B, &format!("http://{}/metrics", lab.admin(NODE_B)));
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn run(lab: &PodLab, pod: &str, ip: &str, rate: u32, secs: f64) -> Run {
    let exe = std::env::current_exe().expect("exe").display().to_string();
    let out = lab.run_in_pod(
        pod,
        &[
            "env",
            &format!("{ROLE}=1"),
            &exe,
            "load",
            ip,
            &rate.to_string(),
            &secs.to_string(),
        ],
    );
    let line = out.lines().last().unwrap_or_default();
    let f: Vec<f64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    assert_eq!(f.len(), 5, "load generator in {pod} said: {out}");
    Run {
        ok: f[0] as u64,
        failed: f[1] as u64,
        secs: f[2],
        p50: f[3],
        p99: f[4],
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if std::env::var_os(ROLE).is_some() {
        return role(&args);
    }
    let full = args.iter().any(|a| a == "--bench");
    if let Err(why) = can_run() {
        eprintln!("SKIPPED l7_mesh bench: {why}");
        return;
    }
    // Paced rounds per path, medians reported: the waypoint's vCPU from one 5 s round
    // moved by a third between runs of the same binaries.
    let (sat_secs, paced_secs, paced_rounds, rate) = if full {
        (5.0, 5.0, 3, 1000)
    } else {
        (0.5, 0.5, 1, 200)
    };

    // `details` is served by the same v1 pod, opted out of the namespace's waypoint:
    // the L4 mesh path. `legacy` is outside the mesh: the direct path.
    let extra = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: details, namespace: demo, labels: {{istio.io/use-waypoint: none}}}}\nspec:\n  clusterIP: {DETAILS_VIP}\n  selector: {{app: reviews, version: v1}}\n  ports: [{{name: http, port: 9080, targetPort: http}}]\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: legacy\n{}{}",
        pod(
            "legacy",
            "plain-client",
            "app: plain",
            "node-a",
            "10.77.1.30"
        ),
        pod(
            "legacy",
            "plain-server",
            "app: plain-server",
            "node-b",
            LEGACY_SERVER
        ),
    );
    let mut lab = PodLab::new(&manifests(&extra));
    let (_, wp) = apply_and_place(&mut lab);
    let exe = std::env::current_exe().expect("exe").display().to_string();
    let server = |_: &str| {
        vec![
            "env".to_string(),
            format!("{ROLE}=1"),
            exe.clone(),
            "serve".into(),
        ]
    };
    start_mesh(&mut lab, &server);
    lab.add_pod(spec("legacy", "plain-client", NODE_A, "10.77.1.30"));
    lab.add_pod(spec("legacy", "plain-server", NODE_B, LEGACY_SERVER));
    let serve_args = server("");
    let serve_args: Vec<&str> = serve_args.iter().map(String::as_str).collect();
    lab.spawn_in_pod("plain-server", &serve_args, "plain-server.log");
    lab.wait_for("the plain server", |l| {
        run(l, "plain-client", LEGACY_SERVER, 100, 0.05).ok > 0
    });
    assert_eq!(
        lab.fetch(NODE_A, &format!("{}/healthz/ready", waypoint_admin()))
            .trim(),
        "ready"
    );

    let paths = [
        ("direct", "plain-client", LEGACY_SERVER),
        ("L4 mesh (ztunnel -> ztunnel)", "client", DETAILS_VIP),
        (
            "waypoint (ztunnel -> waypoint -> ztunnel)",
            "client",
            REVIEWS_VIP,
        ),
    ];
    let mut rows = Vec::new();
    for (name, pod, ip) in paths {
        // Warm the pools and connections, then measure.
        run(&lab, pod, ip, 0, 0.2);
        let sat = run(&lab, pod, ip, 0, sat_secs);
        let through_waypoint = ip == REVIEWS_VIP;
        let opened0 = inbound_opened(&lab);
        let mut rounds = Vec::new();
        // (vCPU per 1,000 req/s, the part of it spent in the kernel) per round.
        let mut cpus = Vec::new();
        let mut rss = 0;
        for _ in 0..paced_rounds {
            let (user0, sys0, _) = usage(wp);
            let paced = run(&lab, pod, ip, rate, paced_secs);
            let (user1, sys1, now) = usage(wp);
            rss = now;
            let achieved = paced.ok as f64 / paced.secs;
            let per_1k = |cpu: f64| cpu / paced.secs / (achieved.max(1.0) / 1000.0);
            let cpu = per_1k(user1 - user0 + sys1 - sys0);
            cpus.push((cpu, per_1k(sys1 - sys0)));
            // Each round on stderr: how far apart the rounds were.
            eprintln!(
                "{name}: paced round: {} ok, p50 {:.0} µs, p99 {:.0} µs{}",
                paced.ok,
                paced.p50,
                paced.p99,
                match through_waypoint {
                    true => format!(", waypoint {cpu:.3} vCPU per 1k req/s"),
                    false => String::new(),
                }
            );
            rounds.push(paced);
        }
        let opened = inbound_opened(&lab) - opened0;
        let paced = medians(&rounds);
        assert!(
            sat.ok > 0 && paced.ok > 0,
            "{name}: no request answered ({} / {} failed)\n{}",
            sat.failed,
            paced.failed,
            lab.logs()
        );
        cpus.sort_by(|a, b| a.0.total_cmp(&b.0));
        let wp_cpu = through_waypoint.then(|| cpus[cpus.len() / 2]);
        let opened_per_1k = opened / (paced.ok.max(1) as f64 / 1000.0);
        rows.push((
            name,
            sat,
            paced,
            wp_cpu,
            through_waypoint.then_some(rss),
            opened_per_1k,
        ));
    }
    let direct_rps = rows[0].1.ok as f64 / rows[0].1.secs;
    let (l4_p99, direct_p99) = (rows[1].2.p99, rows[0].2.p99);
    println!("<!-- l7-mesh:begin -->");
    println!(
        "Pod lab: two nodes (network namespaces, veth), pods captured by eBPF, the real controller, ztunnels and `waypoint` (one worker thread each), HTTP/1.1 servers in pods on node B, the load generator in a pod on node A; saturation: 16 keep-alive connections for {sat_secs} s; latency: 8 connections paced at {rate} req/s, {paced_rounds} rounds of {paced_secs} s (medians of the rounds' p50, p99 and waypoint vCPU).\n"
    );
    println!(
        "| path | req/s at saturation | vs direct | p50 µs @{rate}/s | p99 µs @{rate}/s | p99 added vs L4 mesh µs | p99 added vs direct µs | failed | waypoint vCPU per 1k req/s (of it in the kernel) | waypoint RSS MB | connections opened at node B per 1k req (paced) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (name, sat, paced, cpu, rss, opened) in &rows {
        let rps = sat.ok as f64 / sat.secs;
        println!(
            "| {name} | {rps:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} |",
            rps / direct_rps,
            paced.p50,
            paced.p99,
            paced.p99 - l4_p99,
            paced.p99 - direct_p99,
            sat.failed + paced.failed,
            cpu.map_or("-".into(), |(c, k)| format!("{c:.3} ({k:.3})")),
            rss.map_or("-".into(), |r| format!("{:.1}", r as f64 / 1024.0)),
            // The direct path's server is outside the mesh: node B's ztunnel never sees it.
            match name.starts_with("direct") {
                true => "-".to_string(),
                false => format!("{opened:.1}"),
            },
        );
    }
    println!("<!-- l7-mesh:end -->");
}
