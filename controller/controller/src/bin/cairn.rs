//! `cairn`: the operator CLI.

use std::{path::PathBuf, process::ExitCode};

use cairn_controller::{decode, local::yaml_files};
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
    let files = match yaml_files(path) {
        Ok(f) if !f.is_empty() => f,
        Ok(_) => {
            eprintln!("error: no *.yaml or *.yml files under {}", path.display());
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("error: reading {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let (mut objects, mut errors, mut warnings) = (0usize, 0usize, 0usize);
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                println!("error: {}: {e}", file.display());
                errors += 1;
                continue;
            }
        };
        for result in decode::decode_documents(&text) {
            match result {
                Ok(d) => {
                    objects += 1;
                    for w in d.warnings {
                        warnings += 1;
                        println!(
                            "warning: {}: document {} ({}): {w}",
                            file.display(),
                            d.index,
                            d.object.object_ref()
                        );
                    }
                }
                Err(e) => {
                    errors += 1;
                    println!("error: {}: {e}", file.display());
                }
            }
        }
    }
    println!("{objects} objects valid, {errors} errors, {warnings} warnings");
    if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
