//! The cluster for real: an etcd server, two `rwkv worker` processes and an `rwkv router`
//! process on 127.0.0.1. 200 concurrent streaming requests complete with the right (greedy)
//! output; a worker killed mid-run costs no request (failover, or a clear error within a bound)
//! and leaves the routing table; greedy output through the router equals `rwkv generate`.
//!
//! Needs the `etcd` binary (Debian's `etcd-server`, which `.ci/run` installs). Without it the
//! test says so and passes, unless `RWKV_REQUIRE_ETCD=1` (set in CI) makes that a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{json, Value};

const MAX_TOKENS: usize = 12;

mod common;

use common::{free_port, Proc};

fn etcd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

fn start_etcd(dir: &Path) -> (Proc, String) {
    start_etcd_with(dir, "http", &[])
}

/// An etcd whose clients use `scheme` (`https` needs its certificate flags in `extra`).
fn start_etcd_with(dir: &Path, scheme: &str, extra: &[&std::ffi::OsStr]) -> (Proc, String) {
    let (client, peer) = (free_port(), free_port());
    let url = format!("{scheme}://127.0.0.1:{client}");
    let child = Command::new(etcd_binary().unwrap())
        .args([
            "--name",
            "test",
            "--data-dir",
            dir.join("etcd").to_str().unwrap(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
            "--initial-cluster",
            &format!("test=http://127.0.0.1:{peer}"),
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd");
    (Proc(child), url)
}

/// A worker record of the `tiny` model with 4 slots.
fn record(id: &str, address: &str) -> rwkv_cluster::WorkerRecord {
    rwkv_cluster::WorkerRecord {
        id: id.into(),
        address: address.into(),
        model: "tiny".into(),
        slots: 4,
    }
}

fn rwkv() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rwkv"));
    c.env("RUST_LOG", "error").stdout(Stdio::null());
    c
}

fn start_worker(model: &Path, etcd: &str, id: &str, token: &Path) -> Proc {
    let port = free_port();
    let child = rwkv()
        .args(["worker", "--model", model.to_str().unwrap(), "--etcd", etcd])
        .args(["--worker-token-file", token.to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--worker-id", id])
        .args(["--lease-ttl", "2", "--slots", "8", "--model-id", "tiny"])
        .args([
            "--backend",
            "cpu",
            "--cpu-precision",
            "f32",
            "--drain-timeout",
            "5",
        ])
        .spawn()
        .expect("start worker");
    Proc(child)
}

/// The router takes the worker token from the environment (the workers from the flag).
/// The router serves `/metrics` on `metrics_port` too, besides its API port.
fn start_router(etcd: &str, port: u16, metrics_port: u16, token: &Path) -> Proc {
    let child = rwkv()
        .env("RWKV_WORKER_TOKEN_FILE", token)
        .args([
            "router",
            "--etcd",
            etcd,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
        ])
        .args(["--request-timeout", "60"])
        .spawn()
        .expect("start router");
    Proc(child)
}

/// A random-weight model with the World vocabulary, written with `rwkv bench --make-model`.
fn make_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.safetensors");
    let out = rwkv()
        .args([
            "bench",
            "--make-model",
            "64,2,65536",
            path.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

async fn workers_in_table(http: &reqwest::Client, base: &str) -> Option<u64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with("rwkv_router_workers "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

async fn wait_for(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// One streaming completion; returns the text, or the error message the stream ended with.
async fn stream_completion(
    http: &reqwest::Client,
    base: &str,
    prompt: &str,
    max_tokens: usize,
) -> Result<String, String> {
    let response = http
        .post(format!("{base}/v1/completions"))
        .json(
            &json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                      "stream": true}),
        )
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    let body = response.text().await.map_err(|e| e.to_string())?;
    let mut text = String::new();
    let mut done = false;
    for data in body.split("\n\n").filter_map(|b| b.strip_prefix("data: ")) {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
        if let Some(err) = v.get("error") {
            return Err(err["message"].as_str().unwrap_or("error").to_owned());
        }
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
    }
    if done {
        Ok(text)
    } else {
        Err("the stream ended without [DONE]".into())
    }
}

/// A non-streaming greedy completion with `n` choices: their texts, or the error message.
async fn choices_completion(
    http: &reqwest::Client,
    base: &str,
    prompt: &str,
    max_tokens: usize,
    n: usize,
) -> Result<Vec<String>, String> {
    let response = http
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "n": n}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("HTTP {status}: {}", body["error"]["message"]));
    }
    let choices = body["choices"].as_array().ok_or("no choices")?;
    Ok(choices
        .iter()
        .map(|c| c["text"].as_str().unwrap_or_default().to_owned())
        .collect())
}

fn generate_cli(model: &Path, prompt: &str, max_tokens: usize) -> String {
    let out = rwkv()
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            prompt,
        ])
        .args([
            "--max-tokens",
            &max_tokens.to_string(),
            "--temperature",
            "0",
        ])
        .args(["--presence-penalty", "0", "--frequency-penalty", "0"])
        .args(["--backend", "cpu", "--cpu-precision", "f32"])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap_or(&text).to_owned()
}

/// Whether the etcd tests can run: false (the test then passes, saying it skipped) without an
/// `etcd` binary, unless RWKV_REQUIRE_ETCD makes that a failure.
fn etcd_available() -> bool {
    if etcd_binary().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("RWKV_REQUIRE_ETCD").is_none(),
        "RWKV_REQUIRE_ETCD is set but no `etcd` binary is on PATH"
    );
    eprintln!("SKIPPED: no `etcd` on PATH (apt-get install etcd-server)");
    false
}

/// etcd started in `dir` and answering: its process and client URL.
async fn running_etcd(dir: &Path, http: &reqwest::Client) -> (Proc, String) {
    let (proc, etcd) = start_etcd(dir);
    // etcd takes a moment to listen; workers and router retry nothing, so wait for it first.
    wait_for("etcd", Duration::from_secs(20), async || {
        http.get(format!("{etcd}/health")).send().await.is_ok()
    })
    .await;
    (proc, etcd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_cluster_serves_200_streams_and_survives_a_dead_worker() {
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path());
    let http = reqwest::Client::new();
    let (_etcd, etcd) = running_etcd(dir.path(), &http).await;
    let router_port = free_port();
    let base = format!("http://127.0.0.1:{router_port}");
    // The workers refuse calls without the cluster's token; the router sends it. Mid-rotation:
    // the workers take a new token and the old one, the router still sends the old one.
    let token = dir.path().join("worker-token");
    std::fs::write(&token, "cluster-test-token-0123456789\n").unwrap();
    let rotating = dir.path().join("worker-tokens");
    std::fs::write(
        &rotating,
        "cluster-test-token-new-012345\ncluster-test-token-0123456789\n",
    )
    .unwrap();
    let mut worker_a = start_worker(&model, &etcd, "a", &rotating);
    let _worker_b = start_worker(&model, &etcd, "b", &rotating);
    let metrics_port = free_port();
    let _router = start_router(&etcd, router_port, metrics_port, &token);
    // On the metrics port (the same text as the API port's /metrics).
    let metrics = format!("http://127.0.0.1:{metrics_port}");
    wait_for(
        "two workers in the routing table",
        Duration::from_secs(60),
        async || workers_in_table(&http, &metrics).await == Some(2),
    )
    .await;
    wait_for("readiness", Duration::from_secs(20), async || {
        http.get(format!("{base}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;

    // Greedy through the router equals `rwkv generate` on the same model and prompt.
    let prompts: Vec<String> = (0..20).map(|i| format!("Request number {i}:")).collect();
    let expected_0 = generate_cli(&model, &prompts[0], MAX_TOKENS);
    let got_0 = stream_completion(&http, &base, &prompts[0], MAX_TOKENS).await;
    assert_eq!(got_0.as_deref(), Ok(expected_0.as_str()));

    // 200 concurrent streams over 20 prompts: each prompt's 10 answers are identical (greedy)
    // whichever worker served them, and every stream completes.
    let first: Vec<String> = join_all(
        prompts
            .iter()
            .map(|p| stream_completion(&http, &base, p, MAX_TOKENS)),
    )
    .await
    .into_iter()
    .map(|r| r.expect("a request failed with both workers up"))
    .collect();
    let started = Instant::now();
    let results = join_all((0..200).map(|i| {
        let (http, base, prompt) = (&http, &base, &prompts[i % 20]);
        async move {
            (
                i % 20,
                stream_completion(http, base, prompt, MAX_TOKENS).await,
            )
        }
    }))
    .await;
    for (p, result) in &results {
        assert_eq!(result.as_ref(), Ok(&first[*p]), "prompt {p}");
    }
    eprintln!("200 streams in {:?}", started.elapsed());

    // Kill worker a in the middle of 60 longer streams and 10 requests of 3 choices. Each one
    // completes on b (greedy replay gives the same text as an undisturbed run; each choice of
    // a multi-choice call fails over on its own) or fails with a clear error; none hangs.
    let long = 48;
    let undisturbed = stream_completion(&http, &base, &prompts[3], long)
        .await
        .unwrap();
    let bound = Duration::from_secs(90);
    let run = join_all((0..60).map(|_| {
        let (http, base, prompt) = (&http, &base, &prompts[3]);
        async move { stream_completion(http, base, prompt, long).await }
    }));
    let run_choices = join_all((0..10).map(|_| {
        let (http, base, prompt) = (&http, &base, &prompts[3]);
        async move { choices_completion(http, base, prompt, long, 3).await }
    }));
    let killer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        worker_a.0.kill().unwrap();
    };
    let (results, choice_results, ()) =
        tokio::time::timeout(bound, async { tokio::join!(run, run_choices, killer) })
            .await
            .expect("requests hung after a worker died");
    let mut choices_completed = 0;
    for result in choice_results {
        match result {
            Ok(texts) => {
                assert_eq!(texts, vec![undisturbed.clone(); 3]);
                choices_completed += 1;
            }
            Err(message) => assert!(!message.is_empty()),
        }
    }
    eprintln!("{choices_completed}/10 three-choice requests completed across the worker's death");
    let mut completed = 0;
    for result in results {
        match result {
            Ok(text) => {
                assert_eq!(text, undisturbed);
                completed += 1;
            }
            Err(message) => assert!(!message.is_empty()),
        }
    }
    eprintln!("{completed}/60 completed across the worker's death");
    assert!(completed > 0, "failover completed no request");
    wait_for(
        "the dead worker to leave the table",
        Duration::from_secs(20),
        async || workers_in_table(&http, &base).await == Some(1),
    )
    .await;
    // And the cluster keeps serving.
    assert_eq!(
        stream_completion(&http, &base, &prompts[0], MAX_TOKENS)
            .await
            .as_deref(),
        Ok(expected_0.as_str())
    );
}

/// Membership in a real etcd follows the keys: a record stored under another worker's key is
/// ignored (no phantom worker, no takeover), a record whose key is deleted while its lease
/// lives comes back at the next lease refresh, and a deregistered one stays gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_membership_follows_the_keys() {
    use rwkv_cluster::{EtcdRegistry, Registry, WorkerRecord};
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let (_etcd, etcd) = running_etcd(dir.path(), &http).await;
    let ttl = Duration::from_secs(3);
    let registry = EtcdRegistry::connect(std::slice::from_ref(&etcd), "/t", ttl)
        .await
        .unwrap();
    let a = record("a", "http://10.0.0.1:50051");
    let registration = registry.register(a.clone()).await.unwrap();
    let mut members = registry.watch().await.unwrap();
    let mut etcd_client = etcd_client::Client::connect([etcd.as_str()], None)
        .await
        .unwrap();
    let json = |r: &WorkerRecord| serde_json::to_vec(r).unwrap();
    async fn settle(
        members: &mut tokio::sync::watch::Receiver<rwkv_cluster::Membership>,
        what: &str,
        done: impl Fn(&rwkv_cluster::Membership) -> bool,
    ) {
        tokio::time::timeout(Duration::from_secs(10), members.wait_for(|m| done(m)))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting until {what}"))
            .unwrap();
    }
    settle(&mut members, "a joined", |m| m.get("a") == Some(&a)).await;

    // Under key `b`, a record that claims to be `a`: neither a phantom `b` nor a new `a`.
    let impostor = record("a", "http://10.6.6.6:50051");
    etcd_client
        .put("/t/workers/b", json(&impostor), None)
        .await
        .unwrap();
    // A valid record under its own key, written after it, shows the watch has seen both.
    let c = record("c", "http://10.0.0.3:50051");
    etcd_client
        .put("/t/workers/c", json(&c), None)
        .await
        .unwrap();
    settle(&mut members, "c joined", |m| m.contains_key("c")).await;
    let now = members.borrow().clone();
    assert_eq!(now.get("a"), Some(&a), "{now:?}");
    assert!(!now.contains_key("b"), "{now:?}");
    // A fresh reader (a router starting now) agrees.
    let fresh = registry.watch().await.unwrap().borrow().clone();
    assert_eq!(fresh, now);
    // `c`'s key now holds garbage: `c` leaves.
    etcd_client.put("/t/workers/c", "{", None).await.unwrap();
    settle(&mut members, "c left", |m| !m.contains_key("c")).await;

    // Someone deletes `a`'s key while its lease lives: it comes back within a refresh.
    etcd_client.delete("/t/workers/a", None).await.unwrap();
    wait_for(
        "a's record written again",
        Duration::from_secs(10),
        async || {
            let got = etcd_client.get("/t/workers/a", None).await.unwrap();
            got.kvs().first().map(|kv| kv.value().to_vec()) == Some(json(&a))
        },
    )
    .await;
    settle(&mut members, "a registered again", |m| {
        m.get("a") == Some(&a)
    })
    .await;

    // Deregistered: gone for good.
    registration.deregister().await;
    settle(&mut members, "a deregistered", |m| !m.contains_key("a")).await;
    tokio::time::sleep(ttl).await;
    assert!(!members.borrow().contains_key("a"));
}

/// An etcd with authentication on: without a user nothing can be registered, with one the
/// membership works as before, and etcd's roles decide which prefix a user may write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_with_authentication_needs_the_user() {
    use etcd_client::{Client, Permission};
    use rwkv_cluster::{EtcdRegistry, EtcdSecurity, Registry};
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let (_etcd, etcd) = running_etcd(dir.path(), &http).await;
    let mut admin = Client::connect([etcd.as_str()], None).await.unwrap();
    admin.user_add("root", "root-pw", None).await.unwrap();
    let _ = admin.role_add("root").await; // present already in some etcd versions
    admin.user_grant_role("root", "root").await.unwrap();
    admin.user_add("rwkv", "rwkv-pw", None).await.unwrap();
    admin.role_add("rwkv").await.unwrap();
    admin
        .role_grant_permission("rwkv", Permission::read_write("/a/").with_prefix())
        .await
        .unwrap();
    admin.user_grant_role("rwkv", "rwkv").await.unwrap();
    admin.auth_enable().await.unwrap();

    let ttl = Duration::from_secs(3);
    let endpoints = std::slice::from_ref(&etcd);
    let record = record("w", "http://10.0.0.1:50051");
    let open = EtcdRegistry::connect(endpoints, "/a", ttl).await;
    let refused = match open {
        Ok(registry) => registry.register(record.clone()).await.err(),
        Err(e) => Some(e),
    };
    assert!(
        refused.is_some(),
        "registered in an etcd with auth, without a user"
    );

    let user = EtcdSecurity {
        user: Some(("rwkv".into(), "rwkv-pw".into())),
        ..EtcdSecurity::default()
    };
    let registry = EtcdRegistry::connect_secured(endpoints, "/a", ttl, &user)
        .await
        .unwrap();
    let registration = registry.register(record.clone()).await.unwrap();
    let members = registry.watch().await.unwrap();
    assert_eq!(members.borrow().get("w"), Some(&record));
    registration.deregister().await;

    // The user may not write outside its prefix.
    let elsewhere = EtcdRegistry::connect_secured(endpoints, "/b", ttl, &user)
        .await
        .unwrap();
    assert!(elsewhere.register(record).await.is_err());
    // A wrong password is refused when connecting.
    let wrong = EtcdSecurity {
        user: Some(("rwkv".into(), "nope".into())),
        ..EtcdSecurity::default()
    };
    let refused = EtcdRegistry::connect_secured(endpoints, "/a", ttl, &wrong).await;
    assert!(
        matches!(refused, Err(rwkv_cluster::RegistryError::Refused(_))),
        "{refused:?}"
    );

    // Through the CLI: a router with the user's password file follows the membership (its
    // health port answers); with a wrong password it stops at once, saying why.
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (good, bad) = (file("pw", "rwkv-pw\n"), file("bad-pw", "nope\n"));
    let router = |password: &Path, port: u16, metrics: u16| {
        rwkv()
            .args(["router", "--etcd", etcd.as_str(), "--etcd-prefix", "/a"])
            .args(["--etcd-user", "rwkv", "--etcd-password-file"])
            .arg(password)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .stderr(Stdio::piped())
            .spawn()
            .expect("start router")
    };
    let (port, metrics) = (free_port(), free_port());
    let mut good_router = router(&good, port, metrics);
    // Its log is not read: drained, so that it never blocks on a full pipe.
    let log = good_router.stderr.take().unwrap();
    std::thread::spawn(move || std::io::copy(&mut { log }, &mut std::io::sink()));
    let _router = Proc(good_router);
    wait_for(
        "the router with the etcd user",
        Duration::from_secs(60),
        async || {
            http.get(format!("http://127.0.0.1:{metrics}/health"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        },
    )
    .await;
    let refused = router(&bad, free_port(), free_port());
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || refused.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("authentication failed"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "a wrong password was retried"
    );
}

/// An etcd that speaks only TLS and asks for client certificates (`--client-cert-auth`): the
/// membership works with its CA and a client certificate it trusts, and not without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_behind_tls_with_client_certificates() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rwkv_cluster::{EtcdRegistry, EtcdSecurity, Registry};
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()]);
    let (client_cert, client_key) = leaf(vec!["rwkv-worker".into()]);
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let ca_file = write("ca.pem", &ca.pem());
    let (cert_file, key_file) = (
        write("server.pem", &server_cert),
        write("server-key.pem", &server_key),
    );
    let (_etcd, url) = start_etcd_with(
        dir.path(),
        "https",
        &[
            "--cert-file".as_ref(),
            cert_file.as_os_str(),
            "--key-file".as_ref(),
            key_file.as_os_str(),
            "--trusted-ca-file".as_ref(),
            ca_file.as_os_str(),
            "--client-cert-auth".as_ref(),
        ],
    );
    let secured = EtcdSecurity {
        ca_pem: Some(ca.pem().into_bytes()),
        client_identity: Some((client_cert.into_bytes(), client_key.into_bytes())),
        user: None,
    };
    let endpoints = [url.clone()];
    let ttl = Duration::from_secs(3);
    let record = record("w", "http://10.0.0.1:50051");
    // etcd takes a moment to listen.
    let deadline = Instant::now() + Duration::from_secs(30);
    let registration = loop {
        let attempt = async {
            let registry = EtcdRegistry::connect_secured(&endpoints, "/t", ttl, &secured).await?;
            registry
                .register(record.clone())
                .await
                .map(|r| (registry, r))
        };
        match attempt.await {
            Ok(done) => break done,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("etcd over TLS never answered: {e}"),
        }
    };
    let (registry, registration) = registration;
    assert_eq!(
        registry.watch().await.unwrap().borrow().get("w"),
        Some(&record)
    );
    registration.deregister().await;

    // Without a client certificate, or without the CA, nothing gets through.
    let no_client_cert = EtcdSecurity {
        client_identity: None,
        ..secured.clone()
    };
    for (what, security) in [
        ("no client certificate", no_client_cert),
        ("plaintext", EtcdSecurity::default()),
    ] {
        let refused = match EtcdRegistry::connect_secured(&endpoints, "/t", ttl, &security).await {
            Ok(registry) => registry.register(record.clone()).await.err(),
            Err(e) => Some(e),
        };
        assert!(refused.is_some(), "registered with {what}");
    }
}
