//! The pods of this node as the CNI plugin saw them created: one JSON file per pod in
//! the state directory. ztunnel reads them to find each pod's network namespace and
//! cgroup when it enrolls or adopts the pod (also after a restart).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// The pod's network namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory.
    pub cgroup: PathBuf,
    /// The node address kubelet probes come from; they bypass capture.
    #[serde(default)]
    pub probe_ip: Option<Ipv4Addr>,
}

#[derive(Debug, thiserror::Error)]
pub enum PodRecordError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Malformed {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct PodRecords {
    dir: PathBuf,
}

impl PodRecords {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PodRecords { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, namespace: &str, name: &str) -> PathBuf {
        self.dir.join(format!("{namespace}_{name}.json"))
    }

    /// Writes a record atomically (temporary file + rename).
    pub fn write(&self, pod: &PodRecord) -> Result<(), PodRecordError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| PodRecordError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let path = self.path(&pod.namespace, &pod.name);
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(pod).map_err(|source| PodRecordError::Malformed {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&tmp, body).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    pub fn remove(&self, namespace: &str, name: &str) -> Result<Option<PodRecord>, PodRecordError> {
        let path = self.path(namespace, name);
        let record = match std::fs::read(&path) {
            Ok(body) => serde_json::from_slice(&body).ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(PodRecordError::Io { path, source }),
        };
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(record),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(PodRecordError::Io { path, source }),
        }
    }

    /// Every readable record; unreadable ones are returned as errors beside them, so
    /// one bad file does not hide the other pods.
    pub fn list(&self) -> (Vec<PodRecord>, Vec<PodRecordError>) {
        let mut pods = Vec::new();
        let mut errors = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (pods, errors),
            Err(source) => {
                errors.push(PodRecordError::Io {
                    path: self.dir.clone(),
                    source,
                });
                return (pods, errors);
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path) {
                Ok(body) => match serde_json::from_slice(&body) {
                    Ok(pod) => pods.push(pod),
                    Err(source) => errors.push(PodRecordError::Malformed { path, source }),
                },
                Err(source) => errors.push(PodRecordError::Io { path, source }),
            }
        }
        pods.sort_by(|a: &PodRecord, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        (pods, errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: [u8; 4]) -> PodRecord {
        PodRecord {
            namespace: "demo".into(),
            name: name.into(),
            ip: Ipv4Addr::from(ip),
            netns: "/var/run/netns/x".into(),
            cgroup: "/sys/fs/cgroup/x".into(),
            probe_ip: None,
        }
    }

    #[test]
    fn records_round_trip_and_a_bad_file_does_not_hide_the_rest() {
        let dir = std::env::temp_dir().join(format!("cairn-pods-{}", std::process::id()));
        let records = PodRecords::new(&dir);
        records.write(&pod("a", [10, 0, 0, 1])).expect("write");
        records.write(&pod("b", [10, 0, 0, 2])).expect("write");
        std::fs::write(dir.join("broken.json"), b"{").expect("write");
        let (pods, errors) = records.list();
        assert_eq!(pods, vec![pod("a", [10, 0, 0, 1]), pod("b", [10, 0, 0, 2])]);
        assert_eq!(errors.len(), 1);
        assert_eq!(
            records.remove("demo", "a").expect("remove"),
            Some(pod("a", [10, 0, 0, 1]))
        );
        assert_eq!(records.remove("demo", "a").expect("remove"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
