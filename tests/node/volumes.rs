//! A pod's volumes, as kubelet materialises them: `configMap`, `secret`, `emptyDir`
//! and `projected` (service-account tokens minted with the TokenRequest API and bound
//! to the pod, config maps, secrets) become files under the node's directory; the
//! container's `volumeMounts` then bind them at their paths in a private mount
//! namespace (see `Sandbox::start`). Other volume types (hostPath, PVCs) are refused
//! with the reason: the pod stays Pending, as with an image the node does not run.
//!
//! Tokens are minted once, at start, for the volume's `expirationSeconds`; kubelet
//! would refresh them at 80% of their life. Local-cluster pods live far shorter than
//! the default 12 h.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::TokenRequest,
        core::v1::{ConfigMap, KeyToPath, Pod, Secret, ServiceAccount, Volume},
    },
};
use kube::{Api, Client, api::PostParams};

/// One bind mount for the container: a materialised volume (or a file of it) at a
/// path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

/// Writes `pod`'s volumes under `dir` (one directory per volume) and returns the
/// bind mounts its first container asks for.
pub async fn materialise(client: &Client, pod: &Pod, dir: &Path) -> Result<Vec<Mount>> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let spec = pod.spec.as_ref().context("pod without a spec")?;
    let volumes = spec.volumes.as_deref().unwrap_or_default();
    for volume in volumes {
        let target = dir.join(&volume.name);
        std::fs::create_dir_all(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        write_volume(client, pod, namespace, volume, &target)
            .await
            .with_context(|| format!("volume {:?}", volume.name))?;
    }
    let container = spec.containers.first().context("pod without containers")?;
    let mut mounts = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        if !volumes.iter().any(|v| v.name == m.name) {
            bail!("volumeMount {:?}: no volume of that name", m.name);
        }
        let mut source = dir.join(&m.name);
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            if sub.split('/').any(|part| part == "..") {
                bail!(
                    "volumeMount {:?}: subPath {sub:?} leaves the volume",
                    m.name
                );
            }
            source = source.join(sub);
        }
        mounts.push(Mount {
            source,
            target: m.mount_path.clone(),
            read_only: m.read_only.unwrap_or(false),
        });
    }
    Ok(mounts)
}

async fn write_volume(
    client: &Client,
    pod: &Pod,
    namespace: &str,
    volume: &Volume,
    target: &Path,
) -> Result<()> {
    if volume.empty_dir.is_some() {
        return Ok(());
    }
    if let Some(cm) = &volume.config_map {
        let data = config_map(client, namespace, &cm.name, cm.optional).await?;
        return write_items(target, &data, cm.items.as_deref());
    }
    if let Some(s) = &volume.secret {
        let name = s
            .secret_name
            .as_deref()
            .context("secret volume without secretName")?;
        let data = secret(client, namespace, name, s.optional).await?;
        return write_items(target, &data, s.items.as_deref());
    }
    if let Some(projected) = &volume.projected {
        for source in projected.sources.iter().flatten() {
            if let Some(t) = &source.service_account_token {
                let token = token(client, pod, t.audience.as_deref(), t.expiration_seconds).await?;
                write_file(&target.join(&t.path), token.as_bytes())?;
            } else if let Some(cm) = &source.config_map {
                let data = config_map(client, namespace, &cm.name, cm.optional).await?;
                write_items(target, &data, cm.items.as_deref())?;
            } else if let Some(s) = &source.secret {
                let data = secret(client, namespace, &s.name, s.optional).await?;
                write_items(target, &data, s.items.as_deref())?;
            } else {
                bail!(
                    "projected source of a kind this node does not support (downwardAPI, clusterTrustBundle)"
                );
            }
        }
        return Ok(());
    }
    bail!("volume type not supported by cairn-node (configMap, secret, emptyDir and projected are)")
}

/// Keys to files: every key, or only `items` (key -> path).
fn write_items(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
) -> Result<()> {
    match items {
        Some(items) => {
            for item in items {
                let value = data
                    .get(&item.key)
                    .with_context(|| format!("no key {:?}", item.key))?;
                write_file(&dir.join(&item.path), value)?;
            }
        }
        None => {
            for (key, value) in data {
                write_file(&dir.join(key), value)?;
            }
        }
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        bail!("{} leaves the volume", path.display());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

async fn config_map(
    client: &Client,
    namespace: &str,
    name: &str,
    optional: Option<bool>,
) -> Result<BTreeMap<String, Vec<u8>>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    match api
        .get_opt(name)
        .await
        .with_context(|| format!("reading ConfigMap {namespace}/{name}"))?
    {
        Some(cm) => {
            let mut out: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            out.extend(
                cm.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, ByteString(v))| (k, v)),
            );
            Ok(out)
        }
        None if optional == Some(true) => Ok(BTreeMap::new()),
        None => bail!("ConfigMap {namespace}/{name} does not exist"),
    }
}

async fn secret(
    client: &Client,
    namespace: &str,
    name: &str,
    optional: Option<bool>,
) -> Result<BTreeMap<String, Vec<u8>>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api
        .get_opt(name)
        .await
        .with_context(|| format!("reading Secret {namespace}/{name}"))?
    {
        Some(s) => Ok(s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, ByteString(v))| (k, v))
            .collect()),
        None if optional == Some(true) => Ok(BTreeMap::new()),
        None => bail!("Secret {namespace}/{name} does not exist"),
    }
}

/// A token for the pod's service account, bound to the pod (it dies with it), as
/// kubelet mints for a projected `serviceAccountToken`.
async fn token(
    client: &Client,
    pod: &Pod,
    audience: Option<&str>,
    expiration: Option<i64>,
) -> Result<String> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default");
    // No audience means the API server's own (its issuer).
    let audiences: Vec<&str> = audience.into_iter().collect();
    let request: TokenRequest = serde_json::from_value(serde_json::json!({"spec": {
        "audiences": audiences,
        "expirationSeconds": expiration.unwrap_or(3600),
        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                           "name": pod.metadata.name, "uid": pod.metadata.uid},
    }}))
    .context("building the TokenRequest")?;
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let issued = api
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .with_context(|| format!("minting a token for service account {namespace}/{account}"))?;
    issued
        .status
        .and_then(|s| s.token)
        .context("TokenRequest without a token")
}

/// The shell lines that make the mounts in a private mount namespace: each target
/// directory (or file) created on the host's file system, then bound.
pub fn mount_script(mounts: &[Mount]) -> String {
    let mut script = String::new();
    for m in mounts {
        let (src, dst) = (quote(&m.source.display().to_string()), quote(&m.target));
        if m.source.is_dir() {
            script += &format!("mkdir -p {dst} && ");
        } else {
            script += &format!("mkdir -p \"$(dirname {dst})\" && touch {dst} && ");
        }
        script += &format!("mount --bind {src} {dst} && ");
        if m.read_only {
            script += &format!("mount -o remount,bind,ro {dst} && ");
        }
    }
    script
}

/// Single-quoted for `sh`.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_write_only_what_they_name_and_never_outside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = BTreeMap::from([
            ("root-cert.pem".to_owned(), b"PEM".to_vec()),
            ("other".to_owned(), b"x".to_vec()),
        ]);
        let items = [KeyToPath {
            key: "root-cert.pem".into(),
            path: "certs/root.pem".into(),
            ..KeyToPath::default()
        }];
        write_items(dir.path(), &data, Some(&items)).expect("items");
        assert_eq!(
            std::fs::read(dir.path().join("certs/root.pem")).expect("file"),
            b"PEM"
        );
        assert!(!dir.path().join("other").exists());
        let escape = [KeyToPath {
            key: "other".into(),
            path: "../x".into(),
            ..KeyToPath::default()
        }];
        assert!(write_items(dir.path(), &data, Some(&escape)).is_err());
        let missing = [KeyToPath {
            key: "nope".into(),
            path: "y".into(),
            ..KeyToPath::default()
        }];
        assert!(write_items(dir.path(), &data, Some(&missing)).is_err());
    }

    #[test]
    fn mounts_bind_read_only_where_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = mount_script(&[Mount {
            source: dir.path().to_owned(),
            target: "/var/run/it's".into(),
            read_only: true,
        }]);
        assert!(script.contains(r"mkdir -p '/var/run/it'\''s'"), "{script}");
        assert!(script.contains("mount --bind"), "{script}");
        assert!(script.contains("remount,bind,ro"), "{script}");
    }
}
