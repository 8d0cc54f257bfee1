//! Kubernetes mode: each waypoint Gateway (class `istio-waypoint`) becomes a
//! ServiceAccount, a Deployment and a Service of the same name in its namespace, plus
//! the mesh root ConfigMap the waypoint pods mount, all owned by the Gateway; the
//! Gateway's status gets `Accepted` / `Programmed` and its address
//! ([`crate::waypoint::status`], the same as `cairn waypoint status` in local mode).
//!
//! [`desired`] is pure; [`run`] applies it with server-side apply (field manager
//! `cairn-controller`) whenever the store changes, writing only what changed since
//! its last successful write.

use std::{collections::HashMap, sync::Arc, time::Duration};

use kube::{
    Client,
    api::{Api, ApiResource, DynamicObject, Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::{
    compile::{
        waypoint::{GATEWAY_NAME_LABEL, USE_WAYPOINT},
        workload::DATAPLANE_MODE,
    },
    resources::{Kind, gateway::WAYPOINT_CLASS},
    runtime::SharedStore,
    waypoint,
};

const FIELD_MANAGER: &str = "cairn-controller";
/// The root ConfigMap's name in every waypoint namespace (as in `cairn-system`).
pub const ROOT_CONFIGMAP: &str = crate::ca_secret::ROOT_CONFIGMAP;

/// What waypoint pods are started with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub image: String,
    /// The controller as waypoints reach it (`https://host:port`) and the name on its
    /// serving certificate.
    pub controller: String,
    pub controller_name: String,
    pub trust_domain: String,
    /// The mesh root (PEM), published next to each waypoint.
    pub root_pem: String,
}

/// The objects waypoint `namespace/name` (Gateway uid `uid`) needs.
pub fn desired(namespace: &str, name: &str, uid: &str, s: &Settings) -> Vec<Value> {
    let owner = json!([{
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "name": name, "uid": uid, "controller": true,
    }]);
    let labels = json!({
        GATEWAY_NAME_LABEL: name,
        "app.kubernetes.io/managed-by": "cairn",
        USE_WAYPOINT: "none",
    });
    let meta = |kind_labels: Value| json!({"name": name, "namespace": namespace, "labels": kind_labels, "ownerReferences": owner});
    let identity = format!("spiffe://{}/ns/{namespace}/sa/{name}", s.trust_domain);
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(labels.clone())}),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": ROOT_CONFIGMAP, "namespace": namespace,
                            "labels": {"app.kubernetes.io/part-of": "cairn"}},
               "data": {"root-cert.pem": s.root_pem}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": meta(labels.clone()),
               "spec": {"selector": {GATEWAY_NAME_LABEL: name},
                        "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008, "appProtocol": "hbone"}]}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(labels),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
            "template": {
                "metadata": {
                    "labels": {GATEWAY_NAME_LABEL: name, DATAPLANE_MODE: "none", USE_WAYPOINT: "none"},
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "15020"},
                },
                "spec": {
                    "serviceAccountName": name,
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "waypoint",
                        "image": s.image,
                        "env": [
                            {"name": "CAIRN_IDENTITY", "value": identity},
                            {"name": "CAIRN_CONTROLLER", "value": s.controller},
                            {"name": "CAIRN_CONTROLLER_NAME", "value": s.controller_name},
                            {"name": "CAIRN_ROOT_CERT", "value": "/var/run/cairn/root/root-cert.pem"},
                            {"name": "CAIRN_TOKEN_FILE", "value": "/var/run/secrets/tokens/istio-token"},
                        ],
                        "ports": [{"name": "mesh", "containerPort": 15008},
                                  {"name": "admin", "containerPort": 15020}],
                        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15020},
                                           "periodSeconds": 2},
                        "resources": {"requests": {"cpu": "100m", "memory": "32Mi"},
                                      "limits": {"memory": "256Mi"}},
                        "securityContext": {"allowPrivilegeEscalation": false,
                                            "readOnlyRootFilesystem": true,
                                            "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [
                            {"name": "root-cert", "mountPath": "/var/run/cairn/root", "readOnly": true},
                            {"name": "token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        {"name": "root-cert", "configMap": {"name": ROOT_CONFIGMAP}},
                        {"name": "token", "projected": {"sources": [{"serviceAccountToken":
                            {"audience": crate::token_review::AUDIENCE, "expirationSeconds": 43200, "path": "istio-token"}}]}},
                    ],
                },
            },
        }}),
    ]
}

/// The Gateway `status` for a computed waypoint status.
pub fn status_patch(status: &waypoint::Status, generation: Option<i64>, now: &str) -> Value {
    let conditions: Vec<Value> = status
        .conditions
        .iter()
        .map(|c| {
            json!({"type": c.type_, "status": if c.status { "True" } else { "False" },
                   "reason": c.reason, "message": c.message,
                   "lastTransitionTime": now, "observedGeneration": generation})
        })
        .collect();
    let addresses: Vec<Value> = status
        .address
        .iter()
        .map(|a| json!({"type": "IPAddress", "value": a}))
        .collect();
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
           "status": {"conditions": conditions, "addresses": addresses}})
}

fn api_for(client: &Client, obj: &Value) -> Option<(Api<DynamicObject>, String)> {
    let api_version = obj.get("apiVersion")?.as_str()?;
    let kind = obj.get("kind")?.as_str()?;
    let namespace = obj.pointer("/metadata/namespace")?.as_str()?;
    let name = obj.pointer("/metadata/name")?.as_str()?.to_owned();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let plural = match kind {
        "ServiceAccount" => "serviceaccounts",
        "ConfigMap" => "configmaps",
        "Service" => "services",
        "Deployment" => "deployments",
        _ => return None,
    };
    let ar = ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: api_version.into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    Some((Api::namespaced_with(client.clone(), namespace, &ar), name))
}

/// A key for the last-written cache: kind/namespace/name.
fn key(obj: &Value) -> String {
    let get = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or_default();
    format!(
        "{}/{}/{}",
        get("/kind"),
        get("/metadata/namespace"),
        get("/metadata/name")
    )
}

/// One pass: every waypoint Gateway's objects and status, written where they differ
/// from the last successful write. Returns how many writes were made.
async fn reconcile(
    client: &Client,
    store: &SharedStore,
    settings: &Settings,
    written: &mut HashMap<String, Value>,
) -> usize {
    // (namespace, name, uid, generation, status) of each waypoint, read under the lock.
    let waypoints: Vec<(String, String, String, Option<i64>, waypoint::Status)> = {
        let store = store.read().unwrap_or_else(|e| e.into_inner());
        store
            .of_kind(Kind::Gateway)
            .filter_map(|o| match o {
                crate::resources::Object::Gateway(g) => Some(g.clone()),
                _ => None,
            })
            .filter(|g| g.spec.gateway_class_name == WAYPOINT_CLASS)
            .filter_map(|g| {
                let ns = g.metadata.namespace.clone()?;
                let name = g.metadata.name.clone()?;
                let uid = g.metadata.uid.clone()?;
                let status = waypoint::status(&store, &ns, &name).ok()?;
                Some((ns, name, uid, g.metadata.generation, status))
            })
            .collect()
    };
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let mut writes = 0;
    for (ns, name, uid, generation, status) in waypoints {
        for obj in desired(&ns, &name, &uid, settings) {
            let k = key(&obj);
            if written.get(&k) == Some(&obj) {
                continue;
            }
            let Some((api, obj_name)) = api_for(client, &obj) else {
                continue;
            };
            match api.patch(&obj_name, &apply, &Patch::Apply(&obj)).await {
                Ok(_) => {
                    info!(waypoint = %format!("{ns}/{name}"), object = %k, "applied");
                    written.insert(k, obj);
                    writes += 1;
                }
                Err(e) => {
                    warn!(waypoint = %format!("{ns}/{name}"), object = %k, error = %e, "cannot apply; retrying on the next change")
                }
            }
        }
        // The status, without a timestamp in the comparison (it would always differ).
        let skey = format!("status/{ns}/{name}");
        let compare = status_patch(&status, generation, "");
        if written.get(&skey) == Some(&compare) {
            continue;
        }
        let now = utc_now();
        let patch = status_patch(&status, generation, &now);
        let api: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            &ns,
            &crate::kubernetes::api_resource(Kind::Gateway),
        );
        match api.patch_status(&name, &apply, &Patch::Apply(&patch)).await {
            Ok(_) => {
                info!(waypoint = %format!("{ns}/{name}"), programmed = status.programmed(), address = ?status.address, "status written");
                written.insert(skey, compare);
                writes += 1;
            }
            Err(e) => {
                warn!(waypoint = %format!("{ns}/{name}"), error = %e, "cannot write status; retrying on the next change")
            }
        }
    }
    writes
}

/// RFC 3339 UTC, second precision (what `metav1.Time` holds).
fn utc_now() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

/// While `leader` is true, reconciles on every `changed` notification (and every
/// 30 s, which retries failed writes) until `shutdown` turns true.
pub async fn run(
    client: Client,
    store: SharedStore,
    settings: Settings,
    changed: Arc<Notify>,
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut written = HashMap::new();
    loop {
        let leading = *leader.borrow();
        if leading {
            reconcile(&client, &store, &settings, &mut written).await;
        }
        tokio::select! {
            lead = leader.changed() => {
                if lead.is_err() {
                    return;
                }
                // A new term starts from what the cluster holds, not from memory.
                written.clear();
            }
            _ = changed.notified() => {
                // Let a burst of changes settle into one pass.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ = tokio::time::sleep(Duration::from_secs(30)) => {
                // Forget what was written: objects edited or deleted behind our back
                // are put back.
                written.clear();
            }
            stop = shutdown.changed() => {
                if stop.is_err() || *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            image: "cairn/waypoint:test".into(),
            controller: "https://cairn-controller.cairn-system.svc:15012".into(),
            controller_name: "cairn-controller.cairn-system.svc".into(),
            trust_domain: "cluster.local".into(),
            root_pem: "ROOT".into(),
        }
    }

    #[test]
    fn a_waypoint_gets_its_account_service_deployment_and_root_owned_by_the_gateway() {
        let objs = desired("shop", "waypoint", "uid-1", &settings());
        let kinds: Vec<&str> = objs.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            ["ServiceAccount", "ConfigMap", "Service", "Deployment"]
        );
        for o in &objs {
            assert_eq!(o["metadata"]["namespace"], "shop");
            if o["kind"] != "ConfigMap" {
                assert_eq!(o["metadata"]["ownerReferences"][0]["uid"], "uid-1");
                assert_eq!(o["metadata"]["labels"][GATEWAY_NAME_LABEL], "waypoint");
            }
        }
        let pod = &objs[3]["spec"]["template"];
        // Never captured, never sent to a waypoint itself, its own identity.
        assert_eq!(pod["metadata"]["labels"][DATAPLANE_MODE], "none");
        assert_eq!(pod["spec"]["serviceAccountName"], "waypoint");
        let env = pod["spec"]["containers"][0]["env"].as_array().expect("env");
        assert!(env.iter().any(|e| e["name"] == "CAIRN_IDENTITY"
            && e["value"] == "spiffe://cluster.local/ns/shop/sa/waypoint"));
        assert_eq!(objs[1]["data"]["root-cert.pem"], "ROOT");
        assert_eq!(objs[2]["spec"]["ports"][0]["port"], 15008);
    }

    #[test]
    fn status_reports_conditions_and_address() {
        let status = waypoint::Status {
            conditions: [
                waypoint::Condition {
                    type_: "Accepted",
                    status: true,
                    reason: "Accepted",
                    message: "ok".into(),
                },
                waypoint::Condition {
                    type_: "Programmed",
                    status: false,
                    reason: "NoReadyPods",
                    message: "none".into(),
                },
            ],
            address: Some("10.96.0.9".into()),
        };
        let p = status_patch(&status, Some(3), "2026-12-03T00:00:00Z");
        assert_eq!(p["status"]["conditions"][0]["status"], "True");
        assert_eq!(p["status"]["conditions"][1]["reason"], "NoReadyPods");
        assert_eq!(p["status"]["conditions"][1]["observedGeneration"], 3);
        assert_eq!(p["status"]["addresses"][0]["value"], "10.96.0.9");
    }
}
