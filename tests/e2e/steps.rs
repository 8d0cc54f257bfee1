//! The e2e scenarios, in the order `e2e_scenarios` runs them; each step leaves the
//! mesh as the next expects it (namespace `shop` ambient from step one on, the
//! waypoint from `waypoint` on).

use std::time::{Duration, Instant};

use cairn_tests::{backend::Backend, pod_lab::sum_metric};

use crate::support::*;

/// What the steps share: addresses found at setup, the waypoint's pod once made.
pub struct Mesh {
    /// The reviews Service's cluster IP and port.
    pub reviews_vip: String,
    /// reviews-v1's pod IP and port (for clients outside the mesh).
    pub v1: String,
    /// The metric label selecting the client's connections.
    pub principal: String,
    pub waypoint_pod: String,
}

/// The app, Istio-style manifests and the dashboards' ConfigMaps applied; every pod
/// ready.
pub fn setup(lab: &mut dyn Backend) -> Mesh {
    lab.apply(&app(lab)).expect("app");
    // Manifests written for Istio apply unchanged (server-side dry run against
    // Cairn's CRDs), fields Cairn ignores included.
    lab.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: bookinfo}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n")
        .expect("namespaces");
    let examples =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/istio-examples.yaml");
    let accepted = lab
        .kubectl(&[
            "apply",
            "--dry-run=server",
            "-f",
            &examples.display().to_string(),
        ])
        .expect("Istio-style manifests accepted by Cairn's CRDs");
    println!(
        "E2E Istio-style manifests: {} objects accepted by the CRDs",
        accepted.lines().count()
    );
    // The dashboards' ConfigMaps, as shipped for Grafana's sidecar.
    let grafana = cairn_tests::workspace_root().join("deploy/grafana");
    lab.kubectl(&[
        "apply",
        "--dry-run=server",
        "-k",
        &grafana.display().to_string(),
    ])
    .expect("deploy/grafana applies");
    let mut ips = std::collections::HashMap::new();
    for (ns, name) in [
        (NS, "client"),
        (NS, "other"),
        ("legacy", "outsider"),
        (NS, "reviews-v1"),
        (NS, "reviews-v2"),
        (NS, "flaky"),
        (NS, "slow"),
    ] {
        ips.insert(name, lab.wait_pod(ns, name).expect("pod ready"));
    }
    Mesh {
        reviews_vip: format!("{}:9080", cluster_ip(lab, "reviews")),
        v1: format!("{}:9080", ips["reviews-v1"]),
        principal: format!("source_principal=\"{CLIENT}\""),
        waypoint_pod: String::new(),
    }
}

/// Labelling the namespace ambient turns its running pods' traffic into mTLS (the
/// destination ztunnel reports the client's principal); removing the label turns it
/// back; no pod restarts.
pub fn ambient(lab: &mut dyn Backend, m: &Mesh) {
    // 1. Not in the mesh yet: plain TCP, the ztunnels see nothing.
    let before = load(lab, NS, "client", &m.v1, "reviews", 50);
    assert_eq!(before.code("200"), 50, "{before:?}");
    assert_eq!(inbound(lab, 1, &[]), 0.0);
    let pods_before = uids(lab);
    lab.kubectl(&["label", "namespace", NS, "istio.io/dataplane-mode=ambient"])
        .expect("label");
    let took = eventually(
        lab,
        "shop's pods adopted on both nodes",
        Duration::from_secs(30),
        || adopted(lab, 0) >= 2.0 && adopted(lab, 1) >= 4.0,
    );
    println!(
        "E2E ambient label -> pods adopted in {:.2} s",
        took.as_secs_f64()
    );
    let meshed = load(lab, NS, "client", &m.reviews_vip, "reviews", 200);
    assert_eq!(meshed.code("200"), 200, "{meshed:?}\n{}", lab.logs());
    let mtls = inbound(lab, 1, &[&m.principal]);
    assert!(
        mtls >= 1.0,
        "node 2's ztunnel saw the client's principal\n{}",
        lab.metrics(1)
    );
    println!(
        "E2E mesh: 200/200 via the reviews VIP, v1 {} / v2 {} (L4 spread), {mtls} mTLS connections with the client's principal at the destination",
        meshed.version("v1"),
        meshed.version("v2")
    );
    assert!(
        meshed.version("v1") > 0 && meshed.version("v2") > 0,
        "spread over endpoints: {meshed:?}"
    );
    lab.kubectl(&["label", "namespace", NS, "istio.io/dataplane-mode-"])
        .expect("unlabel");
    eventually(lab, "shop's pods released", Duration::from_secs(30), || {
        adopted(lab, 0) == 0.0 && adopted(lab, 1) == 0.0
    });
    let plain = load(lab, NS, "client", &m.v1, "reviews", 50);
    assert_eq!(plain.code("200"), 50, "{plain:?}");
    assert_eq!(
        inbound(lab, 1, &[&m.principal]),
        mtls,
        "plaintext again: no new mTLS"
    );
    lab.kubectl(&["label", "namespace", NS, "istio.io/dataplane-mode=ambient"])
        .expect("label");
    eventually(
        lab,
        "shop's pods adopted again",
        Duration::from_secs(30),
        || adopted(lab, 0) >= 2.0 && adopted(lab, 1) >= 4.0,
    );
    assert_eq!(uids(lab), pods_before, "no pod was restarted");
}

/// AuthorizationPolicy DENY by principal; an ALLOW list admits only the listed.
pub fn authorization(lab: &mut dyn Backend, m: &Mesh) {
    // 2. AuthorizationPolicy: DENY by principal, then an ALLOW list.
    lab.apply(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-other, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{app: reviews}}}}\n  action: DENY\n  rules: [{{from: [{{source: {{principals: [cluster.local/ns/shop/sa/other]}}}}]}}]\n"
    ))
    .expect("deny");
    eventually(lab, "other denied", Duration::from_secs(20), || {
        load(lab, NS, "other", &m.reviews_vip, "reviews", 5).code("200") == 0
    });
    assert_eq!(
        load(lab, NS, "client", &m.reviews_vip, "reviews", 20).code("200"),
        20
    );
    lab.kubectl(&["-n", NS, "delete", "authorizationpolicy", "deny-other"])
        .expect("delete");
    lab.apply(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-client, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{app: reviews}}}}\n  action: ALLOW\n  rules: [{{from: [{{source: {{principals: [cluster.local/ns/shop/sa/client]}}}}]}}]\n"
    ))
    .expect("allow");
    eventually(lab, "only client allowed", Duration::from_secs(20), || {
        load(lab, NS, "other", &m.reviews_vip, "reviews", 5).code("200") == 0
            && load(lab, NS, "client", &m.reviews_vip, "reviews", 5).code("200") == 5
    });
    lab.kubectl(&["-n", NS, "delete", "authorizationpolicy", "allow-client"])
        .expect("delete");
    eventually(lab, "other allowed again", Duration::from_secs(20), || {
        load(lab, NS, "other", &m.reviews_vip, "reviews", 5).code("200") == 5
    });
    println!("E2E authorization: DENY by principal blocks other, ALLOW list admits only client");
}

/// What Cairn cannot apply is said in the object's status.
pub fn policy_status(lab: &mut dyn Backend, m: &Mesh) {
    // What Cairn cannot apply is said on the object: L7 rules ztunnel cannot enforce
    // (no waypoint yet), and a policy the decoder rejects.
    lab.apply(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: l7-at-l4, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{app: reviews}}}}\n  action: ALLOW\n  rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: with-delegate, namespace: {NS}}}\nspec:\n  hosts: [reviews]\n  http:\n  - delegate: {{name: reviews-routes}}\n    route: [{{destination: {{host: reviews}}}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: two-stars, namespace: {NS}}}\nspec:\n  action: DENY\n  rules: [{{from: [{{source: {{principals: [\"*a*\"]}}}}]}}]\n"
    ))
    .expect("policies with problems");
    let took = eventually(
        lab,
        "both policies' status written",
        Duration::from_secs(20),
        || {
            condition(lab, "authorizationpolicy", "l7-at-l4").1 == "PartiallyApplied"
                && condition(lab, "authorizationpolicy", "two-stars").1 == "Invalid"
        },
    );
    let (status, _, message) = condition(lab, "authorizationpolicy", "l7-at-l4");
    assert!(status == "True" && message.contains("L7"), "{message}");
    let (status, _, message) = condition(lab, "authorizationpolicy", "two-stars");
    assert!(
        status == "False" && message.contains("not in force"),
        "{message}"
    );
    eventually(
        lab,
        "the ignored field reported",
        Duration::from_secs(20),
        || {
            condition(lab, "virtualservice", "with-delegate")
                .2
                .contains("delegate")
        },
    );
    lab.kubectl(&["-n", NS, "delete", "virtualservice", "with-delegate"])
        .expect("delete");
    println!(
        "E2E policy status: L7 rules at L4 and an ignored field -> Accepted/PartiallyApplied, a rejected policy -> Accepted=False/Invalid, within {:.2} s",
        took.as_secs_f64()
    );
    lab.kubectl(&[
        "-n",
        NS,
        "delete",
        "authorizationpolicy",
        "l7-at-l4",
        "two-stars",
    ])
    .expect("delete");
    eventually(lab, "other allowed again", Duration::from_secs(20), || {
        load(lab, NS, "other", &m.reviews_vip, "reviews", 5).code("200") == 5
    });
}

/// PeerAuthentication STRICT refuses a client outside the mesh; PERMISSIVE admits it.
pub fn peer_authentication(lab: &mut dyn Backend, m: &Mesh) {
    // 3. PeerAuthentication: a pod outside the mesh dials a pod IP directly.
    assert_eq!(
        load(lab, "legacy", "outsider", &m.v1, "reviews", 10).code("200"),
        10
    );
    lab.apply(&format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: strict, namespace: {NS}}}\nspec:\n  mtls: {{mode: STRICT}}\n"
    ))
    .expect("strict");
    eventually(
        lab,
        "STRICT refuses plaintext",
        Duration::from_secs(20),
        || load(lab, "legacy", "outsider", &m.v1, "reviews", 5).code("200") == 0,
    );
    assert_eq!(
        load(lab, NS, "client", &m.reviews_vip, "reviews", 20).code("200"),
        20
    );
    lab.kubectl(&["-n", NS, "delete", "peerauthentication", "strict"])
        .expect("delete");
    eventually(
        lab,
        "PERMISSIVE admits plaintext",
        Duration::from_secs(20),
        || load(lab, "legacy", "outsider", &m.v1, "reviews", 5).code("200") == 5,
    );
    println!("E2E peer authentication: STRICT refuses the outsider, PERMISSIVE admits it");
}

/// `cairn waypoint apply --kube --enroll-namespace --wait` brings up the waypoint's
/// Deployment and the client's traffic goes through it.
pub fn waypoint(lab: &mut dyn Backend, m: &mut Mesh) {
    // 4. A waypoint, declared with the CLI against the API server.
    let started = Instant::now();
    let out = lab
        .cairn(&[
            "waypoint",
            "apply",
            "-n",
            NS,
            "--enroll-namespace",
            "--wait",
            "--timeout",
            "90",
        ])
        .expect("cairn");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "cairn waypoint apply: {said}\n{}",
        lab.logs()
    );
    assert!(said.contains("Programmed"), "{said}");
    println!(
        "E2E cairn waypoint apply --wait: Programmed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    eventually(
        lab,
        "the waypoint Deployment ready",
        Duration::from_secs(30),
        || {
            lab.kubectl(&[
                "-n",
                NS,
                "get",
                "deployment",
                "waypoint",
                "-o",
                "jsonpath={.status.readyReplicas}",
            ])
            .is_ok_and(|r| r == "1")
        },
    );
    m.waypoint_pod = lab
        .kubectl(&[
            "-n",
            NS,
            "get",
            "pods",
            "-l",
            "gateway.networking.k8s.io/gateway-name=waypoint",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])
        .expect("waypoint pod");
    let to_waypoint = format!("destination_principal=\"{WAYPOINT}\"");
    let via_waypoint = || {
        sum_metric(
            &lab.metrics(0),
            "istio_tcp_connections_opened_total",
            &["reporter=\"source\"", &m.principal, &to_waypoint],
        )
    };
    eventually(
        lab,
        "client traffic through the waypoint",
        Duration::from_secs(30),
        || {
            load(lab, NS, "client", &m.reviews_vip, "reviews", 10).code("200") == 10
                && via_waypoint() > 0.0
        },
    );
}

/// Canary weights, a fault abort, retries, a timeout; then every reviews request to v1.
pub fn l7(lab: &mut dyn Backend, m: &Mesh) {
    // 5. L7: canary, abort, retries, timeout.
    lab.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: {NS}}}\nspec:\n  host: reviews\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: {NS}}}\nspec:\n  hosts: [reviews]\n  http:\n  - name: canary\n    route:\n    - {{destination: {{host: reviews, subset: v1}}, weight: 80}}\n    - {{destination: {{host: reviews, subset: v2}}, weight: 20}}\n"
    ))
    .expect("canary");
    rule_at_waypoint(
        lab,
        &m.waypoint_pod,
        "shop/reviews/canary",
        Duration::from_secs(20),
    );
    let canary = load(lab, NS, "client", &m.reviews_vip, "reviews", 4000);
    assert_eq!(canary.code("200"), 4000, "{canary:?}");
    let v2 = share(canary.version("v2"), canary.requests());
    println!("E2E canary 80/20: v2 {v2:.1}% of 4000");
    assert!(
        (v2 - 20.0).abs() <= 3.0,
        "80/20 within 3 points: {canary:?}"
    );

    lab.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: {NS}}}\nspec:\n  hosts: [reviews]\n  http:\n  - name: abort\n    fault: {{abort: {{httpStatus: 503, percentage: {{value: 50}}}}}}\n    route:\n    - {{destination: {{host: reviews, subset: v1}}}}\n"
    ))
    .expect("abort");
    rule_at_waypoint(
        lab,
        &m.waypoint_pod,
        "shop/reviews/abort",
        Duration::from_secs(20),
    );
    let abort = load(lab, NS, "client", &m.reviews_vip, "reviews", 2000);
    let aborted = share(abort.code("503"), abort.requests());
    println!("E2E fault abort 50%: {aborted:.1}% 503 of 2000");
    assert!((aborted - 50.0).abs() <= 5.0, "{abort:?}");
    assert_eq!(abort.code("503") + abort.code("200"), 2000, "{abort:?}");

    let flaky_vip = format!("{}:9080", cluster_ip(lab, "flaky"));
    // One request at a time: the pod fails every third attempt, so one retry always
    // suffices.
    let unretried = load_with(lab, (NS, "client"), &flaky_vip, "flaky", 150, 1);
    let failing = share(unretried.code("500"), unretried.requests());
    assert!(
        failing >= 25.0,
        "the flaky pod fails without retries: {unretried:?}"
    );
    lab.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: flaky, namespace: {NS}}}\nspec:\n  hosts: [flaky]\n  http:\n  - name: retries\n    retries: {{attempts: 3, retryOn: 5xx}}\n    route:\n    - {{destination: {{host: flaky}}}}\n"
    ))
    .expect("retries");
    rule_at_waypoint(
        lab,
        &m.waypoint_pod,
        "shop/flaky/retries",
        Duration::from_secs(20),
    );
    let retried = load_with(lab, (NS, "client"), &flaky_vip, "flaky", 150, 1);
    println!(
        "E2E retries: flaky pod {failing:.0}% 500 without, {} of 150 OK with attempts 3",
        retried.code("200")
    );
    assert_eq!(retried.code("200"), 150, "{retried:?}");

    let slow_vip = format!("{}:9080", cluster_ip(lab, "slow"));
    lab.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: slow, namespace: {NS}}}\nspec:\n  hosts: [slow]\n  http:\n  - name: timeout\n    timeout: 300ms\n    route:\n    - {{destination: {{host: slow}}}}\n"
    ))
    .expect("timeout");
    rule_at_waypoint(
        lab,
        &m.waypoint_pod,
        "shop/slow/timeout",
        Duration::from_secs(20),
    );
    let timed_out = load(lab, NS, "client", &slow_vip, "slow", 8);
    println!(
        "E2E timeout 300 ms on a 1.5 s backend: {} of 8 answered 504",
        timed_out.code("504")
    );
    assert_eq!(timed_out.code("504"), 8, "{timed_out:?}");

    // The abort is done with: every reviews request to v1 from here on.
    lab.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: {NS}}}\nspec:\n  hosts: [reviews]\n  http:\n  - name: all-v1\n    route:\n    - {{destination: {{host: reviews, subset: v1}}}}\n"
    ))
    .expect("all to v1");
    rule_at_waypoint(
        lab,
        &m.waypoint_pod,
        "shop/reviews/all-v1",
        Duration::from_secs(20),
    );
}

/// A ztunnel restart: nothing in plaintext meanwhile, pods re-adopted.
pub fn ztunnel_restart(lab: &mut dyn Backend, m: &Mesh) {
    // 6. ztunnel restart on the client's node: while it is gone the client's
    // connections fail (captured, nothing listens), never plaintext; then re-adopted.
    lab.delete_ztunnel(0).expect("delete the ztunnel pod");
    let during = load(lab, NS, "client", &m.v1, "reviews", 10);
    assert_eq!(
        during.code("200"),
        0,
        "no plaintext escape while ztunnel is down: {during:?}"
    );
    let restarted = Instant::now();
    lab.restore_ztunnel(0).expect("ztunnel pod");
    lab.wait_ztunnel_connected(0).expect("connected");
    eventually(
        lab,
        "client node's pods re-adopted",
        Duration::from_secs(30),
        || adopted(lab, 0) >= 2.0,
    );
    let adopted_in = restarted.elapsed();
    let after = load(lab, NS, "client", &m.reviews_vip, "reviews", 50);
    assert_eq!(after.code("200"), 50, "{after:?}");
    println!(
        "E2E ztunnel restart: {} of 10 requests failed while it was down (none in plaintext), pods re-adopted {:.2} s after the new pod was created",
        10 - during.code("200"),
        adopted_in.as_secs_f64()
    );
}

/// A controller restart: the last config kept, then a change made meanwhile arrives.
pub fn controller_restart(lab: &mut dyn Backend, m: &Mesh) {
    // 7. Controller restart: the proxies keep their config; once back, a change
    // made while it was down arrives.
    lab.stop_controller().expect("stop the controller");
    let kept = load(lab, NS, "client", &m.reviews_vip, "reviews", 50);
    assert_eq!(
        (kept.code("200"), kept.version("v1")),
        (50, 50),
        "last good config (all to v1) while the controller is down: {kept:?}"
    );
    lab.kubectl(&["-n", NS, "delete", "virtualservice", "reviews"])
        .expect("delete vs");
    let restarted = Instant::now();
    lab.start_controller().expect("controller");
    for i in 0..2 {
        lab.wait_ztunnel_connected(i).expect("reconnected");
    }
    eventually(
        lab,
        "the deleted route gone at the waypoint",
        Duration::from_secs(30),
        || !waypoint_dump(lab, &m.waypoint_pod).contains("shop/reviews/all-v1"),
    );
    println!(
        "E2E controller restart: 50 of 50 OK while it was down; a change made meanwhile reached the waypoint {:.2} s after it started",
        restarted.elapsed().as_secs_f64()
    );
    let healed = load(lab, NS, "client", &m.reviews_vip, "reviews", 100);
    assert_eq!(healed.code("200"), 100, "{healed:?}");
    assert!(
        healed.version("v2") > 0,
        "no route pins v1 any more: {healed:?}"
    );
}

/// An API-server restart (where the backend can): traffic unaffected, later changes arrive.
pub fn apiserver_restart(lab: &mut dyn Backend, m: &Mesh) {
    // API-server restart (SIGKILL): nothing dropped, a change after it arrives.
    if !lab.restart_apiserver().expect("API server restart") {
        println!(
            "E2E API-server restart: not supported on {}",
            lab.describe()
        );
        return;
    }
    let kept = load(lab, NS, "client", &m.reviews_vip, "reviews", 50);
    assert_eq!(kept.code("200"), 50, "{kept:?}");
    let applied = Instant::now();
    lab.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: {NS}}}\nspec:\n  hosts: [reviews]\n  http:\n  - name: all-v2\n    route:\n    - {{destination: {{host: reviews, subset: v2}}}}\n"
    ))
    .expect("a route after the API-server restart");
    rule_at_waypoint(
        lab,
        &m.waypoint_pod,
        "shop/reviews/all-v2",
        Duration::from_secs(60),
    );
    let took = applied.elapsed();
    let v2 = load(lab, NS, "client", &m.reviews_vip, "reviews", 50);
    assert_eq!(v2.version("v2"), 50, "{v2:?}");
    println!(
        "E2E API-server restart (SIGKILL): traffic unaffected; a route applied after it served within {:.2} s",
        took.as_secs_f64()
    );
}
