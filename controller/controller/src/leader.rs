//! Leader election for the controller's writers (the waypoint reconciler): a
//! `coordination.k8s.io` Lease, held by renewing it, taken over only once its holder
//! has not renewed for the lease duration. Every replica serves xDS and the CA; only
//! the leader writes to the cluster. Updates carry the resourceVersion read, so two
//! replicas racing for an expired lease cannot both win.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::watch;
use tracing::{info, warn};

pub const LEASE_NAME: &str = "cairn-controller";

#[derive(Clone, Debug)]
pub struct Settings {
    pub namespace: String,
    pub identity: String,
    /// How long a lease holds without renewal.
    pub lease: Duration,
    /// How often the holder renews and followers look.
    pub retry: Duration,
}

/// What a replica should do with the lease as it reads it now.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it, or its holder stopped renewing: take it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds it and renews.
    Follow { holder: String },
}

/// Decides from a lease's spec (pure: unit-tested).
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == me {
        return Decision::Renew;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15).max(1));
    let renewed = spec.renew_time.as_ref().map(|t| t.0.as_second());
    match renewed {
        Some(at) if now.as_second() < at + duration => Decision::Follow {
            holder: holder.to_owned(),
        },
        _ => Decision::Acquire,
    }
}

fn spec_for(s: &Settings, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let ours = previous.and_then(|p| p.holder_identity.as_deref()) == Some(s.identity.as_str());
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(s.identity.clone()),
        lease_duration_seconds: Some(i32::try_from(s.lease.as_secs()).unwrap_or(15)),
        acquire_time: if ours {
            previous.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if ours || previous.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..Default::default()
    }
}

/// One look at the lease; true when we hold it afterwards.
async fn step(api: &Api<Lease>, s: &Settings) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                namespace: Some(s.namespace.clone()),
                ..Default::default()
            },
            spec: Some(spec_for(s, None, now)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    match decide(lease.spec.as_ref(), &s.identity, now) {
        Decision::Follow { .. } => Ok(false),
        Decision::Acquire | Decision::Renew => {
            lease.spec = Some(spec_for(s, lease.spec.as_ref(), now));
            // `replace` sends the resourceVersion we read: a racing writer gets 409.
            match api
                .replace(LEASE_NAME, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Campaigns for the lease until `shutdown`; `leader` says whether we hold it. A
/// leader that cannot renew within the lease duration steps down.
pub async fn run(
    client: Client,
    s: Settings,
    leader: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &s.namespace);
    let mut last_renewal: Option<tokio::time::Instant> = None;
    loop {
        let holds = match step(&api, &s).await {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, lease = %format!("{}/{LEASE_NAME}", s.namespace), "leader election: cannot read or renew the lease");
                // Keep leading only while the lease we last renewed still holds.
                last_renewal.is_some_and(|at| at.elapsed() < s.lease)
            }
        };
        if holds {
            last_renewal = Some(tokio::time::Instant::now());
        }
        if holds != *leader.borrow() {
            if holds {
                info!(identity = %s.identity, "became leader: writing waypoint objects and status");
            } else {
                info!(identity = %s.identity, "not the leader: serving only");
            }
            let _ = leader.send(holds);
        }
        tokio::select! {
            _ = tokio::time::sleep(s.retry) => {}
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

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("timestamp")
    }

    fn held(by: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            ..Default::default()
        }
    }

    #[test]
    fn a_renewed_lease_is_followed_an_expired_one_taken() {
        assert_eq!(decide(None, "a", at(100)), Decision::Acquire);
        assert_eq!(decide(Some(&held("a", 90)), "a", at(100)), Decision::Renew);
        assert_eq!(
            decide(Some(&held("b", 90)), "a", at(100)),
            Decision::Follow { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&held("b", 80)), "a", at(100)),
            Decision::Acquire
        );
        assert_eq!(decide(Some(&held("", 99)), "a", at(100)), Decision::Acquire);
    }

    #[test]
    fn taking_over_counts_a_transition_renewing_does_not() {
        let s = Settings {
            namespace: "cairn-system".into(),
            identity: "a".into(),
            lease: Duration::from_secs(15),
            retry: Duration::from_secs(2),
        };
        let mut theirs = held("b", 80);
        theirs.lease_transitions = Some(3);
        let taken = spec_for(&s, Some(&theirs), at(100));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        let renewed = spec_for(&s, Some(&taken), at(102));
        assert_eq!(renewed.lease_transitions, Some(4));
        assert_eq!(renewed.acquire_time, taken.acquire_time);
    }
}
