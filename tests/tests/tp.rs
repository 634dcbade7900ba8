//! Tensor parallel on CPU: the sharded forward over in-process ranks must match the unsharded
//! reference (logits and every state tensor) within 1e-5 relative L2.

mod common;

use common::{assert_close, fixture};
use rwkv_cpu::{CpuBackend, TpCpuBackend};
use rwkv_model::{Backend, ModelWeights, OutputRows, SeqStep, State};

const TOL: f64 = 1e-5;

fn tokens(n: usize, seed: u32, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97)) % vocab as u32)
        .collect()
}

fn compare_states(what: &str, got: &State, want: &State) {
    for i in 0..want.n_layer() {
        let (ga, gw, gf) = got.layer(i);
        let (wa, ww, wf) = want.layer(i);
        assert_close(&format!("{what} layer {i} att_shift"), ga, wa, TOL);
        assert_close(&format!("{what} layer {i} wkv"), gw, ww, TOL);
        assert_close(&format!("{what} layer {i} ffn_shift"), gf, wf, TOL);
    }
}

/// A ragged prefill batch over four slots in shuffled order, then decode steps; logits and
/// every slot's state compared after each step.
fn check_model(name: &str, world: usize) {
    let weights = ModelWeights::load(fixture(name)).unwrap();
    let vocab = weights.config.vocab_size;
    let mut reference = CpuBackend::new(&weights, 4);
    let mut tp = TpCpuBackend::new(&weights, 4, world).unwrap();
    assert_eq!(tp.world(), world);
    let prompts = [
        tokens(7, 1, vocab),
        tokens(1, 2, vocab),
        tokens(12, 3, vocab),
        tokens(3, 4, vocab),
    ];
    let prefill = [
        SeqStep {
            slot: 2,
            tokens: &prompts[0],
            output: OutputRows::All,
        },
        SeqStep {
            slot: 0,
            tokens: &prompts[1],
            output: OutputRows::Last,
        },
        SeqStep {
            slot: 3,
            tokens: &prompts[2],
            output: OutputRows::None,
        },
        SeqStep {
            slot: 1,
            tokens: &prompts[3],
            output: OutputRows::Last,
        },
    ];
    let mut steps: Vec<Vec<SeqStep<'_>>> = vec![prefill.to_vec()];
    let decode: Vec<Vec<u32>> = (0..3).map(|i| tokens(4, 10 + i, vocab)).collect();
    for toks in &decode {
        steps.push(
            (0..4)
                .map(|s| SeqStep {
                    slot: s,
                    tokens: &toks[s..s + 1],
                    output: OutputRows::Last,
                })
                .collect(),
        );
    }
    for (i, step) in steps.iter().enumerate() {
        let want = reference.forward(step).unwrap();
        let got = tp.forward(step).unwrap();
        assert_eq!(got.rows(), want.rows());
        let what = format!("{name} tp{world} step {i}");
        assert_close(&format!("{what} logits"), &got.data, &want.data, TOL);
        for slot in 0..4 {
            compare_states(
                &format!("{what} slot {slot}"),
                &tp.save_state(slot).unwrap(),
                &reference.save_state(slot).unwrap(),
            );
        }
    }
    // Candidate logits go through the same sharded forward.
    let step = [SeqStep {
        slot: 0,
        tokens: &decode[0][..2],
        output: OutputRows::All,
    }];
    let ids = [3, 1, 4, 1, 5];
    let want = reference.forward_candidates(&step, &ids).unwrap();
    let got = tp.forward_candidates(&step, &ids).unwrap();
    assert_close(&format!("{name} tp{world} candidates"), &got, &want, TOL);
}

#[test]
fn sharded_forward_matches_unsharded_for_tp2_and_tp4() {
    for world in [1, 2, 4] {
        check_model("rwkv6-tiny-c256-l3.safetensors", world);
    }
}

#[test]
fn sharded_forward_with_three_heads_and_a_state_tuned_model() {
    check_model("extra/rwkv6-check-c192-l2.safetensors", 3);
    check_model("extra/rwkv6-check-timestate-c128-l2.safetensors", 2);
}

#[test]
fn state_slots_split_and_reassemble_exactly() {
    let weights = ModelWeights::load(fixture("rwkv6-tiny-c256-l3.safetensors")).unwrap();
    let cfg = &weights.config;
    let mut tp = TpCpuBackend::new(&weights, 3, 4).unwrap();
    let data: Vec<f32> = (0..cfg.state_len()).map(|i| i as f32 * 0.5).collect();
    let state = State::from_flat(cfg, data).unwrap();
    tp.load_state(1, &state).unwrap();
    assert_eq!(tp.save_state(1).unwrap(), state);
    tp.copy_state(1, 2).unwrap();
    assert_eq!(tp.save_state(2).unwrap(), state);
    tp.reset_state(1).unwrap();
    assert_eq!(tp.save_state(1).unwrap(), weights.initial_state());
    let short = State::zeros(&rwkv_model::ModelConfig {
        n_layer: 1,
        ..cfg.clone()
    });
    assert!(tp.load_state(0, &short).is_err());
    assert!(tp.save_state(3).is_err());
}

#[test]
fn invalid_world_sizes_are_refused_clearly() {
    let weights = ModelWeights::load(fixture("rwkv6-tiny-c256-l3.safetensors")).unwrap();
    let err = TpCpuBackend::new(&weights, 1, 3).err().unwrap().to_string();
    assert!(
        err.contains("world size 3") && err.contains("4 heads"),
        "{err}"
    );
    let err = TpCpuBackend::new(&weights, 1, 0).err().unwrap().to_string();
    assert!(err.contains("at least 1"), "{err}");
    let err = TpCpuBackend::new(&weights, 1, 8).err().unwrap().to_string();
    assert!(err.contains("8") && err.contains("4 heads"), "{err}");
}

#[test]
fn sharded_bf16_path_stays_close_to_the_unsharded_bf16_path() {
    use rwkv_cpu::{CpuOptions, Precision};
    let weights = ModelWeights::load(fixture("rwkv6-tiny-c256-l3.safetensors")).unwrap();
    let opts = CpuOptions {
        precision: Precision::Bf16,
        threads: 2,
        isa: None,
    };
    let toks = tokens(9, 5, weights.config.vocab_size);
    let step = [SeqStep {
        slot: 0,
        tokens: &toks,
        output: OutputRows::All,
    }];
    let want = CpuBackend::with_options(&weights, 1, opts)
        .forward(&step)
        .unwrap();
    let got = TpCpuBackend::with_options(&weights, 1, 2, opts)
        .unwrap()
        .forward(&step)
        .unwrap();
    // Same bf16 weights; only the summation order of the split products differs.
    assert_close("bf16 tp2 logits", &got.data, &want.data, TOL);
}
