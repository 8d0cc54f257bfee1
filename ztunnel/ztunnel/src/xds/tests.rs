use cairn_api::proto::discovery::Resource;

use super::*;

fn workload_resource(name: &str, address: Vec<u8>) -> Resource {
    let w = wl::Address {
        r#type: Some(wl::address::Type::Workload(wl::Workload {
            uid: name.into(),
            name: name.into(),
            namespace: "ns".into(),
            addresses: vec![address],
            ..Default::default()
        })),
    };
    Resource {
        name: name.into(),
        version: "1".into(),
        resource: Some(prost_types::Any {
            type_url: ADDRESS_TYPE_URL.into(),
            value: w.encode_to_vec(),
        }),
        ..Default::default()
    }
}

#[test]
fn a_bad_resource_rejects_the_whole_response_and_keeps_state() {
    let mut held = Held::default();
    let good = DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE_URL.into(),
        resources: vec![workload_resource("a", vec![10, 0, 0, 1])],
        nonce: "1".into(),
        ..Default::default()
    };
    assert_eq!(held.apply(&good), Ok(1));
    let bad = DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE_URL.into(),
        resources: vec![
            workload_resource("b", vec![10, 0, 0, 2]),
            workload_resource("c", vec![1, 2, 3]),
        ],
        removed_resources: vec!["a".into()],
        nonce: "2".into(),
        ..Default::default()
    };
    let err = held.apply(&bad).expect_err("bad address");
    assert!(err.contains("resource c"), "{err}");
    // Nothing of the rejected response applied: a still holds, b never arrived.
    assert!(held.addresses.contains_key("a"));
    assert!(!held.addresses.contains_key("b"));
}
