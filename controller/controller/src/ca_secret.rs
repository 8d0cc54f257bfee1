//! Kubernetes mode keeps the mesh root in a Secret, so every controller replica and
//! every restart (whose `--ca-dir` is an emptyDir) signs with the same root.
//!
//! Before the CA loads, [`sync_ca_dir`] fills the CA directory from, in order:
//! 1. the operator's `cacerts` Secret (Istio's convention and layout: `ca-cert.pem`,
//!    `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`);
//! 2. Cairn's own `cairn-ca-root` Secret (`root-cert.pem`, `root-key.pem`);
//! 3. neither: a root is generated and published as `cairn-ca-root`, create-only: if
//!    another replica won that race, its root is taken instead.

use std::{collections::BTreeMap, path::Path, time::Duration};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{Api, Client, api::PostParams};
use tracing::info;

use crate::ca::CertificateAuthority;

/// The operator-provided CA (Istio's name).
pub const OPERATOR_SECRET: &str = "cacerts";
/// Cairn's generated root.
pub const ROOT_SECRET: &str = "cairn-ca-root";

const OPERATOR_FILES: &[&str] = &[
    "ca-cert.pem",
    "ca-key.pem",
    "root-cert.pem",
    "cert-chain.pem",
];
const ROOT_FILES: &[&str] = &["root-cert.pem", "root-key.pem"];

#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    #[error("reading Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name} lacks {key}")]
    Missing {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("CA directory {0}: {1}")]
    Io(String, std::io::Error),
    #[error("generating the mesh root: {0}")]
    Generate(#[from] crate::ca::CaError),
}

/// The ConfigMap carrying the mesh root (public) for the proxies' `CAIRN_ROOT_CERT`.
pub const ROOT_CONFIGMAP: &str = "cairn-ca-root-cert";

/// Publishes `root_pem` as the `cairn-ca-root-cert` ConfigMap (server-side apply, so
/// every replica writes the same object idempotently).
pub async fn publish_root(
    client: Client,
    namespace: &str,
    root_pem: &str,
) -> Result<(), CaSecretError> {
    use kube::api::{Patch, PatchParams};
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client, namespace);
    let map = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": ROOT_CONFIGMAP, "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "cairn"}},
        "data": {"root-cert.pem": root_pem},
    });
    maps.patch(
        ROOT_CONFIGMAP,
        &PatchParams::apply("cairn-controller").force(),
        &Patch::Apply(&map),
    )
    .await
    .map_err(|source| CaSecretError::Api {
        namespace: namespace.to_owned(),
        name: ROOT_CONFIGMAP.to_owned(),
        source,
    })?;
    info!(configmap = %format!("{namespace}/{ROOT_CONFIGMAP}"), "published the mesh root");
    Ok(())
}

/// Where the CA directory's files came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Operator,
    Stored,
    Generated,
}

/// Fills `dir` with the mesh's CA material from the cluster (see the module docs).
pub async fn sync_ca_dir(
    client: Client,
    namespace: &str,
    dir: &Path,
    trust_domain: &str,
) -> Result<Origin, CaSecretError> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let get = |name: &'static str| {
        let secrets = secrets.clone();
        async move {
            secrets
                .get_opt(name)
                .await
                .map_err(|source| CaSecretError::Api {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    source,
                })
        }
    };
    if let Some(secret) = get(OPERATOR_SECRET).await? {
        write_files(&secret, namespace, OPERATOR_SECRET, OPERATOR_FILES, dir)?;
        info!(secret = %format!("{namespace}/{OPERATOR_SECRET}"), "mesh CA from the operator's cacerts Secret");
        return Ok(Origin::Operator);
    }
    if let Some(secret) = get(ROOT_SECRET).await? {
        write_files(&secret, namespace, ROOT_SECRET, ROOT_FILES, dir)?;
        info!(secret = %format!("{namespace}/{ROOT_SECRET}"), "mesh root from its Secret");
        return Ok(Origin::Stored);
    }
    // Generate into a fresh directory (a stale root there must not be published).
    let fresh = dir.join(".generated");
    let _ = std::fs::remove_dir_all(&fresh);
    CertificateAuthority::load_or_create(&fresh, trust_domain, Duration::from_secs(3600))?;
    let mut data = BTreeMap::new();
    for f in ROOT_FILES {
        let path = fresh.join(f);
        let bytes =
            std::fs::read(&path).map_err(|e| CaSecretError::Io(path.display().to_string(), e))?;
        data.insert((*f).to_owned(), ByteString(bytes));
    }
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(ROOT_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_owned(),
                "cairn".to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    };
    let origin = match secrets.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            info!(secret = %format!("{namespace}/{ROOT_SECRET}"), "generated the mesh root and stored it");
            write_files(&created, namespace, ROOT_SECRET, ROOT_FILES, dir)?;
            Origin::Generated
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let theirs = get(ROOT_SECRET)
                .await?
                .ok_or_else(|| CaSecretError::Missing {
                    namespace: namespace.to_owned(),
                    name: ROOT_SECRET.to_owned(),
                    key: "(the Secret itself)".into(),
                })?;
            info!(secret = %format!("{namespace}/{ROOT_SECRET}"), "another replica stored the mesh root first; using it");
            write_files(&theirs, namespace, ROOT_SECRET, ROOT_FILES, dir)?;
            Origin::Stored
        }
        Err(source) => {
            return Err(CaSecretError::Api {
                namespace: namespace.to_owned(),
                name: ROOT_SECRET.to_owned(),
                source,
            });
        }
    };
    let _ = std::fs::remove_dir_all(&fresh);
    Ok(origin)
}

/// Writes `keys` of `secret` into `dir` (private keys 0600), replacing what is there.
fn write_files(
    secret: &Secret,
    namespace: &str,
    name: &str,
    keys: &[&str],
    dir: &Path,
) -> Result<(), CaSecretError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(|e| CaSecretError::Io(dir.display().to_string(), e))?;
    for key in keys {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(*key))
            .ok_or_else(|| CaSecretError::Missing {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                key: (*key).to_owned(),
            })?;
        let path = dir.join(key);
        let io = |e| CaSecretError::Io(path.display().to_string(), e);
        let _ = std::fs::remove_file(&path);
        let mode = if key.contains("key") { 0o600 } else { 0o644 };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(io)?;
        std::io::Write::write_all(&mut f, &bytes.0).map_err(io)?;
    }
    Ok(())
}
