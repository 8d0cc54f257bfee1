//! The compiled routing config of one service port: what a VirtualService or HTTPRoute
//! becomes once the controller has resolved hosts and subsets. Rules are tried in
//! order; the first whose matches accept the request wins (Istio's semantics).

use std::time::Duration;

use bytes::Bytes;
use std::sync::Arc;

use http::{HeaderName, HeaderValue, StatusCode};

use crate::{
    authz::Policies,
    cors::CorsPolicy,
    fault::Fault,
    matching::{RequestMatch, replace_matched_prefix},
    retry::RetryPolicy,
};

#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    pub rules: Vec<Rule>,
    /// Checked before any rule: a denied request never reaches routing.
    pub policies: Policies,
    /// Tokens checked before the policies (which may then require a request
    /// principal).
    pub jwt: crate::jwt::JwtAuthn,
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
    pub rewrite: Option<Rewrite>,
    /// Copies of forwarded requests sent to other backends; their answers are
    /// dropped and never delay or change the client's.
    pub mirrors: Vec<Mirror>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// Cross-origin requests: preflights answered, responses decorated.
    pub cors: Option<Arc<CorsPolicy>>,
}

impl Rule {
    /// A rule with no fault, timeout, retries, rewrite, mirrors, header edits or CORS.
    pub fn new(name: impl Into<String>, matches: Vec<RequestMatch>, action: Action) -> Self {
        Rule {
            name: name.into(),
            matches,
            action,
            fault: None,
            timeout: None,
            retry: None,
            rewrite: None,
            mirrors: Vec::new(),
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
            cors: None,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Action {
    /// Send to one of these, chosen by weight.
    Forward(Vec<WeightedBackend>),
    Redirect(crate::redirect::Redirect),
    Respond {
        status: StatusCode,
        body: Bytes,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// Replaces the matched prefix (rules matched by prefix, see
    /// [`replace_matched_prefix`]) or the whole path.
    pub path: Option<String>,
    /// `path` replaces the whole path even after a prefix match (Gateway API
    /// `ReplaceFullPath`).
    pub full_path: bool,
    /// Instead of `path`: the path rewritten by a regex (`uriRegexRewrite`).
    pub regex: Option<PathRegex>,
    pub authority: Option<HeaderValue>,
}

/// A path rewritten by a regex: every match replaced by `substitution`.
#[derive(Clone, Debug)]
pub struct PathRegex {
    regex: regex::Regex,
    /// In the regex crate's syntax (`${1}`).
    substitution: String,
}

impl PartialEq for PathRegex {
    fn eq(&self, other: &Self) -> bool {
        self.regex.as_str() == other.regex.as_str() && self.substitution == other.substitution
    }
}

impl Eq for PathRegex {}

impl PathRegex {
    /// From RE2 syntax and Envoy's substitution syntax, where `\1` is the first group
    /// and `\\` a backslash (the regex crate writes `${1}`, and `$$` for `$`).
    pub fn new(pattern: &str, substitution: &str) -> Result<Self, crate::matching::BadRegex> {
        let regex = crate::matching::config_regex(pattern, pattern)?;
        let mut out = String::with_capacity(substitution.len());
        let mut chars = substitution.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.peek() {
                    Some(d) if d.is_ascii_digit() => {
                        out.push_str(&format!("${{{d}}}"));
                        chars.next();
                    }
                    Some('\\') => {
                        out.push('\\');
                        chars.next();
                    }
                    _ => out.push('\\'),
                },
                '$' => out.push_str("$$"),
                c => out.push(c),
            }
        }
        Ok(Self {
            regex,
            substitution: out,
        })
    }

    pub fn apply(&self, path: &str) -> String {
        self.regex
            .replace_all(path, self.substitution.as_str())
            .into_owned()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Mirror {
    pub backend: String,
    pub percent: crate::fault::Percent,
}

/// A destination: `backend` names a set of endpoints (service host, subset, port) the
/// [`crate::router::Upstream`] knows how to reach.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WeightedBackend {
    pub backend: String,
    pub weight: u32,
    /// Header edits for requests sent to this destination (VirtualService
    /// `route[].headers`), applied after the rule's own.
    pub headers: Option<Arc<BackendHeaders>>,
}

impl Action {
    /// Every request to `backend`.
    pub fn to(backend: impl Into<String>) -> Self {
        Action::Forward(vec![WeightedBackend {
            backend: backend.into(),
            weight: 1,
            headers: None,
        }])
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendHeaders {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

/// Header edits, applied in this order: remove, set (replace), add (append).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
        self.select_match(req).map(|(r, _)| r)
    }

    /// [`Self::select`], with the match that accepted the request (`None` for a rule
    /// without matches).
    pub fn select_match(
        &self,
        req: &http::request::Parts,
    ) -> Option<(&Rule, Option<&RequestMatch>)> {
        self.rules.iter().find_map(|r| {
            if r.matches.is_empty() {
                return Some((r, None));
            }
            r.matches
                .iter()
                .find(|m| m.matches(req))
                .map(|m| (r, Some(m)))
        })
    }
}

impl Rewrite {
    /// Rewrites the request head: path (prefix or whole, query kept) and authority.
    pub fn apply(&self, parts: &mut http::request::Parts, matched: Option<&RequestMatch>) {
        if let Some(authority) = &self.authority {
            parts.headers.insert(http::header::HOST, authority.clone());
        }
        let path = match (&self.regex, &self.path) {
            (Some(r), _) => Some(r.apply(parts.uri.path())),
            (None, Some(new)) if self.full_path => Some(new.clone()),
            (None, Some(new)) => Some(replace_matched_prefix(parts.uri.path(), new, matched)),
            (None, None) => None,
        };
        if path.is_none() && self.authority.is_none() {
            return;
        }
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        if let Some(path) = path {
            let query = uri
                .path_and_query
                .as_ref()
                .and_then(|pq| pq.query())
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            if let Ok(pq) = format!("{path}{query}").parse() {
                uri.path_and_query = Some(pq);
            }
        }
        if let (Some(a), Some(_)) = (&self.authority, &uri.authority)
            && let Ok(a) = http::uri::Authority::try_from(a.as_bytes())
        {
            uri.authority = Some(a);
        }
        parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::PathRegex;

    #[test]
    fn regex_rewrites_take_envoys_substitution_syntax() {
        let r = PathRegex::new("^/service/([^/]+)(/.*)$", "\\2/instance/\\1").expect("regex");
        assert_eq!(r.apply("/service/foo/v1/api"), "/v1/api/instance/foo");
        let every = PathRegex::new("a", "b").expect("regex");
        assert_eq!(every.apply("/aaa/a"), "/bbb/b", "every match is replaced");
        let literal = PathRegex::new("^/x$", "/$1/\\\\").expect("regex");
        assert_eq!(
            literal.apply("/x"),
            "/$1/\\",
            "a dollar and an escaped backslash"
        );
        assert!(PathRegex::new("(", "/").is_err());
    }
}
