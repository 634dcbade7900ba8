//! Model conformance: every golden case of the official package through the CPU backend, both
//! checkpoint formats, plus batching and state-handling properties.

mod common;

use common::*;
use rwkv_cpu::CpuBackend;
use rwkv_model::{Backend, ModelWeights, OutputRows};

/// Relative L2 tolerance against the reference's `cpu fp32` outputs (issue: 1e-4).
const TOL: f64 = 1e-4;

#[test]
fn cpu_matches_reference_on_every_golden_case_from_pth() {
    for model in GOLDEN_MODELS {
        run_golden_cases(model, "pth", CpuBackend::new, TOL);
    }
}

#[test]
fn cpu_matches_reference_on_every_golden_case_from_safetensors() {
    for model in GOLDEN_MODELS {
        run_golden_cases(model, "safetensors", CpuBackend::new, TOL);
    }
}

#[test]
fn cpu_ragged_batch_equals_sequences_run_alone() {
    run_ragged_batch("rwkv6-tiny-c256-l3", CpuBackend::new, 1e-5);
}

#[test]
fn real_trained_model_with_head_size_8_matches_rwkv_cpp() {
    for ext in ["pth", "safetensors"] {
        let weights = ModelWeights::load(fixture(&format!("real/tiny-rwkv-6v0-1m.{ext}"))).unwrap();
        assert_eq!((weights.config.head_size, weights.config.n_head), (8, 8));
        let expected: Vec<f32> = std::fs::read(fixture("real/expected-logits-6v0-1m.bin"))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let mut cpu = CpuBackend::new(&weights, 1);
        let logits = cpu
            .forward(&[step(0, &[34, 105, 110], OutputRows::Last)])
            .unwrap();
        // 5e-3 accepts both f32 and bf16 folding of the embedding (fixtures/real/README.md).
        assert_close(&format!("real model .{ext}"), &logits.data, &expected, 5e-3);
    }
}

#[test]
fn pth_and_safetensors_load_identical_weights() {
    for model in GOLDEN_MODELS {
        let a = rwkv_model::Checkpoint::open(fixture(&format!("{model}.pth"))).unwrap();
        let b = rwkv_model::Checkpoint::open(fixture(&format!("{model}.safetensors"))).unwrap();
        assert_eq!(a.tensors().len(), b.tensors().len());
        for (name, t) in a.tensors() {
            let u = &b.tensors()[name];
            assert_eq!((t.dtype(), t.shape()), (u.dtype(), u.shape()), "{name}");
            assert_eq!(t.bytes(), u.bytes(), "{name}");
        }
        // The fingerprint names the weights, not the file format.
        assert_eq!(a.fingerprint(), b.fingerprint(), "{model}");
    }
    let [first, second] = GOLDEN_MODELS.map(|m| {
        rwkv_model::Checkpoint::open(fixture(&format!("{m}.safetensors")))
            .unwrap()
            .fingerprint()
    });
    assert_ne!(first, second);
}

#[test]
fn out_of_range_tokens_and_slots_are_errors_not_panics() {
    let weights = ModelWeights::load(fixture("rwkv6-tiny-c128-l2.safetensors")).unwrap();
    let mut cpu = CpuBackend::new(&weights, 2);
    let err = cpu
        .forward(&[step(0, &[1, 1000], OutputRows::Last)])
        .unwrap_err();
    assert!(err.to_string().contains("1000"), "{err}");
    let err = cpu.forward(&[step(2, &[1], OutputRows::Last)]).unwrap_err();
    assert!(err.to_string().contains("slot 2"), "{err}");
    let err = cpu
        .forward(&[
            step(1, &[1], OutputRows::Last),
            step(1, &[2], OutputRows::Last),
        ])
        .unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
}

#[test]
fn empty_and_none_output_steps_are_allowed() {
    let weights = ModelWeights::load(fixture("rwkv6-tiny-c128-l2.safetensors")).unwrap();
    let mut cpu = CpuBackend::new(&weights, 2);
    let out = cpu
        .forward(&[
            step(0, &[], OutputRows::Last),
            step(1, &[5, 6], OutputRows::None),
        ])
        .unwrap();
    assert_eq!(out.rows(), 0);
    assert_eq!(cpu.forward(&[]).unwrap().rows(), 0);
}

#[test]
fn copied_state_continues_identically() {
    let weights = ModelWeights::load(fixture("rwkv6-tiny-c128-l2.safetensors")).unwrap();
    let mut cpu = CpuBackend::new(&weights, 3);
    cpu.forward(&[step(0, &[10, 20, 30], OutputRows::None)])
        .unwrap();
    cpu.copy_state(0, 1).unwrap();
    let saved = cpu.save_state(0).unwrap();
    cpu.load_state(2, &saved).unwrap();
    let a = cpu.forward(&[step(0, &[40, 50], OutputRows::All)]).unwrap();
    let b = cpu.forward(&[step(1, &[40, 50], OutputRows::All)]).unwrap();
    let c = cpu.forward(&[step(2, &[40, 50], OutputRows::All)]).unwrap();
    assert_eq!(a, b);
    assert_eq!(a, c);
}

/// Checkpoints generated after the implementation was written (tests/fixtures/extra): a new
/// shape (C = 192, three heads, V = 777) and a state-tuned model whose initial state comes from
/// `time_state`.
const UNSEEN_MODELS: [&str; 2] = [
    "extra/rwkv6-check-c192-l2",
    "extra/rwkv6-check-timestate-c128-l2",
];

#[test]
fn cpu_matches_reference_on_checkpoints_made_after_the_code() {
    for model in UNSEEN_MODELS {
        for ext in ["pth", "safetensors"] {
            run_golden_cases(model, ext, CpuBackend::new, TOL);
        }
    }
}

#[test]
fn state_tuned_initial_state_matches_reference_and_changes_the_output() {
    let model = "extra/rwkv6-check-timestate-c128-l2";
    let weights = ModelWeights::load(fixture(&format!("{model}.pth"))).unwrap();
    let golden = Golden::load(model);
    let init = weights.initial_state();
    for i in 0..weights.config.n_layer {
        assert_close(
            &format!("init wkv {i}"),
            init.layer(i).1,
            &golden.f32(&format!("init.state.{i}.wkv")),
            1e-7,
        );
    }
    let mut cpu = CpuBackend::new(&weights, 1);
    cpu.load_state(0, &rwkv_model::State::zeros(&weights.config))
        .unwrap();
    let zero = cpu
        .forward(&[step(0, &golden.tokens, OutputRows::All)])
        .unwrap();
    assert_close(
        "zero-state logits",
        &zero.data,
        &golden.f32("zero.logits"),
        TOL,
    );
}
