//! The shared secret that routers present to workers.
//!
//! The worker's gRPC API has no tenants of its own: whoever reaches the port can name any
//! tenant, export another tenant's sessions or drain the worker. A worker started with a
//! [`WorkerToken`] therefore refuses every call that does not carry it as
//! `authorization: Bearer <token>` ([`ServerAuth`]), and routers configured with the same token
//! add it to every call ([`ClientAuth`]). The token travels in the clear over plaintext
//! HTTP/2: use it together with TLS (`tls_cert` on the worker) off a trusted network.

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

    /// The token in `path` (a Kubernetes Secret mounted as a file, say).
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let read = |source| TokenError::Read {
            path: path.display().to_string(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > MAX_TOKEN_FILE_BYTES {
            return Err(TokenError::TooLarge(path.display().to_string()));
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Self::new(&text)
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

/// Server side: with a token, refuses every call that does not carry it (UNAUTHENTICATED);
/// without one, lets everything through.
#[derive(Clone, Debug, Default)]
pub struct ServerAuth(Option<WorkerToken>);

impl ServerAuth {
    pub fn new(token: Option<WorkerToken>) -> Self {
        Self(token)
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match &self.0 {
            Some(token) if !token.is_presented_in(request.metadata()) => {
                Err(Status::unauthenticated(
                    "this worker requires the cluster's worker token (worker_token_file)",
                ))
            }
            _ => Ok(request),
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
        let mut server = ServerAuth::new(Some(token.clone()));
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
            WorkerToken::from_file(&good).unwrap(),
            WorkerToken::new("0123456789abcdef0123").unwrap()
        );
        let big = dir.join("big");
        std::fs::write(&big, vec![b'a'; 5000]).unwrap();
        assert!(matches!(
            WorkerToken::from_file(&big),
            Err(TokenError::TooLarge(_))
        ));
        assert!(matches!(
            WorkerToken::from_file(&dir.join("missing")),
            Err(TokenError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
