use std::collections::BTreeMap;

use cairn_api::model::{Address, PolicyScope, ServiceAccountMatch, StringMatch, TunnelProtocol};

use super::*;

fn workload(ns: &str, name: &str, ip: [u8; 4], policies: &[&str]) -> Address {
    Address::Workload(Box::new(Workload {
        uid: format!("Kubernetes//Pod/{ns}/{name}"),
        name: name.into(),
        namespace: ns.into(),
        addresses: vec![IpAddr::from(ip)],
        network: String::new(),
        identity: SpiffeId::new("cluster.local", ns, name).expect("id"),
        tunnel_protocol: TunnelProtocol::Hbone,
        native_tunnel: false,
        waypoint: None,
        node: "node-a".into(),
        canonical_name: name.into(),
        canonical_revision: "v1".into(),
        workload_name: name.into(),
        services: BTreeMap::new(),
        authorization_policies: policies.iter().map(|s| s.to_string()).collect(),
        healthy: true,
        locality: None,
        cluster_id: "Kubernetes".into(),
    }))
}

fn policy(
    ns: &str,
    name: &str,
    scope: PolicyScope,
    action: PolicyAction,
    rules: Vec<Vec<Vec<Match>>>,
) -> (String, Authorization) {
    (
        format!("{ns}/{name}"),
        Authorization {
            name: name.into(),
            namespace: ns.into(),
            scope,
            action,
            rules,
            dry_run: false,
        },
    )
}

fn state() -> ProxyState {
    let mut addresses = BTreeMap::new();
    addresses.insert(
        "reviews".to_string(),
        workload(
            "bookinfo",
            "reviews",
            [10, 0, 0, 2],
            &["bookinfo/reviews-viewer", "istio-system/static-strict"],
        ),
    );
    addresses.insert(
        "db".to_string(),
        workload(
            "other",
            "db",
            [10, 0, 1, 2],
            &["other/allow-nothing", "other/dry"],
        ),
    );
    addresses.insert(
        "open".to_string(),
        workload("open", "open", [10, 0, 2, 2], &[]),
    );
    let policies = BTreeMap::from([
        policy(
            "bookinfo",
            "reviews-viewer",
            PolicyScope::WorkloadSelector,
            PolicyAction::Allow,
            vec![vec![
                vec![Match {
                    principals: vec![StringMatch::Exact(
                        "cluster.local/ns/bookinfo/sa/productpage".into(),
                    )],
                    ..Default::default()
                }],
                vec![Match {
                    destination_ports: vec![9080],
                    ..Default::default()
                }],
            ]],
        ),
        policy(
            "istio-system",
            "static-strict",
            PolicyScope::WorkloadSelector,
            PolicyAction::Deny,
            vec![vec![vec![Match {
                not_principals: vec![StringMatch::Presence],
                ..Default::default()
            }]]],
        ),
        policy(
            "istio-system",
            "deny-bad-network",
            PolicyScope::Global,
            PolicyAction::Deny,
            vec![vec![vec![Match {
                source_ips: vec!["203.0.113.0/24".parse().expect("cidr")],
                not_source_ips: vec!["203.0.113.7/32".parse().expect("cidr")],
                ..Default::default()
            }]]],
        ),
        policy(
            "other",
            "from-bookinfo",
            PolicyScope::Namespace,
            PolicyAction::Allow,
            vec![vec![vec![Match {
                namespaces: vec![StringMatch::Exact("bookinfo".into())],
                not_service_accounts: vec![ServiceAccountMatch {
                    namespace: "bookinfo".into(),
                    service_account: "ratings".into(),
                }],
                ..Default::default()
            }]]],
        ),
        // ALLOW with no rules: allows nothing (but another ALLOW may still match).
        policy(
            "other",
            "allow-nothing",
            PolicyScope::WorkloadSelector,
            PolicyAction::Allow,
            vec![],
        ),
        // A dry-run DENY that would match everything.
        {
            let (k, mut p) = policy(
                "other",
                "dry",
                PolicyScope::WorkloadSelector,
                PolicyAction::Deny,
                vec![vec![]],
            );
            p.dry_run = true;
            (k, p)
        },
    ]);
    ProxyState::new(&addresses, &policies)
}

fn conn(src: Option<&str>, src_ip: [u8; 4], dst_ip: [u8; 4], port: u16) -> ConnInfo {
    ConnInfo {
        source: src.map(|s| s.parse().expect("id")),
        source_ip: IpAddr::from(src_ip),
        destination_ip: IpAddr::from(dst_ip),
        destination_port: port,
    }
}

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/bookinfo/sa/productpage";
const RATINGS: &str = "spiffe://cluster.local/ns/bookinfo/sa/ratings";
const EVIL: &str = "spiffe://cluster.local/ns/evil/sa/x";

#[test]
fn decisions() {
    let st = state();
    let allow = Decision::Allow;
    let no_allow = Decision::Deny {
        reason: DenyReason::NoAllowMatch,
    };
    let denied_by = |p: &str| Decision::Deny {
        reason: DenyReason::DenyPolicy(p.into()),
    };
    let cases = [
        (
            "principal and port allowed",
            "reviews",
            conn(Some(PRODUCTPAGE), [10, 0, 0, 1], [10, 0, 0, 2], 9080),
            allow.clone(),
        ),
        (
            "wrong port",
            "reviews",
            conn(Some(PRODUCTPAGE), [10, 0, 0, 1], [10, 0, 0, 2], 9090),
            no_allow.clone(),
        ),
        (
            "wrong principal",
            "reviews",
            conn(Some(RATINGS), [10, 0, 0, 1], [10, 0, 0, 2], 9080),
            no_allow.clone(),
        ),
        (
            "plaintext under STRICT",
            "reviews",
            conn(None, [10, 0, 0, 1], [10, 0, 0, 2], 9080),
            denied_by("istio-system/static-strict"),
        ),
        (
            "mesh-wide ipBlock deny",
            "reviews",
            conn(Some(PRODUCTPAGE), [203, 0, 113, 5], [10, 0, 0, 2], 9080),
            denied_by("istio-system/deny-bad-network"),
        ),
        (
            "notIpBlocks exception",
            "reviews",
            conn(Some(PRODUCTPAGE), [203, 0, 113, 7], [10, 0, 0, 2], 9080),
            allow.clone(),
        ),
        (
            "namespace policy: allowed namespace",
            "db",
            conn(Some(PRODUCTPAGE), [10, 0, 0, 1], [10, 0, 1, 2], 5432),
            allow.clone(),
        ),
        (
            "namespace policy: notServiceAccounts",
            "db",
            conn(Some(RATINGS), [10, 0, 0, 1], [10, 0, 1, 2], 5432),
            no_allow.clone(),
        ),
        (
            "namespace policy: other namespace",
            "db",
            conn(Some(EVIL), [10, 0, 0, 1], [10, 0, 1, 2], 5432),
            no_allow.clone(),
        ),
        (
            "namespace policy: plaintext",
            "db",
            conn(None, [10, 0, 0, 1], [10, 0, 1, 2], 5432),
            no_allow.clone(),
        ),
        (
            "no policies: allow",
            "open",
            conn(None, [10, 0, 0, 1], [10, 0, 2, 2], 80),
            allow.clone(),
        ),
        (
            "global deny still applies",
            "open",
            conn(None, [203, 0, 113, 1], [10, 0, 2, 2], 80),
            denied_by("istio-system/deny-bad-network"),
        ),
    ];
    for (what, dst, c, want) in cases {
        let w = st
            .workload(&format!(
                "Kubernetes//Pod/{}/{dst}",
                if dst == "reviews" {
                    "bookinfo"
                } else {
                    dst_ns(dst)
                }
            ))
            .expect("destination workload");
        assert_eq!(authorize(&st, w, &c), want, "{what}");
    }
}

fn dst_ns(dst: &str) -> &str {
    match dst {
        "db" => "other",
        other => other,
    }
}

/// The policies a workload is subject to: mesh-wide ones, its namespace's, and the
/// selector-scoped ones it lists; never another namespace's.
#[test]
fn policies_for_a_workload_come_from_its_scopes_only() {
    let st = state();
    let names = |uid: &str| {
        let w = st.workload(uid).expect("workload");
        let mut n: Vec<String> = st
            .policies_for(w)
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        n.sort();
        n
    };
    assert_eq!(
        names("Kubernetes//Pod/other/db"),
        [
            "istio-system/deny-bad-network",
            "other/allow-nothing",
            "other/dry",
            "other/from-bookinfo"
        ]
    );
    assert_eq!(
        names("Kubernetes//Pod/bookinfo/reviews"),
        [
            "bookinfo/reviews-viewer",
            "istio-system/deny-bad-network",
            "istio-system/static-strict"
        ],
        "not other's namespace-wide policy"
    );
    assert_eq!(
        names("Kubernetes//Pod/open/open"),
        ["istio-system/deny-bad-network"]
    );
}
