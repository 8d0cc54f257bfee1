//! The compiled routing config of one service port: what a VirtualService or HTTPRoute
//! becomes once the controller has resolved hosts and subsets. Rules are tried in
//! order; the first whose matches accept the request wins (Istio's semantics).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

use crate::{authz::Policies, fault::Fault, matching::RequestMatch, retry::RetryPolicy};

#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    pub rules: Vec<Rule>,
    /// Checked before any rule: a denied request never reaches routing.
    pub policies: Policies,
}

#[derive(Clone, Debug)]
pub struct Rule {
    /// For logs and metrics (`route_name`).
    pub name: String,
    /// Any of these; empty matches every request.
    pub matches: Vec<RequestMatch>,
    pub action: Action,
    pub fault: Option<Fault>,
    /// Whole-request deadline; past it the client gets 504.
    pub timeout: Option<Duration>,
    /// Retries of failed attempts (within `timeout`); `None` sends once.
    pub retry: Option<RetryPolicy>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

#[derive(Clone, Debug)]
pub enum Action {
    /// Send to one of these, chosen by weight.
    Forward(Vec<WeightedBackend>),
    Redirect {
        /// Replaces the authority when set.
        authority: Option<String>,
        /// Replaces the path (and query) when set.
        path: Option<String>,
        status: StatusCode,
    },
    Respond {
        status: StatusCode,
        body: Bytes,
    },
}

/// A destination: `backend` names a set of endpoints (service host, subset, port) the
/// [`crate::router::Upstream`] knows how to reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightedBackend {
    pub backend: String,
    pub weight: u32,
}

/// Header edits, applied in this order: remove, set (replace), add (append).
#[derive(Clone, Debug, Default)]
pub struct HeaderOps {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderOps {
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

impl RouteTable {
    /// The first rule whose matches accept the request.
    pub fn select(&self, req: &http::request::Parts) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(req)))
    }
}
