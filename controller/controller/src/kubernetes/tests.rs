use serde_json::json;

use super::*;

fn pod(name: &str, ip: &str) -> Value {
    // As the API server sends list items: no apiVersion/kind, server bookkeeping.
    json!({
        "metadata": {"name": name, "namespace": "shop", "uid": name, "resourceVersion": "7",
                     "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
        "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": [{"name": "app", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn pod_ref(name: &str) -> ObjectRef {
    ObjectRef {
        kind: Kind::Pod,
        namespace: "shop".into(),
        name: name.into(),
    }
}

fn list_everything_but(source: &mut KubeSource, store: &mut Store, except: Kind) {
    for kind in Kind::ALL.into_iter().filter(|k| *k != except) {
        source.apply(store, Change::Relist(kind));
        source.apply(store, Change::Listed(kind));
    }
}

#[test]
fn list_items_decode_into_the_store_and_sync_waits_for_every_kind() {
    let (mut source, mut store) = (KubeSource::new(), Store::default());
    list_everything_but(&mut source, &mut store, Kind::Pod);
    assert!(!source.synced(), "pods not listed yet");
    assert_eq!(source.pending(), vec![Kind::Pod]);
    source.apply(&mut store, Change::Relist(Kind::Pod));
    let changed = source.apply(
        &mut store,
        Change::Apply(Kind::Pod, pod("web-1", "10.1.0.5")),
    );
    assert_eq!(changed, vec![pod_ref("web-1")]);
    source.apply(&mut store, Change::Listed(Kind::Pod));
    assert!(source.synced());
    let stored = store.get(&pod_ref("web-1")).expect("pod stored");
    assert_eq!(stored.meta().resource_version.as_deref(), Some("7"));
    assert!(
        stored.meta().managed_fields.is_none(),
        "managedFields dropped"
    );
    // The same object again changes nothing (a relist after a reconnect).
    let again = source.apply(
        &mut store,
        Change::Apply(Kind::Pod, pod("web-1", "10.1.0.5")),
    );
    assert!(again.is_empty());
}

#[test]
fn a_relist_deletes_what_it_did_not_list_and_only_that_kind() {
    let (mut source, mut store) = (KubeSource::new(), Store::default());
    source.apply(&mut store, Change::Relist(Kind::Pod));
    source.apply(
        &mut store,
        Change::Apply(Kind::Pod, pod("web-1", "10.1.0.5")),
    );
    source.apply(
        &mut store,
        Change::Apply(Kind::Pod, pod("web-2", "10.1.0.6")),
    );
    source.apply(&mut store, Change::Listed(Kind::Pod));
    let ns = json!({"metadata": {"name": "shop"}});
    source.apply(&mut store, Change::Apply(Kind::Namespace, ns));
    // The watch fell behind (or the API server restarted): relist sees only web-2.
    source.apply(&mut store, Change::Relist(Kind::Pod));
    source.apply(
        &mut store,
        Change::Apply(Kind::Pod, pod("web-2", "10.1.0.6")),
    );
    let changed = source.apply(&mut store, Change::Listed(Kind::Pod));
    assert_eq!(changed, vec![pod_ref("web-1")]);
    assert!(store.get(&pod_ref("web-1")).is_none());
    assert!(store.get(&pod_ref("web-2")).is_some());
    let ns_ref = ObjectRef {
        kind: Kind::Namespace,
        namespace: String::new(),
        name: "shop".into(),
    };
    assert!(store.get(&ns_ref).is_some(), "other kinds untouched");
    let deleted = source.apply(
        &mut store,
        Change::Delete(Kind::Pod, pod("web-2", "10.1.0.6")),
    );
    assert_eq!(deleted, vec![pod_ref("web-2")]);
    assert!(store.is_empty() || store.get(&pod_ref("web-2")).is_none());
}

#[test]
fn a_rejected_update_keeps_the_last_good_version_through_a_relist() {
    let (mut source, mut store) = (KubeSource::new(), Store::default());
    let policy = |action: &str| {
        json!({
            "metadata": {"name": "deny", "namespace": "shop"},
            "spec": {"action": action, "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/x/sa/y"]}}]}]},
        })
    };
    let r = ObjectRef {
        kind: Kind::AuthorizationPolicy,
        namespace: "shop".into(),
        name: "deny".into(),
    };
    source.apply(
        &mut store,
        Change::Apply(Kind::AuthorizationPolicy, policy("DENY")),
    );
    let good = store.get(&r).cloned().expect("policy stored");
    let changed = source.apply(
        &mut store,
        Change::Apply(Kind::AuthorizationPolicy, policy("EXPLODE")),
    );
    assert!(changed.is_empty(), "a rejected update changes nothing");
    assert!(source.rejected().contains_key(&r));
    assert_eq!(store.get(&r), Some(&good));
    source.apply(&mut store, Change::Relist(Kind::AuthorizationPolicy));
    source.apply(
        &mut store,
        Change::Apply(Kind::AuthorizationPolicy, policy("EXPLODE")),
    );
    source.apply(&mut store, Change::Listed(Kind::AuthorizationPolicy));
    assert_eq!(store.get(&r), Some(&good), "still listed, so not deleted");
    // Fixed: applies and leaves the rejected set.
    let changed = source.apply(
        &mut store,
        Change::Apply(Kind::AuthorizationPolicy, policy("ALLOW")),
    );
    assert_eq!(changed, vec![r.clone()]);
    assert!(source.rejected().is_empty());
}

#[test]
fn a_kind_not_served_counts_as_listed_and_empty() {
    let (mut source, mut store) = (KubeSource::new(), Store::default());
    list_everything_but(&mut source, &mut store, Kind::GrpcRoute);
    assert!(!source.synced());
    source.apply(&mut store, Change::NotServed(Kind::GrpcRoute));
    assert!(source.synced());
}

#[test]
fn every_kind_maps_to_the_api_resource_it_is_decoded_as() {
    for kind in Kind::ALL {
        let ar = api_resource(kind);
        assert_eq!(
            Kind::from_manifest(&ar.api_version, &ar.kind),
            Some(kind),
            "{kind}: {}/{}",
            ar.api_version,
            ar.kind
        );
        assert!(!ar.plural.is_empty());
    }
}
