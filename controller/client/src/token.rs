//! The bearer token a proxy presents to the controller. In Kubernetes it is a
//! projected service-account token that the kubelet rewrites before it expires, so a
//! file token is read again for every request, never cached.

use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Token {
    Static(String),
    File(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading the token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the token file {0} is empty")]
    Empty(String),
    #[error("the token is not a valid header value")]
    Header,
}

impl Token {
    /// The token now (a file's current content, trimmed).
    pub fn current(&self) -> Result<String, TokenError> {
        match self {
            Token::Static(t) => Ok(t.clone()),
            Token::File(path) => {
                let p = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
                    path: p.clone(),
                    source,
                })?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(TokenError::Empty(p));
                }
                Ok(token.to_owned())
            }
        }
    }

    /// `authorization: Bearer <token>` as a gRPC metadata value.
    pub fn bearer(
        &self,
    ) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, TokenError> {
        format!("Bearer {}", self.current()?)
            .parse()
            .map_err(|_| TokenError::Header)
    }
}

impl From<String> for Token {
    fn from(t: String) -> Self {
        Token::Static(t)
    }
}

impl From<&str> for Token {
    fn from(t: &str) -> Self {
        Token::Static(t.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_token_is_read_at_each_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").expect("write");
        let token = Token::File(path.clone());
        assert_eq!(token.current().expect("token"), "first");
        // The kubelet rotates the projected token.
        std::fs::write(&path, "second").expect("write");
        assert_eq!(
            token.bearer().expect("bearer").to_str().expect("ascii"),
            "Bearer second"
        );
        std::fs::write(&path, "  \n").expect("write");
        assert!(matches!(token.current(), Err(TokenError::Empty(_))));
        std::fs::remove_file(&path).expect("rm");
        assert!(matches!(token.current(), Err(TokenError::Read { .. })));
        assert!(matches!(
            Token::from("bad\nvalue").bearer(),
            Err(TokenError::Header)
        ));
    }
}
