//! Request authentication (RequestAuthentication): JWTs validated against each
//! issuer's JWKS, yielding the request principal `<iss>/<sub>` that
//! AuthorizationPolicy's `requestPrincipals` match.
//!
//! Istio's semantics: a request without a token passes (with no request principal;
//! a policy may then require one); a request with a token that fails — unknown
//! issuer, bad signature, expired, wrong audience, malformed — gets 401 with Envoy's
//! text. A valid token's header is removed before forwarding unless the rule says
//! `forwardOriginalToken`. Clock skew of 60 s is allowed, as Envoy does.

use std::collections::HashSet;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{HeaderMap, HeaderName};
use jsonwebtoken::{DecodingKey, Validation, errors::ErrorKind, jwk::JwkSet};

#[derive(Clone, Debug)]
pub struct TokenSource {
    pub header: HeaderName,
    /// What precedes the token in the header value (`Bearer `).
    pub prefix: String,
}

#[derive(Clone)]
pub struct JwtRule {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: JwkSet,
    pub sources: Vec<TokenSource>,
    pub forward_original_token: bool,
}

impl std::fmt::Debug for JwtRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtRule")
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field("keys", &self.keys.keys.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("JWKS is not a valid key set: {0}")]
    Parse(serde_json::Error),
    #[error("JWKS has no keys")]
    Empty,
}

/// Parses a JWKS document.
pub fn parse_jwks(json: &str) -> Result<JwkSet, JwksError> {
    let set: JwkSet = serde_json::from_str(json).map_err(JwksError::Parse)?;
    if set.keys.is_empty() {
        return Err(JwksError::Empty);
    }
    Ok(set)
}

impl TokenSource {
    pub fn bearer() -> Self {
        Self {
            header: http::header::AUTHORIZATION,
            prefix: "Bearer ".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authn {
    /// No token: passes without a request principal.
    NoToken,
    /// `<iss>/<sub>`.
    Valid(String),
    /// Envoy's 401 text.
    Invalid(&'static str),
}

#[derive(Clone, Debug, Default)]
pub struct JwtAuthn {
    pub rules: Vec<JwtRule>,
}

#[derive(serde::Deserialize)]
struct Claims {
    iss: Option<String>,
    sub: Option<String>,
}

fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<Claims>(&bytes).ok()?.iss
}

impl JwtAuthn {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Finds and checks the request's token; on success removes its header unless
    /// the rule forwards it.
    pub fn authenticate(&self, headers: &mut HeaderMap) -> Authn {
        let default = [TokenSource::bearer()];
        let mut found = None;
        'rules: for rule in &self.rules {
            let sources = if rule.sources.is_empty() {
                &default[..]
            } else {
                &rule.sources[..]
            };
            for s in sources {
                if let Some(t) = headers
                    .get(&s.header)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix(s.prefix.as_str()))
                {
                    found = Some((t.trim().to_owned(), s.header.clone()));
                    break 'rules;
                }
            }
        }
        let Some((token, header)) = found else {
            return Authn::NoToken;
        };
        let Some(issuer) = unverified_issuer(&token) else {
            return Authn::Invalid("Jwt is not in the form of Header.Payload.Signature");
        };
        let Some(rule) = self.rules.iter().find(|r| r.issuer == issuer) else {
            return Authn::Invalid("Jwt issuer is not configured");
        };
        let outcome = verify(rule, &token);
        if matches!(outcome, Authn::Valid(_)) && !rule.forward_original_token {
            headers.remove(&header);
        }
        outcome
    }
}

fn verify(rule: &JwtRule, token: &str) -> Authn {
    let Ok(head) = jsonwebtoken::decode_header(token) else {
        return Authn::Invalid("Jwt header is an invalid JSON");
    };
    let candidates: Vec<_> = match &head.kid {
        Some(kid) => rule.keys.find(kid).into_iter().collect(),
        None => rule.keys.keys.iter().collect(),
    };
    if candidates.is_empty() {
        return Authn::Invalid("Jwks doesn't have key to match kid or alg from Jwt");
    }
    let mut validation = Validation::new(head.alg);
    validation.leeway = 60;
    validation.required_spec_claims = HashSet::new();
    validation.set_issuer(&[rule.issuer.as_str()]);
    if rule.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&rule.audiences);
    }
    let mut last = Authn::Invalid("Jwt verification fails");
    for jwk in candidates {
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        match jsonwebtoken::decode::<Claims>(token, &key, &validation) {
            Ok(data) => {
                let sub = data.claims.sub.unwrap_or_default();
                return Authn::Valid(format!("{}/{sub}", rule.issuer));
            }
            Err(e) => {
                last = Authn::Invalid(match e.kind() {
                    ErrorKind::ExpiredSignature => "Jwt is expired",
                    ErrorKind::ImmatureSignature => "Jwt not yet valid",
                    ErrorKind::InvalidAudience => "Audiences in Jwt are not allowed",
                    ErrorKind::InvalidIssuer => "Jwt issuer is not configured",
                    _ => "Jwt verification fails",
                })
            }
        }
    }
    last
}
