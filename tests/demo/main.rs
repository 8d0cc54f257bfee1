//! `cairn-demo` (run by `cargo xtask demo`): a real Cairn mesh on one machine, with a
//! live view of what it does.
//!
//! `up` (the default) builds two nodes and a bookinfo-shaped app in namespace `demo`
//! as the pod lab does (network namespaces, veths, cgroups, the real CNI plugin and
//! eBPF capture, one real ztunnel per node, the real controller on a config
//! directory), applies `deploy/demo/` and `cairn waypoint apply --enroll-namespace`,
//! starts the apps, and redraws the view until Ctrl-C, then removes everything it
//! made. `down` stops a running demo and removes what any demo left (after a crash).
//! `app` is the sample app itself, run inside the pods.

use std::{
    io::IsTerminal,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use cairn_tests::{
    demo_env::{self, DEFAULT_DIR, PREFIX},
    lab::binary,
    pod_lab::{NODE_A, NODE_B, Options, PodLab, connect_in, get_in},
    waypoint_lab::{WAYPOINT_POD_IP, WAYPOINT_VIP, apply_and_place, spec, wait_for_waypoint},
};
use clap::{Parser, Subcommand};

mod app;
mod kube;
mod view;

#[derive(Parser)]
#[command(
    name = "cairn-demo",
    about = "A Cairn mesh on one machine, with a live view"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the demo and show the live view until Ctrl-C (the default).
    Up {
        /// Requests per second the frontend sends.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// On the local Kubernetes cluster (a real API server; the controller in
        /// Kubernetes mode; everything through kubectl and `cairn --kube`).
        #[arg(long)]
        kube: bool,
    },
    /// Stop a running demo and remove what any demo left behind.
    Down {
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// The sample app (runs inside the demo's pods).
    #[command(hide = true)]
    App {
        #[command(subcommand)]
        role: Role,
    },
}

#[derive(Subcommand)]
enum Role {
    Ratings,
    Reviews {
        #[arg(long)]
        version: String,
        #[arg(long)]
        ratings: Option<SocketAddr>,
        /// Every Nth request answers 500 (the 1st, N+1th, ...).
        #[arg(long)]
        fail_every: Option<u64>,
        /// Milliseconds to wait before each answer.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Sends `count` requests and prints what came back (JSON), then exits.
    Load {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "reviews")]
        host: String,
        /// `name:value`, repeatable.
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        #[arg(long, default_value_t = 100)]
        count: u64,
        #[arg(long, default_value_t = 4)]
        concurrency: u64,
    },
    Frontend {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long)]
        rate: u32,
        #[arg(long)]
        stats: PathBuf,
    },
}

pub(crate) const NAMESPACE: &str = "demo";
const REVIEWS: &str = "10.96.0.12:9080";
const RATINGS: &str = "10.96.0.13:9080";
const PODS: [(&str, usize, &str); 4] = [
    ("frontend", NODE_A, "10.77.1.10"),
    ("ratings", NODE_A, "10.77.1.11"),
    ("reviews-v1", NODE_B, "10.77.2.12"),
    ("reviews-v2", NODE_B, "10.77.2.13"),
];

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Cmd::Up {
        rate: 200,
        dir: DEFAULT_DIR.into(),
        kube: false,
    }) {
        Cmd::Up {
            rate, kube: true, ..
        } => preflight().and_then(|()| kube::up(rate, &*stop_flag()?)),
        Cmd::Up { rate, dir, .. } => up(rate, &dir),
        Cmd::Down { dir } => down(&dir),
        Cmd::App { role } => run_app(role),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once(':').ok_or("expected name:value")?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

fn run_app(role: Role) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match role {
            Role::Ratings => app::ratings().await,
            Role::Reviews {
                version,
                ratings,
                fail_every,
                delay_ms,
            } => {
                let misbehaviour = app::Misbehaviour {
                    fail_every,
                    delay: Duration::from_millis(delay_ms),
                };
                app::reviews(version, ratings, misbehaviour).await
            }
            Role::Load {
                target,
                host,
                headers,
                count,
                concurrency,
            } => {
                let tally = app::load(target, host, headers, count, concurrency).await?;
                println!("{}", serde_json::to_string(&tally)?);
                Ok(())
            }
            Role::Frontend {
                target,
                host,
                rate,
                stats,
            } => app::frontend(target, host, rate, stats).await,
        }
    })
}

/// Why this machine cannot run the demo, if it cannot.
fn preflight() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo needs root (network namespaces, cgroups, eBPF): run it with sudo");
    }
    for (tool, arg, package) in [
        ("ip", "-V", "iproute2"),
        ("nsenter", "--version", "util-linux"),
    ] {
        if Command::new(tool).arg(arg).output().is_err() {
            bail!("the demo needs `{tool}` (Debian package {package})");
        }
    }
    if cairn_capture::cgroup2_mount().is_none() {
        bail!("the demo needs cgroup v2 mounted (capture attaches to pod cgroups)");
    }
    if !Path::new("deploy/demo/bookinfo.yaml").exists() {
        bail!("run the demo from the repository's root (`cargo xtask demo` does)");
    }
    Ok(())
}

/// Sets a flag on SIGINT or SIGTERM (instead of dying), so the demo cleans up.
fn stop_flag() -> Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (ready, registered) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        rt.block_on(async move {
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                let _ = ready.send(false);
                return;
            };
            let _ = ready.send(true);
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            flag.store(true, Ordering::SeqCst);
        })
    });
    if !registered.recv().unwrap_or(false) {
        bail!("could not install the Ctrl-C handler");
    }
    Ok(stop)
}

/// A path as the user can type it from here.
fn shown(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_owned))
        .unwrap_or_else(|| path.to_owned())
        .display()
        .to_string()
}

/// Runs the `cairn` CLI as the user would, echoing the command and what it said.
fn cairn(args: &[&str]) -> Result<()> {
    let bin = binary("cairn");
    println!("$ {} {}", shown(&bin), args.join(" "));
    let out = Command::new(&bin)
        .args(args)
        .output()
        .context("running cairn")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("cairn {} failed", args.join(" "));
    }
    Ok(())
}

pub(crate) fn step(what: &str) {
    println!("==> {what}");
}

/// Forwards 127.0.0.1:`port` (this namespace) to `to` inside `netns`, so the admin
/// pages are plain URLs on the host; false if the port is taken.
fn forward(port: u16, netns: PathBuf, to: SocketAddr) -> bool {
    let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) else {
        return false;
    };
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let netns = netns.clone();
            std::thread::spawn(move || {
                let Ok(upstream) = connect_in(&netns, to, Duration::from_secs(2)) else {
                    return;
                };
                let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), upstream.try_clone()) else {
                    return;
                };
                let (mut c, mut u) = (client, upstream);
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut u2);
                    let _ = u2.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut u, &mut c);
                let _ = c.shutdown(std::net::Shutdown::Write);
                let _ = up.join();
            });
        }
    });
    true
}

fn up(rate: u32, dir: &Path) -> Result<()> {
    preflight()?;
    if let Some(pid) = demo_env::running(dir) {
        bail!(
            "a demo is already running (pid {pid}): stop it with Ctrl-C in its terminal, or `cargo xtask demo down`"
        );
    }
    let left = demo_env::sweep(dir);
    if !left.is_empty() {
        println!(
            "removed what an earlier demo left behind: {}",
            left.join(", ")
        );
    }
    let stop = stop_flag()?;
    let started = Instant::now();
    let outcome = run(rate, dir, &stop);
    // The lab is gone (dropped inside `run`, also on error or panic); check it.
    let left = demo_env::leftovers(dir);
    if !left.is_empty() {
        demo_env::sweep(dir);
        println!("removed after the lab: {}", left.join(", "));
    }
    let left = demo_env::leftovers(dir);
    if left.is_empty() {
        println!(
            "demo stopped after {:.0} s: no namespaces, links, cgroups, pins or processes left",
            started.elapsed().as_secs_f64()
        );
    } else {
        println!("could not remove: {}", left.join(", "));
    }
    outcome
}

fn run(rate: u32, dir: &Path, stop: &AtomicBool) -> Result<()> {
    let stopped = || stop.load(Ordering::SeqCst);
    step("two nodes (network namespaces) and the controller on the config directory");
    let mut lab = PodLab::with(
        "",
        Options {
            prefix: PREFIX,
            dir: Some(dir.to_owned()),
        },
    );
    std::fs::write(demo_env::pid_file(dir), std::process::id().to_string())
        .context("writing the pid file")?;
    let config = dir.join("config").display().to_string();
    step("the app's manifests and a 90/10 canary for reviews");
    cairn(&[
        "apply",
        "-f",
        "deploy/demo/bookinfo.yaml",
        "--config-dir",
        &config,
    ])?;
    cairn(&[
        "apply",
        "-f",
        "deploy/demo/reviews-canary.yaml",
        "--config-dir",
        &config,
    ])?;
    if stopped() {
        return Ok(());
    }

    step("pods: namespace, veth, address and cgroup each, then the CNI plugin (capture)");
    for (name, node, ip) in PODS {
        let cni = lab.add_pod(spec(NAMESPACE, name, node, ip));
        let said = cni.lines().last().unwrap_or_default();
        println!("  {name:<11} {ip:<11} node-{}  {said}", ["a", "b"][node]);
    }
    step("a ztunnel on each node");
    lab.start_ztunnel(NODE_A);
    lab.start_ztunnel(NODE_B);
    if stopped() {
        return Ok(());
    }

    step("the waypoint: `cairn waypoint apply` while the demo (the kubelet) runs its pod");
    println!(
        "$ {} waypoint apply -n {NAMESPACE} --enroll-namespace --wait --config-dir {config}",
        shown(&binary("cairn"))
    );
    let (said, _) = apply_and_place(&mut lab);
    print!("{said}");

    step("the apps");
    let me = binary("cairn-demo").display().to_string();
    lab.spawn_in_pod("ratings", &[&me, "app", "ratings"], "ratings.log");
    lab.spawn_in_pod(
        "reviews-v1",
        &[&me, "app", "reviews", "--version", "v1"],
        "reviews-v1.log",
    );
    lab.spawn_in_pod(
        "reviews-v2",
        &[
            &me,
            "app",
            "reviews",
            "--version",
            "v2",
            "--ratings",
            RATINGS,
        ],
        "reviews-v2.log",
    );
    wait_for_waypoint(&lab);
    lab.wait_for("every pod adopted by its node's ztunnel", |l| {
        l.adopted(NODE_A) >= 2.0 && l.adopted(NODE_B) >= 2.0
    });
    if stopped() {
        return Ok(());
    }
    let stats = dir.join("frontend-stats.json");
    lab.spawn_in_pod(
        "frontend",
        &[
            &me,
            "app",
            "frontend",
            "--target",
            REVIEWS,
            "--host",
            "reviews.demo.svc.cluster.local:9080",
            "--rate",
            &rate.to_string(),
            "--stats",
            &stats.display().to_string(),
        ],
        "frontend.log",
    );

    let pages = [
        (15120, NODE_A, "10.77.1.1:15020", "ztunnel node-a"),
        (15121, NODE_B, "10.77.2.1:15020", "ztunnel node-b"),
        (15122, NODE_A, "10.77.1.20:15020", "waypoint demo/waypoint"),
    ];
    let mut urls = String::new();
    let mut forwarded = Vec::new();
    for (port, node, to, who) in pages {
        let to: SocketAddr = to.parse().context("admin address")?;
        if forward(port, lab.netns_path(node), to) {
            forwarded.push(format!("127.0.0.1:{port}"));
            urls += &format!("\n  {who:<23} http://127.0.0.1:{port}/metrics  (and /config_dump)");
        } else {
            urls += &format!(
                "\n  {who:<23} nsenter --net={} curl http://{to}/metrics  (127.0.0.1:{port} was taken)",
                lab.netns_path(node).display()
            );
        }
    }
    let footer = footer(&config, dir, &urls, &forwarded);
    println!("\n{footer}\n");
    let admin = |ip: &str| format!("http://{ip}/metrics");
    let scrapes = [
        (
            lab.netns_path(NODE_A),
            admin(&lab.admin(NODE_A)),
            "ztunnel node-a",
        ),
        (
            lab.netns_path(NODE_B),
            admin(&lab.admin(NODE_B)),
            "ztunnel node-b",
        ),
        (
            lab.netns_path(NODE_A),
            format!("http://{WAYPOINT_POD_IP}:15020/metrics"),
            "waypoint",
        ),
    ];
    let header = format!(
        "Cairn demo: namespace {NAMESPACE} on node-a and node-b, waypoint {NAMESPACE}/waypoint ({WAYPOINT_VIP}), frontend at {rate} req/s"
    );
    view_loop(&header, &scrapes, &stats, &footer, stop);
    step("stopping: removing every process, namespace, link, cgroup and pin");
    drop(lab);
    Ok(())
}

fn footer(config: &str, dir: &Path, urls: &str, forwarded: &[String]) -> String {
    let cli = shown(&binary("cairn"));
    let cmd = |verb: &str, file: &str| format!("$ {cli} {verb} -f {file} --config-dir {config}");
    let inspect = match forwarded.first() {
        Some(node_a) => format!(
            "\ninspect:\n  node-a       $ {cli} ztunnel-config --admin {node_a}\n  all proxies  $ {cli} proxy-status --admin {}",
            forwarded.join(",")
        ),
        None => String::new(),
    };
    format!(
        "try it (in another terminal, from this directory; the view changes within seconds):\n  even split   {}\n  50% aborts   {}\n  deny jason   {}\n  undo         {}\n               {}{inspect}\nmetrics:{urls}\nlogs: {}/*.log    stop: Ctrl-C here, or `cargo xtask demo down` from anywhere",
        cmd("apply", "deploy/demo/steps/reviews-50-50.yaml"),
        cmd("apply", "deploy/demo/steps/reviews-abort-50.yaml"),
        cmd("apply", "deploy/demo/steps/deny-jason.yaml"),
        cmd("apply", "deploy/demo/reviews-canary.yaml"),
        cmd("delete", "deploy/demo/steps/deny-jason.yaml"),
        dir.display(),
    )
}

/// Redraws the view until `stop`: the frontend's stats from `stats`, the two
/// ztunnels' and the waypoint's metrics from `scrapes` (namespace to fetch from,
/// URL, name).
pub(crate) fn view_loop(
    header: &str,
    scrapes: &[(PathBuf, String, &'static str); 3],
    stats: &Path,
    footer: &str,
    stop: &AtomicBool,
) {
    let tty = std::io::stdout().is_terminal();
    // A terminal is redrawn every second; a log (not a terminal) gets a frame every 5 s.
    let every = if tty {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let started = Instant::now();
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if Instant::now() >= next {
            next += every;
            let scrape = |(netns, url, who): &(PathBuf, String, &'static str)| view::Scrape {
                who,
                samples: get_in(netns, url)
                    .ok()
                    .map(|text| view::parse_metrics(&text)),
            };
            let frame = view::Frame {
                header: format!("{header}, up {:.0} s", started.elapsed().as_secs_f64()),
                stats: app::read_stats(stats),
                ztunnels: [scrape(&scrapes[0]), scrape(&scrapes[1])],
                waypoint: scrape(&scrapes[2]),
                footer,
            };
            let text = view::render(&frame);
            if tty {
                print!("\x1b[H\x1b[2J{text}");
            } else {
                println!("----- view -----\n{text}");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn down(dir: &Path) -> Result<()> {
    if demo_env::stop_running(dir, Duration::from_secs(20)) {
        println!("stopped the running demo");
    }
    let removed = demo_env::sweep(dir);
    if removed.is_empty() {
        println!("nothing to remove");
    } else {
        println!("removed: {}", removed.join(", "));
    }
    let left = demo_env::leftovers(dir);
    if !left.is_empty() {
        bail!("could not remove: {}", left.join(", "));
    }
    println!("no demo namespaces, links, cgroups, pins or processes left");
    Ok(())
}
