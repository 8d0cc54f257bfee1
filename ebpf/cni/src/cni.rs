//! The CNI side: environment, network config, results and errors (CNI spec 1.0).

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use cairn_capture::{Capture, PodNet, PodRecord, PodRecords};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::membership::{Membership, Source};

const CNI_VERSION: &str = "1.0.0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl Command {
    pub fn from_env() -> Result<Self, CniError> {
        match std::env::var("CNI_COMMAND").as_deref() {
            Ok("ADD") => Ok(Command::Add),
            Ok("DEL") => Ok(Command::Del),
            Ok("CHECK") => Ok(Command::Check),
            Ok("VERSION") => Ok(Command::Version),
            Ok(other) => Err(CniError::invalid_env(format!(
                "unknown CNI_COMMAND {other:?}"
            ))),
            Err(_) => Err(CniError::invalid_env("CNI_COMMAND is not set".into())),
        }
    }
}

pub fn env_vars() -> HashMap<String, String> {
    std::env::vars().collect()
}

pub fn version_json() -> String {
    json!({"cniVersion": CNI_VERSION, "supportedVersions": ["0.4.0", "1.0.0"]}).to_string()
}

/// A CNI error: printed on stdout as the spec's error object.
#[derive(Debug, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    /// 4 invalid env, 6 decoding failure, 7 invalid network config, 11 try again
    /// later, 100+ this plugin's own.
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: &str, details: String) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details,
        }
    }

    pub fn invalid_env(details: String) -> Self {
        Self::new(4, "invalid environment", details)
    }

    pub fn io(what: &str, e: std::io::Error) -> Self {
        Self::new(11, what, e.to_string())
    }

    fn config(details: String) -> Self {
        Self::new(7, "invalid network config", details)
    }

    pub fn to_json(&self) -> String {
        json!({"cniVersion": CNI_VERSION, "code": self.code, "msg": self.msg, "details": self.details})
            .to_string()
    }
}

/// This plugin's part of the network config.
#[derive(Debug, Deserialize)]
struct PluginConfig {
    #[serde(rename = "cniVersion", default)]
    cni_version: Option<String>,
    /// Membership from the controller's config directory (local mode) ...
    #[serde(default)]
    config_dir: Option<PathBuf>,
    /// ... or from the API server, with this kubeconfig (Kubernetes mode).
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_pin_root")]
    pin_root: PathBuf,
    /// The node address kubelet probes come from; they skip capture.
    #[serde(default)]
    probe_ip: Option<Ipv4Addr>,
    /// Where cgroup v2 is mounted (to resolve a relative `cgroupPath`); found in
    /// `/proc/self/mounts` when not given.
    #[serde(default = "default_cgroup_root")]
    cgroup_root: PathBuf,
    #[serde(rename = "runtimeConfig", default)]
    runtime_config: RuntimeConfig,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct RuntimeConfig {
    /// The pod's cgroup (the CNI `cgroupPath` capability).
    #[serde(rename = "cgroupPath", default)]
    cgroup_path: Option<String>,
}

fn default_state_dir() -> PathBuf {
    cairn_capture::DEFAULT_STATE_DIR.into()
}

fn default_pin_root() -> PathBuf {
    cairn_capture::DEFAULT_PIN_ROOT.into()
}

fn default_cgroup_root() -> PathBuf {
    cairn_capture::cgroup2_mount().unwrap_or_else(|| "/sys/fs/cgroup".into())
}

pub struct Request {
    command: Command,
    config: PluginConfig,
    netns: Option<PathBuf>,
    namespace: String,
    name: String,
}

impl Request {
    pub fn parse(
        command: Command,
        stdin: &str,
        env: &HashMap<String, String>,
    ) -> Result<Self, CniError> {
        let config: PluginConfig = serde_json::from_str(stdin)
            .map_err(|e| CniError::new(6, "decoding the network config", e.to_string()))?;
        let args: HashMap<&str, &str> = env
            .get("CNI_ARGS")
            .map(|a| a.split(';').filter_map(|kv| kv.split_once('=')).collect())
            .unwrap_or_default();
        let arg = |k: &str| {
            args.get(k)
                .map(|v| v.to_string())
                .ok_or_else(|| CniError::invalid_env(format!("CNI_ARGS has no {k}")))
        };
        Ok(Request {
            command,
            netns: env
                .get("CNI_NETNS")
                .filter(|n| !n.is_empty())
                .map(PathBuf::from),
            namespace: arg("K8S_POD_NAMESPACE")?,
            name: arg("K8S_POD_NAME")?,
            config,
        })
    }

    /// The pod's IPv4 from the previous plugin's result.
    fn pod_ip(&self) -> Result<Ipv4Addr, CniError> {
        let prev = self.config.prev_result.as_ref().ok_or_else(|| {
            CniError::config(
                "no prevResult: cairn-cni must be chained after the network plugin".into(),
            )
        })?;
        let ips = prev
            .get("ips")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        ips.iter()
            .filter_map(|ip| ip.get("address").and_then(Value::as_str))
            .filter_map(|cidr| cidr.split('/').next()?.parse::<Ipv4Addr>().ok())
            .next()
            .ok_or_else(|| {
                CniError::config(
                    "prevResult has no IPv4 address (IPv6-only pods are not captured yet)".into(),
                )
            })
    }

    /// Where membership comes from: exactly one of `config_dir`, `kubeconfig`.
    fn source(&self) -> Result<Source<'_>, CniError> {
        match (&self.config.config_dir, &self.config.kubeconfig) {
            (Some(dir), None) => Ok(Source::ConfigDir(dir)),
            (None, Some(path)) => Ok(Source::Kubeconfig(path)),
            _ => Err(CniError::config(
                "set exactly one of config_dir (local mode) and kubeconfig (Kubernetes mode)"
                    .into(),
            )),
        }
    }

    fn cgroup(&self) -> Result<PathBuf, CniError> {
        let path = self.config.runtime_config.cgroup_path.as_deref().ok_or_else(|| {
            CniError::config(
                "runtimeConfig.cgroupPath is not set: declare \"capabilities\": {\"cgroupPath\": true} for cairn-cni".into(),
            )
        })?;
        let path = Path::new(path);
        let full = if path.starts_with(&self.config.cgroup_root) {
            path.to_owned()
        } else {
            self.config
                .cgroup_root
                .join(path.strip_prefix("/").unwrap_or(path))
        };
        if !full.is_dir() {
            return Err(CniError::new(
                11,
                "the pod's cgroup does not exist",
                full.display().to_string(),
            ));
        }
        Ok(full)
    }

    fn prev_result(&self) -> String {
        let mut result = self.config.prev_result.clone().unwrap_or_else(|| json!({}));
        if let Some(obj) = result.as_object_mut() {
            let version = self
                .config
                .cni_version
                .clone()
                .unwrap_or_else(|| CNI_VERSION.into());
            obj.insert("cniVersion".into(), Value::String(version));
        }
        result.to_string()
    }
}

pub fn handle(req: &Request, membership: &dyn Membership) -> Result<Option<String>, CniError> {
    let records = PodRecords::new(&req.config.state_dir);
    let pod = format!("{}/{}", req.namespace, req.name);
    match req.command {
        Command::Add => {
            let netns = req
                .netns
                .clone()
                .ok_or_else(|| CniError::invalid_env("CNI_NETNS is not set".into()))?;
            let record = PodRecord {
                namespace: req.namespace.clone(),
                name: req.name.clone(),
                ip: req.pod_ip()?,
                netns,
                cgroup: req.cgroup()?,
                probe_ip: req.config.probe_ip,
            };
            // The record first: ztunnel releases enrolled pods it has no record of.
            records
                .write(&record)
                .map_err(|e| CniError::new(11, "recording the pod", e.to_string()))?;
            let in_mesh = membership
                .in_mesh(req.source()?, &req.namespace, &req.name)
                .map_err(CniError::config)?;
            if in_mesh == Some(true) {
                let mut capture = Capture::open(&req.config.pin_root).map_err(|e| {
                    CniError::new(100, "loading the capture programs", e.to_string())
                })?;
                capture.enroll(&PodNet::from(&record)).map_err(|e| {
                    CniError::new(101, "enrolling the pod in capture", e.to_string())
                })?;
                eprintln!("cairn-cni: {pod} ({}) enrolled", record.ip);
            } else {
                eprintln!("cairn-cni: {pod} ({}) is not in the mesh", record.ip);
            }
            Ok(Some(req.prev_result()))
        }
        Command::Del => {
            let record = records
                .remove(&req.namespace, &req.name)
                .map_err(|e| CniError::new(11, "removing the pod record", e.to_string()))?;
            if let Some(record) = record {
                let mut capture = Capture::open(&req.config.pin_root).map_err(|e| {
                    CniError::new(100, "loading the capture programs", e.to_string())
                })?;
                capture
                    .release(record.ip)
                    .map_err(|e| CniError::new(102, "releasing the pod", e.to_string()))?;
            }
            Ok(None)
        }
        Command::Check => {
            let (pods, _) = records.list();
            let Some(record) = pods
                .iter()
                .find(|p| p.namespace == req.namespace && p.name == req.name)
            else {
                return Err(CniError::new(103, "no record of the pod", pod));
            };
            let in_mesh = membership
                .in_mesh(req.source()?, &req.namespace, &req.name)
                .map_err(CniError::config)?;
            if in_mesh == Some(true) {
                let capture = Capture::open(&req.config.pin_root).map_err(|e| {
                    CniError::new(100, "loading the capture programs", e.to_string())
                })?;
                if !capture.is_enrolled(record.ip) {
                    return Err(CniError::new(
                        104,
                        "the pod is in the mesh but not enrolled",
                        pod,
                    ));
                }
            }
            Ok(None)
        }
        Command::Version => Ok(Some(version_json())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(args: &str) -> HashMap<String, String> {
        HashMap::from([
            ("CNI_ARGS".to_string(), args.to_string()),
            ("CNI_NETNS".to_string(), "/var/run/netns/p".to_string()),
        ])
    }

    const CONFIG: &str = r#"{"cniVersion":"1.0.0","name":"k8s","type":"cairn-cni","config_dir":"/etc/cairn",
        "runtimeConfig":{"cgroupPath":"/kubepods/pod1"},
        "prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.1.2.3/24","interface":0}]}}"#;

    #[test]
    fn parses_pod_args_ip_and_passes_the_previous_result_through() {
        let req = Request::parse(
            Command::Add,
            CONFIG,
            &env("IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-1;K8S_POD_UID=u"),
        )
        .expect("valid");
        assert_eq!(
            (req.namespace.as_str(), req.name.as_str()),
            ("demo", "web-1")
        );
        assert_eq!(req.pod_ip().expect("ip"), Ipv4Addr::new(10, 1, 2, 3));
        let out: Value = serde_json::from_str(&req.prev_result()).expect("json");
        assert_eq!(out["ips"][0]["address"], "10.1.2.3/24");
        assert_eq!(out["cniVersion"], "1.0.0");
    }

    #[test]
    fn bad_input_gets_a_cni_error_naming_what_is_wrong() {
        let e = Request::parse(
            Command::Add,
            "{",
            &env("K8S_POD_NAMESPACE=a;K8S_POD_NAME=b"),
        )
        .err()
        .expect("bad json");
        assert_eq!(e.code, 6);
        let e = Request::parse(Command::Add, CONFIG, &env("K8S_POD_NAME=b"))
            .err()
            .expect("no namespace");
        assert!(e.to_string().contains("K8S_POD_NAMESPACE"), "{e}");
        let unchained = CONFIG.replace("\"prevResult\"", "\"ignored\"");
        let req = Request::parse(
            Command::Add,
            &unchained,
            &env("K8S_POD_NAMESPACE=a;K8S_POD_NAME=b"),
        )
        .expect("parses");
        let e = req.pod_ip().expect_err("no prevResult");
        assert!(e.to_string().contains("chained"), "{e}");
        let v: Value = serde_json::from_str(&e.to_json()).expect("error json");
        assert_eq!(v["code"], 7);
    }
}
