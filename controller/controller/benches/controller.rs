//! Controller scale benchmark: 10,000 pods, 2,000 services, 500 policies.
//!
//! Reports full compile time, the time from one pod change to its delta being queued
//! for 100 subscribers, how many resources that change sends, and RSS — each beside a
//! baseline measured in the same run (these machines are shared and noisy).
//!
//! `cargo bench -p cairn-controller --bench controller -- --bench` runs it at full
//! scale (what `cargo xtask bench controller` does); under `cargo test` it runs a small
//! smoke version so the harness itself stays tested.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use cairn_controller::{
    compile::{self, MeshConfig},
    decode::decode_value,
    resources::{Kind, ObjectRef},
    runtime::Runtime,
    xds::Cache,
};
use prost::Message;
use serde_json::json;

struct Scale {
    namespaces: usize,
    pods: usize,
    services: usize,
    policies: usize,
    subscribers: usize,
    samples: usize,
}

const FULL: Scale = Scale {
    namespaces: 50,
    pods: 10_000,
    services: 2_000,
    policies: 500,
    subscribers: 100,
    samples: 200,
};

const SMOKE: Scale = Scale {
    namespaces: 2,
    pods: 40,
    services: 8,
    policies: 4,
    subscribers: 3,
    samples: 5,
};

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn pod(i: usize, scale: &Scale, version: &str) -> serde_json::Value {
    let ns = format!("ns-{}", i % scale.namespaces);
    let svcs_per_ns = (scale.services / scale.namespaces).max(1);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("pod-{i}"), "namespace": ns,
            "labels": {"app": format!("svc-{}", (i / scale.namespaces) % svcs_per_ns), "version": version, "tier": if i.is_multiple_of(2) { "web" } else { "db" }},
        },
        "spec": {
            "nodeName": format!("node-{}", i % 20),
            "serviceAccountName": format!("sa-{}", i % 7),
            "containers": [{"name": "app", "image": "cairn/test-app", "ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": {
            "phase": "Running",
            "podIP": format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    })
}

fn objects(scale: &Scale) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for n in 0..scale.namespaces {
        out.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("ns-{n}"), "labels": {"istio.io/dataplane-mode": "ambient"}}}));
    }
    for n in 0..20 {
        out.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{n}"), "labels": {"topology.kubernetes.io/zone": format!("zone-{}", n % 3)}}}));
    }
    for i in 0..scale.pods {
        out.push(pod(i, scale, "v1"));
    }
    let per_ns = (scale.services / scale.namespaces).max(1);
    for s in 0..scale.services {
        out.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{}", s / scale.namespaces), "namespace": format!("ns-{}", s % scale.namespaces)},
            "spec": {
                "clusterIP": format!("10.96.{}.{}", (s >> 8) & 255, s & 255),
                "selector": {"app": format!("svc-{}", (s / scale.namespaces) % per_ns)},
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}, {"name": "grpc", "port": 9090, "targetPort": 9090}],
            },
        }));
    }
    for p in 0..scale.policies {
        let ns = format!("ns-{}", p % scale.namespaces);
        let spec = match p % 4 {
            0 => {
                json!({"selector": {"matchLabels": {"tier": "db"}}, "rules": [{"from": [{"source": {"principals": [format!("cluster.local/ns/{ns}/sa/sa-1")]}}], "to": [{"operation": {"ports": ["5432"]}}]}]})
            }
            1 => {
                json!({"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["203.0.113.0/24"]}}]}]})
            }
            2 => {
                json!({"selector": {"matchLabels": {"app": format!("svc-{}", p % per_ns)}}, "rules": [{"from": [{"source": {"namespaces": [ns.clone()]}}]}]})
            }
            _ => json!({"rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}]}]}),
        };
        out.push(json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": format!("policy-{p}"), "namespace": ns}, "spec": spec}));
    }
    out
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full { FULL } else { SMOKE };
    let rss_start = rss_kib("VmRSS:");
    let mesh = MeshConfig::default();

    // Decode (what the local source does per document), then fill the store.
    let values = objects(&scale);
    let t = Instant::now();
    let decoded: Vec<_> = values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            decode_value(i, v)
                .expect("generated object is valid")
                .object
        })
        .collect();
    let decode_time = t.elapsed();
    let runtime = Arc::new(Runtime::new(mesh.clone(), Arc::new(Cache::default())));
    {
        let mut store = runtime.store().write().expect("store");
        for o in decoded {
            store.apply(o);
        }
    }

    // Full compile (pure function), 5 runs; baseline: encoding its output to protobuf.
    let store = runtime.store().read().expect("store").clone();
    let mut compile_times = Vec::new();
    let mut compiled = compile::compile(&store, &mesh);
    for _ in 0..5 {
        let t = Instant::now();
        compiled = compile::compile(&store, &mesh);
        compile_times.push(t.elapsed());
    }
    let t = Instant::now();
    let encoded: usize = compiled
        .addresses
        .values()
        .map(|a| a.encoded_len())
        .sum::<usize>()
        + compiled
            .authorizations
            .values()
            .map(|a| a.encoded_len())
            .sum::<usize>();
    let _bytes: Vec<Vec<u8>> = compiled
        .addresses
        .values()
        .map(|a| a.encode_to_vec())
        .chain(compiled.authorizations.values().map(|a| a.encode_to_vec()))
        .collect();
    let encode_time = t.elapsed();
    let full_compile = median(compile_times);
    drop(store);

    // Publish everything, then attach subscribers.
    let t = Instant::now();
    let all: Vec<ObjectRef> = Kind::ALL
        .iter()
        .flat_map(|k| {
            runtime
                .store()
                .read()
                .expect("store")
                .refs_of_kind(*k)
                .collect::<Vec<_>>()
        })
        .collect();
    let initial = runtime.publish(&all);
    let initial_publish = t.elapsed();
    let subs: Vec<_> = (0..scale.subscribers)
        .map(|_| runtime.cache().subscribe())
        .collect();

    // One pod change -> delta queued for every subscriber.
    let mut one_pod = Vec::new();
    let mut sent = Vec::new();
    for s in 0..scale.samples {
        let i = (s * 7919) % scale.pods;
        let changed = decode_value(0, pod(i, &scale, &format!("v{}", s + 2)))
            .expect("valid")
            .object;
        let r = changed.object_ref();
        for sub in &subs {
            let _ = sub.pending_len();
        }
        let t = Instant::now();
        runtime.store().write().expect("store").apply(changed);
        let stats = runtime.publish(std::slice::from_ref(&r));
        one_pod.push(t.elapsed());
        sent.push(stats.updated + stats.removed);
        assert_eq!(stats.subscribers, scale.subscribers);
    }
    let queued: usize = subs.iter().map(|s| s.pending_len()).max().unwrap_or(0);
    let rss_end = rss_kib("VmRSS:");
    let hwm = rss_kib("VmHWM:");

    let one = median(one_pod.clone());
    let sent_max = sent.iter().max().copied().unwrap_or(0);
    println!("<!-- controller:begin -->");
    println!(
        "Scale: {} pods, {} services, {} authorization policies, {} namespaces, {} subscribers; {} resources ({} bytes encoded).\n",
        scale.pods,
        scale.services,
        scale.policies,
        scale.namespaces,
        scale.subscribers,
        compiled.addresses.len() + compiled.authorizations.len(),
        encoded
    );
    println!("| figure | value | baseline (same run) | ratio | goal |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| full compile (median of 5) | {} | protobuf encode of the output: {} | {:.1}x | <= 1 s |",
        ms(full_compile),
        ms(encode_time),
        full_compile.as_secs_f64() / encode_time.as_secs_f64().max(1e-9),
    );
    println!(
        "| one pod change -> delta queued for {} subscribers (median / p99 of {}) | {} / {} | full compile: {} | {:.4}x | <= 10 ms |",
        scale.subscribers,
        scale.samples,
        ms(one),
        ms(p99(one_pod)),
        ms(full_compile),
        one.as_secs_f64() / full_compile.as_secs_f64().max(1e-9),
    );
    println!(
        "| resources sent for one pod change (max over samples) | {sent_max} | all resources: {} | {:.5}x | O(1) |",
        initial.updated,
        sent_max as f64 / initial.updated.max(1) as f64,
    );
    println!(
        "| backlog per subscriber after {} changes (names, coalesced) | {queued} | changes made: {} | - | bounded |",
        scale.samples, scale.samples
    );
    println!(
        "| controller RSS (peak) | {:.1} MiB | at start: {:.1} MiB | {:.1}x | <= 300 MB |",
        hwm as f64 / 1024.0,
        rss_start as f64 / 1024.0,
        hwm as f64 / rss_start.max(1) as f64,
    );
    println!(
        "| decode of every manifest | {} | - | - | - |\n| initial incremental publish of everything | {} | full compile: {} | {:.1}x | - |",
        ms(decode_time),
        ms(initial_publish),
        ms(full_compile),
        initial_publish.as_secs_f64() / full_compile.as_secs_f64().max(1e-9),
    );
    println!("\nRSS now: {:.1} MiB.", rss_end as f64 / 1024.0);
    println!("<!-- controller:end -->");
    assert!(sent_max <= 1, "one pod change must send one resource");
}
