//! TLS end to end: a worker serving gRPC over TLS (and requiring the cluster's worker token), a
//! router that verifies it with a CA, presents the token and serves HTTPS and gRPC over TLS on
//! one port, and clients that trust only that CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rwkv_cluster::{MemoryRegistry, Registry, WorkerRecord};
use rwkv_cpu::CpuBackend;
use rwkv_engine::{Engine, EngineConfig};
use rwkv_model::{synthetic, Checkpoint, ModelWeights};
use rwkv_proto::auth::WorkerToken;
use rwkv_proto::av1;
use rwkv_router::{PoolConfig, Router, RouterConfig, WorkerPool};
use rwkv_tokenizer::Tokenizer;
use rwkv_worker::{WorkerIdentity, WorkerService};
use serde_json::{json, Value};

struct Pki {
    dir: PathBuf,
    ca_pem: String,
}

impl Pki {
    /// A CA and a certificate it signed for 127.0.0.1 and localhost, as PEM files in a new
    /// directory.
    fn new() -> Self {
        Self::in_dir("main")
    }

    fn in_dir(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rwkv-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        Self {
            dir,
            ca_pem: ca.pem(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// One HTTP/1.1 request over TLS, trusting only `pki`'s CA: (status, body).
async fn https(
    pki: &Pki,
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap();
    roots.add(ca).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    // The server closes after the response; a TLS close without close_notify is fine here.
    let _ = tls.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Ok((status, body))
}

fn weights() -> ModelWeights {
    let spec = synthetic::SyntheticSpec::new(64, 2, 65536);
    let ckpt = Checkpoint::from_tensors("synthetic", synthetic::random_checkpoint(&spec));
    ModelWeights::from_checkpoint(&ckpt).unwrap()
}

async fn tls_worker(pki: &Pki, token: WorkerToken) -> std::net::SocketAddr {
    let engine = Engine::start(
        CpuBackend::new(&weights(), 2),
        EngineConfig {
            model_id: "tiny".into(),
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let service = WorkerService::new(
        engine.handle(),
        WorkerIdentity {
            worker_id: "w-tls".into(),
            model_id: "tiny".into(),
            model_hash: [0; 32],
            backend: "cpu".into(),
            slots: 2,
            max_batch_size: 8,
            max_waiting: 8,
        },
    )
    .require_token(token);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cert = std::fs::read(pki.path("cert.pem")).unwrap();
    let key = std::fs::read(pki.path("key.pem")).unwrap();
    tokio::spawn(async move {
        let _engine = engine;
        rwkv_worker::serve_tls(service, listener, cert, key, std::future::pending()).await
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_grpc_over_tls_end_to_end() {
    let pki = Pki::new();
    let token = WorkerToken::new("tls-test-worker-token-0123").unwrap();
    let worker = tls_worker(&pki, token.clone()).await;

    let registry = MemoryRegistry::new();
    let _registration = registry
        .register(WorkerRecord {
            id: "w-tls".into(),
            address: format!("https://{worker}"),
            model: "tiny".into(),
            slots: 2,
        })
        .await
        .unwrap();
    let pool_config = |token| PoolConfig {
        poll_interval: Duration::from_millis(50),
        worker_tls: Some(rwkv_router::tls::worker_client_config(&pki.path("ca.pem")).unwrap()),
        worker_token: token,
        ..PoolConfig::default()
    };
    let pool = WorkerPool::new(pool_config(Some(token)));
    pool.follow(&registry).await.unwrap();
    // A router without the token reaches the worker but is refused: the worker never becomes
    // ready there.
    let tokenless = WorkerPool::new(pool_config(None));
    tokenless.follow(&registry).await.unwrap();
    let router = Router::new(
        RouterConfig::default(),
        pool.clone(),
        Arc::new(Tokenizer::world()),
        None,
    );
    let tls = rwkv_router::tls::server_config(&pki.path("cert.pem"), &pki.path("key.pem")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(rwkv_router::serve_https(
        router,
        listener,
        tls,
        std::future::pending(),
    ));
    for _ in 0..200 {
        if pool.is_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(pool.is_ready(), "the router never reached the TLS worker");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !tokenless.is_ready(),
        "a router without the worker token was let in"
    );

    // HTTPS, trusting only our CA (a plain HTTP/1.1 exchange over rustls: reqwest's TLS
    // features would change every reqwest client in the workspace).
    let body = json!({"prompt": "Hello", "max_tokens": 3, "temperature": 0}).to_string();
    let (status, response) = https(&pki, addr, "POST", "/v1/completions", &body)
        .await
        .unwrap();
    assert_eq!(status, 200, "{response}");
    let response: Value = serde_json::from_str(&response).unwrap();
    assert_eq!(response["usage"]["completion_tokens"], 3, "{response}");

    // gRPC over TLS on the same port.
    let channel = tonic::transport::Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&pki.ca_pem)),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let models = av1::inference_client::InferenceClient::new(channel)
        .list_models(av1::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(models.models, vec!["tiny".to_owned()]);

    // A client that trusts another CA is refused; so is plaintext HTTP.
    let stranger = Pki::in_dir("stranger");
    assert!(https(&stranger, addr, "GET", "/health", "").await.is_err());
    let plain = reqwest::Client::new()
        .get(format!("http://{addr}/health"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    let _ = std::fs::remove_dir_all(&stranger.dir);
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[test]
fn bad_certificate_files_are_clear_errors() {
    let missing = rwkv_router::tls::server_config(Path::new("/nope/cert.pem"), Path::new("/nope"))
        .unwrap_err();
    assert!(missing.contains("/nope/cert.pem"), "{missing}");
    let dir = std::env::temp_dir().join(format!("rwkv-tls-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("empty.pem"), "not a certificate").unwrap();
    let empty = rwkv_router::tls::server_config(&dir.join("empty.pem"), &dir.join("empty.pem"))
        .unwrap_err();
    assert!(empty.contains("no certificate"), "{empty}");
    let _ = std::fs::remove_dir_all(&dir);
}
