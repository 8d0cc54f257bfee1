use super::*;
use crate::resources::Kind;

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write fixture file");
}

const NS_A: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  labels: {team: one}\n";
const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: a}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{port: 80}]\n";
const SVC_BAD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: a}\nspec:\n  clusterIP: not-an-ip\n  ports: [{port: 80}]\n";

/// Scans until nothing is settling: a change applies once two scans agree.
fn settle(src: &mut LocalSource, store: &mut Store) -> Scan {
    let first = src.scan(store);
    if first.settling == 0 {
        return first;
    }
    let second = src.scan(store);
    assert_eq!(
        second.settling, 0,
        "a stable file settles on the second scan"
    );
    second
}

fn svc_ref() -> ObjectRef {
    ObjectRef {
        kind: Kind::Service,
        namespace: "a".into(),
        name: "web".into(),
    }
}

#[test]
fn bad_document_keeps_last_good_version_and_the_rest_applies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut src = LocalSource::new(dir.path());
    let mut store = Store::default();
    write(dir.path(), "app.yaml", &format!("{NS_A}---\n{SVC}"));
    let scan = src.scan(&mut store);
    assert!(scan.errors.is_empty());
    assert_eq!(scan.changed.len(), 2);
    let good = store.get(&svc_ref()).cloned().expect("service applied");

    // The service turns bad while the namespace changes: the namespace change applies,
    // the service keeps its last good version, and the error names file/doc/kind/path.
    let ns_b = NS_A.replace("team: one", "team: two");
    write(dir.path(), "app.yaml", &format!("{ns_b}---\n{SVC_BAD}"));
    let scan = settle(&mut src, &mut store);
    assert_eq!(scan.changed.len(), 1, "only the namespace changed");
    assert_eq!(scan.errors.len(), 1);
    let e = &scan.errors[0];
    assert!(e.file.ends_with("app.yaml"));
    assert_eq!(e.error.index, 1);
    assert_eq!(e.error.kind.as_deref(), Some("Service"));
    assert_eq!(e.error.name.as_deref(), Some("web"));
    assert_eq!(e.error.path.as_deref(), Some("spec.clusterIP"));
    assert_eq!(store.get(&svc_ref()), Some(&good));

    // Fixing it applies the fix; removing the file removes its objects.
    write(
        dir.path(),
        "app.yaml",
        &format!("{ns_b}---\n{}", SVC.replace("10.96.0.1", "10.96.0.2")),
    );
    let scan = settle(&mut src, &mut store);
    assert_eq!(scan.changed, vec![svc_ref()]);
    std::fs::remove_file(dir.path().join("app.yaml")).expect("remove");
    let scan = settle(&mut src, &mut store);
    assert_eq!(scan.changed.len(), 2);
    assert!(store.is_empty());
}

#[test]
fn unchanged_files_are_not_reapplied_and_duplicates_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut src = LocalSource::new(dir.path());
    let mut store = Store::default();
    write(dir.path(), "a.yaml", SVC);
    write(dir.path(), "b.yml", SVC);
    write(dir.path(), "notes.txt", "not config");
    let scan = src.scan(&mut store);
    assert_eq!(scan.changed, vec![svc_ref()]);
    assert_eq!(scan.errors.len(), 1);
    assert!(scan.errors[0].file.ends_with("b.yml"));
    assert!(scan.errors[0].error.message.contains("already defined in"));
    let scan = src.scan(&mut store);
    assert!(scan.changed.is_empty() && scan.errors.is_empty());
}

#[test]
fn a_half_written_file_is_not_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut src = LocalSource::new(dir.path());
    let mut store = Store::default();
    write(dir.path(), "app.yaml", &format!("{NS_A}---\n{SVC}"));
    src.scan(&mut store);
    assert_eq!(store.len(), 2);
    // Caught mid-write: truncated to its first document. Not applied yet...
    write(dir.path(), "app.yaml", NS_A);
    let scan = src.scan(&mut store);
    assert_eq!(scan.settling, 1);
    assert!(scan.changed.is_empty());
    assert_eq!(store.len(), 2, "nothing deleted on a glimpse");
    // ...and the writer finished before the next scan: only the real change applies.
    write(
        dir.path(),
        "app.yaml",
        &format!("{NS_A}---\n{}", SVC.replace("10.96.0.1", "10.96.0.3")),
    );
    assert!(
        src.scan(&mut store).changed.is_empty(),
        "new content settles first"
    );
    let scan = src.scan(&mut store);
    assert_eq!(scan.changed, vec![svc_ref()]);
    assert_eq!(store.len(), 2);
}
