//! The fast CPU paths (bf16 and int8 weights, every SIMD kernel set) against the official
//! package's golden outputs and against the f32 reference backend.

mod common;

use common::*;
use rwkv_cpu::{CpuBackend, CpuOptions, Isa, Precision};
use rwkv_model::{Backend, ModelWeights, OutputRows};

/// bf16 path vs the `cpu fp32` goldens. The fixtures store bf16 weights, which the f32 reference
/// upcasts exactly, so the bf16 path multiplies the very same numbers with f32 accumulation; only
/// the summation order differs (FMA, 16-wide partial sums), which moves results by ~1e-6
/// relative. The conformance bound of the f32 path therefore applies unchanged.
const BF16_TOL: f64 = 1e-4;

/// int8 (per-output-row scales) vs the f32 reference: quantization adds ~0.6% rms relative noise
/// per weight (a uniform error of half a step, step = max|w|/127, on Gaussian rows), which
/// compounds through every projection of every layer; on the random-weight fixtures this gives
/// 3-11% relative L2 on logits and states. The bound is ~2x the largest error measured
/// (benches/README.md has the numbers, also for the 0.2B shape).
const INT8_TOL: f64 = 2e-1;

fn opts(precision: Precision, isa: Isa) -> CpuOptions {
    CpuOptions {
        precision,
        threads: 2,
        isa: Some(isa),
    }
}

#[test]
fn bf16_path_matches_reference_goldens_with_every_kernel_set() {
    for isa in Isa::available() {
        for model in GOLDEN_MODELS {
            for ext in ["pth", "safetensors"] {
                run_golden_cases(
                    model,
                    ext,
                    |w, s| CpuBackend::with_options(w, s, opts(Precision::Bf16, isa)),
                    BF16_TOL,
                );
            }
        }
        run_ragged_batch(
            "rwkv6-tiny-c256-l3",
            |w, s| CpuBackend::with_options(w, s, opts(Precision::Bf16, isa)),
            1e-5,
        );
    }
}

#[test]
fn bf16_path_on_the_extra_and_state_tuned_fixtures() {
    for model in [
        "extra/rwkv6-check-c192-l2",
        "extra/rwkv6-check-timestate-c128-l2",
    ] {
        run_golden_cases(
            model,
            "safetensors",
            |w, s| CpuBackend::with_options(w, s, opts(Precision::Bf16, Isa::detect())),
            BF16_TOL,
        );
    }
}

/// Logits and final state of the whole golden sequence, from a backend.
fn logits_and_state(b: &mut CpuBackend, tokens: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let l = b.forward(&[step(0, tokens, OutputRows::All)]).unwrap();
    let s = b.save_state(0).unwrap();
    (l.data, s.as_flat().to_vec())
}

#[test]
fn int8_path_stays_close_to_the_f32_reference() {
    for model in GOLDEN_MODELS {
        let weights = ModelWeights::load(fixture(&format!("{model}.safetensors"))).unwrap();
        let tokens = Golden::load(model).tokens;
        let (want_l, want_s) = logits_and_state(&mut CpuBackend::new(&weights, 1), &tokens);
        for isa in Isa::available() {
            let mut b = CpuBackend::with_options(&weights, 1, opts(Precision::Int8, isa));
            let (l, s) = logits_and_state(&mut b, &tokens);
            let (el, es) = (rel_l2(&l, &want_l), rel_l2(&s, &want_s));
            eprintln!("{model} int8 {isa:?}: logits rel L2 {el:.2e}, state rel L2 {es:.2e}");
            assert!(
                el <= INT8_TOL && es <= INT8_TOL,
                "{model} {isa:?}: {el} {es}"
            );
        }
    }
}

#[test]
fn candidate_logits_equal_the_matching_full_logits() {
    let weights = ModelWeights::load(fixture("rwkv6-tiny-c128-l2.safetensors")).unwrap();
    let cands = [3u32, 0, 77, 5];
    for precision in [Precision::F32, Precision::Bf16, Precision::Int8] {
        let o = opts(precision, Isa::detect());
        let mut full = CpuBackend::with_options(&weights, 2, o);
        let mut some = CpuBackend::with_options(&weights, 2, o);
        let steps = [
            step(0, &[1, 2, 3], OutputRows::All),
            step(1, &[9], OutputRows::Last),
        ];
        let all = full.forward(&steps).unwrap();
        let got = some.forward_candidates(&steps, &cands).unwrap();
        assert_eq!(got.len(), 4 * cands.len());
        for r in 0..4 {
            for (i, &t) in cands.iter().enumerate() {
                let (a, b) = (got[r * cands.len() + i], all.row(r)[t as usize]);
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{precision:?} {a} vs {b}"
                );
            }
        }
        assert!(some.forward_candidates(&steps, &[100_000]).is_err());
    }
}

/// On a trained model (the real 1M-parameter checkpoint; random-weight models amplify any
/// rounding difference chaotically, see benches/README.md) the bf16 path equals the reference to
/// f32 rounding and int8 stays within ~1% relative L2 with the same greedy choices.
#[test]
fn precisions_on_a_trained_model() {
    let weights = ModelWeights::load(fixture("real/tiny-rwkv-6v0-1m.safetensors")).unwrap();
    let tokens: Vec<u32> = (0..128).map(|i| (i * 7919 % 200 + 20) as u32).collect();
    let (want, _) = logits_and_state(&mut CpuBackend::new(&weights, 1), &tokens);
    let argmax = |row: &[f32]| {
        (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap()
    };
    for (precision, tol, min_agree) in [(Precision::Bf16, 1e-5, 1.0), (Precision::Int8, 3e-2, 0.95)]
    {
        let o = opts(precision, Isa::detect());
        let (got, _) = logits_and_state(&mut CpuBackend::with_options(&weights, 1, o), &tokens);
        let err = rel_l2(&got, &want);
        let v = weights.config.vocab_size;
        let agree = got
            .chunks_exact(v)
            .zip(want.chunks_exact(v))
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count() as f64
            / tokens.len() as f64;
        eprintln!("trained model {precision:?}: rel L2 {err:.2e}, top-1 agreement {agree}");
        assert!(
            err <= tol && agree >= min_agree,
            "{precision:?}: {err} {agree}"
        );
    }
}
