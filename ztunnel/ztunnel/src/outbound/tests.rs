use std::collections::BTreeMap;

use cairn_api::model::{Address, LoadBalancing, Locality, NetworkAddress, Port, TunnelProtocol};

use super::*;

const SVC: &str = "ns/web.ns.svc.cluster.local";

fn pod(name: &str, ip: [u8; 4], zone: &str, healthy: bool) -> Workload {
    Workload {
        uid: name.into(),
        name: name.into(),
        namespace: "ns".into(),
        addresses: vec![IpAddr::from(ip)],
        network: String::new(),
        identity: SpiffeId::new("cluster.local", "ns", name).expect("id"),
        tunnel_protocol: TunnelProtocol::Hbone,
        native_tunnel: false,
        waypoint: None,
        node: format!("node-{zone}"),
        canonical_name: name.into(),
        canonical_revision: "v1".into(),
        workload_name: name.into(),
        services: BTreeMap::from([(
            SVC.to_string(),
            vec![Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: Default::default(),
            }],
        )]),
        authorization_policies: vec![],
        healthy,
        locality: Some(Locality {
            region: "eu".into(),
            zone: zone.into(),
            subzone: String::new(),
        }),
        cluster_id: "Kubernetes".into(),
    }
}

fn state(lb: Option<LoadBalancing>, endpoints: Vec<Workload>) -> ProxyState {
    let mut addresses: BTreeMap<String, Address> = endpoints
        .into_iter()
        .map(|w| (w.uid.clone(), Address::Workload(Box::new(w))))
        .collect();
    addresses.insert(
        SVC.into(),
        Address::Service(Box::new(Service {
            name: "web".into(),
            namespace: "ns".into(),
            hostname: "web.ns.svc.cluster.local".into(),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: "10.96.0.1".parse().expect("ip"),
            }],
            ports: vec![Port {
                service_port: 80,
                target_port: 0,
                app_protocol: Default::default(),
            }],
            subject_alt_names: vec![],
            waypoint: None,
            load_balancing: lb,
        })),
    );
    ProxyState::new(&addresses, &BTreeMap::new())
}

fn names(v: Vec<&Arc<Workload>>) -> Vec<String> {
    let mut n: Vec<String> = v.iter().map(|w| w.name.clone()).collect();
    n.sort();
    n
}

fn lb(mode: LoadBalancingMode) -> Option<LoadBalancing> {
    Some(LoadBalancing {
        routing_preference: vec![LocalityScope::Region, LocalityScope::Zone],
        mode,
        only_healthy: true,
    })
}

#[test]
fn locality_preference_failover_and_strict() {
    let source = pod("client", [10, 0, 0, 1], "a", true);
    let eps = || {
        vec![
            pod("a1", [10, 0, 1, 1], "a", true),
            pod("a2", [10, 0, 1, 2], "a", false),
            pod("b1", [10, 0, 2, 1], "b", true),
        ]
    };
    let svc = |st: &ProxyState| st.service(SVC).expect("svc").clone();

    // No preference: every healthy endpoint.
    let st = state(None, eps());
    assert_eq!(
        names(preferred_endpoints(&st, &svc(&st), &source)),
        ["a1", "b1"]
    );
    // FAILOVER: same zone first...
    let st = state(lb(LoadBalancingMode::Failover), eps());
    assert_eq!(names(preferred_endpoints(&st, &svc(&st), &source)), ["a1"]);
    // ...and the next best when the zone has no healthy endpoint.
    let only_b = vec![
        pod("a2", [10, 0, 1, 2], "a", false),
        pod("b1", [10, 0, 2, 1], "b", true),
    ];
    let st = state(lb(LoadBalancingMode::Failover), only_b.clone());
    assert_eq!(names(preferred_endpoints(&st, &svc(&st), &source)), ["b1"]);
    // STRICT: nothing outside the zone, even if that means nothing.
    let st = state(lb(LoadBalancingMode::Strict), only_b);
    assert!(preferred_endpoints(&st, &svc(&st), &source).is_empty());
    assert_eq!(
        route(&st, &source, "10.96.0.1:80".parse().expect("addr")),
        Err(RouteError::NoEndpoint("web.ns.svc.cluster.local".into()))
    );
}

#[test]
fn routes_vip_to_endpoint_target_port_and_unknown_to_passthrough() {
    let source = pod("client", [10, 0, 0, 1], "a", true);
    let st = state(None, vec![pod("a1", [10, 0, 1, 1], "a", true)]);
    assert_eq!(
        route(&st, &source, "10.96.0.1:80".parse().expect("addr")),
        Ok(Route::Hbone {
            gateway: "10.0.1.1:15008".parse().expect("addr"),
            authority: "10.0.1.1:8080".parse().expect("addr"),
            identity: SpiffeId::new("cluster.local", "ns", "a1").expect("id"),
            via_waypoint: false,
        })
    );
    assert_eq!(
        route(&st, &source, "10.96.0.1:81".parse().expect("addr")),
        Err(RouteError::NoPort {
            service: "web.ns.svc.cluster.local".into(),
            port: 81
        })
    );
    assert_eq!(
        route(&st, &source, "192.0.2.9:443".parse().expect("addr")),
        Ok(Route::Passthrough("192.0.2.9:443".parse().expect("addr")))
    );
}
