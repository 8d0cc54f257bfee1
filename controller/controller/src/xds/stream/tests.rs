use cairn_api::proto::google::rpc::Status as RpcStatus;

use super::*;
use crate::compile::{Delta, Encoded};

const ADDR: &str = cairn_api::ADDRESS_TYPE_URL;

fn put(cache: &Cache, name: &str, body: &[u8]) {
    cache.apply(&Delta {
        updated: vec![Encoded {
            type_: ResourceType::Address,
            name: name.into(),
            body: body.to_vec(),
            audience: None,
        }],
        ..Default::default()
    });
}

fn remove(cache: &Cache, name: &str) {
    cache.apply(&Delta {
        removed: vec![(ResourceType::Address, name.into())],
        ..Default::default()
    });
}

fn req(subscribe: &[&str], unsubscribe: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: ADDR.into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

#[test]
fn first_request_is_always_answered_and_unknown_types_are_ignored() {
    let cache = Cache::default();
    let mut st = StreamState::new("test".into());
    let r = st.handle(&cache, req(&[], &[])).response.expect("answered");
    assert!(r.resources.is_empty() && !r.nonce.is_empty());
    let other = DeltaDiscoveryRequest {
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        ..Default::default()
    };
    assert!(st.handle(&cache, other).response.is_none());
}

#[test]
fn named_subscriptions_follow_subscribe_and_unsubscribe() {
    let cache = Cache::default();
    let sub = cache.subscribe();
    put(&cache, "a", b"a1");
    put(&cache, "b", b"b1");
    let mut st = StreamState::new("test".into());
    let first = st
        .handle(&cache, req(&["a", "missing"], &[]))
        .response
        .expect("first");
    assert_eq!(names(&first), vec!["a"]);

    // A name that appears later is sent when it does; unwatched names are not.
    sub.take();
    put(&cache, "missing", b"m1");
    put(&cache, "b", b"b2");
    let pushed = st.on_pending(&cache, sub.take());
    assert_eq!(pushed.len(), 1);
    assert_eq!(names(&pushed[0]), vec!["missing"]);

    // After unsubscribing, changes to "a" are not pushed, and nothing is "removed".
    assert!(st.handle(&cache, req(&[], &["a"])).response.is_none());
    put(&cache, "a", b"a2");
    remove(&cache, "missing");
    let pushed = st.on_pending(&cache, sub.take());
    assert_eq!(pushed.len(), 1);
    assert_eq!(pushed[0].removed_resources, vec!["missing".to_string()]);

    // Switching to wildcard sends everything the client lacks.
    let all = st
        .handle(&cache, req(&["*"], &[]))
        .response
        .expect("wildcard diff");
    let mut got = names(&all);
    got.sort();
    assert_eq!(got, vec!["a", "b"]);
}

#[test]
fn nack_rolls_back_what_the_client_holds() {
    let cache = Cache::default();
    let sub = cache.subscribe();
    put(&cache, "a", b"v1");
    let mut st = StreamState::new("test".into());
    let first = st.handle(&cache, req(&[], &[])).response.expect("first");
    st.handle(
        &cache,
        DeltaDiscoveryRequest {
            type_url: ADDR.into(),
            response_nonce: first.nonce.clone(),
            ..Default::default()
        },
    );
    sub.take();
    put(&cache, "a", b"v2");
    let push = st.on_pending(&cache, sub.take()).remove(0);
    let handled = st.handle(
        &cache,
        DeltaDiscoveryRequest {
            type_url: ADDR.into(),
            response_nonce: push.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: "bad".into(),
                details: vec![],
            }),
            ..Default::default()
        },
    );
    assert_eq!(handled.nack.as_deref(), Some("bad"));
    // Back to v1: the client never left it, so nothing to send.
    put(&cache, "a", b"v1");
    assert!(st.on_pending(&cache, sub.take()).is_empty());
    // v3 is sent.
    put(&cache, "a", b"v3");
    assert_eq!(st.on_pending(&cache, sub.take()).len(), 1);
}

#[test]
fn overflowing_backlog_turns_into_a_resync() {
    let cache = Cache::new(3);
    let sub = cache.subscribe();
    let mut st = StreamState::new("test".into());
    st.handle(&cache, req(&[], &[])).response.expect("first");
    for i in 0..10 {
        put(&cache, &format!("r{i}"), b"x");
    }
    assert!(sub.pending_len() <= 3 + 3, "bounded: {}", sub.pending_len());
    let pushed = st.on_pending(&cache, sub.take());
    assert_eq!(pushed.len(), 1);
    assert_eq!(
        pushed[0].resources.len(),
        10,
        "the resync sends everything missing"
    );
}

#[test]
fn a_waypoint_receives_only_the_route_configs_scoped_to_it() {
    let cache = Cache::default();
    let route = |name: &str, body: &[u8], audience: &str| Encoded {
        type_: ResourceType::RouteConfig,
        name: name.into(),
        body: body.to_vec(),
        audience: Some(audience.into()),
    };
    cache.apply(&Delta {
        updated: vec![
            route("demo/reviews:9080", b"r1", "demo/waypoint"),
            route("other/ratings:9080", b"o1", "other/waypoint"),
            route("demo/unbound:9080", b"u1", ""),
        ],
        ..Default::default()
    });
    let sub = cache.subscribe();
    let wildcard = DeltaDiscoveryRequest {
        type_url: cairn_api::ROUTE_CONFIG_TYPE_URL.into(),
        ..Default::default()
    };
    let mut demo =
        StreamState::for_audience("wp".into(), Audience::Waypoint("demo/waypoint".into()));
    let first = demo
        .handle(&cache, wildcard.clone())
        .response
        .expect("answer");
    assert_eq!(names(&first), ["demo/reviews:9080"]);
    let mut all = StreamState::new("node".into());
    let everything = all.handle(&cache, wildcard).response.expect("answer");
    assert_eq!(everything.resources.len(), 3, "unscoped clients see all");

    // The service moves to another waypoint: demo's waypoint is told it is gone.
    cache.apply(&Delta {
        updated: vec![route("demo/reviews:9080", b"r2", "demo/other-waypoint")],
        ..Default::default()
    });
    let pushed = demo.on_pending(&cache, sub.take());
    assert_eq!(pushed.len(), 1);
    assert!(pushed[0].resources.is_empty());
    assert_eq!(pushed[0].removed_resources, ["demo/reviews:9080"]);
}
