//! `cairn apply -f` and `cairn delete -f` in local mode: put a manifest's objects into
//! the controller's config directory, or take them out, the way `kubectl apply` and
//! `kubectl delete` do on a cluster.
//!
//! Every document is checked with the controller's own decoder first; a file with one
//! bad document changes nothing. An object already defined somewhere in the directory
//! is replaced where it is (that document only; the file's other documents keep their
//! text byte for byte); a new object gets its own file, `<kind>-<namespace>-<name>.yaml`.
//! Files are replaced whole (written aside, renamed), so the controller never reads
//! half a file.

use std::path::{Path, PathBuf};

use serde_yaml::Value;

use crate::{
    decode::decode_documents,
    waypoint::{
        ConfigDir, Document, Manifests, Report, WaypointError, is_object, split_documents,
        write_atomically,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{file} was rejected, nothing changed:\n  {}", .errors.join("\n  "))]
    Rejected { file: String, errors: Vec<String> },
    #[error("{0} holds no objects")]
    Empty(String),
    #[error("{file}: document {index} has no kind or metadata.name")]
    Unnamed { file: String, index: usize },
    #[error(transparent)]
    Files(#[from] WaypointError),
}

/// Which object a document is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    kind: String,
    /// None for cluster-scoped kinds (Namespace).
    namespace: Option<String>,
    name: String,
}

impl Key {
    fn of(v: &Value) -> Option<Key> {
        let kind = v["kind"].as_str()?.to_owned();
        let name = v["metadata"]["name"].as_str()?.to_owned();
        let namespace = (kind != "Namespace").then(|| {
            v["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned()
        });
        Some(Key {
            kind,
            namespace,
            name,
        })
    }

    fn matches(&self, v: &Value) -> bool {
        // A document without a namespace is in `default`, as in the store.
        let ns = v["metadata"]["namespace"].as_str().unwrap_or("default");
        is_object(v, &self.kind, None, &self.name)
            && self.namespace.as_deref().is_none_or(|want| want == ns)
    }

    fn file_name(&self) -> String {
        let kind = self.kind.to_ascii_lowercase();
        match &self.namespace {
            Some(ns) => format!("{kind}-{ns}-{}.yaml", self.name),
            None => format!("{kind}-{}.yaml", self.name),
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// The objects of `file`, checked by the controller's decoder.
fn read_objects(file: &Path) -> Result<Vec<(Key, Document)>, ApplyError> {
    let shown = file.display().to_string();
    let docs = split_documents(file)?;
    let text: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
    let errors: Vec<String> = decode_documents(&text.join("---\n"))
        .into_iter()
        .filter_map(|d| d.err().map(|e| e.to_string()))
        .collect();
    if !errors.is_empty() {
        return Err(ApplyError::Rejected {
            file: shown,
            errors,
        });
    }
    let mut out = Vec::new();
    for (index, doc) in docs.into_iter().enumerate() {
        if doc.value.is_null() {
            continue;
        }
        let key = Key::of(&doc.value).ok_or_else(|| ApplyError::Unnamed {
            file: shown.clone(),
            index,
        })?;
        out.push((key, doc));
    }
    if out.is_empty() {
        return Err(ApplyError::Empty(shown));
    }
    Ok(out)
}

/// Where `key` is defined in the directory: the file, its documents, and which one.
fn find(dir: &ConfigDir, key: &Key) -> Result<Option<(PathBuf, Vec<Document>, usize)>, ApplyError> {
    for file in dir.files()? {
        // Files the controller cannot parse are skipped, as the controller skips them.
        let Ok(docs) = split_documents(&file) else {
            continue;
        };
        if let Some(i) = docs.iter().position(|d| key.matches(&d.value)) {
            return Ok(Some((file, docs, i)));
        }
    }
    Ok(None)
}

fn join(docs: &[Document]) -> String {
    let text: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
    text.join("---\n")
}

/// Creates or replaces every object of `file` in the directory.
pub fn apply(dir: &ConfigDir, file: &Path) -> Result<Report, ApplyError> {
    let mut report = Report::default();
    for (key, doc) in read_objects(file)? {
        let mut text = doc.text;
        if !text.ends_with('\n') {
            text.push('\n');
        }
        match find(dir, &key)? {
            Some((path, mut docs, i)) => {
                if docs[i].value == doc.value {
                    report
                        .done
                        .push(format!("{key} unchanged ({})", path.display()));
                    continue;
                }
                docs[i].text = text;
                write_atomically(&path, &join(&docs))?;
                report
                    .done
                    .push(format!("{key} configured in {}", path.display()));
            }
            None => {
                let path = dir.path().join(key.file_name());
                write_atomically(&path, &text)?;
                report
                    .done
                    .push(format!("{key} created in {}", path.display()));
            }
        }
    }
    Ok(report)
}

/// Removes every object of `file` from the directory; one not there is a warning.
pub fn delete(dir: &ConfigDir, file: &Path) -> Result<Report, ApplyError> {
    let mut report = Report::default();
    for (key, _) in read_objects(file)? {
        let Some((path, mut docs, i)) = find(dir, &key)? else {
            report
                .warnings
                .push(format!("{key} not found in {}", dir.describe()));
            continue;
        };
        docs.remove(i);
        if docs.iter().all(|d| d.value.is_null()) {
            std::fs::remove_file(&path).map_err(|source| WaypointError::Io {
                path: path.clone(),
                source,
            })?;
            report
                .done
                .push(format!("{key} deleted ({} removed)", path.display()));
        } else {
            write_atomically(&path, &join(&docs))?;
            report
                .done
                .push(format!("{key} deleted from {}", path.display()));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{Kind, Object};

    const VS_90_10: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: demo}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 90}\n    - {destination: {host: reviews, subset: v2}, weight: 10}\n";
    const VS_50_50: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: demo}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 50}\n    - {destination: {host: reviews, subset: v2}, weight: 50}\n";
    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n";

    fn setup(base: &str) -> (tempfile::TempDir, ConfigDir) {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(tmp.path().join("config")).expect("mkdir");
        std::fs::write(tmp.path().join("config/base.yaml"), base).expect("base");
        let dir = ConfigDir::new(tmp.path().join("config"));
        (tmp, dir)
    }

    fn input(tmp: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = tmp.path().join("input.yaml");
        std::fs::write(&path, text).expect("input");
        path
    }

    fn weight_of_v2(dir: &ConfigDir) -> i64 {
        let store = dir.store().expect("store");
        let Some(Object::VirtualService(vs)) = store.of_kind(Kind::VirtualService).next() else {
            panic!("no VirtualService");
        };
        let json = serde_json::to_value(&vs.spec).expect("json");
        json["http"][0]["route"][1]["weight"]
            .as_i64()
            .expect("weight")
    }

    #[test]
    fn an_object_defined_in_a_shared_file_is_replaced_in_place_and_the_rest_kept() {
        let (tmp, dir) = setup(&format!("{NS}---\n# the canary\n{VS_90_10}"));
        let report = apply(&dir, &input(&tmp, VS_50_50)).expect("apply");
        assert!(report.done[0].contains("configured in"), "{report:?}");
        let base = std::fs::read_to_string(tmp.path().join("config/base.yaml")).expect("base");
        assert!(
            base.starts_with(NS),
            "the Namespace document is untouched: {base}"
        );
        assert_eq!(weight_of_v2(&dir), 50);
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            1,
            "no second definition written"
        );
        let again = apply(&dir, &input(&tmp, VS_50_50)).expect("apply");
        assert!(again.done[0].contains("unchanged"), "{again:?}");
    }

    #[test]
    fn a_new_object_gets_its_own_file_and_delete_removes_it() {
        let (tmp, dir) = setup(NS);
        let vs = input(&tmp, VS_90_10);
        apply(&dir, &vs).expect("apply");
        let own = dir.path().join("virtualservice-demo-reviews.yaml");
        assert!(own.exists());
        assert_eq!(weight_of_v2(&dir), 10);
        let report = delete(&dir, &vs).expect("delete");
        assert!(report.done[0].contains("removed"), "{report:?}");
        assert!(!own.exists());
        assert!(
            dir.store()
                .expect("store")
                .of_kind(Kind::VirtualService)
                .next()
                .is_none()
        );
        let missing = delete(&dir, &vs).expect("delete again");
        assert!(missing.warnings[0].contains("not found"), "{missing:?}");
    }

    #[test]
    fn deleting_one_document_of_a_shared_file_keeps_the_others() {
        let (tmp, dir) = setup(&format!("{NS}---\n{VS_90_10}"));
        delete(&dir, &input(&tmp, VS_50_50)).expect("delete");
        let base = std::fs::read_to_string(tmp.path().join("config/base.yaml")).expect("base");
        assert_eq!(base.trim_end(), NS.trim_end());
        assert!(dir.store().expect("store").namespace("demo").is_some());
    }

    #[test]
    fn a_file_with_one_bad_document_changes_nothing() {
        let (tmp, dir) = setup(&format!("{NS}---\n{VS_90_10}"));
        let bad = format!(
            "{VS_50_50}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r, namespace: demo}}\nspec:\n  host: reviews\n  trafficPolicy: {{loadBalancer: {{simple: NOT_A_POLICY}}}}\n"
        );
        let err = apply(&dir, &input(&tmp, &bad)).expect_err("rejected");
        let msg = err.to_string();
        assert!(
            msg.contains("nothing changed") && msg.contains("DestinationRule"),
            "{msg}"
        );
        assert_eq!(
            weight_of_v2(&dir),
            10,
            "the good document was not applied either"
        );
    }

    #[test]
    fn an_empty_file_is_an_error() {
        let (tmp, dir) = setup(NS);
        let err = apply(&dir, &input(&tmp, "# nothing\n")).expect_err("empty");
        assert!(matches!(err, ApplyError::Empty(_)), "{err}");
    }
}
