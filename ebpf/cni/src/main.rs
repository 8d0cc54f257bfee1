//! `cairn-cni`: a chained CNI plugin (spec 1.0), run by the container runtime after
//! the network plugin has set the pod up and before its containers start.
//!
//! - `ADD`: records the pod for ztunnel (state directory), and when the pod is in the
//!   mesh, enrolls it in capture right away: from that moment its connections reach
//!   ztunnel or fail, never bypass it. Passes the previous result through.
//! - `DEL`: forgets the pod and detaches its programs (idempotent).
//! - `CHECK`: the record exists, and an enrolled pod is still enrolled.
//! - `VERSION`.
//! - `cairn-cni install ...` (not a CNI call): puts the plugin on a node (`install.rs`).
//!
//! Membership is decided like the controller decides it (`istio.io/dataplane-mode`
//! on the namespace or pod, `none` opts out), from the controller's config directory
//! in local mode. docs/capture.md has the whole model.

mod cni;
mod install;
mod membership;

use std::io::Read;

use cni::{CniError, Command, Request};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("install") {
        if let Err(e) = install::run(&args[1..]) {
            eprintln!("cairn-cni install: {e}");
            std::process::exit(2);
        }
        return;
    }
    let result = run();
    match result {
        Ok(out) => {
            if let Some(out) = out {
                println!("{out}");
            }
        }
        Err(e) => {
            println!("{}", e.to_json());
            eprintln!("cairn-cni: {e}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<Option<String>, CniError> {
    let command = Command::from_env()?;
    if command == Command::Version {
        return Ok(Some(cni::version_json()));
    }
    let mut stdin = String::new();
    std::io::stdin()
        .read_to_string(&mut stdin)
        .map_err(|e| CniError::io("reading the network config from stdin", e))?;
    let request = Request::parse(command, &stdin, &cni::env_vars())?;
    cni::handle(&request, &membership::FromSource)
}
