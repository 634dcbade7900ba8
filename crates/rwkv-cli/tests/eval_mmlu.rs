//! `rwkv eval mmlu` end to end on a tiny random-weight model and a two-subject MMLU fixture
//! (`tests/fixtures/mmlu`: six test questions per subject, with quoted fields, newlines and
//! leading spaces, and the subjects' dev files):
//! - a prediction equals the argmax over `" A"`..`" D"` of the logits `rwkv forward` gives for a
//!   prompt built here independently from the reference template;
//! - in-process and `--endpoint` (a real `rwkv serve`) give the same answers and scores;
//! - an interrupted sweep resumes without redoing finished questions;
//! - 5-shot prompts reuse the subject's cached few-shot state, with the same results as without;
//! - a malformed CSV row is an error naming the file and line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mmlu")
}

fn rwkv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rwkv"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run rwkv")
}

fn ok(args: &[&str]) -> Output {
    let out = rwkv(args);
    assert!(
        out.status.success(),
        "rwkv {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A random-weight model with the World vocabulary (C=64, one head, two layers).
fn make_model(dir: &Path) -> PathBuf {
    let path = dir.join("m.safetensors");
    ok(&[
        "bench",
        "--make-model",
        "64,2,65536",
        path.to_str().unwrap(),
    ]);
    path
}

/// `rwkv eval mmlu` on the fixture with the exact f32 CPU numerics, in process.
fn eval_in_process(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let data = fixture();
    let mut args = vec!["eval", "mmlu", "--data", data.to_str().unwrap()];
    args.extend(["--model", model.to_str().unwrap(), "--backend", "cpu"]);
    args.extend([
        "--cpu-precision",
        "f32",
        "--output-dir",
        out.to_str().unwrap(),
    ]);
    args.extend(extra);
    rwkv(&args)
}

fn report(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

fn journal(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("journal.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Journal records by (subject, index), checking each question appears once.
fn by_question(out: &Path) -> std::collections::BTreeMap<(String, u64), Value> {
    let mut map = std::collections::BTreeMap::new();
    for r in journal(out) {
        let key = (
            r["subject"].as_str().unwrap().to_owned(),
            r["index"].as_u64().unwrap(),
        );
        assert!(
            map.insert(key.clone(), r).is_none(),
            "{key:?} twice in the journal"
        );
    }
    map
}

fn logprobs(r: &Value) -> Vec<f64> {
    r["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn token_ids(text: &str) -> Vec<u32> {
    let out = ok(&["tokenize", "--text", text]);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_prediction_is_the_argmax_of_a_direct_forward_pass() {
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path());
    let out = dir.path().join("out");
    let o = eval_in_process(&model, &out, &["--subjects", "college_computer_science"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let records = by_question(&out);
    assert_eq!(records.len(), 6);

    // Question 2 has newlines in it. Its prompt, built here from the reference template.
    let csv = std::fs::read(fixture().join("test/college_computer_science_test.csv")).unwrap();
    let mut reader = csv::Reader::from_reader(&csv[..]);
    let row = reader.records().nth(2).unwrap().unwrap();
    assert!(row[0].contains('\n'));
    let prompt = format!(
        "User: You are a very talented expert in college computer science. Answer this question:\n\
         {}\nA. {}\nB. {}\nC. {}\nD. {}\n\nAssistant: The answer is",
        &row[0], &row[1], &row[2], &row[3], &row[4]
    );
    let mut tokens = vec![0];
    tokens.extend(token_ids(prompt.trim()));
    let ids: Vec<String> = tokens.iter().map(u32::to_string).collect();
    let logits_file = dir.path().join("logits.safetensors");
    ok(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &ids.join(","),
        "--output",
        logits_file.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&logits_file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor("logits").unwrap();
    let vocab = view.shape()[1];
    let all: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let last = &all[all.len() - vocab..];
    let max = last.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + last
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let choice_logits: Vec<f64> = [" A", " B", " C", " D"]
        .iter()
        .map(|c| last[token_ids(c)[0] as usize] as f64)
        .collect();
    let best = (0..4).fold(0, |b, i| {
        if choice_logits[i] > choice_logits[b] {
            i
        } else {
            b
        }
    });

    let record = &records[&("college_computer_science".to_owned(), 2)];
    let letter = ["A", "B", "C", "D"][best];
    assert_eq!(record["prediction"], letter, "{record}");
    assert_eq!(
        record["context_tokens"].as_u64().unwrap() as usize,
        tokens.len()
    );
    for (lp, logit) in logprobs(record).iter().zip(&choice_logits) {
        assert!((lp - (logit - lse)).abs() < 1e-3, "{lp} vs {}", logit - lse);
    }
    // The CSV has the same results as the journal, and the answer key of the data.
    let answer = ["A", "B", "C", "D"][row[5].parse::<usize>().unwrap()];
    let rows = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let line = rows
        .lines()
        .find(|l| l.starts_with("college_computer_science,2,"))
        .unwrap();
    assert!(
        line.starts_with(&format!("college_computer_science,2,{answer},{letter},")),
        "{line}"
    );
}

mod common;

use common::{free_port, get_status as http_get_status, Proc};

#[test]
fn endpoint_and_in_process_give_the_same_answers() {
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Proc(
        Command::new(env!("CARGO_BIN_EXE_rwkv"))
            .args([
                "serve",
                "--model",
                model.to_str().unwrap(),
                "--listen",
                &addr,
            ])
            .args(["--backend", "cpu", "--cpu-precision", "f32"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while http_get_status(&addr, "/ready") != Some(200) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the server never got ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let local = dir.path().join("local");
    let remote = dir.path().join("remote");
    let o = eval_in_process(&model, &local, &["--concurrency", "4"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ok(&[
        "eval",
        "mmlu",
        "--data",
        fixture().to_str().unwrap(),
        "--endpoint",
        &format!("http://{addr}"),
        "--output-dir",
        remote.to_str().unwrap(),
        "--concurrency",
        "4",
    ]);
    let (a, b) = (by_question(&local), by_question(&remote));
    assert_eq!(a.len(), 12);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (key, ra) in &a {
        let rb = &b[key];
        assert_eq!(ra["prediction"], rb["prediction"], "{key:?}");
        assert_eq!(ra["context_tokens"], rb["context_tokens"], "{key:?}");
        for (x, y) in logprobs(ra).iter().zip(logprobs(rb)) {
            assert!((x - y).abs() < 1e-4, "{key:?}: {x} vs {y}");
        }
    }
    let (ra, rb) = (report(&local), report(&remote));
    assert_eq!(ra["overall"], rb["overall"]);
    assert_eq!(rb["settings"]["mode"], "endpoint");
}

#[test]
fn an_interrupted_sweep_resumes_without_redoing_questions() {
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path());
    let out = dir.path().join("out");
    // The "interrupted" sweep: the first 3 questions of each subject.
    let o = eval_in_process(&model, &out, &["--limit", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = by_question(&out);
    assert_eq!(first.len(), 6);

    // Without --resume an existing journal is never overwritten.
    let o = eval_in_process(&model, &out, &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));

    let o = eval_in_process(&model, &out, &["--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("skipped 6 question(s)"), "{stderr}");
    let all = by_question(&out); // each question exactly once
    assert_eq!(all.len(), 12);
    for (key, r) in &first {
        assert_eq!(&all[key], r, "a finished question was redone");
    }
    let rep = report(&out);
    assert_eq!(rep["run"]["skipped"], 6);
    assert_eq!(rep["run"]["scored"], 6);
    assert_eq!(rep["overall"]["total"], 12);
    let csv_rows = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv_rows.lines().count(), 13);

    // Nothing left: a second resume scores nothing and reports the same accuracy.
    let o = eval_in_process(&model, &out, &["--resume"]);
    assert!(o.status.success());
    let again = report(&out);
    assert_eq!(again["run"]["scored"], 0);
    assert_eq!(again["overall"], rep["overall"]);
}

#[test]
fn five_shot_reuses_the_cached_few_shot_state() {
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path());
    let shared = dir.path().join("shared");
    let o = eval_in_process(&model, &shared, &["--shots", "5"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep = report(&shared);
    assert_eq!(rep["settings"]["shots"], 5);
    assert_eq!(rep["run"]["warmup_requests"], 2);
    assert_eq!(rep["run"]["cache_hits"], 12, "{rep}");
    let warm = rep["run"]["warmup_tokens"].as_u64().unwrap();
    // Every question reused its subject's whole few-shot prefix (5 solved questions).
    assert_eq!(rep["run"]["cached_tokens"].as_u64().unwrap(), 6 * warm);
    assert!(warm > 1000, "{rep}");

    let unshared = dir.path().join("unshared");
    let o = eval_in_process(&model, &unshared, &["--shots", "5", "--no-prefix-sharing"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep_u = report(&unshared);
    assert_eq!(rep_u["run"]["cache_hits"], 0);
    assert_eq!(rep_u["run"]["context_tokens"], rep["run"]["context_tokens"]);
    let (a, b) = (by_question(&shared), by_question(&unshared));
    for (key, ra) in &a {
        assert_eq!(ra["prediction"], b[key]["prediction"], "{key:?}");
        for (x, y) in logprobs(ra).iter().zip(logprobs(&b[key])) {
            assert!((x - y).abs() < 1e-4, "{key:?}: {x} vs {y}");
        }
    }
}

#[test]
fn a_malformed_row_is_an_error_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mmlu");
    std::fs::create_dir_all(data.join("test")).unwrap();
    let file = data.join("test/bad_test.csv");
    std::fs::write(
        &file,
        "question,choice0,choice1,choice2,choice3,answer\n\"two\nlines\",a,b,c,d,1\nq,a,b,c,d,E\n",
    )
    .unwrap();
    // The data is read before the model is loaded, so a bad row fails fast (the model file
    // does not even exist here).
    let o = rwkv(&[
        "eval",
        "mmlu",
        "--data",
        data.to_str().unwrap(),
        "--model",
        dir.path().join("missing.safetensors").to_str().unwrap(),
        "--output-dir",
        dir.path().join("out").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("bad_test.csv") && stderr.contains("line 4"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
