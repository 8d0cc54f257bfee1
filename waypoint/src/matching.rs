//! Request matching: path, scheme, method, authority, headers and query parameters,
//! with exact, prefix, path-prefix (by segments) and regex string matches (regexes
//! match the whole value, as Envoy's RE2 matches do), and the path edits that follow
//! a match (rewrites and redirects replace the prefix a rule matched).

use std::{collections::HashSet, net::IpAddr, sync::Arc};

use http::HeaderName;
use regex::Regex;

use crate::ingress::Downstream;

#[derive(Clone, Debug)]
pub enum StringMatch {
    Exact(String),
    /// A string prefix: `/foo` matches `/foobar` (Istio's, Envoy's `prefix`).
    Prefix(String),
    /// A prefix by whole path segments, kept without a trailing `/` (Gateway API
    /// `PathPrefix`): `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`;
    /// empty matches every path. Build it with [`StringMatch::path_prefix`].
    PathPrefix(String),
    /// Anchored: the whole value must match.
    Regex(Regex),
}

#[derive(Debug, thiserror::Error)]
#[error("invalid regex {pattern:?}: {source}")]
pub struct BadRegex {
    pub pattern: String,
    pub source: regex::Error,
}

/// A config's regex (`pattern`, as its error names it) compiled as `compiled`, which
/// may wrap it; the size limit bounds what a config can cost.
pub(crate) fn config_regex(compiled: &str, pattern: &str) -> Result<Regex, BadRegex> {
    regex::RegexBuilder::new(compiled)
        .size_limit(1 << 20)
        .build()
        .map_err(|source| BadRegex {
            pattern: pattern.into(),
            source,
        })
}

impl StringMatch {
    /// A regex match of the whole value.
    pub fn regex(pattern: &str) -> Result<Self, BadRegex> {
        config_regex(&format!("^(?:{pattern})$"), pattern).map(StringMatch::Regex)
    }

    /// A path-segment prefix; `/foo/` and `/foo` are the same prefix.
    pub fn path_prefix(prefix: &str) -> Self {
        StringMatch::PathPrefix(prefix.trim_end_matches('/').to_owned())
    }

    pub fn matches(&self, value: &str) -> bool {
        self.matches_case(value, false)
    }

    /// As [`StringMatch::matches`]; with `ignore_case` exact and prefix matches compare
    /// ASCII letters case-insensitively (regexes are as written).
    pub fn matches_case(&self, value: &str, ignore_case: bool) -> bool {
        match self {
            StringMatch::Exact(s) if ignore_case => value.eq_ignore_ascii_case(s),
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(_) | StringMatch::PathPrefix(_) => {
                self.prefix_len(value, ignore_case).is_some()
            }
            StringMatch::Regex(r) => r.is_match(value),
        }
    }

    /// How many leading bytes of `value` a prefix match covers; `None` for other
    /// kinds and for values it does not match.
    fn prefix_len(&self, value: &str, ignore_case: bool) -> Option<usize> {
        let starts = |p: &str| {
            value.len() >= p.len()
                && if ignore_case {
                    value.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
                } else {
                    value.as_bytes().starts_with(p.as_bytes())
                }
        };
        match self {
            StringMatch::Prefix(p) => starts(p).then_some(p.len()),
            StringMatch::PathPrefix(p) => (starts(p)
                && matches!(value.as_bytes().get(p.len()), None | Some(b'/')))
            .then_some(p.len()),
            StringMatch::Exact(_) | StringMatch::Regex(_) => None,
        }
    }
}

/// `path` with the prefix its rule matched replaced by `new`, or all of it replaced
/// when the rule did not match the path by prefix. A string prefix is replaced as a
/// string (Envoy's `prefix_rewrite`); a path prefix by segments, as Gateway API's
/// `ReplacePrefixMatch` (prefix `/foo`: `/xyz` or `/xyz/` turn `/foo/bar` into
/// `/xyz/bar`, `/` turns it into `/bar`, and an empty result is `/`).
pub fn replace_matched_prefix(path: &str, new: &str, matched: Option<&RequestMatch>) -> String {
    let Some(m) = matched else {
        return new.to_owned();
    };
    let Some(kind) = &m.path else {
        return new.to_owned();
    };
    match (kind, kind.prefix_len(path, m.ignore_path_case)) {
        (StringMatch::Prefix(_), Some(n)) => format!("{new}{}", &path[n..]),
        (StringMatch::PathPrefix(_), Some(n)) => {
            let joined = format!("{}{}", new.trim_end_matches('/'), &path[n..]);
            if joined.is_empty() {
                "/".to_owned()
            } else {
                joined
            }
        }
        _ => new.to_owned(),
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
    /// Exact and prefix `path` matches ignore ASCII case (`ignoreUriCase`).
    pub ignore_path_case: bool,
    /// `http` unless the request says otherwise (HTTP/2's `:scheme`).
    pub scheme: Option<StringMatch>,
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
        if self
            .path
            .as_ref()
            .is_some_and(|m| !m.matches_case(path, self.ignore_path_case))
        {
            return false;
        }
        if self
            .scheme
            .as_ref()
            .is_some_and(|m| !m.matches(req.uri.scheme_str().unwrap_or("http")))
        {
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
    fn path_prefixes_match_whole_segments() {
        let m = StringMatch::path_prefix("/foo/");
        for path in ["/foo", "/foo/", "/foo/bar"] {
            assert!(m.matches(path), "{path}");
        }
        for path in ["/foobar", "/fo", "/", "/bar/foo"] {
            assert!(!m.matches(path), "{path}");
        }
        assert!(StringMatch::path_prefix("/").matches("/anything"));
        assert!(
            StringMatch::Prefix("/foo".into()).matches("/foobar"),
            "a string prefix is not by segments"
        );
    }

    #[test]
    fn ignoring_case_covers_exact_and_prefix_matches_not_regexes() {
        assert!(StringMatch::Exact("/Api".into()).matches_case("/aPI", true));
        assert!(!StringMatch::Exact("/Api".into()).matches_case("/aPI", false));
        assert!(StringMatch::Prefix("/API/".into()).matches_case("/api/v1", true));
        assert!(StringMatch::path_prefix("/API").matches_case("/api/v1", true));
        assert!(!StringMatch::path_prefix("/API").matches_case("/apiv1", true));
        let r = StringMatch::regex("/api").expect("regex");
        assert!(!r.matches_case("/API", true));
        let m = RequestMatch {
            path: Some(StringMatch::Prefix("/Reviews".into())),
            ignore_path_case: true,
            ..Default::default()
        };
        assert!(m.matches(&parts("GET", "/REVIEWS/1", &[])));
    }

    #[test]
    fn the_matched_prefix_is_replaced_as_string_or_by_segments() {
        let by = |path: StringMatch| RequestMatch {
            path: Some(path),
            ..Default::default()
        };
        // Envoy's prefix_rewrite: a string replaced by a string.
        let string = by(StringMatch::Prefix("/foo/".into()));
        assert_eq!(
            replace_matched_prefix("/foo/bar", "/xyz", Some(&string)),
            "/xyzbar"
        );
        // Gateway API's ReplacePrefixMatch table.
        for (path, prefix, new, want) in [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "/", "/bar"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/foo/bar", "/", "/xyz", "/xyz/foo/bar"),
        ] {
            let m = by(StringMatch::path_prefix(prefix));
            assert_eq!(
                replace_matched_prefix(path, new, Some(&m)),
                want,
                "{path} with prefix {prefix} -> {new}"
            );
        }
        let exact = by(StringMatch::Exact("/foo".into()));
        assert_eq!(
            replace_matched_prefix("/foo", "/xyz/", Some(&exact)),
            "/xyz/"
        );
        assert_eq!(replace_matched_prefix("/foo/bar", "/xyz", None), "/xyz");
        let any_case = RequestMatch {
            ignore_path_case: true,
            ..by(StringMatch::Prefix("/old".into()))
        };
        assert_eq!(
            replace_matched_prefix("/OLD/x", "/new", Some(&any_case)),
            "/new/x"
        );
    }

    #[test]
    fn scheme_is_http_unless_the_request_names_one() {
        let m = RequestMatch {
            scheme: Some(StringMatch::Exact("http".into())),
            ..Default::default()
        };
        assert!(m.matches(&parts("GET", "/", &[])));
        assert!(!m.matches(&parts("GET", "https://reviews/", &[])));
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
