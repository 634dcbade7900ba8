//! Shared helpers of the integration tests: fixture paths, golden files, tolerances, and the
//! conformance suite that every backend runs.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rwkv_model::{Backend, DType, ModelWeights, OutputRows, SeqStep, State, Tensor};

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The random-weight fixtures with golden outputs of the official package (`cpu fp32`).
pub const GOLDEN_MODELS: [&str; 2] = ["rwkv6-tiny-c128-l2", "rwkv6-tiny-c256-l3"];

/// ‖a − b‖₂ / ‖b‖₂.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in length");
    let diff: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let err = rel_l2(got, want);
    if std::env::var_os("RWKV_PRINT_ERR").is_some() {
        eprintln!("{what}: {err:.3e}");
    }
    assert!(
        err <= tol,
        "{what}: relative L2 error {err:.3e} exceeds {tol:.0e}"
    );
}

/// A golden file: the token ids, and every case's logits and states.
pub struct Golden {
    pub tensors: BTreeMap<String, Tensor>,
    pub tokens: Vec<u32>,
    pub continue_from: usize,
}

impl Golden {
    pub fn load(model: &str) -> Self {
        let bytes = std::fs::read(fixture(&format!("{model}.golden.safetensors"))).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = BTreeMap::new();
        let mut tokens = Vec::new();
        for (name, view) in file.tensors() {
            match view.dtype() {
                safetensors::Dtype::I64 => tokens = read_i64(view.data()),
                safetensors::Dtype::F32 => {
                    let t =
                        Tensor::from_bytes(DType::F32, view.shape().to_vec(), view.data().to_vec());
                    tensors.insert(name, t);
                }
                other => panic!("unexpected dtype {other:?} in golden file"),
            }
        }
        let meta = std::fs::read_to_string(fixture(&format!("{model}.json"))).unwrap();
        let continue_from = meta
            .split("\"continue_from\":")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.trim().parse().ok())
            .expect("continue_from in fixture json");
        Self {
            tensors,
            tokens,
            continue_from,
        }
    }

    pub fn f32(&self, name: &str) -> Vec<f32> {
        self.tensors[name].to_f32()
    }

    pub fn state(&self, weights: &ModelWeights, prefix: &str) -> State {
        State::from_tensors(&weights.config, &self.tensors, prefix).unwrap()
    }
}

/// The golden `tokens` tensor is int64, which checkpoints never hold, so it is decoded here.
fn read_i64(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect()
}

/// Compares a state with a golden state, tensor by tensor.
pub fn assert_state_close(what: &str, got: &State, want: &State, tol: f64) {
    for i in 0..want.n_layer() {
        let (ga, gw, gf) = got.layer(i);
        let (wa, ww, wf) = want.layer(i);
        assert_close(&format!("{what} layer {i} att_shift"), ga, wa, tol);
        assert_close(&format!("{what} layer {i} wkv"), gw, ww, tol);
        assert_close(&format!("{what} layer {i} ffn_shift"), gf, wf, tol);
    }
}

/// The three golden cases (seq, one, continue) through a backend, for one checkpoint file.
pub fn run_golden_cases<B: Backend>(
    model: &str,
    ext: &str,
    make: impl Fn(&ModelWeights, usize) -> B,
    tol: f64,
) {
    let weights = ModelWeights::load(fixture(&format!("{model}.{ext}"))).unwrap();
    let golden = Golden::load(model);
    let mut backend = make(&weights, 2);
    let tokens = &golden.tokens;
    let what = |case: &str| format!("{model}.{ext} {case}");

    // seq: the whole sequence at once, every position's logits.
    let logits = backend
        .forward(&[step(0, tokens, OutputRows::All)])
        .unwrap();
    assert_close(
        &what("seq logits"),
        &logits.data,
        &golden.f32("seq.logits"),
        tol,
    );
    let state = backend.save_state(0).unwrap();
    assert_state_close(
        &what("seq state"),
        &state,
        &golden.state(&weights, "seq.state"),
        tol,
    );

    // one: token by token.
    backend.reset_state(1).unwrap();
    let mut rows = Vec::new();
    for t in tokens.chunks(1) {
        rows.extend(
            backend
                .forward(&[step(1, t, OutputRows::Last)])
                .unwrap()
                .data,
        );
    }
    assert_close(&what("one logits"), &rows, &golden.f32("one.logits"), tol);
    let state = backend.save_state(1).unwrap();
    assert_state_close(
        &what("one state"),
        &state,
        &golden.state(&weights, "one.state"),
        tol,
    );

    // continue: first part, then the rest from the carried state.
    let cut = golden.continue_from;
    backend.reset_state(0).unwrap();
    let none = backend
        .forward(&[step(0, &tokens[..cut], OutputRows::None)])
        .unwrap();
    assert_eq!(none.rows(), 0);
    let state = backend.save_state(0).unwrap();
    assert_state_close(
        &what("half state"),
        &state,
        &golden.state(&weights, "half.state"),
        tol,
    );
    let logits = backend
        .forward(&[step(0, &tokens[cut..], OutputRows::All)])
        .unwrap();
    assert_close(
        &what("continue logits"),
        &logits.data,
        &golden.f32("continue.logits"),
        tol,
    );
}

pub fn step(slot: usize, tokens: &[u32], output: OutputRows) -> SeqStep<'_> {
    SeqStep {
        slot,
        tokens,
        output,
    }
}

/// A ragged batch (sequences of different lengths, several at once) must give each sequence the
/// same logits as running it alone.
pub fn run_ragged_batch<B: Backend>(
    model: &str,
    make: impl Fn(&ModelWeights, usize) -> B,
    tol: f64,
) {
    let weights = ModelWeights::load(fixture(&format!("{model}.safetensors"))).unwrap();
    let golden = Golden::load(model);
    let toks = &golden.tokens;
    let seqs: Vec<&[u32]> = (0..8)
        .map(|i| &toks[i..i + 1 + (i * 5) % (toks.len() - i)])
        .collect();
    let mut alone = make(&weights, 1);
    let mut expected = Vec::new();
    for s in &seqs {
        alone.reset_state(0).unwrap();
        expected.extend(alone.forward(&[step(0, s, OutputRows::All)]).unwrap().data);
    }
    let mut batched = make(&weights, 8);
    let steps: Vec<SeqStep<'_>> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| step(7 - i, s, OutputRows::All))
        .collect();
    let got = batched.forward(&steps).unwrap();
    assert_close(&format!("{model} ragged batch"), &got.data, &expected, tol);
}
