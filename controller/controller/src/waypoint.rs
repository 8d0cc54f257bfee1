//! Declaring waypoints (`cairn waypoint apply | delete | list`): the Gateway of class
//! `istio-waypoint` that asks for one, the checks before writing it, and optionally the
//! namespace label that sends the namespace's traffic through it.
//!
//! [`Manifests`] is where the objects live: [`ConfigDir`] is local mode (the
//! controller's config directory, which the controller rescans); Kubernetes mode swaps
//! in the API server behind the same trait.

use std::path::{Path, PathBuf};

use serde_yaml::Value;

use crate::{
    compile::{
        waypoint::{GATEWAY_NAME_LABEL, USE_WAYPOINT, WAYPOINT_FOR},
        workload::{AMBIENT, DATAPLANE_MODE},
    },
    local::{LocalSource, yaml_files},
    resources::gateway::WAYPOINT_CLASS,
    store::Store,
};

#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    #[error("{what} {value:?} is not a valid name (lowercase letters, digits and '-', at most 63)")]
    BadName { what: &'static str, value: String },
    #[error("--for {0:?}: write service, workload, all or none")]
    BadFor(String),
    #[error("namespace {namespace} does not exist in {where_}")]
    NoNamespace { namespace: String, where_: String },
    #[error(
        "a Gateway {namespace}/{name} of class {class:?} already exists ({file}): choose another --name"
    )]
    NameClash {
        namespace: String,
        name: String,
        class: String,
        file: String,
    },
    #[error(
        "waypoint {namespace}/{name} is defined in {file}, not by `cairn waypoint apply`: change or remove it there"
    )]
    NotOurs {
        namespace: String,
        name: String,
        file: String,
    },
    #[error("no waypoint {namespace}/{name}")]
    NotFound { namespace: String, name: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("Kubernetes API: {action}: {source}")]
    Kube { action: String, source: kube::Error },
    #[error("the written manifest was rejected: {0}")]
    Rejected(String),
}

/// What `apply` asks for.
#[derive(Clone, Debug)]
pub struct Apply {
    pub namespace: String,
    pub name: String,
    /// `istio.io/waypoint-for`: service (Istio's default), workload, all or none.
    pub for_: String,
    /// Also label the namespace `istio.io/use-waypoint=<name>`.
    pub enroll_namespace: bool,
}

/// What a command did, for the operator: lines to print, and warnings.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub done: Vec<String>,
    pub warnings: Vec<String>,
}

/// One waypoint, for `list`.
#[derive(Debug, PartialEq, Eq)]
pub struct Listed {
    pub namespace: String,
    pub name: String,
    pub for_: String,
    pub source: String,
}

/// Where the mesh's objects live.
pub trait Manifests {
    /// The objects as the controller would load them.
    fn store(&self) -> Result<Store, WaypointError>;
    /// Where a Gateway is defined, and whether `cairn waypoint` wrote it.
    fn gateway_source(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<(String, bool)>, WaypointError>;
    fn write_gateway(
        &self,
        namespace: &str,
        name: &str,
        manifest: &str,
    ) -> Result<String, WaypointError>;
    fn remove_gateway(&self, namespace: &str, name: &str) -> Result<(), WaypointError>;
    /// Sets one label on a namespace; returns where.
    fn label_namespace(
        &self,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> Result<String, WaypointError>;
    /// For messages: "the config directory X", "the cluster".
    fn describe(&self) -> String;
}

fn valid_name(what: &'static str, value: &str) -> Result<(), WaypointError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(WaypointError::BadName {
            what,
            value: value.into(),
        })
    }
}

/// The Gateway manifest `apply` writes.
pub fn manifest(namespace: &str, name: &str, for_: &str) -> String {
    format!(
        "# Written by `cairn waypoint apply`; remove with `cairn waypoint delete -n {namespace} --name {name}`.\n\
         apiVersion: gateway.networking.k8s.io/v1\n\
         kind: Gateway\n\
         metadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    {WAYPOINT_FOR}: {for_}\n\
         spec:\n  gatewayClassName: {WAYPOINT_CLASS}\n  listeners:\n  - name: mesh\n    port: 15008\n    protocol: HBONE\n"
    )
}

/// Where a local-mode waypoint runs: the node, the pod's IP and the Service's VIP
/// (chosen by the process that runs pods: the test harness, the demo).
#[derive(Clone, Debug)]
pub struct Placement<'a> {
    pub node: &'a str,
    pub pod_ip: &'a str,
    pub cluster_ip: &'a str,
}

/// What stands in for the waypoint's Deployment and Service in local mode: one pod
/// (identity `sa/<name>`, as Istio names a waypoint's ServiceAccount, never captured
/// itself) and a Service whose VIP is the waypoint's address in the Address
/// resources. In Kubernetes mode the controller reconciles a Gateway into the same
/// objects; the runner of pods starts `waypoint` in this pod.
pub fn local_deployment(namespace: &str, name: &str, at: &Placement<'_>) -> String {
    let Placement {
        node,
        pod_ip,
        cluster_ip,
    } = at;
    format!(
        "# The local-mode stand-in for waypoint {namespace}/{name}'s Deployment and Service.\n\
         apiVersion: v1\n\
         kind: Pod\n\
         metadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    {GATEWAY_NAME_LABEL}: {name}\n    {DATAPLANE_MODE}: none\n    {USE_WAYPOINT}: none\n\
         spec:\n  serviceAccountName: {name}\n  nodeName: {node}\n  containers:\n  - name: waypoint\n    image: cairn/waypoint\n    ports: [{{name: mesh, containerPort: 15008}}]\n\
         status:\n  phase: Running\n  podIP: {pod_ip}\n  conditions: [{{type: Ready, status: \"True\"}}]\n\
         ---\n\
         apiVersion: v1\n\
         kind: Service\n\
         metadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    {GATEWAY_NAME_LABEL}: {name}\n    {USE_WAYPOINT}: none\n\
         spec:\n  clusterIP: {cluster_ip}\n  selector:\n    {GATEWAY_NAME_LABEL}: {name}\n  ports:\n  - {{name: mesh, port: 15008, targetPort: 15008}}\n"
    )
}

/// Declares (or updates) a waypoint.
pub fn apply(target: &dyn Manifests, req: &Apply) -> Result<Report, WaypointError> {
    valid_name("namespace", &req.namespace)?;
    valid_name("waypoint name", &req.name)?;
    if !matches!(req.for_.as_str(), "service" | "workload" | "all" | "none") {
        return Err(WaypointError::BadFor(req.for_.clone()));
    }
    let store = target.store()?;
    let Some(ns) = store.namespace(&req.namespace) else {
        return Err(WaypointError::NoNamespace {
            namespace: req.namespace.clone(),
            where_: target.describe(),
        });
    };
    let mut report = Report::default();
    let ambient = ns
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(DATAPLANE_MODE))
        .is_some_and(|m| m == AMBIENT);
    if !ambient {
        report.warnings.push(format!(
            "namespace {} is not in the mesh ({DATAPLANE_MODE}={AMBIENT} is not set): the waypoint gets no traffic until it is",
            req.namespace
        ));
    }
    if let Some(existing) = store.gateway(&req.namespace, &req.name) {
        let class = existing.spec.gateway_class_name.clone();
        let (file, ours) = target
            .gateway_source(&req.namespace, &req.name)?
            .unwrap_or_else(|| (target.describe(), false));
        if class != WAYPOINT_CLASS {
            return Err(WaypointError::NameClash {
                namespace: req.namespace.clone(),
                name: req.name.clone(),
                class,
                file,
            });
        }
        if !ours {
            return Err(WaypointError::NotOurs {
                namespace: req.namespace.clone(),
                name: req.name.clone(),
                file,
            });
        }
    }
    let file = target.write_gateway(
        &req.namespace,
        &req.name,
        &manifest(&req.namespace, &req.name, &req.for_),
    )?;
    report.done.push(format!(
        "waypoint {}/{} applied (for {}) in {file}",
        req.namespace, req.name, req.for_
    ));
    if req.enroll_namespace {
        let file = target.label_namespace(&req.namespace, USE_WAYPOINT, &req.name)?;
        report.done.push(format!(
            "namespace {} labelled {USE_WAYPOINT}={} in {file}",
            req.namespace, req.name
        ));
    }
    Ok(report)
}

/// Removes a waypoint `apply` declared.
pub fn delete(
    target: &dyn Manifests,
    namespace: &str,
    name: &str,
) -> Result<Report, WaypointError> {
    valid_name("namespace", namespace)?;
    valid_name("waypoint name", name)?;
    let not_found = || WaypointError::NotFound {
        namespace: namespace.into(),
        name: name.into(),
    };
    let store = target.store()?;
    let is_waypoint = store
        .gateway(namespace, name)
        .is_some_and(|g| g.spec.gateway_class_name == WAYPOINT_CLASS);
    if !is_waypoint {
        return Err(not_found());
    }
    let (file, ours) = target
        .gateway_source(namespace, name)?
        .ok_or_else(not_found)?;
    if !ours {
        return Err(WaypointError::NotOurs {
            namespace: namespace.into(),
            name: name.into(),
            file,
        });
    }
    target.remove_gateway(namespace, name)?;
    let mut report = Report {
        done: vec![format!("waypoint {namespace}/{name} deleted ({file})")],
        warnings: Vec::new(),
    };
    let uses = |labels: Option<&std::collections::BTreeMap<String, String>>| {
        labels
            .and_then(|l| l.get(USE_WAYPOINT))
            .is_some_and(|w| w == name)
    };
    if store
        .namespace(namespace)
        .is_some_and(|n| uses(n.metadata.labels.as_ref()))
    {
        report.warnings.push(format!(
            "namespace {namespace} still has {USE_WAYPOINT}={name}: remove the label (or apply the waypoint again)"
        ));
    }
    for svc in store.services_in(namespace) {
        if uses(svc.metadata.labels.as_ref()) {
            report.warnings.push(format!(
                "service {namespace}/{} still has {USE_WAYPOINT}={name}",
                svc.metadata.name.as_deref().unwrap_or_default()
            ));
        }
    }
    Ok(report)
}

/// One of a waypoint Gateway's status conditions (Gateway API's `Accepted` and
/// `Programmed`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// A waypoint's status as the controller computes it: what Kubernetes mode writes to
/// the Gateway's `status`, and what `cairn waypoint status` shows in local mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub conditions: [Condition; 2],
    /// The waypoint's address (its Service's VIP) once it has one.
    pub address: Option<String>,
}

impl Status {
    pub fn programmed(&self) -> bool {
        self.conditions.iter().all(|c| c.status)
    }
}

/// The status of waypoint `namespace/name`, or `NotFound`.
pub fn status(store: &Store, namespace: &str, name: &str) -> Result<Status, WaypointError> {
    let gw = store
        .gateway(namespace, name)
        .filter(|g| g.spec.gateway_class_name == WAYPOINT_CLASS)
        .ok_or_else(|| WaypointError::NotFound {
            namespace: namespace.into(),
            name: name.into(),
        })?;
    let hbone = gw
        .spec
        .listeners
        .iter()
        .any(|l| l.port == u32::from(cairn_api::HBONE_PORT) && l.protocol == "HBONE");
    let accepted = if hbone {
        Condition {
            type_: "Accepted",
            status: true,
            reason: "Accepted",
            message: "waypoint of class istio-waypoint".into(),
        }
    } else {
        Condition {
            type_: "Accepted",
            status: false,
            reason: "UnsupportedProtocol",
            message: "a waypoint needs a listener on port 15008 with protocol HBONE".into(),
        }
    };
    let address = store
        .service(namespace, name)
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.cluster_ip.clone())
        .filter(|ip| !ip.is_empty() && ip != "None");
    let ready_pods = store
        .pods_in(namespace)
        .filter(|p| crate::compile::waypoint::is_waypoint_pod(store, p))
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(GATEWAY_NAME_LABEL))
                == Some(&name.to_owned())
        })
        .filter(|p| crate::compile::workload::ready(p))
        .count();
    let programmed = match (&address, ready_pods) {
        (None, _) => Condition {
            type_: "Programmed",
            status: false,
            reason: "AddressNotAssigned",
            message: format!(
                "no Service {namespace}/{name} with a cluster IP yet (made by the controller in Kubernetes, by the runner of pods in local mode)"
            ),
        },
        (Some(_), 0) => Condition {
            type_: "Programmed",
            status: false,
            reason: "NoReadyPods",
            message: format!("no ready pod labelled {GATEWAY_NAME_LABEL}={name} yet"),
        },
        (Some(ip), n) => Condition {
            type_: "Programmed",
            status: true,
            reason: "Programmed",
            message: format!("{n} ready pod(s) behind {ip}"),
        },
    };
    Ok(Status {
        conditions: [accepted, programmed],
        address,
    })
}

/// Every waypoint, optionally in one namespace.
pub fn list(target: &dyn Manifests, namespace: Option<&str>) -> Result<Vec<Listed>, WaypointError> {
    let store = target.store()?;
    let mut out = Vec::new();
    for obj in store.of_kind(crate::resources::Kind::Gateway) {
        let crate::resources::Object::Gateway(g) = obj else {
            continue;
        };
        if g.spec.gateway_class_name != WAYPOINT_CLASS {
            continue;
        }
        let ns = g.metadata.namespace.clone().unwrap_or_default();
        if namespace.is_some_and(|n| n != ns) {
            continue;
        }
        let name = g.metadata.name.clone().unwrap_or_default();
        let for_ = g
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(WAYPOINT_FOR))
            .cloned()
            .unwrap_or_else(|| "service".into());
        let source = target
            .gateway_source(&ns, &name)?
            .map(|(file, _)| file)
            .unwrap_or_default();
        out.push(Listed {
            namespace: ns,
            name,
            for_,
            source,
        });
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(out)
}

/// Local mode: the controller's config directory.
pub struct ConfigDir {
    dir: PathBuf,
}

/// One YAML document of a file: its text and its parsed value.
pub(crate) struct Document {
    pub(crate) text: String,
    pub(crate) value: Value,
}

pub(crate) fn split_documents(path: &Path) -> Result<Vec<Document>, WaypointError> {
    let text = std::fs::read_to_string(path).map_err(|source| WaypointError::Io {
        path: path.into(),
        source,
    })?;
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut flush = |current: &mut String| -> Result<(), WaypointError> {
        let value: Value = if current.trim().is_empty() {
            Value::Null
        } else {
            serde_yaml::from_str(current).map_err(|source| WaypointError::Yaml {
                path: path.into(),
                source,
            })?
        };
        docs.push(Document {
            text: std::mem::take(current),
            value,
        });
        Ok(())
    };
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" {
            flush(&mut current)?;
        } else {
            current.push_str(line);
        }
    }
    flush(&mut current)?;
    Ok(docs)
}

pub(crate) fn is_object(v: &Value, kind: &str, namespace: Option<&str>, name: &str) -> bool {
    let meta = &v["metadata"];
    v["kind"].as_str() == Some(kind)
        && meta["name"].as_str() == Some(name)
        && (namespace.is_none() || meta["namespace"].as_str() == namespace)
}

pub(crate) fn write_atomically(path: &Path, text: &str) -> Result<(), WaypointError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| WaypointError::Io { path, source }
    };
    // A name the controller's scan skips (not *.yaml), renamed into place whole.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl ConfigDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ConfigDir { dir: dir.into() }
    }

    fn ours(&self, namespace: &str, name: &str) -> PathBuf {
        self.dir.join(format!("waypoint-{namespace}-{name}.yaml"))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn files(&self) -> Result<Vec<PathBuf>, WaypointError> {
        yaml_files(&self.dir).map_err(|source| WaypointError::Io {
            path: self.dir.clone(),
            source,
        })
    }
}

impl Manifests for ConfigDir {
    fn store(&self) -> Result<Store, WaypointError> {
        let mut store = Store::default();
        // Files that do not parse are skipped, as the controller skips them.
        let _ = LocalSource::new(&self.dir).scan(&mut store);
        Ok(store)
    }

    fn gateway_source(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<(String, bool)>, WaypointError> {
        let ours = self.ours(namespace, name);
        for file in self.files()? {
            let Ok(docs) = split_documents(&file) else {
                continue;
            };
            if docs
                .iter()
                .any(|d| is_object(&d.value, "Gateway", Some(namespace), name))
            {
                return Ok(Some((file.display().to_string(), file == ours)));
            }
        }
        Ok(None)
    }

    fn write_gateway(
        &self,
        namespace: &str,
        name: &str,
        manifest: &str,
    ) -> Result<String, WaypointError> {
        let path = self.ours(namespace, name);
        // Checked before the controller sees it: the controller's own decoder.
        let decoded = crate::decode::decode_documents(manifest);
        if let Some(e) = decoded.iter().find_map(|d| d.as_ref().err()) {
            return Err(WaypointError::Rejected(e.to_string()));
        }
        write_atomically(&path, manifest)?;
        Ok(path.display().to_string())
    }

    fn remove_gateway(&self, namespace: &str, name: &str) -> Result<(), WaypointError> {
        let path = self.ours(namespace, name);
        std::fs::remove_file(&path).map_err(|source| WaypointError::Io { path, source })
    }

    fn label_namespace(
        &self,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> Result<String, WaypointError> {
        for file in self.files()? {
            let Ok(mut docs) = split_documents(&file) else {
                continue;
            };
            let Some(doc) = docs
                .iter_mut()
                .find(|d| is_object(&d.value, "Namespace", None, namespace))
            else {
                continue;
            };
            let mut v = doc.value.clone();
            let labels = &mut v["metadata"]["labels"];
            if !labels.is_mapping() {
                *labels = Value::Mapping(Default::default());
            }
            if let Value::Mapping(m) = labels {
                m.insert(key.into(), value.into());
            }
            if v == doc.value {
                return Ok(file.display().to_string());
            }
            // Only this document is rewritten (its comments are lost); the others
            // keep their text byte for byte.
            doc.text = serde_yaml::to_string(&v).map_err(|source| WaypointError::Yaml {
                path: file.clone(),
                source,
            })?;
            let joined: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
            write_atomically(&file, &joined.join("---\n"))?;
            return Ok(file.display().to_string());
        }
        Err(WaypointError::NoNamespace {
            namespace: namespace.into(),
            where_: self.describe(),
        })
    }

    fn describe(&self) -> String {
        format!("the config directory {}", self.dir.display())
    }
}

#[cfg(test)]
mod tests;
