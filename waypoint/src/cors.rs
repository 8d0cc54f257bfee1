//! Cross-origin resource sharing for a route (VirtualService `corsPolicy`), as
//! Envoy's CORS filter applies it behind Istio:
//!
//! - A request without an `Origin` header, or from an origin the policy does not
//!   allow, is routed as usual and its response gets no CORS headers.
//! - A preflight (`OPTIONS` with `Access-Control-Request-Method`) from an allowed
//!   origin is answered here, 200 with the policy's headers (`*` as the methods or
//!   headers echoes what the preflight asks for); it never reaches the backend. A
//!   preflight from another origin goes to the backend, or, with
//!   `unmatchedPreflights: IGNORE`, is answered 200 without
//!   `Access-Control-Allow-Origin`.
//! - The response to any other request from an allowed origin (the backend's, or the
//!   waypoint's timeout or no-healthy-upstream answer) gets
//!   `Access-Control-Allow-Origin` (the request's origin), `-Allow-Credentials` and
//!   `-Expose-Headers`, replacing the backend's.
//!
//! Order, as Istio's filter chain has it: request authentication and authorization
//! run first (a preflight they refuse gets their 401 or 403), then faults (an abort
//! answers without CORS headers), then CORS; redirects and direct responses are not
//! subject to it.

use http::{HeaderMap, HeaderValue, Method, header};

use crate::matching::StringMatch;

#[derive(Clone, Debug, Default)]
pub struct CorsPolicy {
    /// An origin is allowed when any of these matches it.
    pub allow_origins: Vec<StringMatch>,
    /// Comma-joined, as sent in the preflight answer.
    pub allow_methods: Option<HeaderValue>,
    pub allow_headers: Option<HeaderValue>,
    pub expose_headers: Option<HeaderValue>,
    /// Seconds.
    pub max_age: Option<HeaderValue>,
    pub allow_credentials: bool,
    /// A preflight from an origin not allowed goes to the backend (Istio's default,
    /// `FORWARD`); `false` (`IGNORE`) answers it 200 without CORS headers.
    pub forward_unmatched_preflights: bool,
}

/// What the policy makes of one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Cors {
    /// Not a cross-origin request the policy allows: route it, add nothing.
    Pass,
    /// A preflight answered here: 200 with these headers, no body.
    Answer(HeaderMap),
    /// An allowed cross-origin request: route it, then [`CorsPolicy::decorate`] its
    /// response with this origin.
    Allowed(HeaderValue),
}

impl CorsPolicy {
    pub fn decide(&self, method: &Method, headers: &HeaderMap) -> Cors {
        let Some(origin) = headers.get(header::ORIGIN).filter(|o| !o.is_empty()) else {
            return Cors::Pass;
        };
        let preflight = method == Method::OPTIONS
            && headers
                .get(header::ACCESS_CONTROL_REQUEST_METHOD)
                .is_some_and(|m| !m.is_empty());
        let allowed = self.allows(origin);
        match (preflight, allowed) {
            (false, false) => Cors::Pass,
            (false, true) => Cors::Allowed(origin.clone()),
            (true, false) if self.forward_unmatched_preflights => Cors::Pass,
            (true, false) => Cors::Answer(self.preflight_answer(headers, None)),
            (true, true) => Cors::Answer(self.preflight_answer(headers, Some(origin))),
        }
    }

    /// The headers of a preflight answered here; `origin` when it is allowed.
    fn preflight_answer(&self, request: &HeaderMap, origin: Option<&HeaderValue>) -> HeaderMap {
        let mut answer = HeaderMap::new();
        if let Some(origin) = origin {
            answer.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        }
        if self.allow_credentials {
            answer.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        // `*` echoes what the preflight asks for.
        let echo = |configured: &Option<HeaderValue>, asked: header::HeaderName| match configured {
            Some(v) if v == "*" => request.get(asked).cloned(),
            other => other.clone(),
        };
        for (name, value) in [
            (
                header::ACCESS_CONTROL_ALLOW_METHODS,
                echo(&self.allow_methods, header::ACCESS_CONTROL_REQUEST_METHOD),
            ),
            (
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                echo(&self.allow_headers, header::ACCESS_CONTROL_REQUEST_HEADERS),
            ),
            (header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone()),
        ] {
            if let Some(v) = value {
                answer.insert(name, v);
            }
        }
        // Envoy's filter also sees its own answer on the way out.
        if origin.is_some()
            && let Some(v) = &self.expose_headers
        {
            answer.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
        answer
    }

    /// The CORS headers of a response to an allowed cross-origin request; they
    /// replace any the backend sent.
    pub fn decorate(&self, origin: HeaderValue, headers: &mut HeaderMap) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if self.allow_credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &self.expose_headers {
            headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        self.allow_origins
            .iter()
            .any(|m| m.matches("*") || m.matches(origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CorsPolicy {
        CorsPolicy {
            allow_origins: vec![
                StringMatch::Exact("https://shop.example".into()),
                StringMatch::regex(r"https://.*\.partner\.example").expect("regex"),
            ],
            allow_methods: Some(HeaderValue::from_static("GET,POST")),
            allow_headers: Some(HeaderValue::from_static("x-token")),
            expose_headers: Some(HeaderValue::from_static("x-trace")),
            max_age: Some(HeaderValue::from_static("86400")),
            allow_credentials: true,
            forward_unmatched_preflights: true,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    header::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    const PREFLIGHT: (&str, &str) = ("access-control-request-method", "POST");

    #[test]
    fn a_preflight_from_an_allowed_origin_is_answered_with_the_policy() {
        for origin in ["https://shop.example", "https://eu.partner.example"] {
            let got = policy().decide(&Method::OPTIONS, &headers(&[("origin", origin), PREFLIGHT]));
            let want = headers(&[
                ("access-control-allow-origin", origin),
                ("access-control-allow-credentials", "true"),
                ("access-control-allow-methods", "GET,POST"),
                ("access-control-allow-headers", "x-token"),
                ("access-control-max-age", "86400"),
                ("access-control-expose-headers", "x-trace"),
            ]);
            assert_eq!(got, Cors::Answer(want), "{origin}");
        }
    }

    #[test]
    fn requests_without_origin_or_from_other_origins_pass_untouched() {
        let p = policy();
        assert_eq!(p.decide(&Method::GET, &HeaderMap::new()), Cors::Pass);
        assert_eq!(
            p.decide(&Method::GET, &headers(&[("origin", "")])),
            Cors::Pass
        );
        let other = headers(&[("origin", "https://evil.example")]);
        assert_eq!(p.decide(&Method::GET, &other), Cors::Pass);
        // An unmatched preflight goes to the backend by default...
        let other_preflight = headers(&[("origin", "https://evil.example"), PREFLIGHT]);
        assert_eq!(p.decide(&Method::OPTIONS, &other_preflight), Cors::Pass);
        // ...or is answered without an allowed origin (IGNORE).
        let ignoring = CorsPolicy {
            forward_unmatched_preflights: false,
            ..policy()
        };
        assert_eq!(
            ignoring.decide(&Method::OPTIONS, &other_preflight),
            Cors::Answer(headers(&[
                ("access-control-allow-credentials", "true"),
                ("access-control-allow-methods", "GET,POST"),
                ("access-control-allow-headers", "x-token"),
                ("access-control-max-age", "86400"),
            ]))
        );
        // A regex is anchored: a prefix of an allowed origin is not allowed.
        let suffixed = headers(&[("origin", "https://eu.partner.example.evil")]);
        assert_eq!(p.decide(&Method::GET, &suffixed), Cors::Pass);
    }

    #[test]
    fn an_options_request_without_a_requested_method_is_not_a_preflight() {
        let h = headers(&[("origin", "https://shop.example")]);
        assert_eq!(
            policy().decide(&Method::OPTIONS, &h),
            Cors::Allowed(HeaderValue::from_static("https://shop.example"))
        );
    }

    #[test]
    fn responses_to_allowed_requests_get_the_origin_credentials_and_exposed_headers() {
        let p = policy();
        let Cors::Allowed(origin) = p.decide(
            &Method::POST,
            &headers(&[("origin", "https://shop.example")]),
        ) else {
            panic!("allowed")
        };
        let mut resp = headers(&[("access-control-allow-origin", "*"), ("x-app", "1")]);
        p.decorate(origin, &mut resp);
        assert_eq!(
            resp,
            headers(&[
                ("access-control-allow-origin", "https://shop.example"),
                ("x-app", "1"),
                ("access-control-allow-credentials", "true"),
                ("access-control-expose-headers", "x-trace"),
            ])
        );
    }

    #[test]
    fn a_star_for_methods_or_headers_echoes_what_the_preflight_asks_for() {
        let p = CorsPolicy {
            allow_methods: Some(HeaderValue::from_static("*")),
            allow_headers: Some(HeaderValue::from_static("*")),
            ..policy()
        };
        let Cors::Answer(got) = p.decide(
            &Method::OPTIONS,
            &headers(&[
                ("origin", "https://shop.example"),
                ("access-control-request-method", "DELETE"),
                ("access-control-request-headers", "x-a,x-b"),
            ]),
        ) else {
            panic!("answered")
        };
        assert_eq!(got["access-control-allow-methods"], "DELETE");
        assert_eq!(got["access-control-allow-headers"], "x-a,x-b");
    }

    #[test]
    fn an_exact_star_allows_every_origin() {
        let p = CorsPolicy {
            allow_origins: vec![StringMatch::Exact("*".into())],
            ..CorsPolicy::default()
        };
        assert_eq!(
            p.decide(&Method::GET, &headers(&[("origin", "https://any.example")])),
            Cors::Allowed(HeaderValue::from_static("https://any.example"))
        );
    }
}
