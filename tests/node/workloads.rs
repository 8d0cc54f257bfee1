//! The local cluster has no kube-controller-manager nor scheduler: with
//! `--run-deployments`, one node's agent stands in for both, for Deployments only.
//! Each Deployment gets `spec.replicas` pods (default 1) made from its template,
//! bound to this node, owned by the Deployment (controller reference); pods of a
//! changed template are replaced, extra pods and pods of deleted Deployments are
//! deleted (the garbage collector's job), and the Deployment's status counts the
//! ready ones. That is what `cairn`'s waypoint reconciler needs to see its
//! Deployment come up. No ReplicaSets, no rolling updates, no spreading over nodes.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use anyhow::{Context, Result};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Pod, PodSpec},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use tracing::{info, warn};

/// The label carrying a hash of the template a pod was made from.
const TEMPLATE_HASH: &str = "pod-template-hash";

/// Reconciles every Deployment every `period` until the process ends.
pub async fn run(client: Client, node: String, period: Duration) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        if let Err(e) = reconcile_all(&client, &node).await {
            warn!(
                error = format!("{e:#}"),
                "deployments: reconcile failed; retrying"
            );
        }
    }
}

fn template_hash(spec: &Option<PodSpec>, labels: &Option<BTreeMap<String, String>>) -> String {
    // FNV-1a: stable across builds (a restarted agent must compute the same).
    let text = serde_json::to_string(&(spec, labels)).unwrap_or_default();
    let hash = text.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{hash:08x}")
}

/// The owning Deployment's uid, if `pod` is one of ours.
fn owner(pod: &Pod) -> Option<&str> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "Deployment" && o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn reconcile_all(client: &Client, node: &str) -> Result<()> {
    let deployments: Api<Deployment> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client.clone());
    let deployments = deployments
        .list(&ListParams::default())
        .await
        .context("listing deployments")?;
    let all_pods = pods
        .list(&ListParams::default())
        .await
        .context("listing pods")?;
    let mut owned: HashMap<String, Vec<Pod>> = HashMap::new();
    for pod in all_pods.items {
        if let Some(uid) = owner(&pod) {
            owned.entry(uid.to_owned()).or_default().push(pod);
        }
    }
    for d in &deployments.items {
        let uid = d.metadata.uid.clone().unwrap_or_default();
        let pods = owned.remove(&uid).unwrap_or_default();
        if let Err(e) = reconcile(client, node, d, pods).await {
            warn!(
                deployment = %format!("{}/{}", d.metadata.namespace.as_deref().unwrap_or(""), d.metadata.name.as_deref().unwrap_or("")),
                error = format!("{e:#}"),
                "deployments: could not bring in line"
            );
        }
    }
    // What is left is owned by Deployments that are gone.
    for pod in owned.into_values().flatten() {
        delete(client, &pod, "its Deployment is gone").await;
    }
    Ok(())
}

async fn delete(client: &Client, pod: &Pod, why: &str) {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        return;
    }
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => info!(pod = %format!("{ns}/{name}"), why, "deployments: pod deleted"),
        Err(kube::Error::Api(s)) if s.is_not_found() => {}
        Err(e) => warn!(pod = %format!("{ns}/{name}"), error = %e, "deployments: could not delete"),
    }
}

async fn reconcile(client: &Client, node: &str, d: &Deployment, pods: Vec<Pod>) -> Result<()> {
    let ns = d
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = d.metadata.name.clone().unwrap_or_default();
    let spec = &d.spec;
    let want = usize::try_from(spec.replicas.unwrap_or(1).max(0)).unwrap_or(0);
    let template = &spec.template;
    let labels = template.metadata.as_ref().and_then(|m| m.labels.clone());
    let hash = template_hash(&template.spec, &labels);
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);

    let (current, stale): (Vec<Pod>, Vec<Pod>) = pods.into_iter().partition(|p| {
        p.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(TEMPLATE_HASH))
            == Some(&hash)
    });
    for pod in &stale {
        delete(client, pod, "its template changed").await;
    }
    let live: Vec<&Pod> = current
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    for pod in live.iter().skip(want) {
        delete(client, pod, "more replicas than wanted").await;
    }
    for i in live.len()..want {
        let mut labels = labels.clone().unwrap_or_default();
        labels.insert(TEMPLATE_HASH.into(), hash.clone());
        let mut pod_spec = template
            .spec
            .clone()
            .context("template without a pod spec")?;
        pod_spec.node_name = Some(node.to_owned());
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(format!("{name}-{hash}-{i}")),
                namespace: Some(ns.clone()),
                labels: Some(labels),
                annotations: template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.annotations.clone()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "Deployment".into(),
                    name: name.clone(),
                    uid: d.metadata.uid.clone().unwrap_or_default(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..ObjectMeta::default()
            },
            spec: Some(pod_spec),
            status: None,
        };
        match api.create(&PostParams::default(), &pod).await {
            Ok(_) => {
                info!(deployment = %format!("{ns}/{name}"), pod = %format!("{name}-{hash}-{i}"), node, "deployments: pod created")
            }
            Err(kube::Error::Api(s)) if s.reason == "AlreadyExists" => {}
            Err(e) => return Err(e).context("creating a pod"),
        }
    }
    let ready = live.iter().take(want).filter(|p| ready(p)).count();
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let status = serde_json::json!({"status": {
        "observedGeneration": d.metadata.generation,
        "replicas": count(live.len().min(want)),
        "updatedReplicas": count(live.len().min(want)),
        "readyReplicas": count(ready),
        "availableReplicas": count(ready),
    }});
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("writing the deployment's status")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_change_changes_the_hash() {
        let labels = Some(BTreeMap::from([("app".to_owned(), "w".to_owned())]));
        let spec = Some(PodSpec {
            service_account_name: Some("w".into()),
            ..PodSpec::default()
        });
        let other = Some(PodSpec {
            service_account_name: Some("x".into()),
            ..PodSpec::default()
        });
        assert_eq!(template_hash(&spec, &labels), template_hash(&spec, &labels));
        assert_ne!(
            template_hash(&spec, &labels),
            template_hash(&other, &labels)
        );
        assert_ne!(template_hash(&spec, &labels), template_hash(&spec, &None));
    }
}
