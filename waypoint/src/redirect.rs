//! Redirects: the `Location` a redirect rule answers with. Each part (scheme,
//! authority, port, path, query) is the request's unless the rule replaces it, as
//! Envoy builds it for Istio's `HTTPRedirect` and Gateway API's `RequestRedirect`.

use std::fmt::Write;

use http::{HeaderValue, StatusCode, header, uri::Authority};

use crate::matching::{RequestMatch, replace_matched_prefix};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// Replaces the scheme (`https`).
    pub scheme: Option<String>,
    /// Replaces the authority: the host, and the port unless `port` is set.
    pub authority: Option<Authority>,
    /// Replaces the port.
    pub port: Option<u16>,
    pub path: Option<PathRedirect>,
    pub status: StatusCode,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathRedirect {
    /// The whole path (Istio's `uri`, Gateway API's `ReplaceFullPath`).
    Full(String),
    /// Only the prefix the rule matched (Gateway API's `ReplacePrefixMatch`).
    MatchedPrefix(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("redirect target {0:?} is not a valid Location")]
pub struct InvalidLocation(pub String);

/// The default port of a scheme, left out of a `Location`.
fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

impl Redirect {
    /// The `Location` for this request (`matched`: the match that chose the rule).
    pub fn location(
        &self,
        req: &http::request::Parts,
        matched: Option<&RequestMatch>,
    ) -> Result<HeaderValue, InvalidLocation> {
        let request_scheme = req.uri.scheme_str().unwrap_or("http");
        let scheme = self.scheme.as_deref().unwrap_or(request_scheme);
        let request_authority = req.uri.authority().cloned().or_else(|| {
            req.headers
                .get(header::HOST)
                .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        });
        let (host, port) = match (&self.authority, &request_authority) {
            (Some(a), _) => (a.host(), a.port_u16()),
            (None, Some(a)) => {
                // A new scheme drops the old one's default port, not a port of its own.
                let port = a
                    .port_u16()
                    .filter(|p| self.scheme.is_none() || Some(*p) != default_port(request_scheme));
                (a.host(), port)
            }
            (None, None) => ("", None),
        };
        let port = self
            .port
            .or(port)
            .filter(|p| Some(*p) != default_port(scheme));
        let path = req.uri.path();
        let (path, query) = match &self.path {
            None => (path.to_owned(), req.uri.query()),
            Some(edit) => {
                let new = match edit {
                    PathRedirect::Full(p) => p.clone(),
                    PathRedirect::MatchedPrefix(p) => replace_matched_prefix(path, p, matched),
                };
                // A query in the rule's path replaces the request's.
                if new.contains('?') {
                    (new, None)
                } else {
                    (new, req.uri.query())
                }
            }
        };
        // Without a host to name (no valid Host header and none in the rule) the
        // Location is relative: the path alone.
        let mut location = String::new();
        if !host.is_empty() {
            let _ = write!(location, "{scheme}://{host}");
            if let Some(p) = port {
                let _ = write!(location, ":{p}");
            }
        }
        location.push_str(&path);
        if let Some(q) = query {
            location.push('?');
            location.push_str(q);
        }
        HeaderValue::try_from(location.as_str()).map_err(|_| InvalidLocation(location))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matching::StringMatch;

    fn request(uri: &str, host: &str) -> http::request::Parts {
        http::Request::builder()
            .uri(uri)
            .header(header::HOST, host)
            .body(())
            .expect("request")
            .into_parts()
            .0
    }

    fn redirect() -> Redirect {
        Redirect {
            scheme: None,
            authority: None,
            port: None,
            path: None,
            status: StatusCode::MOVED_PERMANENTLY,
        }
    }

    fn location(r: &Redirect, uri: &str, host: &str, matched: Option<&RequestMatch>) -> String {
        let v = r.location(&request(uri, host), matched).expect("location");
        v.to_str().expect("ascii").to_owned()
    }

    #[test]
    fn unreplaced_parts_are_the_requests() {
        assert_eq!(
            location(&redirect(), "/a?b=1", "reviews:9080", None),
            "http://reviews:9080/a?b=1"
        );
        let r = Redirect {
            authority: Some(Authority::from_static("ratings")),
            ..redirect()
        };
        assert_eq!(
            location(&r, "/a", "reviews:9080", None),
            "http://ratings/a",
            "the authority replaces host and port"
        );
    }

    #[test]
    fn scheme_and_port_follow_the_defaults() {
        let https = Redirect {
            scheme: Some("https".into()),
            ..redirect()
        };
        assert_eq!(location(&https, "/", "reviews", None), "https://reviews/");
        assert_eq!(
            location(&https, "/", "reviews:80", None),
            "https://reviews/",
            "http's default port is not carried to https"
        );
        assert_eq!(
            location(&https, "/", "reviews:9080", None),
            "https://reviews:9080/",
            "a port of the service's own is kept"
        );
        let on_443 = Redirect {
            port: Some(443),
            ..https.clone()
        };
        assert_eq!(
            location(&on_443, "/", "reviews:9080", None),
            "https://reviews/"
        );
        let on_8443 = Redirect {
            port: Some(8443),
            ..https
        };
        assert_eq!(
            location(&on_8443, "/x", "reviews", None),
            "https://reviews:8443/x"
        );
        let port_only = Redirect {
            port: Some(9090),
            ..redirect()
        };
        assert_eq!(
            location(&port_only, "/", "reviews:9080", None),
            "http://reviews:9090/"
        );
    }

    #[test]
    fn paths_replace_whole_or_the_matched_prefix_and_keep_the_query() {
        let full = Redirect {
            path: Some(PathRedirect::Full("/v2/login".into())),
            ..redirect()
        };
        let by_prefix = RequestMatch {
            path: Some(StringMatch::path_prefix("/old")),
            ..Default::default()
        };
        assert_eq!(
            location(&full, "/old/login?next=/home", "web", Some(&by_prefix)),
            "http://web/v2/login?next=/home"
        );
        let prefix = Redirect {
            path: Some(PathRedirect::MatchedPrefix("/new".into())),
            ..redirect()
        };
        assert_eq!(
            location(&prefix, "/old/a/b?x=1", "web", Some(&by_prefix)),
            "http://web/new/a/b?x=1"
        );
        let own_query = Redirect {
            path: Some(PathRedirect::Full("/login?from=old".into())),
            ..redirect()
        };
        assert_eq!(
            location(&own_query, "/old?x=1", "web", None),
            "http://web/login?from=old"
        );
    }

    #[test]
    fn without_a_valid_host_the_location_is_relative() {
        let r = Redirect {
            path: Some(PathRedirect::Full("/x".into())),
            ..redirect()
        };
        assert_eq!(location(&r, "/?a=1", "bad host", None), "/x?a=1");
    }
}
