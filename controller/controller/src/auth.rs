//! Who is calling: bearer tokens on CA and xDS requests mapped to a node (a ztunnel)
//! or a service account identity (a waypoint).
//!
//! [`Authenticator`] is the seam: [`StaticTokens`] reads a token file for local mode;
//! Kubernetes TokenReview will be another implementation.

use std::{collections::HashMap, future::Future, path::Path, pin::Pin};

use cairn_identity::SpiffeId;
use serde::Deserialize;
use tonic::metadata::MetadataMap;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A node proxy (ztunnel) on this node: may act for workloads scheduled there.
    Node(String),
    /// A single workload identity (a waypoint).
    Identity(SpiffeId),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Node(n) => write!(f, "node/{n}"),
            Caller::Identity(id) => write!(f, "{id}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send \"authorization: Bearer <token>\"")]
    Missing,
    #[error("authorization header is not \"Bearer <token>\"")]
    Malformed,
    #[error("bearer token is not recognised")]
    Unknown,
    /// The token is valid but does not give what is asked (wrong audience, not bound
    /// to a pod, ...).
    #[error("bearer token refused: {0}")]
    Refused(String),
    /// The token cannot be checked now (the API server is unreachable).
    #[error("cannot check the bearer token now: {0}")]
    Unavailable(String),
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        match e {
            // Retryable: the caller's token may be fine.
            AuthError::Unavailable(_) => tonic::Status::unavailable(e.to_string()),
            _ => tonic::Status::unauthenticated(e.to_string()),
        }
    }
}

pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Caller, AuthError>> + Send + 'a>>;

/// Maps a bearer token to a caller.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a>;
}

/// Extracts the bearer token from gRPC metadata and authenticates it.
pub async fn authenticate(
    auth: &dyn Authenticator,
    metadata: &MetadataMap,
) -> Result<Caller, AuthError> {
    let value = metadata.get("authorization").ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Malformed)?;
    auth.authenticate(token).await
}

/// One entry of the token file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenEntry {
    token: String,
    node: Option<String>,
    identity: Option<SpiffeId>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("token file {path}: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("token file {path}: entry {index} must set exactly one of node, identity")]
    Entry { path: String, index: usize },
    #[error("token file {path}: entry {index} repeats a token")]
    Duplicate { path: String, index: usize },
}

/// Tokens from configuration (local mode).
#[derive(Debug, Default, Clone)]
pub struct StaticTokens {
    tokens: HashMap<String, Caller>,
}

impl StaticTokens {
    pub fn new(tokens: impl IntoIterator<Item = (String, Caller)>) -> Self {
        Self {
            tokens: tokens.into_iter().collect(),
        }
    }

    /// Reads a YAML list of `{token, node}` or `{token, identity}` entries.
    pub fn from_file(path: &Path) -> Result<Self, TokenFileError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: p.clone(),
            source,
        })?;
        let entries: Vec<TokenEntry> =
            serde_yaml::from_str(&text).map_err(|source| TokenFileError::Parse {
                path: p.clone(),
                source,
            })?;
        let mut tokens = HashMap::new();
        for (index, e) in entries.into_iter().enumerate() {
            let caller = match (e.node, e.identity) {
                (Some(n), None) => Caller::Node(n),
                (None, Some(id)) => Caller::Identity(id),
                _ => return Err(TokenFileError::Entry { path: p, index }),
            };
            if tokens.insert(e.token, caller).is_some() {
                return Err(TokenFileError::Duplicate { path: p, index });
            }
        }
        Ok(Self { tokens })
    }
}

impl Authenticator for StaticTokens {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        let result = self.tokens.get(token).cloned().ok_or(AuthError::Unknown);
        Box::pin(std::future::ready(result))
    }
}
