//! The `rwkv` binary's stable interfaces, end to end: `forward` against the official package's
//! golden outputs (including `--state-in`), `tokenize`/`detokenize`, `inspect`, and error exits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn rwkv(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rwkv"))
        .args(args)
        .output()
        .expect("run rwkv")
}

fn stdout_ok(args: &[&str]) -> String {
    let out = rwkv(args);
    assert!(
        out.status.success(),
        "rwkv {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// f32 tensors of a safetensors file (i64 `tokens` converted to f32 is not needed: read apart).
fn read_f32(path: &Path) -> (HashMap<String, Vec<f32>>, Vec<u32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = HashMap::new();
    let mut tokens = Vec::new();
    for (name, view) in st.tensors() {
        match view.dtype() {
            safetensors::Dtype::F32 => {
                out.insert(
                    name,
                    view.data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                );
            }
            safetensors::Dtype::I64 => {
                tokens = view
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
                    .collect();
            }
            other => panic!("unexpected dtype {other:?}"),
        }
    }
    (out, tokens)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let n: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (d / n).sqrt()
}

fn ids(tokens: &[u32]) -> String {
    tokens
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn forward_writes_reference_logits_and_state_and_continues_from_state_in() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("rwkv6-tiny-c256-l3.pth");
    let (golden, tokens) = read_f32(&fixtures().join("rwkv6-tiny-c256-l3.golden.safetensors"));
    let out = dir.path().join("out.safetensors");
    stdout_ok(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &ids(&tokens),
        "--output",
        out.to_str().unwrap(),
    ]);
    let (got, _) = read_f32(&out);
    assert!(rel_l2(&got["logits"], &golden["seq.logits"]) < 1e-4);
    for i in 0..3 {
        for part in ["att_shift", "wkv", "ffn_shift"] {
            let err = rel_l2(
                &got[&format!("state.{i}.{part}")],
                &golden[&format!("seq.state.{i}.{part}")],
            );
            assert!(err < 1e-4, "state.{i}.{part}: {err}");
        }
    }
    // First half, then the second half from the written state.
    let cut = 16;
    let half = dir.path().join("half.safetensors");
    stdout_ok(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &ids(&tokens[..cut]),
        "--output",
        half.to_str().unwrap(),
    ]);
    let rest = dir.path().join("rest.safetensors");
    stdout_ok(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &ids(&tokens[cut..]),
        "--state-in",
        half.to_str().unwrap(),
        "--output",
        rest.to_str().unwrap(),
    ]);
    let (got, _) = read_f32(&rest);
    assert!(rel_l2(&got["logits"], &golden["continue.logits"]) < 1e-4);
}

#[test]
fn tokenize_and_detokenize_round_trip() {
    assert_eq!(
        stdout_ok(&["tokenize", "--text", "Hello, world!"]).trim(),
        "[33155,45,40213,34]"
    );
    assert_eq!(
        stdout_ok(&["tokenize", "--hex", "48656c6c6f"]).trim(),
        stdout_ok(&["tokenize", "--text", "Hello"]).trim()
    );
    assert_eq!(
        stdout_ok(&["detokenize", "33155,45,40213,34"]).trim_end_matches('\n'),
        "Hello, world!"
    );
    assert_eq!(
        stdout_ok(&["detokenize", "--hex", "33155"]).trim(),
        "48656c6c6f"
    );
    let hf = fixtures().join("../../crates/rwkv-tokenizer/assets/20B_tokenizer.json");
    assert_eq!(
        stdout_ok(&[
            "tokenize",
            "--tokenizer",
            hf.to_str().unwrap(),
            "--text",
            "Hello, world!"
        ])
        .trim(),
        "[12092,13,1533,2]"
    );
}

#[test]
fn inspect_reports_inferred_shape() {
    let model = fixtures().join("real/tiny-rwkv-6v0-1m.pth");
    let json: serde_json::Value = serde_json::from_str(&stdout_ok(&[
        "inspect",
        "--json",
        "--model",
        model.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(json["n_embd"], 64);
    assert_eq!(json["n_layer"], 12);
    assert_eq!(json["head_size"], 8);
    assert_eq!(json["dim_ffn"], 224);
    assert_eq!(json["vocab_size"], 256);
}

#[test]
fn bad_input_exits_with_a_clear_error() {
    let model = fixtures().join("rwkv6-tiny-c128-l2.safetensors");
    let out = rwkv(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        "1,99999",
        "--output",
        "/dev/null",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("99999"));
    let out = rwkv(&["inspect", "--model", "/nonexistent.pth"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.pth"));
    let out = rwkv(&["detokenize", "0"]);
    assert!(!out.status.success(), "id 0 has no text");
}

#[test]
fn generate_is_reproducible_with_a_seed() {
    let model = fixtures().join("rwkv6-tiny-c256-l3.safetensors");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "\u{1}",
        "--max-tokens",
        "12",
        "--seed",
        "7",
    ];
    // The fixture's vocabulary is 1000 ids, so the prompt must use low World ids (byte tokens).
    let a = stdout_ok(&args);
    let b = stdout_ok(&args);
    assert_eq!(a, b);
    let greedy = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "\u{1}",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ];
    assert_eq!(stdout_ok(&greedy), stdout_ok(&greedy));
}

/// The server commands check what they can before loading a model (minutes for a large one):
/// here the model does not even exist, and each run must fail on the setting, not the model.
#[test]
fn server_settings_are_checked_before_the_model_loads() {
    let dir = std::env::temp_dir().join(format!("rwkv-cli-settings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad_pem = dir.join("bad.pem");
    std::fs::write(&bad_pem, "not a certificate").unwrap();
    let bad_pem = bad_pem.to_str().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let missing = "/nonexistent-model.pth";
    let worker = ["worker", "--model", missing, "--worker-id", "w"];
    let etcd = ["--etcd", "http://127.0.0.1:9"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            [&worker[..], &etcd, &["--listen", "127.0.0.1:0"]].concat(),
            "--etcd",
        ),
        (
            [
                &worker[..],
                &["--listen", "127.0.0.1:0", "--lease-ttl", "0"],
            ]
            .concat(),
            "--lease-ttl",
        ),
        (
            [
                &worker[..],
                &etcd,
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--tls-cert",
                    bad_pem,
                    "--tls-key",
                    bad_pem,
                ],
            ]
            .concat(),
            "--tls-cert",
        ),
        (
            [&worker[..], &etcd, &["--listen", taken.as_str()]].concat(),
            "cannot listen",
        ),
        (
            [
                &worker[..],
                &etcd,
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--metrics-listen",
                    taken.as_str(),
                ],
            ]
            .concat(),
            "for metrics",
        ),
        (
            vec!["serve", "--model", missing, "--max-queue", "0"],
            "--max-queue",
        ),
        (
            vec!["serve", "--model", missing, "--listen", taken.as_str()],
            "cannot listen",
        ),
        (
            vec!["router", "--max-queue", "0", "--etcd", "http://127.0.0.1:9"],
            "--max-queue",
        ),
    ];
    for (args, expected) in cases {
        // The first case names an etcd that cannot be reached: only settings may fail here.
        let args: Vec<&str> = if expected == "--etcd" {
            args.into_iter()
                .filter(|a| *a != "--etcd" && *a != "http://127.0.0.1:9")
                .collect()
        } else {
            args
        };
        // Without the caller's RWKV_* settings (an RWKV_ETCD would make the first case wait
        // for that etcd).
        let out = Command::new(env!("CARGO_BIN_EXE_rwkv"))
            .args(&args)
            .env_clear()
            .output()
            .expect("run rwkv");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(
            !stderr.contains(missing),
            "{args:?} loaded the model first: {stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
