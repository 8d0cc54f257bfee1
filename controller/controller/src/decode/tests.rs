use super::*;

fn one(yaml: &str) -> Result<Decoded, DocumentError> {
    let mut all = decode_documents(yaml);
    assert_eq!(all.len(), 1, "expected one document");
    all.remove(0)
}

#[test]
fn istio_manifest_with_unimplemented_fields_applies_with_warnings() {
    let d = one("apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: reviews
  namespace: bookinfo
spec:
  hosts: [reviews]
  http:
  - delegate: {name: reviews-routes}
    route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
  tcp:
  - route:
    - destination: {host: reviews}
")
    .expect("applies");
    let paths: Vec<&str> = d.warnings.iter().map(|w| w.path.as_str()).collect();
    assert_eq!(paths, vec!["spec.http[0].delegate", "spec.tcp"]);
    let Object::VirtualService(vs) = d.object else {
        panic!("wrong kind")
    };
    assert_eq!(vs.spec.http[0].route[1].weight, Some(10));
}

#[test]
fn errors_name_kind_name_and_field_path() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-ip, namespace: ns}
spec:
  rules:
  - from:
    - source:
        ipBlocks: [10.0.0.0/33]
",
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "neither an IP address nor a CIDR",
        ),
        (
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-action, namespace: ns}
spec:
  action: MAYBE
",
            "spec.action",
            "unknown variant",
        ),
        (
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-port, namespace: ns}
spec:
  rules:
  - to:
    - operation: {ports: [\"http\"]}
",
            "spec.rules[0].to[0].operation.ports[0]",
            "not a port number",
        ),
        (
            "apiVersion: v1
kind: Pod
metadata: {name: p, namespace: ns}
spec:
  containers: not-a-list
",
            "spec.containers",
            "invalid type",
        ),
        (
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: [a]
  http:
  - timeout: 5 seconds
    route: [{destination: {host: a}}]
",
            "spec.http[0].timeout",
            "not a duration",
        ),
    ];
    for (yaml, path, msg) in cases {
        let e = one(yaml).expect_err("must be rejected");
        assert_eq!(e.path.as_deref(), Some(*path), "{e}");
        assert!(e.message.contains(msg), "{e}");
        assert!(e.name.is_some() && e.kind.is_some(), "{e}");
        assert!(e.to_string().starts_with("document 0 ("), "{e}");
    }
}

#[test]
fn unknown_kinds_missing_names_lists_and_bad_yaml() {
    let e =
        one("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n").expect_err("unserved");
    assert_eq!(e.path.as_deref(), Some("kind"));
    let e = one("apiVersion: v1\nkind: Service\nmetadata: {}\n").expect_err("no name");
    assert_eq!(e.path.as_deref(), Some("metadata.name"));

    let docs = decode_documents(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: a}\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: b}\n---\n---\n",
    );
    assert_eq!(docs.len(), 2);
    assert!(docs.iter().all(Result::is_ok));

    let docs = decode_documents(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkey: [unclosed\n",
    );
    assert!(docs[0].is_ok());
    let e = docs[1].as_ref().expect_err("bad yaml");
    assert_eq!(e.index, 1);
    assert!(e.message.contains("invalid YAML"), "{e}");
}

#[test]
fn namespaced_objects_default_to_default_namespace() {
    let d = one("apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec: {mtls: {mode: STRICT}}\n")
        .expect("valid");
    assert_eq!(d.object.object_ref().namespace, "default");
    assert!(d.warnings.is_empty(), "{:?}", d.warnings);
}

#[test]
fn typos_in_core_kinds_are_reported() {
    let d = one("apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a, lables: {x: y}}\nspec:\n  selectr: {app: a}\n  ports: [{port: 80}]\n")
        .expect("applies");
    let paths: Vec<&str> = d.warnings.iter().map(|w| w.path.as_str()).collect();
    assert_eq!(paths, vec!["metadata.lables", "spec.selectr"]);
}
