//! Request matching: path, method, authority, headers and query parameters, with
//! exact, prefix and regex string matches (regexes match the whole value, as Envoy's
//! RE2 matches do).

use std::{collections::HashSet, net::IpAddr, sync::Arc};

use http::HeaderName;
use regex::Regex;

use crate::ingress::Downstream;

#[derive(Clone, Debug)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// Anchored: the whole value must match.
    Regex(Regex),
}

#[derive(Debug, thiserror::Error)]
#[error("invalid regex {pattern:?}: {source}")]
pub struct BadRegex {
    pub pattern: String,
    pub source: regex::Error,
}

impl StringMatch {
    /// A regex match of the whole value; the size limit bounds what a config can cost.
    pub fn regex(pattern: &str) -> Result<Self, BadRegex> {
        regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
            .size_limit(1 << 20)
            .build()
            .map(StringMatch::Regex)
            .map_err(|source| BadRegex {
                pattern: pattern.into(),
                source,
            })
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.is_match(value),
        }
    }
}

#[derive(Clone, Debug)]
pub enum HeaderRule {
    Value(StringMatch),
    Present,
    Absent,
}

#[derive(Clone, Debug, Default)]
pub struct RequestMatch {
    pub path: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: Vec<(HeaderName, HeaderRule)>,
    pub query: Vec<(String, StringMatch)>,
    /// The client's namespace, from its proven identity.
    pub source_namespace: Option<String>,
    /// The client pods' addresses (`sourceLabels` as the controller resolved them).
    pub source_addresses: Option<HashSet<IpAddr>>,
}

impl RequestMatch {
    /// Source conditions: a request with no known client matches none of them.
    fn source_matches(&self, downstream: Option<&Arc<Downstream>>) -> bool {
        let Some(d) = downstream else {
            return false;
        };
        if let Some(ns) = &self.source_namespace
            && d.identity.as_ref().map(|i| i.namespace()) != Some(ns.as_str())
        {
            return false;
        }
        if let Some(addrs) = &self.source_addresses
            && !addrs.contains(&d.peer.ip())
        {
            return false;
        }
        true
    }

    /// Every condition set must hold.
    pub fn matches(&self, req: &http::request::Parts) -> bool {
        if (self.source_namespace.is_some() || self.source_addresses.is_some())
            && !self.source_matches(req.extensions.get::<Arc<Downstream>>())
        {
            return false;
        }
        let path = req.uri.path();
        if self.path.as_ref().is_some_and(|m| !m.matches(path)) {
            return false;
        }
        if self
            .method
            .as_ref()
            .is_some_and(|m| !m.matches(req.method.as_str()))
        {
            return false;
        }
        if let Some(m) = &self.authority {
            let authority = req
                .uri
                .authority()
                .map(|a| a.as_str())
                .or_else(|| {
                    req.headers
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                })
                .unwrap_or_default();
            if !m.matches(authority) {
                return false;
            }
        }
        let headers_ok = self.headers.iter().all(|(name, rule)| {
            let value = req.headers.get(name);
            match rule {
                HeaderRule::Present => value.is_some(),
                HeaderRule::Absent => value.is_none(),
                HeaderRule::Value(m) => value
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| m.matches(v)),
            }
        });
        headers_ok
            && self.query.iter().all(|(key, m)| {
                query_param(req.uri.query().unwrap_or_default(), key).is_some_and(|v| m.matches(v))
            })
    }
}

/// The first value of `key` in a query string (no percent-decoding, as Istio matches
/// the raw value).
fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn string_matches_and_anchored_regexes() {
        assert!(StringMatch::Exact("/a".into()).matches("/a"));
        assert!(!StringMatch::Exact("/a".into()).matches("/ab"));
        assert!(StringMatch::Prefix("/api/".into()).matches("/api/v1"));
        let r = StringMatch::regex("/users/[0-9]+").expect("regex");
        assert!(r.matches("/users/42"));
        assert!(
            !r.matches("/users/42/edit"),
            "regexes match the whole value"
        );
        assert!(StringMatch::regex("(").is_err());
    }

    #[test]
    fn every_condition_must_hold() {
        let m = RequestMatch {
            path: Some(StringMatch::Prefix("/reviews".into())),
            method: Some(StringMatch::Exact("GET".into())),
            authority: Some(StringMatch::Prefix("reviews".into())),
            headers: vec![
                (
                    HeaderName::from_static("end-user"),
                    HeaderRule::Value(StringMatch::Exact("jason".into())),
                ),
                (HeaderName::from_static("x-canary"), HeaderRule::Present),
                (HeaderName::from_static("x-debug"), HeaderRule::Absent),
            ],
            query: vec![("v".into(), StringMatch::Exact("2".into()))],
            ..Default::default()
        };
        let ok = [
            ("host", "reviews:9080"),
            ("end-user", "jason"),
            ("x-canary", "1"),
        ];
        assert!(m.matches(&parts("GET", "/reviews/1?a=b&v=2", &ok)));
        assert!(!m.matches(&parts("POST", "/reviews/1?v=2", &ok)), "method");
        assert!(!m.matches(&parts("GET", "/ratings?v=2", &ok)), "path");
        assert!(!m.matches(&parts("GET", "/reviews/1?v=3", &ok)), "query");
        assert!(
            !m.matches(&parts("GET", "/reviews/1", &ok)),
            "query missing"
        );
        let mut debug = ok.to_vec();
        debug.push(("x-debug", "1"));
        assert!(
            !m.matches(&parts("GET", "/reviews/1?v=2", &debug)),
            "absent header present"
        );
        assert!(
            !m.matches(&parts("GET", "/reviews/1?v=2", &ok[..2])),
            "present header missing"
        );
        let other_user = [("host", "reviews"), ("end-user", "mike"), ("x-canary", "1")];
        assert!(
            !m.matches(&parts("GET", "/reviews/1?v=2", &other_user)),
            "header value"
        );
        assert!(
            RequestMatch::default().matches(&parts("DELETE", "/", &[])),
            "empty matches all"
        );
    }

    #[test]
    fn source_namespace_and_addresses_come_from_the_downstream() {
        let m = RequestMatch {
            source_namespace: Some("frontend".into()),
            source_addresses: Some(["10.77.1.10".parse().expect("ip")].into()),
            ..Default::default()
        };
        let with = |id: &str, peer: &str| {
            let mut p = parts("GET", "/", &[]);
            p.extensions.insert(Arc::new(Downstream {
                identity: Some(id.parse().expect("id")),
                peer: peer.parse().expect("peer"),
                service: "reviews:9080".into(),
                destination: "10.96.0.12:9080".parse().expect("dst"),
            }));
            p
        };
        let client = "spiffe://cluster.local/ns/frontend/sa/web";
        assert!(m.matches(&with(client, "10.77.1.10:40000")));
        assert!(
            !m.matches(&with(client, "10.77.1.11:40000")),
            "another pod of the namespace"
        );
        assert!(
            !m.matches(&with(
                "spiffe://cluster.local/ns/other/sa/web",
                "10.77.1.10:1"
            )),
            "another namespace"
        );
        assert!(
            !m.matches(&parts("GET", "/", &[])),
            "no known client: no source condition holds"
        );
    }
}
