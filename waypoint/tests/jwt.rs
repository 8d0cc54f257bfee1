//! RequestAuthentication with real ES256 tokens over HTTP/1.1 and HTTP/2: missing
//! (allowed unless a policy requires a principal), valid (principal from iss/sub,
//! token header removed), and every way a token can be invalid (401).

use std::{
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use cairn_waypoint::{
    authz::{Effect, Operation, Policies, Policy, PolicyRule, Source, Values},
    jwt::{JwtAuthn, JwtRule, parse_jwks},
    route::{Action, HeaderOps, RouteTable, Rule, WeightedBackend},
    router::{Body, Router, Upstream, UpstreamFuture, full, serve},
};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const ISSUER: &str = "https://issuer.example";

struct Signer {
    key: EncodingKey,
    jwk: String,
}

fn signer(kid: &str) -> Signer {
    let pair = rcgen::KeyPair::generate().expect("P-256 key");
    let raw = pair.public_key_raw();
    assert_eq!(raw.len(), 65, "uncompressed point");
    let jwk = format!(
        r#"{{"kty":"EC","crv":"P-256","kid":"{kid}","alg":"ES256","x":"{}","y":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(&raw[1..33]),
        URL_SAFE_NO_PAD.encode(&raw[33..65])
    );
    Signer {
        key: EncodingKey::from_ec_der(&pair.serialize_der()),
        jwk,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn token(s: &Signer, kid: &str, claims: serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, &s.key).expect("sign")
}

/// Keeps the Authorization header each request arrived with.
#[derive(Default)]
struct Seen(Mutex<Vec<Option<String>>>);

impl Upstream for Seen {
    fn send(&self, _backend: &str, req: Request<Body>) -> UpstreamFuture {
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.0.lock().expect("lock").push(auth);
        Box::pin(async { Ok(Response::new(full("ok"))) })
    }
}

#[tokio::test]
async fn tokens_are_validated_and_feed_request_principals() {
    let good = signer("k1");
    let other = signer("k1");
    let jwks = format!(r#"{{"keys":[{}]}}"#, good.jwk);
    // Istio's "require a JWT on /secure": deny requests without a request principal.
    let require_jwt = Policy {
        name: "bookinfo/require-jwt".into(),
        effect: Effect::Deny,
        rules: vec![PolicyRule {
            from: vec![Source {
                request_principals: Values::parse(&[], &["*".into()]),
                ..Default::default()
            }],
            to: vec![Operation {
                paths: Values::parse(&["/secure*".into()], &[]),
                ..Default::default()
            }],
            when: vec![],
        }],
    };
    let only_alice = Policy {
        name: "bookinfo/alice-admin".into(),
        effect: Effect::Deny,
        rules: vec![PolicyRule {
            from: vec![Source {
                request_principals: Values::parse(&[], &[format!("{ISSUER}/alice")]),
                ..Default::default()
            }],
            to: vec![Operation {
                paths: Values::parse(&["/secure/admin".into()], &[]),
                ..Default::default()
            }],
            when: vec![],
        }],
    };
    let seen = Arc::new(Seen::default());
    let router = Arc::new(Router::new(
        RouteTable {
            rules: vec![Rule {
                name: "all".into(),
                matches: vec![],
                action: Action::Forward(vec![WeightedBackend {
                    backend: "b".into(),
                    weight: 1,
                    headers: None,
                }]),
                fault: None,
                timeout: None,
                retry: None,
                rewrite: None,
                mirrors: vec![],
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
                cors: None,
            }],
            policies: Policies {
                policies: vec![require_jwt, only_alice],
            },
            jwt: JwtAuthn {
                rules: vec![JwtRule {
                    issuer: ISSUER.into(),
                    audiences: vec!["bookinfo".into()],
                    keys: parse_jwks(&jwks).expect("jwks"),
                    sources: vec![],
                    forward_original_token: false,
                }],
            },
        },
        seen.clone(),
        Some(2),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve(listener, router));

    let t = now();
    let claims = |sub: &str, aud: &str, exp: u64| serde_json::json!({"iss": ISSUER, "sub": sub, "aud": aud, "exp": exp, "iat": t});
    let alice = token(&good, "k1", claims("alice", "bookinfo", t + 600));
    let bob = token(&good, "k1", claims("bob", "bookinfo", t + 600));
    let expired = token(&good, "k1", claims("alice", "bookinfo", t - 600));
    let wrong_aud = token(&good, "k1", claims("alice", "reviews", t + 600));
    let forged = token(&other, "k1", claims("alice", "bookinfo", t + 600));
    let stranger = token(
        &good,
        "k1",
        serde_json::json!({"iss": "https://evil.example", "sub": "x", "exp": t + 600}),
    );
    let cases: Vec<(&str, Option<String>, StatusCode, &str)> = vec![
        ("/public", None, StatusCode::OK, "ok"),
        (
            "/secure/page",
            None,
            StatusCode::FORBIDDEN,
            "RBAC: access denied",
        ),
        ("/secure/page", Some(bob.clone()), StatusCode::OK, "ok"),
        (
            "/secure/admin",
            Some(bob),
            StatusCode::FORBIDDEN,
            "RBAC: access denied",
        ),
        ("/secure/admin", Some(alice), StatusCode::OK, "ok"),
        (
            "/public",
            Some(expired),
            StatusCode::UNAUTHORIZED,
            "Jwt is expired",
        ),
        (
            "/public",
            Some(wrong_aud),
            StatusCode::UNAUTHORIZED,
            "Audiences in Jwt are not allowed",
        ),
        (
            "/public",
            Some(forged),
            StatusCode::UNAUTHORIZED,
            "Jwt verification fails",
        ),
        (
            "/public",
            Some(stranger),
            StatusCode::UNAUTHORIZED,
            "Jwt issuer is not configured",
        ),
        (
            "/public",
            Some("not.a.jwt".into()),
            StatusCode::UNAUTHORIZED,
            "Jwt is not in the form of Header.Payload.Signature",
        ),
    ];
    for proto in ["HTTP/1.1", "HTTP/2"] {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(proto == "HTTP/2")
            .build_http::<Body>();
        for (path, tok, want, body) in &cases {
            let mut b = Request::get(format!("http://{addr}{path}"));
            if let Some(tok) = tok {
                b = b.header("authorization", format!("Bearer {tok}"));
            }
            let resp = client
                .request(b.body(full("")).expect("request"))
                .await
                .expect("response");
            assert_eq!(resp.status(), *want, "{proto} {path} {tok:?}");
            let got = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(String::from_utf8_lossy(&got), *body, "{proto} {path}");
        }
    }
    let forwarded = seen.0.lock().expect("lock").clone();
    assert_eq!(forwarded.len(), 6, "three allowed requests per protocol");
    assert!(
        forwarded.iter().all(Option::is_none),
        "validated tokens are not forwarded: {forwarded:?}"
    );
}
