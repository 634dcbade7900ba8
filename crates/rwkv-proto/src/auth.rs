//! The shared secret that routers present to workers.
//!
//! The worker's gRPC API has no tenants of its own: whoever reaches the port can name any
//! tenant, export another tenant's sessions or drain the worker. A worker started with a
//! [`WorkerToken`] therefore refuses every call that does not carry it as
//! `authorization: Bearer <token>` ([`ServerAuth`]), and routers configured with the same token
//! add it to every call ([`ClientAuth`]). The token travels in the clear over plaintext
//! HTTP/2: use it together with TLS (`tls_cert` on the worker) off a trusted network.
//!
//! A token file may hold several tokens, one per line ([`read_token_file`]): a worker accepts
//! each of them and a router sends the first. That is what rotation needs: add the new token
//! below the old one and restart the workers, move it to the top and restart the routers,
//! drop the old one and restart the workers; no call is refused at any point.

use std::fmt;
use std::path::Path;

use rand::RngCore;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Shortest token accepted: a guessable secret is no secret.
pub const MIN_TOKEN_CHARS: usize = 16;
/// Largest token file read (a token is one line).
const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// The cluster's worker token. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct WorkerToken {
    /// `Bearer <token>`, the header value as sent.
    header: AsciiMetadataValue,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the worker token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the worker token file {0} is larger than {MAX_TOKEN_FILE_BYTES} bytes")]
    TooLarge(String),
    #[error("the worker token must be at least {MIN_TOKEN_CHARS} characters, got {0}")]
    TooShort(usize),
    #[error("the worker token may only hold printable ASCII without spaces")]
    BadCharacter,
    #[error("the worker token file {0} holds no token")]
    Empty(String),
}

impl WorkerToken {
    /// A token from its text; surrounding whitespace (a file's final newline) is dropped.
    pub fn new(secret: &str) -> Result<Self, TokenError> {
        let secret = secret.trim();
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::BadCharacter);
        }
        if secret.len() < MIN_TOKEN_CHARS {
            return Err(TokenError::TooShort(secret.len()));
        }
        let header = format!("Bearer {secret}")
            .parse()
            .map_err(|_| TokenError::BadCharacter)?;
        Ok(Self { header })
    }

    /// A fresh random token (256 bits from the OS), for a router and worker in one process.
    pub fn random() -> Self {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self::new(&hex).expect("64 hex digits make a valid token")
    }

    /// Whether `metadata` carries this token. The comparison takes the same time wherever the
    /// first difference is, so the token cannot be found a byte at a time by timing refusals.
    pub fn is_presented_in(&self, metadata: &MetadataMap) -> bool {
        let Some(presented) = metadata.get("authorization") else {
            return false;
        };
        let (expected, presented) = (self.header.as_bytes(), presented.as_bytes());
        if expected.len() != presented.len() {
            return false;
        }
        expected
            .iter()
            .zip(presented)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

/// The tokens in `path` (a Kubernetes Secret mounted as a file, say), one per line, blank lines
/// ignored; at least one. A router sends the first, a worker accepts any.
pub fn read_token_file(path: &Path) -> Result<Vec<WorkerToken>, TokenError> {
    let name = || path.display().to_string();
    let read = |source| TokenError::Read {
        path: name(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read)?.len();
    if len > MAX_TOKEN_FILE_BYTES {
        return Err(TokenError::TooLarge(name()));
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    let tokens = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(WorkerToken::new)
        .collect::<Result<Vec<_>, _>>()?;
    if tokens.is_empty() {
        return Err(TokenError::Empty(name()));
    }
    Ok(tokens)
}

impl fmt::Debug for WorkerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WorkerToken(<redacted>)")
    }
}

/// Client side: adds the token, if there is one, to every call.
#[derive(Clone, Debug, Default)]
pub struct ClientAuth(Option<WorkerToken>);

impl ClientAuth {
    pub fn new(token: Option<WorkerToken>) -> Self {
        Self(token)
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.header.clone());
        }
        Ok(request)
    }
}

/// Server side: with tokens, refuses every call that carries none of them (UNAUTHENTICATED);
/// without any, lets everything through.
#[derive(Clone, Debug, Default)]
pub struct ServerAuth(Vec<WorkerToken>);

impl ServerAuth {
    pub fn new(tokens: Vec<WorkerToken>) -> Self {
        Self(tokens)
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        // Every token is compared (no early exit), so timing does not tell which one matched.
        let accepted = self.0.iter().fold(self.0.is_empty(), |ok, token| {
            ok | token.is_presented_in(request.metadata())
        });
        if accepted {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "this worker requires the cluster's worker token (worker_token_file)",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_with(header: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(h) = header {
            request
                .metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        request
    }

    #[test]
    fn the_server_takes_only_the_token_the_client_sends() {
        let token = WorkerToken::new("0123456789abcdef-secret\n").unwrap();
        let mut server = ServerAuth::new(vec![token.clone()]);
        let sent = ClientAuth::new(Some(token)).call(Request::new(())).unwrap();
        assert!(server.call(sent).is_ok());
        for wrong in [
            None,
            Some("Bearer 0123456789abcdef-secreT"),
            Some("Bearer 0123456789abcdef-secret2"),
            Some("0123456789abcdef-secret"),
            Some("Bearer "),
        ] {
            let refused = server.call(call_with(wrong)).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{wrong:?}");
        }
    }

    /// Mid-rotation a worker accepts the old token and the new one, and nothing else.
    #[test]
    fn a_server_with_several_tokens_takes_any_of_them() {
        let old = WorkerToken::new("old-token-0123456789").unwrap();
        let new = WorkerToken::new("new-token-0123456789").unwrap();
        let mut server = ServerAuth::new(vec![new.clone(), old.clone()]);
        for token in [old, new] {
            let sent = ClientAuth::new(Some(token)).call(Request::new(())).unwrap();
            assert!(server.call(sent).is_ok());
        }
        let refused = server
            .call(call_with(Some("Bearer other-token-0123456789")))
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn without_a_token_both_sides_pass_calls_through() {
        let sent = ClientAuth::default().call(Request::new(())).unwrap();
        assert!(sent.metadata().get("authorization").is_none());
        assert!(ServerAuth::default().call(sent).is_ok());
    }

    #[test]
    fn weak_or_malformed_tokens_are_refused_and_debug_hides_the_secret() {
        assert!(matches!(
            WorkerToken::new("short"),
            Err(TokenError::TooShort(5))
        ));
        assert!(matches!(
            WorkerToken::new("has a space in the middle"),
            Err(TokenError::BadCharacter)
        ));
        assert!(matches!(
            WorkerToken::new("nön-ascii-token-text"),
            Err(TokenError::BadCharacter)
        ));
        let token = WorkerToken::random();
        assert_ne!(token, WorkerToken::random());
        assert_eq!(format!("{token:?}"), "WorkerToken(<redacted>)");
    }

    #[test]
    fn a_token_file_is_read_trimmed_and_bounded() {
        let dir = std::env::temp_dir().join(format!("rwkv-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, "  0123456789abcdef0123\n").unwrap();
        assert_eq!(
            read_token_file(&good).unwrap(),
            vec![WorkerToken::new("0123456789abcdef0123").unwrap()]
        );
        let two = dir.join("two");
        std::fs::write(&two, "new-token-0123456789\n\nold-token-0123456789\n").unwrap();
        assert_eq!(read_token_file(&two).unwrap().len(), 2);
        let blank = dir.join("blank");
        std::fs::write(&blank, "\n  \n").unwrap();
        assert!(matches!(read_token_file(&blank), Err(TokenError::Empty(_))));
        let weak = dir.join("weak");
        std::fs::write(&weak, "new-token-0123456789\nshort\n").unwrap();
        assert!(matches!(
            read_token_file(&weak),
            Err(TokenError::TooShort(5))
        ));
        let big = dir.join("big");
        std::fs::write(&big, vec![b'a'; 5000]).unwrap();
        assert!(matches!(
            read_token_file(&big),
            Err(TokenError::TooLarge(_))
        ));
        assert!(matches!(
            read_token_file(&dir.join("missing")),
            Err(TokenError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
