//! The ztunnel binary's configuration, from a key/value source: the environment in
//! production, a map in tests. Errors name the key, the value and the reason.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

/// Where configuration values come from.
pub trait Source {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
pub struct Env;

impl Source for Env {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
}

impl Source for HashMap<&str, &str> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).map(|v| v.to_string())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{key} is required: {why}")]
    Missing {
        key: &'static str,
        why: &'static str,
    },
    #[error("{key}={value:?} is invalid: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
}

/// Where config comes from: the controller, or a local YAML file (no controller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigMode {
    Controller {
        address: String,
        server_name: String,
        root_cert: PathBuf,
        token_file: PathBuf,
    },
    Local {
        file: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node_name: String,
    pub mode: ConfigMode,
    pub admin_addr: SocketAddr,
    pub cert_ttl: Duration,
    /// How long in-flight connections may take to finish after SIGTERM.
    pub drain: Duration,
    /// Serve the explicit outbound entry (PROXY header on `<pod-ip>:15001`).
    pub explicit_outbound: bool,
    /// Runtime worker threads (`CAIRN_WORKER_THREADS`; default 2, as Istio's ztunnel,
    /// or fewer when the process may use fewer CPUs, e.g. under a 1-CPU cgroup limit).
    pub worker_threads: usize,
    /// In-pod capture with eBPF (`CAIRN_CAPTURE=true`): enroll and adopt the pods the
    /// CNI plugin recorded. `None` = explicit addressing only.
    pub capture: Option<CaptureConfig>,
}

/// Where the capture state lives (see docs/capture.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// `CAIRN_CAPTURE_PIN_ROOT`, default `/sys/fs/bpf/cairn`.
    pub pin_root: PathBuf,
    /// `CAIRN_CAPTURE_STATE_DIR`, default `/var/run/cairn/pods`.
    pub state_dir: PathBuf,
}

fn boolean(src: &dyn Source, key: &'static str) -> Result<bool, ConfigError> {
    match src.get(key).as_deref() {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => Err(ConfigError::Invalid {
            key,
            value: other.into(),
            reason: "write true or false".into(),
        }),
    }
}

fn duration(key: &'static str, value: String) -> Result<Duration, ConfigError> {
    cairn_client::duration(&value).ok_or_else(|| ConfigError::Invalid {
        key,
        value: value.clone(),
        reason: "write a duration like 500ms, 30s, 5m or 24h".into(),
    })
}

impl Config {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let node_name = src.get("CAIRN_NODE_NAME").ok_or(ConfigError::Missing {
            key: "CAIRN_NODE_NAME",
            why: "the node this ztunnel serves (its workloads get certificates and listeners)",
        })?;
        let mode = match src.get("CAIRN_LOCAL_CONFIG") {
            Some(file) => ConfigMode::Local { file: file.into() },
            None => ConfigMode::Controller {
                address: src
                    .get("CAIRN_CONTROLLER")
                    .unwrap_or_else(|| "https://localhost:15012".into()),
                server_name: src
                    .get("CAIRN_CONTROLLER_NAME")
                    .unwrap_or_else(|| "localhost".into()),
                root_cert: src
                    .get("CAIRN_ROOT_CERT")
                    .ok_or(ConfigError::Missing {
                        key: "CAIRN_ROOT_CERT",
                        why: "the mesh root (root-cert.pem) to trust the controller and peers",
                    })?
                    .into(),
                token_file: src
                    .get("CAIRN_TOKEN_FILE")
                    .ok_or(ConfigError::Missing {
                        key: "CAIRN_TOKEN_FILE",
                        why: "a file holding this node's bearer token for the controller",
                    })?
                    .into(),
            },
        };
        let admin = src
            .get("CAIRN_ADMIN_ADDR")
            .unwrap_or_else(|| "127.0.0.1:15020".into());
        let admin_addr = admin.parse().map_err(|_| ConfigError::Invalid {
            key: "CAIRN_ADMIN_ADDR",
            value: admin.clone(),
            reason: "write ip:port".into(),
        })?;
        Ok(Self {
            node_name,
            mode,
            admin_addr,
            cert_ttl: duration(
                "CAIRN_CERT_TTL",
                src.get("CAIRN_CERT_TTL").unwrap_or_else(|| "24h".into()),
            )?,
            drain: duration(
                "CAIRN_DRAIN",
                src.get("CAIRN_DRAIN").unwrap_or_else(|| "5s".into()),
            )?,
            worker_threads: match src.get("CAIRN_WORKER_THREADS") {
                None => std::thread::available_parallelism().map_or(2, |n| n.get().min(2)),
                Some(v) => v
                    .parse()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| ConfigError::Invalid {
                        key: "CAIRN_WORKER_THREADS",
                        value: v.clone(),
                        reason: "write a number of threads from 1 to 64".into(),
                    })?,
            },
            explicit_outbound: boolean(src, "CAIRN_EXPLICIT_OUTBOUND")?,
            capture: boolean(src, "CAIRN_CAPTURE")?.then(|| CaptureConfig {
                pin_root: src
                    .get("CAIRN_CAPTURE_PIN_ROOT")
                    .unwrap_or_else(|| "/sys/fs/bpf/cairn".into())
                    .into(),
                state_dir: src
                    .get("CAIRN_CAPTURE_STATE_DIR")
                    .unwrap_or_else(|| "/var/run/cairn/pods".into())
                    .into(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_mode_with_defaults() {
        let src = HashMap::from([
            ("CAIRN_NODE_NAME", "node-a"),
            ("CAIRN_ROOT_CERT", "/etc/cairn/root-cert.pem"),
            ("CAIRN_TOKEN_FILE", "/var/run/secrets/token"),
        ]);
        let c = Config::from_source(&src).expect("valid");
        assert_eq!(c.admin_addr, "127.0.0.1:15020".parse().expect("addr"));
        assert_eq!(c.cert_ttl, Duration::from_secs(86400));
        assert!(
            matches!(c.mode, ConfigMode::Controller { ref address, .. } if address == "https://localhost:15012")
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_source(&HashMap::new()).expect_err("no node");
        assert!(
            e.to_string().starts_with("CAIRN_NODE_NAME is required"),
            "{e}"
        );
        let e =
            Config::from_source(&HashMap::from([("CAIRN_NODE_NAME", "n")])).expect_err("no root");
        assert!(
            e.to_string().starts_with("CAIRN_ROOT_CERT is required"),
            "{e}"
        );
        let e = Config::from_source(&HashMap::from([
            ("CAIRN_NODE_NAME", "n"),
            ("CAIRN_LOCAL_CONFIG", "/x.yaml"),
            ("CAIRN_DRAIN", "soon"),
        ]))
        .expect_err("bad duration");
        assert_eq!(
            e,
            ConfigError::Invalid {
                key: "CAIRN_DRAIN",
                value: "soon".into(),
                reason: "write a duration like 500ms, 30s, 5m or 24h".into()
            }
        );
    }
}
