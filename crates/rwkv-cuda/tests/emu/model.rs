//! The whole forward pass (real orchestration, emulated kernels, host GEMM with cuBLAS
//! semantics) against the CPU backend on every fixture checkpoint.

use super::*;

pub(super) fn fixture(name: &str) -> PathBuf {
    crate_dir().join("../../tests/fixtures").join(name)
}

/// Checkpoints with their head sizes 64 (random weights) and 8 (a real trained model).
const FIXTURES: [&str; 5] = [
    "rwkv6-tiny-c128-l2.safetensors",
    "rwkv6-tiny-c256-l3.safetensors",
    "extra/rwkv6-check-c192-l2.safetensors",
    "extra/rwkv6-check-timestate-c128-l2.safetensors",
    "real/tiny-rwkv-6v0-1m.safetensors",
];

/// Logits tolerance of the GPU tests; the split-bf16 GEMM path should be far inside it.
pub(super) const TOL: f64 = 2e-3;
/// State tolerance.
const STATE_TOL: f64 = 1e-3;

pub(super) fn tokens(vocab: usize, n: usize, seed: u64) -> Vec<u32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

pub(super) fn step(slot: usize, tokens: &[u32], output: OutputRows) -> SeqStep<'_> {
    SeqStep {
        slot,
        tokens,
        output,
    }
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
    let err = rel_l2(got, want);
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: non-finite output"
    );
    assert!(
        err <= tol,
        "{what}: relative L2 error {err:.3e} exceeds {tol:.0e}"
    );
    err
}

fn check_states(
    what: &str,
    emu: &EmuModel,
    cpu: &mut CpuBackend,
    slots: impl Iterator<Item = usize>,
) -> f64 {
    let mut worst: f64 = 0.0;
    for s in slots {
        let want = cpu.save_state(s).unwrap();
        worst = worst.max(check(
            &format!("{what} state {s}"),
            emu.state(s),
            want.as_flat(),
            STATE_TOL,
        ));
    }
    worst
}

/// One sequence, all positions, then token-by-token decode steps from the carried state.
fn batch_of_one(e: &Arc<Emu>, name: &str, w: &ModelWeights) {
    let vocab = w.config.vocab_size;
    let toks = tokens(vocab, 20, 1);
    let mut cpu = CpuBackend::new(w, 2);
    let mut emu = EmuModel::new(e, w, 2, GemmPrecision::Split);
    let want = cpu.forward(&[step(1, &toks, OutputRows::All)]).unwrap();
    let got = emu.forward(&[step(1, &toks, OutputRows::All)]);
    let err = check(&format!("{name} prefill logits"), &got, &want.data, TOL);
    let serr = check_states(&format!("{name} prefill"), &emu, &mut cpu, 0..2);
    let mut derr: f64 = 0.0;
    for t in tokens(vocab, 3, 2) {
        let want = cpu.forward(&[step(1, &[t], OutputRows::Last)]).unwrap();
        let got = emu.forward(&[step(1, &[t], OutputRows::Last)]);
        derr = derr.max(check(
            &format!("{name} decode logits"),
            &got,
            &want.data,
            TOL,
        ));
    }
    check_states(&format!("{name} decode"), &emu, &mut cpu, 0..2);
    eprintln!("{name}: batch 1 prefill {err:.2e}, decode {derr:.2e}, state {serr:.2e}");
}

/// Eight sequences of different lengths at different offsets, in reversed slots, with mixed
/// output requests; then one decode token each (the decode kernel for all eight).
fn ragged(e: &Arc<Emu>, name: &str, w: &ModelWeights, precision: GemmPrecision, tol: f64) -> f64 {
    let vocab = w.config.vocab_size;
    let toks = tokens(vocab, 24, 3);
    let seqs: Vec<&[u32]> = (0..8)
        .map(|i| &toks[i..i + 1 + (i * 5) % (toks.len() - i)])
        .collect();
    let outputs = [
        OutputRows::All,
        OutputRows::Last,
        OutputRows::None,
        OutputRows::All,
    ];
    let steps: Vec<SeqStep<'_>> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| step(7 - i, s, outputs[i % 4]))
        .collect();
    let mut cpu = CpuBackend::new(w, 8);
    let mut emu = EmuModel::new(e, w, 8, precision);
    let want = cpu.forward(&steps).unwrap();
    let got = emu.forward(&steps);
    let mut worst = check(
        &format!("{name} ragged prefill {precision:?}"),
        &got,
        &want.data,
        tol,
    );
    let next = tokens(vocab, 8, 4);
    let decode: Vec<SeqStep<'_>> = (0..8)
        .map(|i| step(7 - i, &next[i..i + 1], OutputRows::Last))
        .collect();
    let want = cpu.forward(&decode).unwrap();
    let got = emu.forward(&decode);
    worst = worst.max(check(
        &format!("{name} ragged decode {precision:?}"),
        &got,
        &want.data,
        tol,
    ));
    if precision == GemmPrecision::Split {
        check_states(&format!("{name} ragged"), &emu, &mut cpu, 0..8);
    }
    worst
}

#[test]
fn forward_matches_the_cpu_backend_on_every_fixture() {
    for name in FIXTURES {
        let path = fixture(name);
        let w = ModelWeights::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let Some(e) = emu(w.config.head_size) else {
            return;
        };
        batch_of_one(&e, name, &w);
        let err = ragged(&e, name, &w, GemmPrecision::Split, TOL);
        eprintln!("{name}: ragged batch of 8 {err:.2e}");
    }
}

/// `--gpu-precision bf16`: random weights amplify the rounding of GEMM inputs (a loose bound),
/// trained weights do not: on the real model it stays within the tolerance `split` meets.
#[test]
fn bf16_gemm_inputs_stay_close_to_the_reference() {
    for (name, tol) in [(FIXTURES[1], 5e-2), (FIXTURES[4], TOL)] {
        let w = ModelWeights::load(fixture(name)).unwrap();
        let Some(e) = emu(w.config.head_size) else {
            return;
        };
        let err = ragged(&e, name, &w, GemmPrecision::Bf16, tol);
        eprintln!("{name}: bf16 GEMM inputs, ragged batch {err:.2e}");
    }
}

/// Greedy decodes ask for candidates (`OutputRows::Top`): the head's logits stay on the
/// device, the top-k kernel ranks them and only the candidates come back. They must be exactly
/// the best entries of the rows the same step downloads otherwise, in a batch that mixes
/// candidate rows with full rows.
#[test]
fn device_candidates_are_the_best_entries_of_the_same_rows() {
    let w = ModelWeights::load(fixture("rwkv6-tiny-c256-l3.safetensors")).unwrap();
    let Some(e) = emu(w.config.head_size) else {
        return;
    };
    let vocab = w.config.vocab_size;
    let toks = tokens(vocab, 40, 11);
    let mut rows_model = EmuModel::new(&e, &w, 6, GemmPrecision::Split);
    let mut top_model = EmuModel::new(&e, &w, 6, GemmPrecision::Split);
    // Prefill six sequences, identically in both.
    let prefill: Vec<SeqStep<'_>> = (0..6)
        .map(|i| step(i, &toks[i * 5..i * 5 + 3 + i], OutputRows::Last))
        .collect();
    rows_model.forward(&prefill);
    top_model.forward(&prefill);
    // One decode token each: some rows as candidates (various k), the others as rows.
    let ks = [Some(1), None, Some(7), Some(64), None, Some(3)];
    let with_rows: Vec<SeqStep<'_>> = (0..6)
        .map(|i| step(i, &toks[30 + i..31 + i], OutputRows::Last))
        .collect();
    let with_top: Vec<SeqStep<'_>> = (0..6)
        .map(|i| {
            let output = ks[i].map_or(OutputRows::Last, OutputRows::Top);
            step(i, &toks[30 + i..31 + i], output)
        })
        .collect();
    let full = rows_model.forward(&with_rows);
    let (rows, top) = top_model.forward_with_candidates(&with_top);
    let mut want_rows = Vec::new();
    let mut want_top = Vec::new();
    for (i, k) in ks.iter().enumerate() {
        let row = &full[i * vocab..(i + 1) * vocab];
        match k {
            Some(k) => want_top.extend(rwkv_model::backend::top_candidates(row, *k)),
            None => want_rows.extend_from_slice(row),
        }
    }
    assert_eq!(rows, want_rows, "rows asked for in full");
    assert_eq!(top.len(), want_top.len());
    for (i, (got, want)) in top.iter().zip(&want_top).enumerate() {
        assert_eq!(got.token, want.token, "candidate {i}");
        assert_eq!(got.logit.to_bits(), want.logit.to_bits(), "candidate {i}");
    }
}

/// Sampled decodes: each nucleus row comes back as its kept set (the best candidates, decided
/// with the device's softmax denominator) or, when those do not decide it, as its whole row;
/// both the same as a step that downloads the rows computes.
#[test]
fn nucleus_rows_are_kept_sets_or_whole_rows_of_the_same_logits() {
    use rwkv_model::nucleus::{kept_set, NUCLEUS_CANDIDATES};
    use rwkv_model::{Nucleus, NucleusRow};
    let Some(e) = emu(64) else { return };
    let w = ModelWeights::load(fixture("rwkv6-tiny-c256-l3.safetensors")).unwrap();
    let vocab = w.config.vocab_size;
    let prefix = tokens(vocab, 40, 11);
    let next = tokens(vocab, 8, 12);
    let mut rows_emu = EmuModel::new(&e, &w, 8, GemmPrecision::Split);
    let mut nucleus_emu = EmuModel::new(&e, &w, 8, GemmPrecision::Split);
    let prefill: Vec<SeqStep<'_>> = (0..8)
        .map(|i| step(i, &prefix[i * 4..i * 4 + 2 + i], OutputRows::None))
        .collect();
    rows_emu.forward(&prefill);
    nucleus_emu.forward(&prefill);
    // Small top-k decides within the candidates; a wide nucleus of a random model does not.
    // Rows 4 to 7 ban the last 6 ids, as the router does for the World tokenizer.
    let filters: Vec<Nucleus> = (0..8)
        .map(|i| Nucleus {
            top_p: [0.9, 0.5, 0.999, 1.0][i % 4],
            top_k: [0, 3, 0, 64][i % 4],
            below: [vocab, vocab - 6][i / 4],
        })
        .collect();
    let with_rows: Vec<SeqStep<'_>> = (0..8)
        .map(|i| step(i, &next[i..i + 1], OutputRows::Last))
        .collect();
    // One sequence asks for candidates: Top and Nucleus rows share the device path.
    let with_nucleus: Vec<SeqStep<'_>> = (0..8)
        .map(|i| {
            let out = if i == 5 {
                OutputRows::Top(4)
            } else {
                OutputRows::Nucleus(filters[i])
            };
            step(i, &next[i..i + 1], out)
        })
        .collect();
    let full = rows_emu.forward(&with_rows);
    let got = nucleus_emu.forward_logits(&with_nucleus).unwrap();
    assert!(got.data.is_empty());
    assert_eq!(got.top.len(), 4);
    assert_eq!(got.nucleus.len(), 7);
    let (mut kept_sets, mut whole) = (0, 0);
    let nucleus_seqs = (0..8).filter(|&i| i != 5);
    for (i, row_out) in nucleus_seqs.zip(&got.nucleus) {
        let row = &full[i * vocab..(i + 1) * vocab];
        let cands = rwkv_model::backend::top_candidates(row, NUCLEUS_CANDIDATES);
        let max = cands[0].logit;
        let sum = row.iter().map(|&l| f64::from((l - max).exp())).sum::<f64>() as f32;
        let want = kept_set(&cands, max, sum, filters[i], vocab);
        match row_out {
            NucleusRow::Kept(kept) => {
                kept_sets += 1;
                let want = want.unwrap_or_else(|| panic!("sequence {i}: kept, not decided"));
                assert_eq!(kept.len(), want.len(), "sequence {i}");
                for (g, w) in kept.iter().zip(&want) {
                    assert_eq!((g.token, g.logit.to_bits()), (w.token, w.logit.to_bits()));
                }
            }
            NucleusRow::Row(r) => {
                whole += 1;
                assert_eq!(want, None, "sequence {i}");
                assert_eq!(r.as_slice(), row, "sequence {i}");
            }
        }
    }
    assert!(
        kept_sets >= 2 && whole >= 2,
        "{kept_sets} kept sets, {whole} rows"
    );
    assert_eq!(rows_emu.state(3), nucleus_emu.state(3));
}
