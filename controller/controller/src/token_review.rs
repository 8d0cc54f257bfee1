//! Kubernetes mode's callers: projected service-account tokens checked with the API
//! server's TokenReview, bound to the audience `istio-ca` (Istio's, so the same pod
//! specs work).
//!
//! A token of the ztunnel service account must be bound to a pod, and the pod's node
//! (the `authentication.kubernetes.io/node-name` extra the API server adds) is what the
//! caller may act for: a ztunnel only gets identities of pods on its own node (the CA
//! checks). Any other service account's token is that workload's own identity
//! (waypoints, workloads asking for their certificate).
//!
//! Accepted tokens are cached for a minute, so a reconnect storm after a controller
//! restart is not a TokenReview storm.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use cairn_identity::SpiffeId;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client, api::PostParams};
use tracing::{debug, warn};

use crate::auth::{AuthError, AuthFuture, Authenticator, Caller};

/// The audience tokens must be bound to.
pub const AUDIENCE: &str = "istio-ca";
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
const CACHE_TTL: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 10_000;

/// Who acts as a node: the ztunnel DaemonSet's service account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZtunnelAccount {
    pub namespace: String,
    pub name: String,
}

/// Maps a TokenReview's answer to a caller.
pub fn caller_from_review(
    status: &TokenReviewStatus,
    ztunnel: &ZtunnelAccount,
    trust_domain: &str,
) -> Result<Caller, AuthError> {
    if status.authenticated != Some(true) {
        return Err(match status.error.as_deref() {
            Some(e) if !e.is_empty() => AuthError::Refused(e.to_owned()),
            _ => AuthError::Unknown,
        });
    }
    if !status.audiences.iter().flatten().any(|a| a == AUDIENCE) {
        return Err(AuthError::Refused(format!(
            "token is not bound to the audience {AUDIENCE:?}"
        )));
    }
    let user = status.user.as_ref().ok_or(AuthError::Unknown)?;
    let username = user.username.as_deref().unwrap_or_default();
    let Some((namespace, name)) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    else {
        return Err(AuthError::Refused(format!(
            "{username:?} is not a service account"
        )));
    };
    if namespace == ztunnel.namespace && name == ztunnel.name {
        let node = user
            .extra
            .as_ref()
            .and_then(|e| e.get(NODE_NAME_EXTRA))
            .and_then(|v| v.first())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                AuthError::Refused(
                    "a ztunnel token must be bound to its pod (projected service-account token)"
                        .into(),
                )
            })?;
        return Ok(Caller::Node(node.clone()));
    }
    SpiffeId::new(trust_domain, namespace, name)
        .map(Caller::Identity)
        .map_err(|e| AuthError::Refused(format!("service account {namespace}/{name}: {e}")))
}

pub struct TokenReviewer {
    api: Api<TokenReview>,
    ztunnel: ZtunnelAccount,
    trust_domain: String,
    cache: Mutex<HashMap<String, (Instant, Caller)>>,
}

impl TokenReviewer {
    pub fn new(client: Client, ztunnel: ZtunnelAccount, trust_domain: impl Into<String>) -> Self {
        Self {
            api: Api::all(client),
            ztunnel,
            trust_domain: trust_domain.into(),
            cache: Mutex::default(),
        }
    }

    fn cached(&self, token: &str) -> Option<Caller> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(token)
            .filter(|(at, _)| at.elapsed() < CACHE_TTL)
            .map(|(_, c)| c.clone())
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        if let Some(caller) = self.cached(token) {
            return Ok(caller);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..Default::default()
        };
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                warn!(error = %e, "TokenReview failed");
                AuthError::Unavailable(format!("TokenReview: {e}"))
            })?;
        let status = answer.status.unwrap_or_default();
        let caller = caller_from_review(&status, &self.ztunnel, &self.trust_domain)?;
        debug!(caller = %caller, "token reviewed");
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(token.to_owned(), (Instant::now(), caller.clone()));
        Ok(caller)
    }
}

impl Authenticator for TokenReviewer {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(self.review(token))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn ztunnel() -> ZtunnelAccount {
        ZtunnelAccount {
            namespace: "cairn-system".into(),
            name: "ztunnel".into(),
        }
    }

    fn status(user: &str, audiences: &[&str], node: Option<&str>) -> TokenReviewStatus {
        let extra =
            node.map(|n| BTreeMap::from([(NODE_NAME_EXTRA.to_owned(), vec![n.to_owned()])]));
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra,
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn a_pod_bound_ztunnel_token_acts_for_its_node() {
        let s = status(
            "system:serviceaccount:cairn-system:ztunnel",
            &["istio-ca"],
            Some("node-a"),
        );
        assert_eq!(
            caller_from_review(&s, &ztunnel(), "cluster.local"),
            Ok(Caller::Node("node-a".into()))
        );
        let unbound = status(
            "system:serviceaccount:cairn-system:ztunnel",
            &["istio-ca"],
            None,
        );
        assert!(matches!(
            caller_from_review(&unbound, &ztunnel(), "cluster.local"),
            Err(AuthError::Refused(m)) if m.contains("bound to its pod")
        ));
    }

    #[test]
    fn other_service_accounts_are_their_own_identity() {
        let s = status(
            "system:serviceaccount:shop:waypoint",
            &["istio-ca"],
            Some("node-b"),
        );
        let expected = SpiffeId::new("cluster.local", "shop", "waypoint").expect("id");
        assert_eq!(
            caller_from_review(&s, &ztunnel(), "cluster.local"),
            Ok(Caller::Identity(expected))
        );
        // A ztunnel-named account elsewhere is not the ztunnel.
        let s = status(
            "system:serviceaccount:shop:ztunnel",
            &["istio-ca"],
            Some("node-b"),
        );
        assert!(matches!(
            caller_from_review(&s, &ztunnel(), "cluster.local"),
            Ok(Caller::Identity(_))
        ));
    }

    #[test]
    fn wrong_audience_users_and_failed_reviews_are_refused() {
        let s = status(
            "system:serviceaccount:cairn-system:ztunnel",
            &["https://kubernetes.default.svc"],
            Some("node-a"),
        );
        assert!(matches!(
            caller_from_review(&s, &ztunnel(), "cluster.local"),
            Err(AuthError::Refused(m)) if m.contains("audience")
        ));
        let s = status("alice", &["istio-ca"], None);
        assert!(matches!(
            caller_from_review(&s, &ztunnel(), "cluster.local"),
            Err(AuthError::Refused(m)) if m.contains("not a service account")
        ));
        let failed = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token has expired".into()),
            ..Default::default()
        };
        assert_eq!(
            caller_from_review(&failed, &ztunnel(), "cluster.local"),
            Err(AuthError::Refused("token has expired".into()))
        );
        assert_eq!(
            caller_from_review(&TokenReviewStatus::default(), &ztunnel(), "cluster.local"),
            Err(AuthError::Unknown)
        );
    }
}
