//! `cairn`: the operator CLI.

use std::{path::PathBuf, process::ExitCode};

use cairn_controller::{
    local::{LocalSource, yaml_files},
    store::Store,
};
use clap::{Parser, Subcommand};

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
    /// Validate manifests exactly as the controller would.
    Analyze {
        /// A YAML file, or a directory searched for *.yaml / *.yml.
        #[arg(short = 'f', long = "filename")]
        path: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Version => {
            println!("cairn {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Analyze { path } => analyze(&path),
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
