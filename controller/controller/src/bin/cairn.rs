//! `cairn`: the operator CLI.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use cairn_controller::{
    apply, crds, inspect,
    local::{LocalSource, yaml_files},
    store::Store,
    waypoint::{self, ConfigDir, Manifests, Report},
};
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cairn", about = "Operate the Cairn ambient mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the version.
    Version,
    /// Print the CustomResourceDefinitions for the Istio (default) or Gateway API kinds
    /// Cairn reads.
    Crds {
        #[arg(long)]
        gateway_api: bool,
    },
    /// Validate manifests exactly as the controller would.
    Analyze {
        /// A YAML file, or a directory searched for *.yaml / *.yml.
        #[arg(short = 'f', long = "filename")]
        path: PathBuf,
    },
    /// Create or replace the objects of a manifest in the config directory.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[command(flatten)]
        target: Where,
    },
    /// Remove the objects of a manifest from the config directory.
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[command(flatten)]
        target: Where,
    },
    /// Show what a ztunnel holds: workloads, services, policies, certificates.
    ZtunnelConfig {
        /// workloads, services, policies, certificates or all.
        #[arg(default_value = "all")]
        section: String,
        /// The ztunnel's admin address (port 15020).
        #[arg(long, default_value = "127.0.0.1:15020")]
        admin: String,
    },
    /// Show each proxy's xDS connection, accepted/rejected updates, certificate expiry
    /// and what it holds.
    ProxyStatus {
        /// Admin addresses of the proxies (port 15020), comma-separated or repeated.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:15020")]
        admin: Vec<String>,
    },
    /// Declare, remove and list waypoints (L7 proxies).
    Waypoint {
        #[command(subcommand)]
        command: WaypointCommand,
    },
}

#[derive(Debug, Args)]
struct Where {
    /// The controller's config directory (local mode).
    #[arg(long, env = "CAIRN_CONFIG_DIR", default_value = "deploy/local/config")]
    config_dir: PathBuf,
}

/// Where waypoints are declared: a config directory, or a cluster.
#[derive(Debug, Args)]
struct WaypointWhere {
    #[command(flatten)]
    dir: Where,
    /// Kubernetes mode: the cluster's API server instead of a config directory.
    #[arg(long)]
    kube: bool,
    /// kubeconfig for `--kube` (default: in-cluster, $KUBECONFIG, ~/.kube/config).
    #[arg(long, requires = "kube")]
    kubeconfig: Option<PathBuf>,
}

impl WaypointWhere {
    fn open(self) -> Result<Box<dyn Manifests>, String> {
        if self.kube {
            let cluster =
                cairn_controller::waypoint_kube::Cluster::connect(self.kubeconfig.as_deref())?;
            Ok(Box::new(cluster))
        } else {
            Ok(Box::new(ConfigDir::new(self.dir.config_dir)))
        }
    }
}

#[derive(Debug, Subcommand)]
enum WaypointCommand {
    /// Declare a waypoint for a namespace (a Gateway of class istio-waypoint).
    Apply {
        #[arg(short = 'n', long)]
        namespace: String,
        #[arg(long, default_value = "waypoint")]
        name: String,
        /// What it serves: service, workload, all or none.
        #[arg(long = "for", default_value = "service")]
        for_: String,
        /// Also label the namespace istio.io/use-waypoint=<name>.
        #[arg(long)]
        enroll_namespace: bool,
        /// Wait until the waypoint is Programmed (has an address and a ready pod).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[command(flatten)]
        target: WaypointWhere,
    },
    /// Show a waypoint's status conditions (Accepted, Programmed) and address.
    Status {
        #[arg(short = 'n', long)]
        namespace: String,
        #[arg(long, default_value = "waypoint")]
        name: String,
        #[command(flatten)]
        target: WaypointWhere,
    },
    /// Remove a waypoint `apply` declared.
    Delete {
        #[arg(short = 'n', long)]
        namespace: String,
        #[arg(long, default_value = "waypoint")]
        name: String,
        #[command(flatten)]
        target: WaypointWhere,
    },
    /// List waypoints.
    List {
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[command(flatten)]
        target: WaypointWhere,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Version => {
            println!("cairn {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Crds { gateway_api } => {
            let set = if gateway_api {
                crds::Set::GatewayApi
            } else {
                crds::Set::Istio
            };
            match crds::to_yaml(set) {
                Ok(yaml) => {
                    print!("{yaml}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: encoding the CRDs: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Analyze { path } => analyze(&path),
        Command::Apply { file, target } => {
            objects(apply::apply(&ConfigDir::new(target.config_dir), &file))
        }
        Command::Delete { file, target } => {
            objects(apply::delete(&ConfigDir::new(target.config_dir), &file))
        }
        Command::ZtunnelConfig { section, admin } => ztunnel_config(&section, &admin),
        Command::ProxyStatus { admin } => {
            let rows: Vec<_> = admin.iter().map(|a| inspect::proxy_status(a)).collect();
            print!("{}", inspect::render_status(&rows));
            if rows.iter().all(|r| r.kind.is_ok()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Waypoint { command } => waypoint_command(command),
    }
}

fn ztunnel_config(section: &str, admin: &str) -> ExitCode {
    use inspect::Section;
    let section = match section {
        "workloads" | "workload" => Section::Workloads,
        "services" | "service" => Section::Services,
        "policies" | "policy" => Section::Policies,
        "certificates" | "certificate" | "certs" => Section::Certificates,
        "all" => Section::All,
        other => {
            eprintln!("error: {other:?}: write workloads, services, policies, certificates or all");
            return ExitCode::from(2);
        }
    };
    match inspect::fetch(admin, "/config_dump")
        .and_then(|dump| inspect::ztunnel_config(admin, &dump, section))
    {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn objects(result: Result<Report, apply::ApplyError>) -> ExitCode {
    match result {
        Ok(r) => report(Ok(r)),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn report(result: Result<Report, waypoint::WaypointError>) -> ExitCode {
    match result {
        Ok(r) => {
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            for d in &r.done {
                println!("{d}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn waypoint_command(command: WaypointCommand) -> ExitCode {
    match command {
        WaypointCommand::Apply {
            namespace,
            name,
            for_,
            enroll_namespace,
            wait,
            timeout,
            target,
        } => {
            let target = match target.open() {
                Ok(t) => t,
                Err(e) => return fail(&e),
            };
            let applied = report(waypoint::apply(
                target.as_ref(),
                &waypoint::Apply {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    for_,
                    enroll_namespace,
                },
            ));
            if applied != ExitCode::SUCCESS || !wait {
                return applied;
            }
            wait_programmed(
                target.as_ref(),
                &namespace,
                &name,
                Duration::from_secs(timeout),
            )
        }
        WaypointCommand::Status {
            namespace,
            name,
            target,
        } => {
            let status = target
                .open()
                .and_then(|t| t.store().map_err(|e| e.to_string()))
                .and_then(|store| {
                    waypoint::status(&store, &namespace, &name).map_err(|e| e.to_string())
                });
            match status {
                Ok(st) => {
                    print_status(&namespace, &name, &st);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        WaypointCommand::Delete {
            namespace,
            name,
            target,
        } => match target.open() {
            Ok(t) => report(waypoint::delete(t.as_ref(), &namespace, &name)),
            Err(e) => fail(&e),
        },
        WaypointCommand::List { namespace, target } => {
            let listed = target.open().and_then(|t| {
                waypoint::list(t.as_ref(), namespace.as_deref()).map_err(|e| e.to_string())
            });
            match listed {
                Ok(listed) => {
                    println!("{:<20} {:<20} {:<9} SOURCE", "NAMESPACE", "NAME", "FOR");
                    for w in listed {
                        println!(
                            "{:<20} {:<20} {:<9} {}",
                            w.namespace, w.name, w.for_, w.source
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
    }
}

fn fail(error: &str) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::FAILURE
}

fn print_status(namespace: &str, name: &str, st: &waypoint::Status) {
    println!("waypoint {namespace}/{name}");
    for c in &st.conditions {
        let status = if c.status { "True" } else { "False" };
        println!(
            "  {:<11} {:<6} {:<20} {}",
            c.type_, status, c.reason, c.message
        );
    }
    println!("  address     {}", st.address.as_deref().unwrap_or("-"));
}

/// Polls the waypoint's status until it is Programmed or `timeout` passes.
fn wait_programmed(
    target: &dyn Manifests,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> ExitCode {
    let start = Instant::now();
    let mut said = false;
    loop {
        let status = target
            .store()
            .and_then(|store| waypoint::status(&store, namespace, name));
        match status {
            Ok(st) if st.programmed() => {
                print_status(namespace, name, &st);
                return ExitCode::SUCCESS;
            }
            Ok(st) if start.elapsed() >= timeout => {
                print_status(namespace, name, &st);
                eprintln!("error: waypoint {namespace}/{name} not Programmed after {timeout:?}");
                return ExitCode::FAILURE;
            }
            Ok(st) => {
                if !said {
                    let why = st
                        .conditions
                        .iter()
                        .find(|c| !c.status)
                        .map(|c| c.message.as_str());
                    eprintln!("waiting for {namespace}/{name}: {}", why.unwrap_or("?"));
                    said = true;
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn analyze(path: &std::path::Path) -> ExitCode {
    match yaml_files(path) {
        Ok(f) if !f.is_empty() => {}
        Ok(_) => {
            eprintln!("error: no *.yaml or *.yml files under {}", path.display());
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("error: reading {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    // The controller's own source and store: same decoding, validation and
    // duplicate detection.
    let mut store = Store::default();
    let scan = LocalSource::new(path).scan(&mut store);
    for w in &scan.warnings {
        println!("warning: {w}");
    }
    for e in &scan.errors {
        println!("error: {e}");
    }
    println!(
        "{} objects valid, {} errors, {} warnings",
        store.len(),
        scan.errors.len(),
        scan.warnings.len()
    );
    if scan.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
