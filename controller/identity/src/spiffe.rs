//! The SPIFFE id type: parse, display, serde.

use std::{fmt, str::FromStr};

/// Longest SPIFFE id the spec allows (URI length limit).
const MAX_LEN: usize = 2048;
/// Longest trust domain the spec allows.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

/// A workload identity in the Kubernetes shape Istio uses:
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Only ids of that shape parse: any other path is not a mesh identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a mesh SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("SPIFFE id is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("SPIFFE id must start with \"spiffe://\"")]
    Scheme,
    #[error("SPIFFE trust domain {0:?} is invalid: use 1-255 of [a-z0-9.-_]")]
    TrustDomain(String),
    #[error("SPIFFE path {0:?} must be /ns/<namespace>/sa/<service-account>")]
    Path(String),
    #[error("SPIFFE path segment {0:?} is invalid: use [A-Za-z0-9.-_], not \".\" or \"..\"")]
    Segment(String),
}

impl SpiffeId {
    /// Builds an id from its parts, validating each.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, ParseError> {
        let id = Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        validate_trust_domain(&id.trust_domain)?;
        validate_segment(&id.namespace)?;
        validate_segment(&id.service_account)?;
        if id.to_string().len() > MAX_LEN {
            return Err(ParseError::TooLong);
        }
        Ok(id)
    }

    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if s.len() > MAX_LEN {
            return Err(ParseError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(ParseError::Scheme)?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => return Err(ParseError::Path(String::new())),
        };
        validate_trust_domain(trust_domain)?;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(""), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => {
                validate_segment(ns)?;
                validate_segment(sa)?;
                Ok(Self {
                    trust_domain: trust_domain.to_owned(),
                    namespace: ns.to_owned(),
                    service_account: sa.to_owned(),
                })
            }
            _ => Err(ParseError::Path(path.to_owned())),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The id without its scheme, as Istio writes principals in AuthorizationPolicy:
    /// `<trust-domain>/ns/<ns>/sa/<sa>`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

fn validate_trust_domain(td: &str) -> Result<(), ParseError> {
    let ok = !td.is_empty()
        && td.len() <= MAX_TRUST_DOMAIN_LEN
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ParseError::TrustDomain(td.to_owned()))
    }
}

fn validate_segment(seg: &str) -> Result<(), ParseError> {
    let ok = !seg.is_empty()
        && seg != "."
        && seg != ".."
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ParseError::Segment(seg.to_owned()))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_displays() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/bookinfo-reviews")
            .expect("valid id");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-reviews");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
        );
        assert_eq!(
            id.principal(),
            "cluster.local/ns/default/sa/bookinfo-reviews"
        );
    }

    #[test]
    fn rejects_malformed() {
        let cases = [
            ("", ParseError::Scheme),
            ("http://cluster.local/ns/a/sa/b", ParseError::Scheme),
            ("spiffe://cluster.local", ParseError::Path(String::new())),
            (
                "spiffe://Cluster.local/ns/a/sa/b",
                ParseError::TrustDomain("Cluster.local".into()),
            ),
            (
                "spiffe:///ns/a/sa/b",
                ParseError::TrustDomain(String::new()),
            ),
            (
                "spiffe://td/ns/a/sa/b/extra",
                ParseError::Path("/ns/a/sa/b/extra".into()),
            ),
            ("spiffe://td/ns/a/sa/", ParseError::Segment(String::new())),
            ("spiffe://td/ns/../sa/b", ParseError::Segment("..".into())),
            ("spiffe://td/ns/a b/sa/b", ParseError::Segment("a b".into())),
            (
                "spiffe://td/sa/a/ns/b",
                ParseError::Path("/sa/a/ns/b".into()),
            ),
            (
                "spiffe://td/ns/a/sa/b?x=1",
                ParseError::Segment("b?x=1".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input), Err(want), "input {input:?}");
        }
        let long = format!("spiffe://td/ns/{}/sa/b", "a".repeat(MAX_LEN));
        assert_eq!(SpiffeId::parse(&long), Err(ParseError::TooLong));
    }

    #[test]
    fn serde_round_trip() {
        let id = SpiffeId::new("td", "ns1", "sa1").expect("valid parts");
        let json = serde_json::to_string(&id).expect("serialize");
        assert_eq!(json, "\"spiffe://td/ns/ns1/sa/sa1\"");
        let back: SpiffeId = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, id);
        let bad = serde_json::from_str::<SpiffeId>("\"spiffe://td/ns/x\"");
        assert!(bad.is_err());
    }

    proptest! {
        // Whatever the input, parsing never panics, and anything accepted displays back
        // to exactly the same string.
        #[test]
        fn parse_never_panics_and_round_trips(s in "\\PC{0,80}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert_eq!(id.to_string(), s);
            }
        }

        #[test]
        fn near_valid_inputs_round_trip(
            td in "[a-z0-9._-]{1,20}",
            ns in "[A-Za-z0-9._-]{1,20}",
            sa in "[A-Za-z0-9._-]{1,20}",
        ) {
            let s = format!("spiffe://{td}/ns/{ns}/sa/{sa}");
            let parsed = SpiffeId::parse(&s);
            let segments_ok = ![".", ".."].contains(&ns.as_str()) && ![".", ".."].contains(&sa.as_str());
            prop_assert_eq!(parsed.is_ok(), segments_ok);
            if let Ok(id) = parsed {
                prop_assert_eq!(id.to_string(), s);
                prop_assert_eq!(SpiffeId::new(td, ns, sa), Ok(id));
            }
        }
    }
}
