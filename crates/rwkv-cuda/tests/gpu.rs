//! Tests that need a CUDA device (`cargo test -p rwkv-cuda --test gpu -- --ignored`).
//! The fixture conformance suite against the CPU backend is in `tests/tests/cuda.rs`.

use std::path::PathBuf;
use std::time::Instant;

use rwkv_cuda::device::Device;
use rwkv_cuda::kernels::{Kernels, PoolArg};
use rwkv_cuda::pool::PoolLayout;
use rwkv_cuda::{CudaBackend, CudaOptions, GemmPrecision};
use rwkv_model::{Backend, Checkpoint, ModelWeights, OutputRows, SeqStep};

#[path = "common/graph_script.rs"]
mod graph_script;
use graph_script::{graph_script, ScriptTokens};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn step(slot: usize, tokens: &[u32], output: OutputRows) -> SeqStep<'_> {
    SeqStep {
        slot,
        tokens,
        output,
    }
}

fn lcg(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let n: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}

/// y and S' of spec 2.4, written out for one sequence of rows.
#[allow(clippy::too_many_arguments)]
fn reference_wkv(
    n: usize,
    heads: usize,
    rows: std::ops::Range<usize>,
    rkvw: [&[f32]; 4],
    u: &[f32],
    s: &mut [f32],
    y: &mut [f32],
) {
    let [r, k, v, w] = rkvw;
    let c = heads * n;
    for t in rows {
        for h in 0..heads {
            let s = &mut s[h * n * n..(h + 1) * n * n];
            let at = |a: &[f32], i: usize| a[t * c + h * n + i];
            for j in 0..n {
                y[t * c + h * n + j] = (0..n)
                    .map(|i| at(r, i) * (u[h * n + i] * at(k, i) * at(v, j) + s[i * n + j]))
                    .sum();
            }
            for i in 0..n {
                for j in 0..n {
                    s[i * n + j] = at(w, i) * s[i * n + j] + at(k, i) * at(v, j);
                }
            }
        }
    }
}

#[test]
#[ignore = "requires a CUDA device"]
fn wkv_kernels_match_a_plain_recurrence() {
    let dev = Device::open(0).unwrap();
    for n in [64, 8] {
        let kx = Kernels::load(&dev, n).unwrap();
        let heads = 4;
        let c = heads * n;
        let layout = PoolLayout {
            slots: 5,
            n_layer: 2,
            n_embd: c,
            n_head: heads,
            head_size: n,
        };
        let rows = 12;
        let pool_host = lcg(1, layout.total_len().unwrap());
        let (r, k, v) = (lcg(2, rows * c), lcg(3, rows * c), lcg(4, rows * c));
        let w: Vec<f32> = lcg(5, rows * c)
            .iter()
            .map(|x| (-(2.0 * x).exp()).exp())
            .collect();
        let u = lcg(6, c);
        // Decode: row 0 -> slot 4, row 5 -> slot 0. Prefill: rows 1..5 -> slot 2, 6..12 -> slot 1.
        let seqs = [(0..1, 4), (1..5, 2), (5..6, 0), (6..12, 1)];
        let meta: Vec<i32> = vec![0, 5, 4, 0, 1, 6, 5, 12, 2, 1];
        let layer = 1;
        let mut want_pool = pool_host.clone();
        let mut want_y = vec![0.0; rows * c];
        for (span, slot) in &seqs {
            let base = layout.slot_range(*slot).start + layout.wkv(layer);
            let s = &mut want_pool[base..base + layout.wkv_len()];
            reference_wkv(n, heads, span.clone(), [&r, &k, &v, &w], &u, s, &mut want_y);
        }
        let d = |v: &[f32]| dev.upload(v).unwrap();
        let (pool, dr, dk, dv, dw, du) = (d(&pool_host), d(&r), d(&k), d(&v), d(&w), d(&u));
        let y = dev.zeros::<f32>(rows * c).unwrap();
        let m = dev.upload(&meta).unwrap();
        let mv = |i: usize, len: usize| dev.buf(&m).slice(i, len).unwrap();
        let arg = PoolArg {
            buf: dev.buf(&pool),
            stride: layout.state_len(),
            slots: layout.slots,
        };
        let rkvw = [dev.buf(&dr), dev.buf(&dk), dev.buf(&dv), dev.buf(&dw)];
        let wkv = layout.wkv(layer);
        kx.wkv6_decode(
            arg,
            wkv,
            mv(0, 2),
            mv(2, 2),
            2,
            rkvw,
            dev.buf(&du),
            dev.buf(&y),
            rows,
            c,
        )
        .unwrap();
        kx.wkv6_prefill(
            arg,
            wkv,
            mv(4, 2),
            mv(6, 2),
            mv(8, 2),
            2,
            rkvw,
            dev.buf(&du),
            dev.buf(&y),
            rows,
            c,
        )
        .unwrap();
        let got_y = dev.compute.clone_dtoh(&y).unwrap();
        let got_pool = dev.compute.clone_dtoh(&pool).unwrap();
        dev.compute.synchronize().unwrap();
        let (ey, es) = (rel_l2(&got_y, &want_y), rel_l2(&got_pool, &want_pool));
        eprintln!("wkv on {} n={n}: y {ey:.2e}, state {es:.2e}", dev.name);
        assert!(
            ey <= 1e-5 && es <= 1e-5,
            "n={n}: y {ey:.2e}, state {es:.2e}"
        );
    }
}

fn tiny() -> ModelWeights {
    ModelWeights::load(fixture("rwkv6-tiny-c256-l3.safetensors")).unwrap()
}

fn tokens(vocab: usize, n: usize, seed: u64) -> Vec<u32> {
    lcg(seed, n)
        .iter()
        .map(|x| ((x + 1.0) * 0.5 * vocab as f32) as u32 % vocab as u32)
        .collect()
}

#[test]
#[ignore = "requires a CUDA device"]
fn swapped_out_and_in_slots_continue_bit_identically() {
    let w = tiny();
    let vocab = w.config.vocab_size;
    let (prefix, rest) = (tokens(vocab, 13, 7), tokens(vocab, 6, 8));
    let mut be = CudaBackend::new(&w, 4, 0).unwrap();
    be.forward(&[step(0, &prefix, OutputRows::None)]).unwrap();
    let saved = be.save_state(0).unwrap();
    let mut host = be.swap_out(0).unwrap();
    assert_eq!(
        host.as_slice().unwrap(),
        saved.as_flat(),
        "swap-out equals save_state"
    );
    let direct = be.forward(&[step(0, &rest, OutputRows::All)]).unwrap();
    // Back into the same slot (now advanced) and into another slot, decoding alongside.
    be.swap_in(0, &mut host).unwrap();
    be.swap_in(2, &mut host).unwrap();
    let again = be.forward(&[step(0, &rest, OutputRows::All)]).unwrap();
    assert_eq!(again.data, direct.data, "same slot after swap-in");
    let other = be.forward(&[step(2, &rest, OutputRows::All)]).unwrap();
    assert_eq!(other.data, direct.data, "another slot after swap-in");
    // A pinned buffer reused for the next swap, with compute on other slots in between.
    let mut buf = be.alloc_host_state().unwrap();
    be.swap_out_into(2, &mut buf).unwrap();
    be.forward(&[step(1, &prefix, OutputRows::Last)]).unwrap();
    be.reset_state(3).unwrap();
    be.swap_in(3, &mut buf).unwrap();
    assert_eq!(be.save_state(3).unwrap(), be.save_state(2).unwrap());
    be.copy_state(3, 1).unwrap();
    assert_eq!(be.save_state(1).unwrap(), be.save_state(2).unwrap());
}

/// CUDA graphs: decode bodies captured per batch size and replayed for later steps with other
/// slots, tokens and outputs give exactly what launching kernel by kernel gives (logits,
/// candidates, states), and the captures did succeed (a failed capture falls back to eager
/// steps, which would pass the comparison unnoticed).
#[test]
#[ignore = "requires a CUDA device"]
fn graph_replay_equals_eager_steps() {
    let w = tiny();
    let vocab = w.config.vocab_size;
    let mut eager = CudaBackend::new(&w, 6, 0).unwrap();
    eager.set_graphs(false);
    let mut graphs = CudaBackend::new(&w, 6, 0).unwrap();
    let toks = ScriptTokens::new(|n, seed| tokens(vocab, n, seed));
    let script = graph_script(&toks);
    for (i, steps) in script.iter().enumerate() {
        let want = eager.forward(steps).unwrap();
        let got = graphs.forward(steps).unwrap();
        assert!(got.data == want.data, "step {i}: logits differ");
        assert_eq!(got.top, want.top, "step {i}: candidates");
        for slot in 0..6 {
            assert_eq!(
                graphs.save_state(slot).unwrap(),
                eager.save_state(slot).unwrap(),
                "step {i}: state of slot {slot}"
            );
        }
    }
    // A swap into a slot between replays is ordered before the replay that reads it.
    let mut host = graphs.swap_out(0).unwrap();
    graphs.swap_in(5, &mut host).unwrap();
    let mut host = eager.swap_out(0).unwrap();
    eager.swap_in(5, &mut host).unwrap();
    let d = &toks.decodes;
    let steps = [
        step(5, &d[20], OutputRows::Last),
        step(0, &d[21], OutputRows::Last),
        step(1, &d[22], OutputRows::Last),
    ];
    assert!(graphs.forward(&steps).unwrap().data == eager.forward(&steps).unwrap().data);
    assert_eq!(graphs.graph_status(), (3, None), "three shapes captured");
    assert_eq!(eager.graph_status(), (0, None));
}

/// Greedy decodes ask for candidates: the top-k kernel ranks each row on the device and only
/// the candidates are downloaded. They must be the best entries of the very rows a step that
/// downloads them computes (same batch shape, so cuBLAS sums alike), and the fallback for more
/// candidates than the device ranks must agree too.
#[test]
#[ignore = "requires a CUDA device"]
fn device_candidates_are_the_best_entries_of_the_rows() {
    let w = tiny();
    let vocab = w.config.vocab_size;
    let prefix = tokens(vocab, 40, 9);
    let next = tokens(vocab, 8, 10);
    let mut rows_be = CudaBackend::new(&w, 8, 0).unwrap();
    let mut top_be = CudaBackend::new(&w, 8, 0).unwrap();
    let prefill: Vec<SeqStep<'_>> = (0..8)
        .map(|i| step(i, &prefix[i * 4..i * 4 + 2 + i], OutputRows::None))
        .collect();
    rows_be.forward(&prefill).unwrap();
    top_be.forward(&prefill).unwrap();
    for k in [1, 9, 64, 100] {
        let with_rows: Vec<SeqStep<'_>> = (0..8)
            .map(|i| step(i, &next[i..i + 1], OutputRows::Last))
            .collect();
        let with_top: Vec<SeqStep<'_>> = (0..8)
            .map(|i| step(i, &next[i..i + 1], OutputRows::Top(k)))
            .collect();
        let full = rows_be.forward(&with_rows).unwrap();
        let got = top_be.forward(&with_top).unwrap();
        assert!(got.data.is_empty());
        let want: Vec<_> = (0..8)
            .flat_map(|i| rwkv_model::backend::top_candidates(full.row(i), k))
            .collect();
        assert_eq!(got.top.len(), want.len(), "k = {k}");
        for (j, (g, w)) in got.top.iter().zip(&want).enumerate() {
            assert_eq!(g.token, w.token, "k = {k}, candidate {j}");
            assert!(
                (g.logit - w.logit).abs() <= 1e-5 * w.logit.abs().max(1.0),
                "k = {k}, candidate {j}: {} vs {}",
                g.logit,
                w.logit
            );
        }
        // Both backends fed the same token: their states stay equal for the next round.
        assert_eq!(
            rows_be.save_state(3).unwrap(),
            top_be.save_state(3).unwrap()
        );
    }
}

/// Sampled decodes: each nucleus row is its kept set, decided on the device from the best
/// candidates and the row's softmax denominator, or its whole row; both from the very rows a
/// step that downloads them computes.
#[test]
#[ignore = "requires a CUDA device"]
fn nucleus_rows_are_kept_sets_or_whole_rows() {
    use rwkv_model::nucleus::{kept_set, NUCLEUS_CANDIDATES};
    use rwkv_model::{Nucleus, NucleusRow};
    let w = tiny();
    let vocab = w.config.vocab_size;
    let prefix = tokens(vocab, 40, 11);
    let next = tokens(vocab, 8, 12);
    let mut rows_be = CudaBackend::new(&w, 8, 0).unwrap();
    let mut nucleus_be = CudaBackend::new(&w, 8, 0).unwrap();
    let prefill: Vec<SeqStep<'_>> = (0..8)
        .map(|i| step(i, &prefix[i * 4..i * 4 + 2 + i], OutputRows::None))
        .collect();
    rows_be.forward(&prefill).unwrap();
    nucleus_be.forward(&prefill).unwrap();
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
    let with_nucleus: Vec<SeqStep<'_>> = (0..8)
        .map(|i| step(i, &next[i..i + 1], OutputRows::Nucleus(filters[i])))
        .collect();
    let full = rows_be.forward(&with_rows).unwrap();
    let got = nucleus_be.forward(&with_nucleus).unwrap();
    assert_eq!(got.nucleus.len(), 8);
    let mut kept_sets = 0;
    for (i, out) in got.nucleus.iter().enumerate() {
        let cands = rwkv_model::backend::top_candidates(full.row(i), NUCLEUS_CANDIDATES);
        match out {
            NucleusRow::Kept(kept) => {
                kept_sets += 1;
                let max = cands[0].logit;
                let sum: f64 = full
                    .row(i)
                    .iter()
                    .map(|&l| f64::from((l - max).exp()))
                    .sum();
                let want = kept_set(&cands, max, sum as f32, filters[i], vocab)
                    .unwrap_or_else(|| panic!("sequence {i}: kept, not decided"));
                assert_eq!(kept.len(), want.len(), "sequence {i}");
                for (g, c) in kept.iter().zip(&want) {
                    assert_eq!(g.token, c.token, "sequence {i}");
                }
            }
            NucleusRow::Row(r) => assert_eq!(r.as_slice(), full.row(i), "sequence {i}"),
        }
    }
    assert!(kept_sets >= 4, "top-k 3 and 64 rows decide on the device");
}

#[test]
#[ignore = "requires a CUDA device"]
fn bad_inputs_are_rejected_before_any_launch() {
    let w = tiny();
    let mut be = CudaBackend::new(&w, 2, 0).unwrap();
    let ok = [1u32, 2];
    assert!(be.forward(&[step(2, &ok, OutputRows::Last)]).is_err());
    assert!(be
        .forward(&[
            step(0, &ok, OutputRows::Last),
            step(0, &ok, OutputRows::Last)
        ])
        .is_err());
    assert!(be
        .forward(&[step(0, &[u32::MAX], OutputRows::Last)])
        .is_err());
    let empty = be.forward(&[step(1, &[], OutputRows::Last)]).unwrap();
    assert_eq!(empty.rows(), 0);
    assert!(be.swap_out(5).is_err());
    // The backend still works afterwards.
    assert_eq!(
        be.forward(&[step(0, &ok, OutputRows::All)]).unwrap().rows(),
        2
    );
}

#[test]
#[ignore = "requires a CUDA device"]
fn sampling_helpers_match_the_host() {
    let w = tiny();
    let mut be = CudaBackend::new(&w, 3, 0).unwrap();
    let toks = tokens(w.config.vocab_size, 5, 9);
    let logits = be
        .forward(&[
            step(0, &toks, OutputRows::All),
            step(1, &toks[..2], OutputRows::Last),
        ])
        .unwrap();
    let top = be.top_k_probs(&logits, 5, 0.8).unwrap();
    for r in 0..logits.rows() {
        let row = logits.row(r);
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let ids: Vec<usize> = top.ids[r * 5..(r + 1) * 5]
            .iter()
            .map(|&i| i as usize)
            .collect();
        assert_eq!(ids, order[..5]);
        let m = row[order[0]];
        let z: f64 = row.iter().map(|v| f64::from(((v - m) / 0.8).exp())).sum();
        let p0 = (1.0 / z) as f32;
        assert!((top.probs[r * 5] - p0).abs() < 1e-5);
    }
}

/// Not an assertion: prints step times on a synthetic model shaped like a small release.
#[test]
#[ignore = "requires a CUDA device"]
fn timing_report() {
    let mut spec = rwkv_model::synthetic::SyntheticSpec::new(1024, 6, 32768);
    spec.seed = 1;
    let ckpt =
        Checkpoint::from_tensors("synthetic", rwkv_model::synthetic::random_checkpoint(&spec));
    let w = ModelWeights::from_checkpoint(&ckpt).unwrap();
    for precision in [GemmPrecision::Split, GemmPrecision::Bf16] {
        let mut be = CudaBackend::with_options(
            &w,
            64,
            0,
            CudaOptions {
                precision,
                ..CudaOptions::default()
            },
        )
        .unwrap();
        let prompt = tokens(32768, 512, 3);
        let time = |be: &mut CudaBackend, steps: &[SeqStep<'_>]| {
            be.forward(steps).unwrap(); // warm-up (workspace growth)
            let t = Instant::now();
            let reps = 5;
            for _ in 0..reps {
                be.forward(steps).unwrap();
            }
            t.elapsed().as_secs_f64() * 1e3 / f64::from(reps)
        };
        let prefill = time(&mut be, &[step(0, &prompt, OutputRows::Last)]);
        let mut line = format!(
            "timing C=1024 L=6 V=32768 {precision:?} on {}: prefill 512 tok {prefill:.2} ms",
            be.device_name()
        );
        for batch in [1usize, 8, 64] {
            let steps: Vec<SeqStep<'_>> = (0..batch)
                .map(|i| step(i, &prompt[i..i + 1], OutputRows::Last))
                .collect();
            let ms = time(&mut be, &steps);
            line.push_str(&format!(", decode x{batch} {ms:.2} ms"));
        }
        let mut host = be.alloc_host_state().unwrap();
        let t = Instant::now();
        be.swap_in(5, &mut host).unwrap();
        be.synchronize().unwrap();
        line.push_str(&format!(
            ", swap-in {:.3} ms",
            t.elapsed().as_secs_f64() * 1e3
        ));
        eprintln!("{line}");
    }
}

/// Runs everywhere: without a driver, opening the backend is a clean error, never a panic.
#[test]
fn no_driver_means_a_clean_no_device_error() {
    if rwkv_cuda::driver_available() {
        return;
    }
    match CudaBackend::new(&tiny(), 1, 0) {
        Err(rwkv_cuda::CudaError::NoDevice(msg)) => assert!(msg.contains("libcuda"), "{msg}"),
        Err(other) => panic!("expected NoDevice, got {other}"),
        Ok(_) => panic!("a backend without a driver"),
    }
    assert!(rwkv_cuda::device_count().is_err());
    match rwkv_cuda::tensor_parallel(&tiny(), 1, &[0, 1], CudaOptions::default()) {
        Err(rwkv_cuda::CudaError::NoDevice(msg)) => assert!(msg.contains("libcuda"), "{msg}"),
        Err(other) => panic!("expected NoDevice, got {other}"),
        Ok(_) => panic!("a tensor-parallel backend without a driver"),
    }
}

/// Runs everywhere: a device list the model cannot be sharded over is refused before any
/// device is touched.
#[test]
fn unshardable_device_lists_are_refused_clearly() {
    let err = rwkv_cuda::tensor_parallel(&tiny(), 1, &[0, 1, 2], CudaOptions::default())
        .err()
        .expect("3 ranks for 4 heads");
    assert!(err.to_string().contains("4 heads"), "{err}");
}

/// The model sharded over every device there is (1, 2 or 4 of them; one device still runs
/// the sharded path with a one-rank NCCL group) against the whole model on device 0: a ragged
/// prefill with every kind of output request, decode steps, and whole states out and back in.
#[test]
#[ignore = "requires a CUDA device and libnccl"]
fn tensor_parallel_matches_one_device() {
    let w = tiny();
    let vocab = w.config.vocab_size;
    let n = rwkv_cuda::device_count().unwrap();
    let world = [4, 2, 1].into_iter().find(|&k| k <= n).unwrap();
    let devices: Vec<usize> = (0..world).collect();
    let mut tp = rwkv_cuda::tensor_parallel(&w, 4, &devices, CudaOptions::default()).unwrap();
    let mut one = CudaBackend::new(&w, 4, 0).unwrap();
    eprintln!("tensor parallel over {devices:?}: {}", tp.name());
    let prompts: Vec<Vec<u32>> = (0..4)
        .map(|i| tokens(vocab, 3 + 5 * i, 40 + i as u64))
        .collect();
    let prefill = vec![
        step(2, &prompts[0], OutputRows::All),
        step(0, &prompts[1], OutputRows::Top(5)),
        step(3, &prompts[2], OutputRows::None),
        step(1, &prompts[3], OutputRows::Last),
    ];
    let next = tokens(vocab, 4, 50);
    let decode: Vec<SeqStep<'_>> = (0..4)
        .map(|s| step(s, &next[s..s + 1], OutputRows::Last))
        .collect();
    for (i, st) in [prefill, decode].iter().enumerate() {
        let want = one.forward(st).unwrap();
        let got = tp.forward(st).unwrap();
        let err = rel_l2(&got.data, &want.data);
        eprintln!("tp{world} step {i}: logits {err:.2e} from one device");
        assert!(err <= 1e-4, "step {i}: {err:.2e}");
        assert_eq!(
            got.top.iter().map(|c| c.token).collect::<Vec<_>>(),
            want.top.iter().map(|c| c.token).collect::<Vec<_>>()
        );
        for slot in 0..4 {
            let (g, w) = (tp.save_state(slot).unwrap(), one.save_state(slot).unwrap());
            let err = rel_l2(g.as_flat(), w.as_flat());
            assert!(err <= 1e-4, "step {i} slot {slot}: state {err:.2e}");
        }
    }
    let state = one.save_state(2).unwrap();
    tp.load_state(3, &state).unwrap();
    assert_eq!(tp.save_state(3).unwrap(), state);
    tp.copy_state(3, 0).unwrap();
    assert_eq!(tp.save_state(0).unwrap(), state);
    tp.reset_state(3).unwrap();
    assert_eq!(tp.save_state(3).unwrap(), w.initial_state());
}

/// Not an assertion: the GPU targets, printed as `timing ...` lines for
/// benches/README.md. (1) The WKV6 decode kernel at batch 256 on a 7B-shaped layer (C = 4096,
/// H = 64) against a device-to-device copy of the same bytes; (2) one decode step of a
/// random-weight 1.6B-shaped model (L24 C2048 V65536) at batch 256, and its prefill rate.
#[test]
#[ignore = "requires a CUDA device"]
fn timing_targets() {
    wkv_decode_bandwidth();
    let gemm_tflops = bf16_gemm_rate();
    model_1b6_step_times(gemm_tflops);
}

/// The card's measured bf16 GEMM rate (the prefill target's denominator): cuBLAS on bf16
/// operands with f32 accumulation and f32 output, as every GEMM of the backend runs, on a
/// large square problem (8192^3) and on the largest GEMM of a 1.6B-shaped prefill of 4096
/// tokens (the FFN key projection, 7168 x 2048). Returns the better of the two in TFLOP/s.
fn bf16_gemm_rate() -> f64 {
    use rwkv_cuda::gemm::{gemm, GemmSpec, WeightLayout};
    let dev = Device::open(0).unwrap();
    dev.bind().unwrap();
    let mut best = 0.0f64;
    let mut parts = Vec::new();
    for (name, out, inp, rows) in [
        ("8192^3", 8192, 8192, 8192),
        ("ffn.key 7168x2048 x 4096 rows", 7168, 2048, 4096),
    ] {
        let spec = GemmSpec::dense(WeightLayout::OutIn, out, inp, rows);
        // Small values (bf16 1/64 = 0x3C80): the rate does not depend on them.
        let w = dev.upload(&vec![0x3C80u16; out * inp]).unwrap();
        let x = dev.upload(&vec![0x3C80u16; rows * inp]).unwrap();
        let y = dev.zeros::<f32>(rows * out).unwrap();
        let run = || gemm(&dev.blas, &spec, dev.buf(&w), dev.buf(&x), dev.buf(&y)).unwrap();
        run();
        dev.compute.synchronize().unwrap();
        let reps = 20;
        let t = Instant::now();
        for _ in 0..reps {
            run();
        }
        dev.compute.synchronize().unwrap();
        let secs = t.elapsed().as_secs_f64() / f64::from(reps);
        let tflops = 2.0 * (out * inp * rows) as f64 / secs / 1e12;
        best = best.max(tflops);
        parts.push(format!("{name} {:.3} ms = {tflops:.0} TFLOP/s", secs * 1e3));
    }
    eprintln!(
        "timing cuBLAS bf16 GEMM (f32 accumulate, f32 out) on {}: {}",
        dev.name,
        parts.join("; ")
    );
    best
}

fn wkv_decode_bandwidth() {
    let dev = Device::open(0).unwrap();
    let (n, heads, batch) = (64, 64, 256);
    let c = heads * n;
    let kx = Kernels::load(&dev, n).unwrap();
    let layout = PoolLayout {
        slots: batch,
        n_layer: 1,
        n_embd: c,
        n_head: heads,
        head_size: n,
    };
    let pool = dev.zeros::<f32>(layout.total_len().unwrap()).unwrap();
    let d = |v: &[f32]| dev.upload(v).unwrap();
    let (r, k, v) = (
        d(&lcg(2, batch * c)),
        d(&lcg(3, batch * c)),
        d(&lcg(4, batch * c)),
    );
    let w = d(&vec![0.9; batch * c]);
    let u = d(&lcg(6, c));
    let y = dev.zeros::<f32>(batch * c).unwrap();
    let meta: Vec<i32> = (0..batch as i32).chain(0..batch as i32).collect();
    let m = dev.upload(&meta).unwrap();
    let arg = PoolArg {
        buf: dev.buf(&pool),
        stride: layout.state_len(),
        slots: layout.slots,
    };
    let launch = || {
        let rkvw = [dev.buf(&r), dev.buf(&k), dev.buf(&v), dev.buf(&w)];
        let (rows, slots) = (
            dev.buf(&m).slice(0, batch).unwrap(),
            dev.buf(&m).slice(batch, batch).unwrap(),
        );
        kx.wkv6_decode(
            arg,
            layout.wkv(0),
            rows,
            slots,
            batch,
            rkvw,
            dev.buf(&u),
            dev.buf(&y),
            batch,
            c,
        )
        .unwrap();
    };
    launch();
    dev.compute.synchronize().unwrap();
    let reps = 50;
    let t = Instant::now();
    for _ in 0..reps {
        launch();
    }
    dev.compute.synchronize().unwrap();
    let kernel_ms = t.elapsed().as_secs_f64() * 1e3 / f64::from(reps);
    // State bytes moved: every slot's H x N x N f32 matrix read and written once.
    let state_bytes = (batch * heads * n * n * 4 * 2) as f64;
    let src = dev.zeros::<f32>(batch * heads * n * n).unwrap();
    let mut dst = dev.zeros::<f32>(batch * heads * n * n).unwrap();
    dev.compute.memcpy_dtod(&src, &mut dst).unwrap();
    dev.compute.synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..reps {
        dev.compute.memcpy_dtod(&src, &mut dst).unwrap();
    }
    dev.compute.synchronize().unwrap();
    let copy_ms = t.elapsed().as_secs_f64() * 1e3 / f64::from(reps);
    let (kernel_bw, copy_bw) = (state_bytes / kernel_ms / 1e6, state_bytes / copy_ms / 1e6);
    eprintln!(
        "timing wkv6_decode B=256 C=4096 H=64 on {}: {kernel_ms:.3} ms, {kernel_bw:.0} GB/s; d2d copy of the same bytes {copy_ms:.3} ms, {copy_bw:.0} GB/s; ratio {:.0}%",
        dev.name,
        100.0 * kernel_bw / copy_bw
    );
}

fn model_1b6_step_times(gemm_tflops: f64) {
    let t = Instant::now();
    let mut spec = rwkv_model::synthetic::SyntheticSpec::new(2048, 24, 65536);
    spec.seed = 7;
    let ckpt = Checkpoint::from_tensors(
        "synthetic-1b6",
        rwkv_model::synthetic::random_checkpoint(&spec),
    );
    let w = ModelWeights::from_checkpoint(&ckpt).unwrap();
    drop(ckpt);
    let build_s = t.elapsed().as_secs_f64();
    let weight_bytes = w.config.param_count() as f64 * 2.0;
    let state_bytes = w.config.state_bytes() as f64;
    tensor_parallel_step_times(&w);
    for precision in [GemmPrecision::Split, GemmPrecision::Bf16] {
        let mut be = CudaBackend::with_options(
            &w,
            256,
            0,
            CudaOptions {
                precision,
                ..CudaOptions::default()
            },
        )
        .unwrap();
        let toks = tokens(65536, 4096, 11);
        let time = |be: &mut CudaBackend, steps: &[SeqStep<'_>], reps: u32| {
            be.forward(steps).unwrap();
            let t = Instant::now();
            for _ in 0..reps {
                be.forward(steps).unwrap();
            }
            t.elapsed().as_secs_f64() * 1e3 / f64::from(reps)
        };
        let decode: Vec<SeqStep<'_>> = (0..256)
            .map(|i| step(i, &toks[i..i + 1], OutputRows::Last))
            .collect();
        let decode_ms = time(&mut be, &decode, 10);
        // The same step without logits: separates the layers from the head and the download of
        // 256 x 65536 f32 logits to pageable host memory.
        let no_logits: Vec<SeqStep<'_>> = (0..256)
            .map(|i| step(i, &toks[i..i + 1], OutputRows::None))
            .collect();
        let no_logits_ms = time(&mut be, &no_logits, 10);
        // Greedy decoding: each row ranked on the device, 8 candidates downloaded per row.
        let greedy: Vec<SeqStep<'_>> = (0..256)
            .map(|i| step(i, &toks[i..i + 1], OutputRows::Top(8)))
            .collect();
        let greedy_ms = time(&mut be, &greedy, 10);
        // Sampled decoding: top-p 0.9 decided on the device (a random model's flat rows may
        // still come back whole; the count is printed).
        let nucleus: Vec<SeqStep<'_>> = (0..256)
            .map(|i| {
                // Ids 65530.. banned, as the router asks for the World tokenizer.
                let filter = rwkv_model::Nucleus {
                    top_p: 0.9,
                    top_k: 0,
                    below: 65530,
                };
                step(i, &toks[i..i + 1], OutputRows::Nucleus(filter))
            })
            .collect();
        let nucleus_ms = time(&mut be, &nucleus, 10);
        // Top-k 40 always decides on the device.
        let top_k: Vec<SeqStep<'_>> = (0..256)
            .map(|i| {
                let filter = rwkv_model::Nucleus {
                    top_p: 1.0,
                    top_k: 40,
                    below: 65530,
                };
                step(i, &toks[i..i + 1], OutputRows::Nucleus(filter))
            })
            .collect();
        let top_k_ms = time(&mut be, &top_k, 10);
        // Floor: weights read once plus every sequence's state read and written once.
        let floor_ms = (weight_bytes + 256.0 * state_bytes * 2.0) / 4.0e12 * 1e3;
        let decode1: Vec<SeqStep<'_>> = (0..1)
            .map(|i| step(i, &toks[i..i + 1], OutputRows::Last))
            .collect();
        let decode1_ms = time(&mut be, &decode1, 10);
        // The same two decode steps launched kernel by kernel, for the graphs' share.
        be.set_graphs(false);
        let decode1_eager_ms = time(&mut be, &decode1, 10);
        let no_logits_eager_ms = time(&mut be, &no_logits, 10);
        be.set_graphs(true);
        let prefill: Vec<SeqStep<'_>> = (0..8)
            .map(|i| step(i, &toks[i * 512..(i + 1) * 512], OutputRows::Last))
            .collect();
        let prefill_ms = time(&mut be, &prefill, 3);
        // Where the time goes: device time per kernel and GEMM shape, one step each.
        for (what, steps) in [
            ("decode B=256 without logits", &no_logits),
            ("decode B=1", &decode1),
            ("prefill 8x512", &prefill),
        ] {
            let (_, times) = be.profile_step(steps).unwrap();
            eprintln!(
                "profile 1.6B-shape {precision:?} {what} (device time, largest first):\n{}",
                rwkv_cuda::profile::format_report(&times, 14)
            );
        }
        let whole_rows = be
            .forward(&nucleus)
            .unwrap()
            .nucleus
            .iter()
            .filter(|r| matches!(r, rwkv_model::NucleusRow::Row(_)))
            .count();
        let flops_per_token = 2.0 * (w.config.param_count() as f64 - 65536.0 * 2048.0);
        let prefill_tflops = flops_per_token * 4096.0 / (prefill_ms / 1e3) / 1e12;
        eprintln!(
            "timing 1.6B-shape L24 C2048 V65536 {precision:?}: decode B=256 {decode_ms:.2} ms/step ({:.0} tok/s; floor at 4 TB/s {floor_ms:.2} ms; without logits {no_logits_ms:.2} ms (no graphs {no_logits_eager_ms:.2}); greedy, 8 candidates per row {greedy_ms:.2} ms; sampled top-p 0.9 {nucleus_ms:.2} ms with {whole_rows} of 256 rows whole; sampled top-k 40 {top_k_ms:.2} ms), decode B=1 {decode1_ms:.2} ms (no graphs {decode1_eager_ms:.2}), prefill 8x512 {prefill_ms:.1} ms ({:.0} tok/s, {prefill_tflops:.0} TFLOP/s = {:.0}% of the measured bf16 GEMM rate {gemm_tflops:.0}; decode B=256 without logits {:.0}% of the floor); model built in {build_s:.0} s",
            256.0 / decode_ms * 1e3,
            4096.0 / prefill_ms * 1e3,
            100.0 * prefill_tflops / gemm_tflops,
            100.0 * floor_ms / no_logits_ms
        );
    }
}

/// The sharded decode step on every GPU there is (a one-rank group on a one-GPU machine: the
/// cost of the sharded path and NCCL's calls without any traffic between GPUs), against the
/// whole model on GPU 0.
fn tensor_parallel_step_times(w: &ModelWeights) {
    let n = rwkv_cuda::device_count().unwrap();
    let world = [4, 2, 1].into_iter().find(|&k| k <= n).unwrap();
    let devices: Vec<usize> = (0..world).collect();
    let mut tp = match rwkv_cuda::tensor_parallel(w, 256, &devices, CudaOptions::default()) {
        Ok(tp) => tp,
        Err(e) => {
            eprintln!("timing tensor parallel: not run ({e})");
            return;
        }
    };
    let toks = tokens(65536, 256, 13);
    let time = |be: &mut dyn Backend, batch: usize| {
        let steps: Vec<SeqStep<'_>> = (0..batch)
            .map(|i| step(i, &toks[i..i + 1], OutputRows::Top(1)))
            .collect();
        be.forward(&steps).unwrap();
        let t = Instant::now();
        for _ in 0..10 {
            be.forward(&steps).unwrap();
        }
        t.elapsed().as_secs_f64() * 1e3 / 10.0
    };
    let (tp256, tp1) = (time(&mut tp, 256), time(&mut tp, 1));
    drop(tp);
    let mut one = CudaBackend::new(w, 256, 0).unwrap();
    let (one256, one1) = (time(&mut one, 256), time(&mut one, 1));
    eprintln!(
        "timing tensor parallel over {world} GPU(s), 1.6B-shape greedy decode: B=256 {tp256:.2} ms/step (one GPU {one256:.2}), B=1 {tp1:.2} ms (one GPU {one1:.2})"
    );
}
