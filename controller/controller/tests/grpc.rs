//! In-process gRPC tests: the controller's delta ADS and CA over TLS, driven by a real
//! config directory, as a ztunnel or waypoint would use them.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use cairn_api::{
    ADDRESS_TYPE_URL,
    proto::{
        ca::{
            IstioCertificateRequest,
            istio_certificate_service_client::IstioCertificateServiceClient,
        },
        discovery::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
        google::rpc::Status as RpcStatus,
    },
};
use cairn_controller::{
    auth::{Caller, StaticTokens},
    ca::{CertificateAuthority, DEFAULT_TTL},
    compile::MeshConfig,
    local::LocalSource,
    runtime::Runtime,
    server::{self, ServeConfig},
    xds::Cache,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Request, Streaming,
    transport::{Certificate, Channel, ClientTlsConfig},
};

const BOOKINFO: &str = include_str!("fixtures/bookinfo.yaml");
const NODE_TOKEN: &str = "node-a-token";
const WAYPOINT_TOKEN: &str = "waypoint-token";
const WAIT: Duration = Duration::from_secs(10);

/// Captured log lines, to check what the controller says.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        struct W;
        impl std::io::Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                logs().lock().expect("log lock").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = tracing_subscriber::fmt()
            .with_writer(|| W)
            .with_ansi(false)
            .with_env_filter("info")
            .try_init();
        Mutex::new(Vec::new())
    })
}

struct Harness {
    _dir: tempfile::TempDir,
    cache: Arc<Cache>,
    config: PathBuf,
    root: String,
    addr: std::net::SocketAddr,
    _stop: watch::Sender<bool>,
}

impl Harness {
    async fn start(config_yaml: &str) -> Self {
        logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let config_dir = dir.path().join("config");
        std::fs::create_dir(&config_dir).expect("config dir");
        let config = config_dir.join("app.yaml");
        std::fs::write(&config, config_yaml).expect("write config");
        let ca = Arc::new(
            CertificateAuthority::load_or_create(
                &dir.path().join("ca"),
                "cluster.local",
                DEFAULT_TTL,
            )
            .expect("ca"),
        );
        let auth = Arc::new(StaticTokens::new([
            (NODE_TOKEN.to_string(), Caller::Node("node-a".into())),
            (
                WAYPOINT_TOKEN.to_string(),
                Caller::Identity(
                    "spiffe://cluster.local/ns/bookinfo/sa/waypoint"
                        .parse()
                        .expect("id"),
                ),
            ),
        ]));
        let cache = Arc::new(Cache::new(64));
        let runtime = Arc::new(Runtime::new(MeshConfig::default(), cache.clone()));
        let mut source = LocalSource::new(&config_dir);
        runtime.scan(&mut source);
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(
            runtime
                .clone()
                .watch(source, Duration::from_millis(20), stop_rx.clone()),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let root = ca.root_pem().to_owned();
        let mut stop_rx2 = stop_rx;
        tokio::spawn(async move {
            server::serve(
                listener,
                ServeConfig {
                    serving_names: vec!["localhost".into()],
                    cert_ttl: DEFAULT_TTL,
                },
                runtime,
                ca,
                auth,
                async move {
                    let _ = stop_rx2.changed().await;
                },
            )
            .await
            .expect("serve");
        });
        Self {
            _dir: dir,
            cache,
            config,
            root,
            addr,
            _stop: stop,
        }
    }

    async fn channel(&self) -> Channel {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.root))
            .domain_name("localhost");
        Channel::from_shared(format!("https://{}", self.addr))
            .expect("uri")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .expect("connect over TLS with a cert from the mesh CA")
    }

    fn write_config(&self, yaml: &str) {
        std::fs::write(&self.config, yaml).expect("write config");
    }
}

fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    r
}

struct Xds {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl Xds {
    async fn open(h: &Harness, first: DeltaDiscoveryRequest) -> Self {
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.expect("queue first request");
        let mut client = AggregatedDiscoveryServiceClient::new(h.channel().await);
        let rx = client
            .delta_aggregated_resources(with_token(ReceiverStream::new(rx), NODE_TOKEN))
            .await
            .expect("stream accepted")
            .into_inner();
        Self { tx, rx }
    }

    async fn next(&mut self) -> DeltaDiscoveryResponse {
        let r = tokio::time::timeout(WAIT, self.rx.message()).await;
        if r.is_err() {
            eprintln!("{}", String::from_utf8_lossy(&logs().lock().expect("logs")));
        }
        r.expect("a response in time")
            .expect("stream ok")
            .expect("stream open")
    }

    async fn ack(&self, resp: &DeltaDiscoveryResponse) {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            })
            .await
            .expect("send ack");
    }

    async fn nack(&self, resp: &DeltaDiscoveryResponse, why: &str) {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail: Some(RpcStatus {
                    code: Code::InvalidArgument as i32,
                    message: why.into(),
                    details: vec![],
                }),
                ..Default::default()
            })
            .await
            .expect("send nack");
    }

    /// Expects no response within a short while.
    async fn quiet(&mut self) {
        let r = tokio::time::timeout(Duration::from_millis(300), self.rx.message()).await;
        assert!(r.is_err(), "unexpected push: {r:?}");
    }
}

fn wildcard(type_url: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        ..Default::default()
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

const REVIEWS_V1: &str = "Kubernetes//Pod/bookinfo/reviews-v1-545db77b95-klmno";

fn relabel_reviews_v1(yaml: &str, version: &str) -> String {
    yaml.replacen(
        "    app: reviews\n    version: v1\n",
        &format!("    app: reviews\n    version: {version}\n"),
        1,
    )
}

#[tokio::test]
async fn subscribe_then_changes_push_only_what_changed() {
    let h = Harness::start(BOOKINFO).await;
    let mut xds = Xds::open(&h, wildcard(ADDRESS_TYPE_URL)).await;
    let initial = xds.next().await;
    assert_eq!(initial.resources.len(), 9, "{:?}", names(&initial));
    assert!(names(&initial).contains(&REVIEWS_V1));
    xds.ack(&initial).await;

    // One pod's label changes: exactly that workload is pushed.
    h.write_config(&relabel_reviews_v1(BOOKINFO, "v1-patched"));
    let update = xds.next().await;
    assert_eq!(names(&update), vec![REVIEWS_V1]);
    assert!(update.removed_resources.is_empty());
    xds.ack(&update).await;

    // The pod's document goes away: a removal of exactly that name.
    let without: Vec<&str> = BOOKINFO
        .split("---\n")
        .filter(|d| !d.contains("reviews-v1-545db77b95-klmno"))
        .collect();
    h.write_config(&without.join("---\n"));
    let removal = xds.next().await;
    assert!(removal.resources.is_empty(), "{:?}", names(&removal));
    assert_eq!(removal.removed_resources, vec![REVIEWS_V1.to_string()]);
    xds.ack(&removal).await;
    xds.quiet().await;
}

#[tokio::test]
async fn nack_keeps_the_clients_previous_version_and_is_logged() {
    let h = Harness::start(BOOKINFO).await;
    let mut xds = Xds::open(&h, wildcard(ADDRESS_TYPE_URL)).await;
    let initial = xds.next().await;
    xds.ack(&initial).await;

    h.write_config(&relabel_reviews_v1(BOOKINFO, "bad"));
    let update = xds.next().await;
    assert_eq!(names(&update), vec![REVIEWS_V1]);
    xds.nack(&update, "workload rejected by test client").await;

    // Going back to the original content needs no push: after the NACK the server
    // knows the client still holds the original version.
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.write_config(BOOKINFO);
    xds.quiet().await;
    // And the stream still works: the next real change arrives.
    h.write_config(&relabel_reviews_v1(BOOKINFO, "v9"));
    let next = xds.next().await;
    assert_eq!(names(&next), vec![REVIEWS_V1]);

    let text = String::from_utf8_lossy(&logs().lock().expect("logs")).to_string();
    let line = text
        .lines()
        .find(|l| l.contains("NACK") && l.contains("workload rejected by test client"))
        .unwrap_or_else(|| panic!("NACK not logged:\n{text}"));
    assert!(line.contains("node/node-a"), "client named in: {line}");
}

#[tokio::test]
async fn reconnect_with_initial_versions_resyncs_only_differences() {
    let h = Harness::start(BOOKINFO).await;
    let mut first = Xds::open(&h, wildcard(ADDRESS_TYPE_URL)).await;
    let initial = first.next().await;
    first.ack(&initial).await;
    let mut versions: std::collections::BTreeMap<String, String> = initial
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    drop(first);

    // While disconnected: one workload changes, and the client holds a stale name.
    h.write_config(&relabel_reviews_v1(BOOKINFO, "v2-while-away"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    versions.insert(
        "bookinfo/gone.bookinfo.svc.cluster.local".into(),
        "0".into(),
    );

    let mut again = Xds::open(
        &h,
        DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            initial_resource_versions: versions,
            ..Default::default()
        },
    )
    .await;
    let resync = again.next().await;
    assert_eq!(names(&resync), vec![REVIEWS_V1]);
    assert_eq!(
        resync.removed_resources,
        vec!["bookinfo/gone.bookinfo.svc.cluster.local".to_string()]
    );
}

#[tokio::test]
async fn named_subscriptions_and_unsubscribe() {
    let h = Harness::start(BOOKINFO).await;
    let svc = "bookinfo/ratings.bookinfo.svc.cluster.local";
    let mut xds = Xds::open(
        &h,
        DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            resource_names_subscribe: vec![svc.into()],
            ..Default::default()
        },
    )
    .await;
    let initial = xds.next().await;
    assert_eq!(names(&initial), vec![svc]);
    xds.ack(&initial).await;
    // Changes to other resources are not pushed to a named subscriber.
    h.write_config(&relabel_reviews_v1(BOOKINFO, "v3"));
    xds.quiet().await;
    // Subscribing to one more name sends it.
    xds.tx
        .send(DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            resource_names_subscribe: vec![REVIEWS_V1.into()],
            resource_names_unsubscribe: vec![svc.into()],
            ..Default::default()
        })
        .await
        .expect("send");
    let more = xds.next().await;
    assert_eq!(names(&more), vec![REVIEWS_V1]);
}

/// Many pods, so a full push is far larger than the HTTP/2 window a non-reading
/// client leaves open.
fn big_config(pods: usize) -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: big\n  labels: {istio.io/dataplane-mode: ambient}\n",
    );
    for i in 0..pods {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-{i}\n  namespace: big\n  labels: {{app: app-{i}, version: r0}}\nspec:\n  nodeName: node-a\n  containers: [{{name: c, image: i}}]\nstatus:\n  podIP: 10.{}.{}.{}\n",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        ));
    }
    out
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_block_others() {
    let config = big_config(3000);
    let h = Harness::start(&config).await;
    // The stalled client advertises a small HTTP/2 window and then never reads: the
    // server cannot even finish its first push to it.
    let stalled_channel = Channel::from_shared(format!("https://{}", h.addr))
        .expect("uri")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&h.root))
                .domain_name("localhost"),
        )
        .expect("tls")
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect()
        .await
        .expect("connect");
    let (stalled_tx, stalled_rx) = mpsc::channel(1);
    stalled_tx
        .send(wildcard(ADDRESS_TYPE_URL))
        .await
        .expect("queue");
    let _stalled = AggregatedDiscoveryServiceClient::new(stalled_channel)
        .delta_aggregated_resources(with_token(ReceiverStream::new(stalled_rx), NODE_TOKEN))
        .await
        .expect("stream accepted");

    let mut live = Xds::open(&h, wildcard(ADDRESS_TYPE_URL)).await;
    let initial = live.next().await;
    assert_eq!(initial.resources.len(), 3000);
    live.ack(&initial).await;

    // 20 rounds of 5 changed pods: 100 names pile up for the stalled client, past the
    // cache's pending bound of 64, while the live client gets each round promptly.
    let mut edited = config.clone();
    for round in 1..=20 {
        let pods: Vec<usize> = (round * 5..round * 5 + 5).collect();
        for i in &pods {
            edited = edited.replacen(
                &format!("app: app-{i}, version: r0"),
                &format!("app: app-{i}, version: r{round}"),
                1,
            );
        }
        h.write_config(&edited);
        let mut want: Vec<String> = pods
            .iter()
            .map(|i| format!("Kubernetes//Pod/big/pod-{i}"))
            .collect();
        let mut got: Vec<String> = Vec::new();
        while got.len() < want.len() {
            let update = live.next().await;
            got.extend(update.resources.iter().map(|r| r.name.clone()));
            live.ack(&update).await;
        }
        want.sort();
        got.sort();
        assert_eq!(got, want, "round {round}");
    }
    let pending = h.cache.max_pending();
    assert!(
        pending <= 64 * 2,
        "stalled client's backlog is bounded, got {pending}"
    );
    assert!(pending > 0, "the stalled client really is behind");
}

#[tokio::test]
async fn streams_without_a_valid_token_are_refused() {
    let h = Harness::start(BOOKINFO).await;
    let mut client = AggregatedDiscoveryServiceClient::new(h.channel().await);
    let (_tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(1);
    let err = client
        .delta_aggregated_resources(Request::new(ReceiverStream::new(rx)))
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let (_tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(1);
    let err = client
        .delta_aggregated_resources(with_token(ReceiverStream::new(rx), "wrong"))
        .await
        .expect_err("wrong token");
    assert_eq!(err.code(), Code::Unauthenticated);
}

fn csr(sans: Vec<rcgen::SanType>) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = sans;
    params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

fn uri(s: &str) -> rcgen::SanType {
    rcgen::SanType::URI(s.try_into().expect("ia5"))
}

fn cert_request(csr: String, impersonate: Option<&str>) -> IstioCertificateRequest {
    IstioCertificateRequest {
        csr,
        validity_duration: 3600,
        metadata: impersonate.map(|id| prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id.into())),
                },
            )]
            .into(),
        }),
    }
}

#[tokio::test]
async fn ca_issues_only_what_the_caller_may_have() {
    let h = Harness::start(BOOKINFO).await;
    let mut ca = IstioCertificateServiceClient::new(h.channel().await);
    let reviews = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews";
    let ratings = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings";
    let waypoint = "spiffe://cluster.local/ns/bookinfo/sa/waypoint";

    // node-a runs reviews-v1: the node proxy may get its identity.
    let ok = ca
        .create_certificate(with_token(
            cert_request(csr(vec![uri(reviews)]), Some(reviews)),
            NODE_TOKEN,
        ))
        .await
        .expect("issued")
        .into_inner();
    assert_eq!(ok.cert_chain.len(), 2);
    assert!(ok.cert_chain[1].trim() == h.root.trim(), "root last");

    let code = |r: Result<tonic::Response<_>, tonic::Status>| r.expect_err("refused").code();
    // ratings runs on node-b only.
    assert_eq!(
        code(
            ca.create_certificate(with_token(
                cert_request(csr(vec![uri(ratings)]), Some(ratings)),
                NODE_TOKEN
            ))
            .await
        ),
        Code::PermissionDenied
    );
    // Unknown token.
    assert_eq!(
        code(
            ca.create_certificate(with_token(
                cert_request(csr(vec![uri(reviews)]), None),
                "nope"
            ))
            .await
        ),
        Code::Unauthenticated
    );
    // Malformed CSR, and a CSR with an extra DNS SAN.
    assert_eq!(
        code(
            ca.create_certificate(with_token(
                cert_request("not a csr".into(), None),
                NODE_TOKEN
            ))
            .await
        ),
        Code::InvalidArgument
    );
    let extra = csr(vec![
        uri(reviews),
        rcgen::SanType::DnsName("x.example".try_into().expect("dns")),
    ]);
    assert_eq!(
        code(
            ca.create_certificate(with_token(cert_request(extra, None), NODE_TOKEN))
                .await
        ),
        Code::InvalidArgument
    );
    // The impersonation metadata must agree with the CSR.
    assert_eq!(
        code(
            ca.create_certificate(with_token(
                cert_request(csr(vec![uri(reviews)]), Some(ratings)),
                NODE_TOKEN
            ))
            .await
        ),
        Code::InvalidArgument
    );
    // A waypoint gets its own identity and nothing else.
    ca.create_certificate(with_token(
        cert_request(csr(vec![uri(waypoint)]), None),
        WAYPOINT_TOKEN,
    ))
    .await
    .expect("own identity");
    assert_eq!(
        code(
            ca.create_certificate(with_token(
                cert_request(csr(vec![uri(reviews)]), None),
                WAYPOINT_TOKEN
            ))
            .await
        ),
        Code::PermissionDenied
    );
}
