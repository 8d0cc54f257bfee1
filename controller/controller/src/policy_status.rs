//! Kubernetes mode: tells users, on the objects themselves, what Cairn could not
//! apply. Each Istio object (AuthorizationPolicy, PeerAuthentication,
//! RequestAuthentication, VirtualService, DestinationRule, ServiceEntry) that the
//! decoder rejects, or that compiles with notices (rules ztunnel cannot enforce, an
//! unknown retry condition, a JWKS that cannot be read, ...), gets a condition
//! `Accepted` in its `status` (the CRDs Cairn ships have a status subresource, as
//! Istio's do):
//!
//! | situation | status | reason |
//! | --- | --- | --- |
//! | rejected by the decoder | `False` | `Invalid`: the last accepted version stays in force (or none) |
//! | fields Cairn ignores, or compiled with notices | `True` | `PartiallyApplied`: each, `; `-separated |
//! | fine again after either | `True` | `Accepted` |
//!
//! Notices come from the runtime's compiler (each source's latest compile), so no
//! compile is done twice. Only the leader writes, after store changes settle, and
//! only what differs from what it wrote before. What a previous leader wrote on objects that are fine now
//! stays until they change again (this writer keeps its memory in process).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams},
};
use serde_json::json;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::{
    compile::Notice,
    kubernetes::{Reports, SharedReports, api_resource},
    resources::{Kind, ObjectRef},
    runtime::Runtime,
};

/// The kinds whose status this writer owns (Gateway API routes report through
/// `parents`, written by whoever owns the parent; Gateways by the waypoint
/// reconciler).
pub const KINDS: [Kind; 6] = [
    Kind::AuthorizationPolicy,
    Kind::PeerAuthentication,
    Kind::RequestAuthentication,
    Kind::VirtualService,
    Kind::DestinationRule,
    Kind::ServiceEntry,
];

/// The one condition written: (status, reason, message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Accepted {
    fn fine() -> Accepted {
        Accepted {
            status: true,
            reason: "Accepted",
            message: "applied by Cairn".into(),
        }
    }
}

/// What each object with something to report should say. `notices` are a full
/// compile's; `reports` the decoder's; `in_force` whether an object is in the store.
pub fn desired(
    notices: &[Notice],
    reports: &Reports,
    in_force: impl Fn(&ObjectRef) -> bool,
) -> BTreeMap<ObjectRef, Accepted> {
    let mut out: BTreeMap<ObjectRef, Vec<String>> = BTreeMap::new();
    let mut add = |r: ObjectRef, message: &str| {
        let messages = out.entry(r).or_default();
        if !messages.iter().any(|m| m == message) {
            messages.push(message.to_owned());
        }
    };
    for (r, fields) in &reports.ignored {
        if KINDS.contains(&r.kind) {
            for f in fields {
                add(r.clone(), f);
            }
        }
    }
    for n in notices {
        let Some(kind) = n.kind.filter(|k| KINDS.contains(k)) else {
            continue;
        };
        let Some((namespace, name)) = n.policy.split_once('/') else {
            continue;
        };
        let r = ObjectRef {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        };
        add(r, &n.message);
    }
    let mut result: BTreeMap<ObjectRef, Accepted> = out
        .into_iter()
        .map(|(r, messages)| {
            (
                r,
                Accepted {
                    status: true,
                    reason: "PartiallyApplied",
                    message: messages.join("; "),
                },
            )
        })
        .collect();
    for (r, why) in &reports.rejected {
        if !KINDS.contains(&r.kind) {
            continue;
        }
        let kept = if in_force(r) {
            "the last accepted version stays in force"
        } else {
            "not in force: no earlier version was accepted"
        };
        result.insert(
            r.clone(),
            Accepted {
                status: false,
                reason: "Invalid",
                message: format!("{why} ({kept})"),
            },
        );
    }
    result
}

/// While `leader` is true, writes statuses after every change notification.
pub async fn run(
    client: Client,
    runtime: Arc<Runtime>,
    reports: SharedReports,
    changed: Arc<Notify>,
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut written: HashMap<ObjectRef, Accepted> = HashMap::new();
    loop {
        if *leader.borrow() {
            let want = {
                let notices = runtime.notices();
                let store = runtime.store().read().unwrap_or_else(|e| e.into_inner());
                let reports = reports.lock().unwrap_or_else(|e| e.into_inner()).clone();
                desired(&notices, &reports, |r| store.get(r).is_some())
            };
            write(&client, &want, &mut written).await;
        }
        tokio::select! {
            lead = leader.changed() => {
                if lead.is_err() {
                    return;
                }
                written.clear();
            }
            _ = changed.notified() => {
                // Let a burst of changes settle into one pass.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            stop = shutdown.changed() => {
                if stop.is_err() || *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

async fn write(
    client: &Client,
    want: &BTreeMap<ObjectRef, Accepted>,
    written: &mut HashMap<ObjectRef, Accepted>,
) {
    // Objects reported before and fine now go back to Accepted.
    let mut todo: Vec<(ObjectRef, Accepted)> = want
        .iter()
        .filter(|(r, a)| written.get(*r) != Some(*a))
        .map(|(r, a)| (r.clone(), a.clone()))
        .collect();
    for r in written.keys() {
        if !want.contains_key(r) && written.get(r) != Some(&Accepted::fine()) {
            todo.push((r.clone(), Accepted::fine()));
        }
    }
    for (r, accepted) in todo {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &r.namespace, &api_resource(r.kind));
        let patch = json!({"status": {"conditions": [{
            "type": "Accepted",
            "status": if accepted.status { "True" } else { "False" },
            "reason": accepted.reason,
            "message": accepted.message,
            "lastTransitionTime": now(),
        }]}});
        match api
            .patch_status(&r.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(object = %r, reason = accepted.reason, message = %accepted.message, "status written");
                written.insert(r, accepted);
            }
            // Deleted meanwhile: nothing to report on.
            Err(kube::Error::Api(s)) if s.is_not_found() => {
                debug!(object = %r, "gone before its status was written");
                written.remove(&r);
            }
            Err(e) => {
                warn!(object = %r, error = %e, "could not write the status; retried on the next change")
            }
        }
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(kind: Kind, name: &str) -> ObjectRef {
        ObjectRef {
            kind,
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    #[test]
    fn notices_and_rejections_become_conditions_on_their_objects() {
        let notice = |kind, policy: &str, message: &str| Notice {
            kind,
            policy: policy.into(),
            message: message.into(),
        };
        let notices = [
            notice(
                Some(Kind::AuthorizationPolicy),
                "shop/l7",
                "rules[0] uses L7 attributes",
            ),
            notice(
                Some(Kind::AuthorizationPolicy),
                "shop/l7",
                "rules[0] uses L7 attributes",
            ),
            notice(Some(Kind::AuthorizationPolicy), "shop/l7", "rules[1] too"),
            notice(
                None,
                "reviews.shop.svc.cluster.local",
                "subset v3 has no endpoints",
            ),
            notice(
                Some(Kind::VirtualService),
                "shop/reviews",
                "retryOn sometimes: unknown condition; ignored",
            ),
        ];
        let reports = Reports {
            rejected: HashMap::from([
                (
                    r(Kind::VirtualService, "bad"),
                    "spec.http[0]: bad".to_owned(),
                ),
                (
                    r(Kind::DestinationRule, "new"),
                    "spec.host: missing".to_owned(),
                ),
                (r(Kind::Pod, "p"), "not ours".to_owned()),
            ]),
            ignored: HashMap::from([(
                r(Kind::VirtualService, "reviews"),
                vec![
                    "spec.http[0].delegate: field is not implemented by Cairn and is ignored"
                        .to_owned(),
                ],
            )]),
        };
        let want = desired(&notices, &reports, |o| o.name == "bad");
        assert_eq!(want.len(), 4, "{want:?}");
        assert_eq!(
            want[&r(Kind::VirtualService, "reviews")].message,
            "spec.http[0].delegate: field is not implemented by Cairn and is ignored; retryOn sometimes: unknown condition; ignored"
        );
        let l7 = &want[&r(Kind::AuthorizationPolicy, "l7")];
        assert_eq!((l7.status, l7.reason), (true, "PartiallyApplied"));
        assert_eq!(l7.message, "rules[0] uses L7 attributes; rules[1] too");
        let bad = &want[&r(Kind::VirtualService, "bad")];
        assert_eq!((bad.status, bad.reason), (false, "Invalid"));
        assert!(
            bad.message
                .ends_with("(the last accepted version stays in force)"),
            "{}",
            bad.message
        );
        assert!(
            want[&r(Kind::DestinationRule, "new")]
                .message
                .contains("not in force")
        );
        assert!(!want.keys().any(|o| o.kind == Kind::Pod));
    }
}
