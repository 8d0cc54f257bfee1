//! The embedded default config source: a directory of multi-document YAML files,
//! rescanned for changes.
//!
//! A bad document is reported with file, document index, kind/name and field path;
//! the other documents still apply, and the last good version of the bad document's
//! object stays in force. An object defined in two files is an error in the second.
//!
//! After the first scan, a changed file is applied only once two consecutive scans
//! read the same content, and a vanished file only once two scans miss it: a file
//! caught half-written (truncated, then written) must not delete objects.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use crate::{
    decode::{self, DocumentError, Warning},
    resources::{Object, ObjectRef},
    store::Store,
};

/// A problem in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub file: PathBuf,
    pub error: DocumentError,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.error)
    }
}

/// A warning about one document in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileWarning {
    pub file: PathBuf,
    pub index: usize,
    pub object: ObjectRef,
    pub warning: Warning,
}

impl fmt::Display for FileWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: document {} ({}): {}",
            self.file.display(),
            self.index,
            self.object,
            self.warning
        )
    }
}

/// What one scan did.
#[derive(Debug, Default)]
pub struct Scan {
    /// Objects added, changed or deleted in the store.
    pub changed: Vec<ObjectRef>,
    pub errors: Vec<FileError>,
    pub warnings: Vec<FileWarning>,
    /// Files seen changing (or vanishing) that wait for the next scan to settle.
    pub settling: usize,
}

#[derive(Debug, Default)]
struct FileState {
    content_hash: u64,
    objects: BTreeMap<ObjectRef, Object>,
}

#[derive(Debug)]
pub struct LocalSource {
    dir: PathBuf,
    files: HashMap<PathBuf, FileState>,
    owner: HashMap<ObjectRef, PathBuf>,
    /// Content hash seen at the last scan but not applied yet.
    unsettled: HashMap<PathBuf, u64>,
    /// Files missed by the last scan whose objects are still applied.
    missing: std::collections::HashSet<PathBuf>,
    scanned_once: bool,
}

fn hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// YAML files under `path` (or `path` itself), sorted for a stable apply order.
pub fn yaml_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let p = entry?.path();
            let hidden = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e == "yaml" || e == "yml")
            {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

impl LocalSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: HashMap::new(),
            owner: HashMap::new(),
            unsettled: HashMap::new(),
            missing: Default::default(),
            scanned_once: false,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Rescans the directory and applies what changed to `store`.
    pub fn scan(&mut self, store: &mut Store) -> Scan {
        let mut scan = Scan::default();
        let files = match yaml_files(&self.dir) {
            Ok(f) => f,
            Err(e) => {
                // Keep everything in force: a directory that vanished for a moment
                // must not wipe the mesh's config.
                warn!(dir = %self.dir.display(), error = %e, "cannot read config directory; keeping the last good config");
                return scan;
            }
        };
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|f| !files.contains(f))
            .cloned()
            .collect();
        let settle = self.scanned_once;
        // A file that reappeared is no longer missing.
        self.missing.retain(|f| gone.contains(f));
        for f in gone {
            if settle && self.missing.insert(f.clone()) {
                scan.settling += 1;
                continue;
            }
            self.missing.remove(&f);
            if let Some(state) = self.files.remove(&f) {
                for (r, _) in state.objects {
                    if self.owner.get(&r) == Some(&f) {
                        self.owner.remove(&r);
                        store.delete(&r);
                        scan.changed.push(r);
                    }
                }
            }
            info!(file = %f.display(), "config file removed");
        }
        for f in files {
            let bytes = match std::fs::read(&f) {
                Ok(b) => b,
                Err(e) => {
                    warn!(file = %f.display(), error = %e, "cannot read config file; keeping its last good objects");
                    continue;
                }
            };
            let h = hash(&bytes);
            if self.files.get(&f).is_some_and(|s| s.content_hash == h) {
                self.unsettled.remove(&f);
                continue;
            }
            if settle && self.unsettled.get(&f) != Some(&h) {
                self.unsettled.insert(f.clone(), h);
                scan.settling += 1;
                continue;
            }
            self.unsettled.remove(&f);
            let text = String::from_utf8_lossy(&bytes);
            self.apply_file(store, &f, h, &text, &mut scan);
        }
        self.scanned_once = true;
        for e in &scan.errors {
            warn!(file = %e.file.display(), document = e.error.index, kind = %e.error.kind.as_deref().unwrap_or("?"), name = %e.error.name.as_deref().unwrap_or("?"), path = %e.error.path.as_deref().unwrap_or(""), error = %e.error.message, "rejected config document; its last good version stays in force");
        }
        for w in &scan.warnings {
            warn!(file = %w.file.display(), document = w.index, object = %w.object, path = %w.warning.path, "{}", w.warning.message);
        }
        scan
    }

    fn apply_file(&mut self, store: &mut Store, f: &Path, h: u64, text: &str, scan: &mut Scan) {
        let old = self.files.remove(f).unwrap_or_default();
        let mut objects: BTreeMap<ObjectRef, Object> = BTreeMap::new();
        for result in decode::decode_documents(text) {
            match result {
                Ok(d) => {
                    let r = d.object.object_ref();
                    if let Some(other) = self.owner.get(&r).filter(|o| o.as_path() != f) {
                        scan.errors.push(FileError {
                            file: f.to_owned(),
                            error: DocumentError {
                                index: d.index,
                                kind: Some(r.kind.to_string()),
                                name: Some(r.name.clone()),
                                path: Some("metadata.name".into()),
                                message: format!("{r} is already defined in {}", other.display()),
                                object: None,
                            },
                        });
                        continue;
                    }
                    scan.warnings
                        .extend(d.warnings.into_iter().map(|warning| FileWarning {
                            file: f.to_owned(),
                            index: d.index,
                            object: r.clone(),
                            warning,
                        }));
                    objects.insert(r, d.object);
                }
                Err(error) => {
                    // Keep the last good version of the object this document defines.
                    if let Some(r) = &error.object
                        && let Some(prev) = old.objects.get(r)
                    {
                        objects.insert(r.clone(), prev.clone());
                    }
                    scan.errors.push(FileError {
                        file: f.to_owned(),
                        error,
                    });
                }
            }
        }
        for r in old.objects.keys() {
            if !objects.contains_key(r) && self.owner.get(r).is_some_and(|o| o.as_path() == f) {
                self.owner.remove(r);
                store.delete(r);
                scan.changed.push(r.clone());
            }
        }
        for (r, obj) in &objects {
            self.owner.insert(r.clone(), f.to_owned());
            if store.get(r) != Some(obj) {
                store.apply(obj.clone());
                scan.changed.push(r.clone());
            }
        }
        self.files.insert(
            f.to_owned(),
            FileState {
                content_hash: h,
                objects,
            },
        );
    }
}

#[cfg(test)]
mod tests;
