//! Route configs and service addresses as the waypoint receives them over xDS
//! (`cairn_waypoint::xds::RouteSink`), served through its real HBONE ingress: a config
//! binds to its service's VIP, a bad config is refused whole (NACK) while the previous
//! one keeps serving, and a removed config stops being served.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use bytes::Bytes;
use cairn_api::{
    ADDRESS_TYPE_URL, ROUTE_CONFIG_TYPE_URL,
    proto::{
        cairn::l7::v1 as l7,
        discovery::{DeltaDiscoveryResponse, Resource},
        istio::workload as wl,
    },
};
use cairn_client::xds::Subscriber;
use cairn_hbone::{
    H2Settings,
    client::{Client, ClientError, PoolKey, PoolSettings},
    server::serve_listener,
    stream::H2Stream,
    test_ca::TestCa,
    tls::{client_config, server_config},
};
use cairn_waypoint::{
    cluster::Transport,
    ingress::{ConnLimits, Ingress},
    router::{HttpTransport, full},
    xds::{RouteSink, TransportFor},
};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::net::TcpListener;

const CLIENT: &str = "spiffe://cluster.local/ns/bookinfo/sa/productpage";
const WAYPOINT: &str = "spiffe://cluster.local/ns/bookinfo/sa/waypoint";
const HOST: &str = "reviews.bookinfo.svc.cluster.local";
const VIP: &str = "10.96.0.12:9080";

/// An HTTP/1.1 backend answering `<name>:<path>`.
async fn backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let body = format!("{name}:{}", req.uri().path());
                    async move {
                        Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(
                            body,
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn response(
    type_url: &str,
    nonce: &str,
    resources: Vec<(&str, Vec<u8>)>,
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: nonce.into(),
        resources: resources
            .into_iter()
            .map(|(name, value)| Resource {
                name: name.into(),
                version: nonce.into(),
                resource: Some(prost_types::Any {
                    type_url: type_url.into(),
                    value,
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn service_address() -> Vec<u8> {
    let vip: SocketAddr = VIP.parse().expect("vip");
    wl::Address {
        r#type: Some(wl::address::Type::Service(wl::Service {
            name: "reviews".into(),
            namespace: "bookinfo".into(),
            hostname: HOST.into(),
            addresses: vec![wl::NetworkAddress {
                network: String::new(),
                address: ip_bytes(vip.ip()),
                length: None,
            }],
            ports: vec![wl::Port {
                service_port: 9080,
                target_port: 9080,
                app_protocol: 0,
            }],
            ..Default::default()
        })),
    }
    .encode_to_vec()
}

/// Every request to one backend (`subset`) at `endpoint`; `regex` goes in a match.
fn route_config(subset: &str, endpoint: SocketAddr, regex: &str) -> Vec<u8> {
    let backend = l7::WeightedBackend {
        hostname: HOST.into(),
        subset: subset.into(),
        port: 9080,
        weight: 1,
        ..Default::default()
    };
    l7::RouteConfig {
        namespace: "bookinfo".into(),
        hostname: HOST.into(),
        port: 9080,
        rules: vec![l7::Rule {
            name: "all".into(),
            matches: vec![l7::Match {
                uri: Some(l7::StringMatch {
                    kind: Some(l7::string_match::Kind::Regex(regex.into())),
                }),
                ..Default::default()
            }],
            action: Some(l7::rule::Action::Forward(l7::Forward {
                backends: vec![backend],
            })),
            ..Default::default()
        }],
        backends: vec![l7::Backend {
            name: format!("{HOST}|{subset}|9080"),
            endpoints: vec![l7::Endpoint {
                address: ip_bytes(endpoint.ip()),
                port: u32::from(endpoint.port()),
                identity: String::new(),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

struct Served {
    addr: SocketAddr,
    mesh: TestCa,
}

impl Served {
    async fn get(&self, client: &Client, path: &str) -> Result<(StatusCode, String), ClientError> {
        let key = PoolKey {
            source: CLIENT.parse().expect("id"),
            destination: WAYPOINT.parse().expect("id"),
            address: self.addr,
            source_ip: None,
            dialer: Default::default(),
        };
        let tls = client_config(
            &self.mesh.workload(CLIENT),
            &self.mesh.roots(),
            WAYPOINT.parse().expect("id"),
        )
        .expect("client config");
        let tunnel: H2Stream = client.connect(&key, tls, VIP.parse().expect("vip")).await?;
        let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel))
            .await
            .expect("http/1.1");
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "reviews:9080")
            .body(full(""))
            .expect("request");
        let resp = h1.send_request(req).await.expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

async fn serve(ingress: Arc<Ingress>) -> Served {
    let mesh = TestCa::new("mesh");
    let config = server_config(&mesh.workload(WAYPOINT), &mesh.roots()).expect("server config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_drain, drain_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _keep = _drain;
        serve_listener(
            listener,
            move || Ok(config.clone()),
            H2Settings::default(),
            ingress,
            8,
            drain_rx,
        )
        .await
    });
    Served { addr, mesh }
}

#[tokio::test]
async fn route_configs_bind_to_their_service_vip_and_a_bad_one_is_refused_whole() {
    let (v1, v2) = (backend("v1").await, backend("v2").await);
    let ingress = Arc::new(Ingress::new(ConnLimits::default()));
    let transport: TransportFor =
        Arc::new(|_| Arc::new(HttpTransport::new(None)) as Arc<dyn Transport>);
    let mut sink = RouteSink::new(ingress.clone(), transport, Some(1));
    let dump = sink.dump();
    let served = serve(ingress).await;
    let client = Client::new(H2Settings::default(), PoolSettings::default());

    // A route config before its service's address: held, not served.
    let routes = response(
        ROUTE_CONFIG_TYPE_URL,
        "1",
        vec![("bookinfo/reviews:9080", route_config("v1", v1, "/.*"))],
    );
    assert_eq!(sink.apply(&routes), Ok(1));
    assert_eq!(dump.load().unbound, vec!["bookinfo/reviews:9080"]);
    assert!(
        served.get(&client, "/a").await.is_err(),
        "no service address yet: the CONNECT is refused"
    );

    let addresses = response(
        ADDRESS_TYPE_URL,
        "2",
        vec![("bookinfo/reviews", service_address())],
    );
    assert_eq!(sink.apply(&addresses), Ok(1));
    assert_eq!(
        dump.load().serving.get(VIP).map(String::as_str),
        Some("reviews.bookinfo.svc.cluster.local:9080")
    );
    assert_eq!(
        served.get(&client, "/a").await.expect("served"),
        (StatusCode::OK, "v1:/a".into())
    );

    // A response with one good and one bad config (a regex that does not compile)
    // changes nothing: the NACK names the bad one and v1 keeps serving.
    let bad = response(
        ROUTE_CONFIG_TYPE_URL,
        "3",
        vec![
            ("bookinfo/reviews:9080", route_config("v2", v2, "/.*")),
            ("bookinfo/other:9080", route_config("v2", v2, "/(unclosed")),
        ],
    );
    let err = sink.apply(&bad).expect_err("NACK");
    assert!(err.contains("bookinfo/other:9080"), "{err}");
    assert_eq!(
        served.get(&client, "/b").await.expect("served"),
        (StatusCode::OK, "v1:/b".into())
    );

    // A good update moves traffic to v2.
    let good = response(
        ROUTE_CONFIG_TYPE_URL,
        "4",
        vec![("bookinfo/reviews:9080", route_config("v2", v2, "/.*"))],
    );
    assert_eq!(sink.apply(&good), Ok(1));
    assert_eq!(
        served.get(&client, "/c").await.expect("served"),
        (StatusCode::OK, "v2:/c".into())
    );

    // Removed: no longer served.
    let removed = DeltaDiscoveryResponse {
        type_url: ROUTE_CONFIG_TYPE_URL.into(),
        nonce: "5".into(),
        removed_resources: vec!["bookinfo/reviews:9080".into()],
        ..Default::default()
    };
    assert_eq!(sink.apply(&removed), Ok(1));
    assert!(dump.load().serving.is_empty());
    assert!(served.get(&client, "/d").await.is_err());
}
