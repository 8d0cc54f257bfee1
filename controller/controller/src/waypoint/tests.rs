use super::*;

const BOOKINFO: &str = "# the demo namespace\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: bookinfo\n  labels:\n    istio.io/dataplane-mode: ambient\n---\n# kept as written\napiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  clusterIP: 10.96.0.12\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080}]\n";

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    dir
}

fn req(namespace: &str, name: &str, enroll: bool) -> Apply {
    Apply {
        namespace: namespace.into(),
        name: name.into(),
        for_: "service".into(),
        enroll_namespace: enroll,
    }
}

#[test]
fn apply_writes_a_waypoint_the_controller_accepts_and_labels_the_namespace() {
    let dir = dir_with(&[("bookinfo.yaml", BOOKINFO)]);
    let target = ConfigDir::new(dir.path());
    let report = apply(&target, &req("bookinfo", "waypoint", true)).expect("apply");
    assert!(report.warnings.is_empty(), "{report:?}");
    assert_eq!(report.done.len(), 2, "{report:?}");
    let store = target.store().expect("store");
    let gw = store
        .gateway("bookinfo", "waypoint")
        .expect("gateway in the store");
    assert_eq!(gw.spec.gateway_class_name, WAYPOINT_CLASS);
    assert_eq!(gw.spec.listeners[0].port, 15008);
    let ns = store.namespace("bookinfo").expect("namespace");
    let labels = ns.metadata.labels.as_ref().expect("labels");
    assert_eq!(
        labels.get(USE_WAYPOINT).map(String::as_str),
        Some("waypoint")
    );
    assert_eq!(
        labels.get(DATAPLANE_MODE).map(String::as_str),
        Some(AMBIENT)
    );
    // The controller now sends the service's traffic to the waypoint.
    let compiled = crate::compile::compile(&store, &crate::compile::MeshConfig::default());
    let svc = match compiled
        .addresses
        .get("bookinfo/reviews.bookinfo.svc.cluster.local")
        .and_then(|a| a.r#type.as_ref())
    {
        Some(cairn_api::proto::istio::workload::address::Type::Service(s)) => s.clone(),
        other => panic!("no reviews service: {other:?}"),
    };
    assert!(svc.waypoint.is_some(), "reviews gets the waypoint: {svc:?}");
    // The other document keeps its text, comment included.
    let text = std::fs::read_to_string(dir.path().join("bookinfo.yaml")).expect("read");
    assert!(
        text.contains("# kept as written\napiVersion: v1\nkind: Service"),
        "{text}"
    );
    // Applying again is idempotent; list shows it, delete removes it and warns about
    // the label still pointing at it.
    apply(&target, &req("bookinfo", "waypoint", true)).expect("again");
    let listed = list(&target, None).expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].name.as_str(), listed[0].for_.as_str()),
        ("waypoint", "service")
    );
    let report = delete(&target, "bookinfo", "waypoint").expect("delete");
    assert!(
        report.warnings[0].contains("still has istio.io/use-waypoint=waypoint"),
        "{report:?}"
    );
    assert!(
        target
            .store()
            .expect("store")
            .gateway("bookinfo", "waypoint")
            .is_none()
    );
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let foreign = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: ingress, namespace: bookinfo}\nspec:\n  gatewayClassName: istio\n  listeners: [{name: http, port: 80, protocol: HTTP}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: handmade, namespace: bookinfo}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n";
    let dir = dir_with(&[("bookinfo.yaml", BOOKINFO), ("gateways.yaml", foreign)]);
    let target = ConfigDir::new(dir.path());
    let before = std::fs::read_dir(dir.path()).expect("dir").count();
    let e = apply(&target, &req("nowhere", "waypoint", false)).expect_err("no namespace");
    assert!(matches!(e, WaypointError::NoNamespace { .. }), "{e}");
    let e = apply(&target, &req("bookinfo", "ingress", false)).expect_err("clash");
    assert!(
        e.to_string().contains("already exists") && e.to_string().contains("\"istio\""),
        "{e}"
    );
    let e = apply(&target, &req("bookinfo", "handmade", false)).expect_err("not ours");
    assert!(matches!(e, WaypointError::NotOurs { .. }), "{e}");
    let e = delete(&target, "bookinfo", "handmade").expect_err("not ours");
    assert!(e.to_string().contains("gateways.yaml"), "{e}");
    let e = delete(&target, "bookinfo", "ingress").expect_err("not a waypoint");
    assert!(matches!(e, WaypointError::NotFound { .. }), "{e}");
    let e = apply(&target, &req("bookinfo", "../etc", false)).expect_err("bad name");
    assert!(matches!(e, WaypointError::BadName { .. }), "{e}");
    let mut bad_for = req("bookinfo", "waypoint", false);
    bad_for.for_ = "everything".into();
    assert!(matches!(
        apply(&target, &bad_for),
        Err(WaypointError::BadFor(_))
    ));
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("dir").count(),
        before,
        "nothing written"
    );
}

#[test]
fn a_namespace_outside_the_mesh_is_a_warning() {
    let plain = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: legacy\n";
    let dir = dir_with(&[("legacy.yaml", plain)]);
    let target = ConfigDir::new(dir.path());
    let report = apply(&target, &req("legacy", "waypoint", true)).expect("apply");
    assert!(report.warnings[0].contains("not in the mesh"), "{report:?}");
    let ns = target
        .store()
        .expect("store")
        .namespace("legacy")
        .cloned()
        .expect("namespace");
    assert_eq!(
        ns.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(USE_WAYPOINT))
            .map(String::as_str),
        Some("waypoint"),
        "a namespace without labels gets the map"
    );
}

#[test]
fn the_local_deployment_gives_the_waypoint_its_address_and_identity() {
    let dir = dir_with(&[("bookinfo.yaml", BOOKINFO)]);
    let target = ConfigDir::new(dir.path());
    apply(&target, &req("bookinfo", "waypoint", true)).expect("apply");
    let before = status(&target.store().expect("store"), "bookinfo", "waypoint").expect("status");
    assert!(before.conditions[0].status, "Accepted: {before:?}");
    assert_eq!(
        (before.conditions[1].status, before.conditions[1].reason),
        (false, "AddressNotAssigned")
    );
    assert!(!before.programmed());
    let placed = Placement {
        node: "node-a",
        pod_ip: "10.244.1.20",
        cluster_ip: "10.96.0.20",
    };
    std::fs::write(
        dir.path().join("waypoint-deployment.yaml"),
        local_deployment("bookinfo", "waypoint", &placed),
    )
    .expect("write");
    let compiled = crate::compile::compile(
        &target.store().expect("store"),
        &crate::compile::MeshConfig::default(),
    );
    use cairn_api::proto::istio::workload::{address::Type, gateway_address::Destination};
    let service = |name: &str| match compiled
        .addresses
        .get(&format!("bookinfo/{name}.bookinfo.svc.cluster.local"))
        .and_then(|a| a.r#type.as_ref())
    {
        Some(Type::Service(s)) => s.clone(),
        other => panic!("no {name} service: {other:?}"),
    };
    let wp = service("reviews").waypoint.expect("reviews is bound");
    match wp.destination {
        Some(Destination::Address(a)) => assert_eq!(a.address, vec![10, 96, 0, 20]),
        other => panic!("waypoint address: {other:?}"),
    }
    assert!(
        service("waypoint").waypoint.is_none(),
        "the waypoint's own service is not sent through a waypoint"
    );
    let pod = compiled
        .addresses
        .values()
        .find_map(|a| match &a.r#type {
            Some(Type::Workload(w)) if w.name == "waypoint" => Some(w.clone()),
            _ => None,
        })
        .expect("the waypoint pod is a workload");
    assert_eq!(pod.service_account, "waypoint");
    assert_eq!(pod.addresses, vec![vec![10, 244, 1, 20]]);
    assert!(pod.waypoint.is_none());
    assert!(
        pod.native_tunnel,
        "ztunnels reach it over HBONE and never capture it"
    );
}
