//! Per-request telemetry: Istio's metric names and labels as Prometheus renders them,
//! response flags, and the request id / trace context sent upstream.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use cairn_waypoint::{
    fault::{Fault, Percent},
    ingress::Downstream,
    matching::{RequestMatch, StringMatch},
    route::{Action, HeaderOps, RouteTable, Rule, WeightedBackend},
    router::{Body, Router, Upstream, UpstreamFuture, full},
};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;

const V2: &str = "reviews.bookinfo.svc.cluster.local|v2|9080";

/// Reads the request, answers 200 with a 5-byte body; keeps the headers it was sent.
#[derive(Default)]
struct Echo(Mutex<Vec<http::HeaderMap>>);

impl Upstream for Echo {
    fn send(&self, _backend: &str, req: Request<Body>) -> UpstreamFuture {
        self.0.lock().expect("lock").push(req.headers().clone());
        Box::pin(async {
            let _ = req.into_body().collect().await;
            Ok(Response::new(full("hello")))
        })
    }
}

fn rule(name: &str, path: &str) -> Rule {
    Rule {
        name: name.into(),
        matches: vec![RequestMatch {
            path: Some(StringMatch::Prefix(path.into())),
            ..Default::default()
        }],
        action: Action::Forward(vec![WeightedBackend {
            backend: V2.into(),
            weight: 1,
            headers: None,
        }]),
        fault: None,
        timeout: None,
        retry: None,
        rewrite: None,
        mirrors: vec![],
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        cors: None,
    }
}

fn request(path: &str, body: &'static str) -> Request<Body> {
    let mut req = Request::post(path)
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(full(body))
        .expect("request");
    req.extensions_mut().insert(Arc::new(Downstream {
        identity: Some(
            "spiffe://cluster.local/ns/bookinfo/sa/productpage"
                .parse()
                .expect("id"),
        ),
        peer: SocketAddr::from(([10, 0, 0, 1], 40000)),
        service: "reviews.bookinfo.svc.cluster.local:9080".into(),
        destination: SocketAddr::from(([10, 96, 0, 12], 9080)),
    }));
    req
}

/// The rendered sample line of `metric` having every one of `labels`.
fn sample<'a>(rendered: &'a str, metric: &str, labels: &[&str]) -> Option<&'a str> {
    rendered
        .lines()
        .find(|l| l.starts_with(metric) && labels.iter().all(|want| l.contains(want)))
}

#[tokio::test]
async fn requests_are_counted_and_measured_with_istios_labels() {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("recorder");
    let echo = Arc::new(Echo::default());
    let mut aborted = rule("bookinfo/reviews/chaos", "/chaos");
    aborted.fault = Some(Fault {
        delay: None,
        abort: Some((StatusCode::SERVICE_UNAVAILABLE.into(), Percent(100.0))),
    });
    let router = Router::new(
        RouteTable {
            rules: vec![aborted, rule("bookinfo/reviews/canary", "/reviews")],
            ..Default::default()
        },
        echo.clone(),
        Some(9),
    );
    for (path, want) in [
        ("/reviews/1", StatusCode::OK),
        ("/reviews/2", StatusCode::OK),
        ("/reviews/3", StatusCode::OK),
        ("/chaos", StatusCode::SERVICE_UNAVAILABLE),
        ("/nowhere", StatusCode::NOT_FOUND),
    ] {
        let resp = router.handle(request(path, "abc")).await;
        assert_eq!(resp.status(), want, "{path}");
        // The request is recorded when its response body has been read.
        resp.into_body().collect().await.expect("body");
    }
    let rendered = prometheus.render();
    let ok = [
        "reporter=\"waypoint\"",
        "source_principal=\"spiffe://cluster.local/ns/bookinfo/sa/productpage\"",
        "source_workload_namespace=\"bookinfo\"",
        "destination_service=\"reviews.bookinfo.svc.cluster.local\"",
        "destination_service_name=\"reviews\"",
        "destination_service_namespace=\"bookinfo\"",
        "destination_version=\"v2\"",
        "response_code=\"200\"",
        "response_flags=\"-\"",
        "connection_security_policy=\"mutual_tls\"",
        "request_protocol=\"http\"",
    ];
    let line =
        sample(&rendered, "istio_requests_total", &ok).unwrap_or_else(|| panic!("{rendered}"));
    assert!(line.ends_with(" 3"), "{line}");
    let fault = sample(
        &rendered,
        "istio_requests_total",
        &["response_code=\"503\"", "response_flags=\"FI\""],
    );
    assert!(fault.is_some_and(|l| l.ends_with(" 1")), "{rendered}");
    let no_route = sample(
        &rendered,
        "istio_requests_total",
        &["response_code=\"404\"", "response_flags=\"NR\""],
    );
    assert!(no_route.is_some_and(|l| l.ends_with(" 1")), "{rendered}");
    // Three 200s, each 3 request bytes and 5 response bytes.
    for (metric, value) in [
        ("istio_request_bytes_sum", " 9"),
        ("istio_response_bytes_sum", " 15"),
        ("istio_response_bytes_count", " 3"),
    ] {
        let line = sample(&rendered, metric, &ok)
            .unwrap_or_else(|| panic!("{metric} missing:\n{rendered}"));
        assert!(line.ends_with(value), "{line}");
    }
    assert!(
        sample(&rendered, "istio_request_duration_milliseconds_count", &ok)
            .is_some_and(|l| l.ends_with(" 3")),
        "{rendered}"
    );

    // Upstream got a request id and the waypoint's span in the caller's trace.
    let sent = echo.0.lock().expect("lock").clone();
    assert_eq!(sent.len(), 3);
    for h in &sent {
        let id = h
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert_eq!(id.len(), 36, "{h:?}");
        let tp = h
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tp}"
        );
        assert!(!tp.contains("00f067aa0ba902b7"), "{tp}");
    }
}
