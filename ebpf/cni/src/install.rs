//! `cairn-cni install`: run on every node by the ztunnel DaemonSet's `install-cni`
//! container. Copies this binary into the node's CNI bin directory, writes the
//! plugin's kubeconfig (the container's service-account token, re-read as it
//! rotates) and chains the plugin after the network plugin in the node's primary
//! network config; then re-checks every few seconds, since network plugins rewrite
//! their configs (a chain entry that vanished is put back).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Value, json};

const PLUGIN_TYPE: &str = "cairn-cni";
const KUBECONFIG_NAME: &str = "cairn-cni.kubeconfig";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}: not a CNI network config: {1}")]
    Config(String, String),
    #[error("no network config (*.conflist or *.conf) in {0} yet")]
    NoConfig(String),
    #[error("usage: {0}")]
    Usage(String),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// `conf_dir` as the node sees it (the path written into the chain entry);
    /// `conf_dir` when not given.
    pub host_conf_dir: PathBuf,
    /// API server URL for the plugin's kubeconfig.
    pub server: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    pub probe_ip: Option<String>,
    /// Install once and exit (tests), instead of re-checking forever.
    pub once: bool,
}

const USAGE: &str = "cairn-cni install --bin-dir DIR --conf-dir DIR [--host-conf-dir DIR] --server URL --token-file F --ca-file F [--probe-ip IP] [--once]";

impl Options {
    pub fn parse(args: &[String]) -> Result<Options, InstallError> {
        let get = |flag: &str| -> Option<String> {
            let i = args.iter().position(|a| a == flag)?;
            args.get(i + 1).cloned()
        };
        let need = |v: Option<String>| v.ok_or_else(|| InstallError::Usage(USAGE.into()));
        let conf_dir: PathBuf = need(get("--conf-dir"))?.into();
        Ok(Options {
            bin_dir: need(get("--bin-dir"))?.into(),
            host_conf_dir: get("--host-conf-dir").map_or_else(|| conf_dir.clone(), PathBuf::from),
            conf_dir,
            server: need(get("--server"))?,
            token_file: need(get("--token-file"))?.into(),
            ca_file: need(get("--ca-file"))?.into(),
            probe_ip: get("--probe-ip"),
            once: args.iter().any(|a| a == "--once"),
        })
    }
}

/// Our entry for the chain. `kubeconfig` is the path the container runtime's view
/// of the node uses (the conf dir as the host sees it).
pub fn plugin_entry(kubeconfig: &str, probe_ip: Option<&str>) -> Value {
    let mut entry = json!({
        "type": PLUGIN_TYPE,
        "kubeconfig": kubeconfig,
        "capabilities": {"cgroupPath": true},
    });
    if let Some(ip) = probe_ip {
        entry["probe_ip"] = json!(ip);
    }
    entry
}

/// The network config with our plugin chained last: `None` when it already is,
/// exactly so. A single-plugin `.conf` becomes a conflist.
pub fn chain(text: &str, entry: &Value) -> Result<Option<Value>, String> {
    let mut config: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let obj = config.as_object_mut().ok_or("not a JSON object")?;
    if !obj.contains_key("plugins") {
        // A `.conf`: one plugin, its fields at the top level.
        if !obj.contains_key("type") {
            return Err("neither \"plugins\" nor \"type\"".into());
        }
        let version = obj.get("cniVersion").cloned().unwrap_or(json!("1.0.0"));
        let name = obj.get("name").cloned().unwrap_or(json!("k8s-pod-network"));
        let mut single = obj.clone();
        single.remove("cniVersion");
        single.remove("name");
        config = json!({"cniVersion": version, "name": name, "plugins": [single]});
    }
    let plugins = config
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or("\"plugins\" is not a list")?;
    let ours: Vec<usize> = plugins
        .iter()
        .enumerate()
        .filter(|(_, p)| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE))
        .map(|(i, _)| i)
        .collect();
    if ours.len() == 1 && ours[0] == plugins.len() - 1 && &plugins[ours[0]] == entry {
        return Ok(None);
    }
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    if plugins.is_empty() {
        return Err("no network plugin to chain after".into());
    }
    plugins.push(entry.clone());
    Ok(Some(config))
}

/// The primary network config: the first `*.conflist` / `*.conf` in name order, as
/// the container runtime picks it (our own kubeconfig is not one).
fn primary(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let io = |e| InstallError::Io(conf_dir.display().to_string(), e);
    let mut names: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e == "conflist" || e == "conf")
        })
        .collect();
    names.sort();
    names
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConfig(conf_dir.display().to_string()))
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e| InstallError::Io(path.display().to_string(), e);
    let tmp = path.with_extension("cairn-tmp");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// One pass; returns what it changed (for the log).
pub fn install_once(o: &Options, self_exe: &Path) -> Result<Vec<String>, InstallError> {
    let mut changed = Vec::new();
    // The binary, when it differs.
    let target = o.bin_dir.join(PLUGIN_TYPE);
    let ours =
        std::fs::read(self_exe).map_err(|e| InstallError::Io(self_exe.display().to_string(), e))?;
    if std::fs::read(&target).ok().as_deref() != Some(ours.as_slice()) {
        write_atomically(&target, &ours, 0o755)?;
        changed.push(format!("installed {}", target.display()));
    }
    // The kubeconfig, with the current token.
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| InstallError::Io(p.display().to_string(), e))
    };
    let token = read(&o.token_file)?;
    let ca = read(&o.ca_file)?;
    let kubeconfig = o.conf_dir.join(KUBECONFIG_NAME);
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: cairn-cni\n  user:\n    token: {}\ncontexts:\n- name: cairn-cni\n  context: {{cluster: local, user: cairn-cni}}\ncurrent-context: cairn-cni\n",
        o.server,
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, ca.as_bytes()),
        token.trim()
    );
    if std::fs::read_to_string(&kubeconfig).ok().as_deref() != Some(text.as_str()) {
        write_atomically(&kubeconfig, text.as_bytes(), 0o600)?;
        changed.push(format!("wrote {}", kubeconfig.display()));
    }
    // The chain.
    let config = primary(&o.conf_dir)?;
    let current = read(&config)?;
    let host_kubeconfig = o.host_conf_dir.join(KUBECONFIG_NAME);
    let entry = plugin_entry(
        &host_kubeconfig.display().to_string(),
        o.probe_ip.as_deref(),
    );
    if let Some(new) = chain(&current, &entry)
        .map_err(|e| InstallError::Config(config.display().to_string(), e))?
    {
        let out = if config.extension().and_then(|e| e.to_str()) == Some("conf") {
            // Written as a conflist beside it; the .conf goes so the runtime takes ours.
            let list = config.with_extension("conflist");
            write_atomically(&list, pretty(&new).as_bytes(), 0o644)?;
            std::fs::remove_file(&config)
                .map_err(|e| InstallError::Io(config.display().to_string(), e))?;
            list
        } else {
            write_atomically(&config, pretty(&new).as_bytes(), 0o644)?;
            config
        };
        changed.push(format!("chained into {}", out.display()));
    }
    Ok(changed)
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// Installs, then re-checks every 5 s until killed (or once with `--once`).
pub fn run(args: &[String]) -> Result<(), InstallError> {
    let o = Options::parse(args)?;
    let exe =
        std::env::current_exe().map_err(|e| InstallError::Io("current executable".into(), e))?;
    loop {
        match install_once(&o, &exe) {
            Ok(changed) => {
                for c in changed {
                    eprintln!("cairn-cni install: {c}");
                }
                if o.once {
                    return Ok(());
                }
            }
            Err(e) if !o.once => eprintln!("cairn-cni install: {e}; retrying"),
            Err(e) => return Err(e),
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Value {
        plugin_entry("/etc/cni/net.d/cairn-cni.kubeconfig", Some("10.0.0.1"))
    }

    #[test]
    fn chains_last_once_and_keeps_the_other_plugins() {
        let list = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;
        let new = chain(list, &entry()).expect("chain").expect("changed");
        let plugins = new["plugins"].as_array().expect("plugins");
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[1]["type"], "portmap");
        assert_eq!(plugins[2], entry());
        // Idempotent.
        assert!(chain(&new.to_string(), &entry()).expect("chain").is_none());
        // An old entry of ours in the middle moves to the end, updated.
        let moved = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp"},{"type":"cairn-cni","kubeconfig":"old"},{"type":"portmap"}]}"#;
        let new = chain(moved, &entry()).expect("chain").expect("changed");
        let types: Vec<&str> = new["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .filter_map(|p| p["type"].as_str())
            .collect();
        assert_eq!(types, ["ptp", "portmap", "cairn-cni"]);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist_and_garbage_is_refused() {
        let conf = r#"{"cniVersion":"0.4.0","name":"bridge-net","type":"bridge","bridge":"cni0"}"#;
        let new = chain(conf, &entry()).expect("chain").expect("changed");
        assert_eq!(new["name"], "bridge-net");
        assert_eq!(new["cniVersion"], "0.4.0");
        assert_eq!(new["plugins"][0]["bridge"], "cni0");
        assert!(new["plugins"][0].get("name").is_none());
        assert_eq!(new["plugins"][1]["type"], "cairn-cni");
        assert!(chain("[1,2]", &entry()).is_err());
        assert!(chain(r#"{"name":"x"}"#, &entry()).is_err());
        assert!(chain(r#"{"name":"x","plugins":[]}"#, &entry()).is_err());
    }

    #[test]
    fn installs_binary_kubeconfig_and_chain_then_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
        std::fs::create_dir_all(&bin).expect("bin");
        std::fs::create_dir_all(&conf).expect("conf");
        std::fs::write(
            conf.join("10-ptp.conflist"),
            r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp"}]}"#,
        )
        .expect("conflist");
        std::fs::write(dir.path().join("token"), "tok-1\n").expect("token");
        std::fs::write(dir.path().join("ca.crt"), "CA").expect("ca");
        let exe = dir.path().join("exe");
        std::fs::write(&exe, b"\x7fELF-binary").expect("exe");
        let o = Options {
            bin_dir: bin.clone(),
            conf_dir: conf.clone(),
            host_conf_dir: "/etc/cni/net.d".into(),
            server: "https://10.96.0.1:443".into(),
            token_file: dir.path().join("token"),
            ca_file: dir.path().join("ca.crt"),
            probe_ip: None,
            once: true,
        };
        let changed = install_once(&o, &exe).expect("install");
        assert_eq!(changed.len(), 3, "{changed:?}");
        assert_eq!(
            std::fs::read(bin.join("cairn-cni")).expect("bin"),
            b"\x7fELF-binary"
        );
        let kubeconfig = std::fs::read_to_string(conf.join(KUBECONFIG_NAME)).expect("kubeconfig");
        assert!(
            kubeconfig.contains("token: tok-1")
                && kubeconfig.contains("certificate-authority-data: Q0E=")
        );
        let chained = std::fs::read_to_string(conf.join("10-ptp.conflist")).expect("conflist");
        assert!(
            chained.contains("\"/etc/cni/net.d/cairn-cni.kubeconfig\""),
            "{chained}"
        );
        assert!(install_once(&o, &exe).expect("again").is_empty());
        // The token rotates: only the kubeconfig is rewritten.
        std::fs::write(dir.path().join("token"), "tok-2").expect("token");
        let changed = install_once(&o, &exe).expect("rotate");
        assert_eq!(changed.len(), 1, "{changed:?}");
        // The network plugin rewrote its config: we chain again.
        std::fs::write(
            conf.join("10-ptp.conflist"),
            r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp"}]}"#,
        )
        .expect("conflist");
        let changed = install_once(&o, &exe).expect("rechain");
        assert!(
            changed.iter().any(|c| c.starts_with("chained")),
            "{changed:?}"
        );
    }
}
