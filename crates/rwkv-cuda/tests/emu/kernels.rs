//! Kernel-level checks of the emulated kernels against plain host math.

use super::*;
use rwkv_cuda::kernels::Act;
use rwkv_model::weights::layer_norm_in_place;

/// The WKV6 recurrence of spec 2.4 for one sequence, written out directly.
#[allow(clippy::too_many_arguments)]
fn reference_wkv(
    n: usize,
    heads: usize,
    rows: std::ops::Range<usize>,
    [r, k, v, w]: [&[f32]; 4],
    u: &[f32],
    state: &mut [f32],
    y: &mut [f32],
) {
    let c = heads * n;
    for t in rows {
        for h in 0..heads {
            let s = &mut state[h * n * n..(h + 1) * n * n];
            let at = |a: &[f32], i: usize| a[t * c + h * n + i];
            for j in 0..n {
                let mut acc = 0.0f32;
                for i in 0..n {
                    acc += at(r, i) * (u[h * n + i] * at(k, i) * at(v, j) + s[i * n + j]);
                }
                y[t * c + h * n + j] = acc;
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
fn wkv_decode_and_prefill_match_the_recurrence_in_place_in_the_pool() {
    // 64 and 8: four threads per value column in the prefill kernel; 6: one.
    for n in [64, 8, 6] {
        let Some(e) = emu(n) else { return };
        let ex = host_exec(&e, n);
        let heads = 3;
        let c = heads * n;
        let layout = PoolLayout {
            slots: 4,
            n_layer: 2,
            n_embd: c,
            n_head: heads,
            head_size: n,
        };
        let mut rng = Lcg(n as u64 + 1);
        let mut pool = rng.vec(layout.total_len().unwrap());
        let start_pool = pool.clone();
        // The long prefill (75 tokens) spans several of the prefill kernel's token chunks and
        // ends in a partial one.
        let rows = 80;
        let (r, k, v) = (rng.vec(rows * c), rng.vec(rows * c), rng.vec(rows * c));
        let w: Vec<f32> = rng
            .vec(rows * c)
            .iter()
            .map(|x| (-(2.0 * x).exp()).exp())
            .collect();
        let u = rng.vec(c);
        // Decode: row 0 -> slot 2, row 4 -> slot 3. Prefill: rows 1..4 -> slot 0, 5..80 -> slot 1.
        let seqs: [(std::ops::Range<usize>, usize); 4] =
            [(0..1, 2), (1..4, 0), (4..5, 3), (5..80, 1)];
        let mut want_pool = start_pool.clone();
        let mut want_y = vec![0.0; rows * c];
        let layer = 1;
        for (span, slot) in &seqs {
            let base = layout.slot_range(*slot).start + layout.wkv(layer);
            let state = &mut want_pool[base..base + layout.wkv_len()];
            reference_wkv(
                n,
                heads,
                span.clone(),
                [&r, &k, &v, &w],
                &u,
                state,
                &mut want_y,
            );
        }
        let mut y = vec![f32::NAN; rows * c];
        let (pool_v, y_v) = (view_mut(&mut pool), view_mut(&mut y));
        let meta: Vec<i32> = vec![0, 4, 2, 3, 1, 5, 4, 80, 0, 1];
        let m = |i: usize, len: usize| view(&meta).slice(i, len).unwrap();
        let arg = PoolArg {
            buf: pool_v,
            stride: layout.state_len(),
            slots: layout.slots,
        };
        let rkvw = [view(&r), view(&k), view(&v), view(&w)];
        let kx = ex.kernels();
        kx.wkv6_decode(
            arg,
            layout.wkv(layer),
            m(0, 2),
            m(2, 2),
            2,
            rkvw,
            view(&u),
            y_v,
            rows,
            c,
        )
        .unwrap();
        kx.wkv6_prefill(
            arg,
            layout.wkv(layer),
            m(4, 2),
            m(6, 2),
            m(8, 2),
            2,
            rkvw,
            view(&u),
            y_v,
            rows,
            c,
        )
        .unwrap();
        let (pool_now, y_now) = (&pool, &y);
        let err_y = rel_l2(y_now, &want_y);
        let err_s = rel_l2(pool_now, &want_pool);
        eprintln!("wkv n={n}: y rel err {err_y:.2e}, state rel err {err_s:.2e}");
        assert!(
            err_y <= 1e-5 && err_s <= 1e-5,
            "n={n}: y {err_y:.2e}, state {err_s:.2e}"
        );
        // Only the WKV parts of the four slots' layer 1 changed.
        for (i, (a, b)) in pool_now.iter().zip(&want_pool).enumerate() {
            let in_slot = i % layout.state_len();
            let lo = layout.wkv(layer);
            if !(lo..lo + layout.wkv_len()).contains(&in_slot) {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "value {i} outside the WKV state changed"
                );
            }
        }
    }
}

#[test]
fn layer_norms_match_the_host_definition() {
    let Some(e) = emu(64) else { return };
    let kx = host_exec(&e, 64).kernels;
    let mut rng = Lcg(7);
    let (rows, cols) = (5, 200);
    let x: Vec<f32> = rng.vec(rows * cols).iter().map(|v| 3.0 * v + 0.5).collect();
    let (w, b) = (rng.vec(cols), rng.vec(cols));
    let mut want = x.clone();
    for row in want.chunks_exact_mut(cols) {
        layer_norm_in_place(row, &w, &b, 1e-5);
    }
    let mut out = vec![f32::NAN; rows * cols];
    kx.layer_norm(view(&x), view(&w), view(&b), view_mut(&mut out), rows, cols)
        .unwrap();
    assert!(
        max_abs(&out, &want) < 1e-5,
        "layer_norm: {}",
        max_abs(&out, &want)
    );

    // Gathered rows as a split bf16 GEMM input: hi + lo recovers the f32 value.
    let idx = [3, 0, 3];
    let mut hl = vec![NAN_BF16; 2 * 3 * cols];
    kx.layer_norm_gather_bf16(
        view(&x),
        rows,
        view(&idx),
        view(&w),
        view(&b),
        view_mut(&mut hl),
        3,
        cols,
        true,
    )
    .unwrap();
    for (o, &src) in idx.iter().enumerate() {
        for j in 0..cols {
            let want = want[src as usize * cols + j];
            let hi = bf16_to_f32(hl[o * cols + j]);
            let lo = bf16_to_f32(hl[3 * cols + o * cols + j]);
            assert!((hi - want).abs() <= want.abs() / 256.0 + 1e-6);
            assert!(
                (hi + lo - want).abs() <= want.abs() * 2e-5 + 1e-6,
                "{hi} + {lo} vs {want}"
            );
        }
    }
}

#[test]
fn group_norm_gate_matches_the_host_definition() {
    for n in [64, 8] {
        let Some(e) = emu(n) else { return };
        let kx = host_exec(&e, n).kernels;
        let mut rng = Lcg(11);
        let (rows, heads) = (3, 4);
        let cols = heads * n;
        let (y, g, w, b) = (
            rng.vec(rows * cols),
            rng.vec(rows * cols),
            rng.vec(cols),
            rng.vec(cols),
        );
        let mut want = y.clone();
        for row in want.chunks_exact_mut(cols) {
            for h in 0..heads {
                let r = h * n..(h + 1) * n;
                layer_norm_in_place(&mut row[r.clone()], &w[r.clone()], &b[r], 64e-5);
            }
        }
        want.iter_mut().zip(&g).for_each(|(v, g)| *v *= g);
        let mut out = vec![NAN_BF16; 2 * rows * cols];
        kx.group_norm_gate(
            view(&y),
            view(&g),
            view(&w),
            view(&b),
            view_mut(&mut out),
            rows,
            cols,
            true,
        )
        .unwrap();
        let got: Vec<f32> = (0..rows * cols)
            .map(|i| bf16_to_f32(out[i]) + bf16_to_f32(out[rows * cols + i]))
            .collect();
        assert!(
            rel_l2(&got, &want) < 1e-5,
            "n={n}: {:.2e}",
            rel_l2(&got, &want)
        );
    }
}

#[test]
fn conversions_and_gemm_epilogues_match_the_host() {
    let Some(e) = emu(64) else { return };
    let kx = host_exec(&e, 64).kernels;
    let mut rng = Lcg(3);
    let (rows, cols) = (3, 50);
    let n = rows * cols;
    let x: Vec<f32> = rng.vec(n).iter().map(|v| 4.0 * v).collect();
    let mut split = vec![NAN_BF16; 2 * n];
    kx.to_bf16(view(&x), view_mut(&mut split), rows, cols, true)
        .unwrap();
    let mut back = vec![f32::NAN; n];
    kx.to_f32(view(&split), view_mut(&mut back), n).unwrap();
    for i in 0..n {
        assert_eq!(split[i], half_bits(x[i]), "round to nearest even");
        let lo = bf16_to_f32(split[n + i]);
        assert!((back[i] + lo - x[i]).abs() <= x[i].abs() * 2e-5);
    }
    // tmp holds hi-part and lo-part GEMM outputs; the epilogue sums them.
    let tmp = rng.vec(2 * n);
    let (bias, gate) = (rng.vec(cols), rng.vec(n));
    let sum = |i: usize| tmp[i] + tmp[n + i] + bias[i % cols];
    type Reference = fn(f32) -> f32;
    let acts: [(Act, Reference); 6] = [
        (Act::None, |v| v),
        (Act::Tanh, f32::tanh),
        (Act::Silu, |v| v / (1.0 + (-v).exp())),
        (Act::Relu2, |v| v.max(0.0) * v.max(0.0)),
        (Act::Sigmoid, |v| 1.0 / (1.0 + (-v).exp())),
        (Act::Decay, |v| (-v.exp()).exp()),
    ];
    for (act, f) in acts {
        let mut out = vec![1.5f32; n];
        kx.gemm_out_f32(
            view(&tmp),
            view_mut(&mut out),
            Some(view(&bias)),
            Some(view(&gate)),
            rows,
            cols,
            true,
            act,
            true,
        )
        .unwrap();
        for i in 0..n {
            let want = 1.5 + gate[i] * f(sum(i));
            assert!(
                (out[i] - want).abs() < 1e-5,
                "{act:?}: {} vs {want}",
                out[i]
            );
        }
        let mut outb = vec![NAN_BF16; 2 * n];
        kx.gemm_out_bf16(
            view(&tmp),
            view_mut(&mut outb),
            Some(view(&bias)),
            rows,
            cols,
            true,
            act,
        )
        .unwrap();
        for i in 0..n {
            let got = bf16_to_f32(outb[i]) + bf16_to_f32(outb[n + i]);
            let want = f(sum(i));
            assert!(
                (got - want).abs() <= want.abs() * 2e-5 + 1e-6,
                "{act:?} bf16: {got} vs {want}"
            );
        }
    }
    // Without split, bias, gate or accumulation.
    let mut out = vec![f32::NAN; n];
    kx.gemm_out_f32(
        view(&tmp),
        view_mut(&mut out),
        None,
        None,
        rows,
        cols,
        false,
        Act::None,
        false,
    )
    .unwrap();
    assert_eq!(out, tmp[..n]);
}

#[test]
fn fused_epilogues_equal_the_unfused_kernels_bit_for_bit() {
    let Some(e) = emu(64) else { return };
    let kx = host_exec(&e, 64).kernels;
    let mut rng = Lcg(11);
    let (rows, cols) = (3, 130);
    let n = rows * cols;
    for split in [false, true] {
        let s = if split { 2 } else { 1 };
        // k, v, r, silu(g) from the four blocks of the batched projection's output.
        let tmp = rng.vec(4 * s * n);
        let mut fused: [Vec<f32>; 4] = std::array::from_fn(|_| vec![f32::NAN; n]);
        let [k, v, r, g] = fused.each_mut().map(|o| view_mut(o.as_mut_slice()));
        kx.kvrg_out(view(&tmp), [k, v, r, g], rows, cols, split)
            .unwrap();
        for (j, act) in [Act::None, Act::None, Act::None, Act::Silu]
            .into_iter()
            .enumerate()
        {
            let mut want = vec![f32::NAN; n];
            let block = &tmp[j * s * n..(j + 1) * s * n];
            kx.gemm_out_f32(
                view(block),
                view_mut(&mut want),
                None,
                None,
                rows,
                cols,
                split,
                act,
                false,
            )
            .unwrap();
            assert_eq!(fused[j], want, "kvrg block {j}, split {split}");
        }

        // x += gate * sum, then LN(x): the same x and LN as the two separate kernels.
        let tmp = rng.vec(s * n);
        let x0: Vec<f32> = rng.vec(n).iter().map(|v| 2.0 * v + 0.25).collect();
        let (w, b, gate) = (rng.vec(cols), rng.vec(cols), rng.vec(n));
        for gate in [None, Some(view(&gate))] {
            let (mut x_want, mut ln_want) = (x0.clone(), vec![f32::NAN; n]);
            kx.gemm_out_f32(
                view(&tmp),
                view_mut(&mut x_want),
                None,
                gate,
                rows,
                cols,
                split,
                Act::None,
                true,
            )
            .unwrap();
            kx.layer_norm(
                view(&x_want),
                view(&w),
                view(&b),
                view_mut(&mut ln_want),
                rows,
                cols,
            )
            .unwrap();
            let (mut x, mut ln) = (x0.clone(), vec![f32::NAN; n]);
            kx.residual_layer_norm(
                view(&tmp),
                gate,
                view_mut(&mut x),
                (view(&w), view(&b)),
                view_mut(&mut ln),
                rows,
                cols,
                split,
            )
            .unwrap();
            assert_eq!(x, x_want, "residual, split {split}");
            assert_eq!(ln, ln_want, "layer norm, split {split}");
        }
    }
}

fn half_bits(x: f32) -> u16 {
    // Round to nearest even, as Tensor::to_bf16_bits does through `half`.
    let u = x.to_bits();
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

#[test]
fn embedding_gathers_rows() {
    let Some(e) = emu(64) else { return };
    let kx = host_exec(&e, 64).kernels;
    let (vocab, cols) = (7, 10);
    let emb: Vec<u16> = (0..vocab * cols)
        .map(|i| half_bits(i as f32 * 0.25))
        .collect();
    let tokens = [6u32, 0, 3, 6];
    let mut x = vec![f32::NAN; tokens.len() * cols];
    kx.embedding(
        view(&emb),
        vocab,
        view(&tokens),
        view_mut(&mut x),
        tokens.len(),
        cols,
    )
    .unwrap();
    for (r, &t) in tokens.iter().enumerate() {
        for j in 0..cols {
            assert_eq!(x[r * cols + j], (t as usize * cols + j) as f32 * 0.25);
        }
    }
}

#[test]
fn softmax_and_top_k_match_the_host() {
    let Some(e) = emu(64) else { return };
    let kx = host_exec(&e, 64).kernels;
    let mut rng = Lcg(5);
    let (rows, cols, k) = (3, 1000, 40);
    let mut x: Vec<f32> = rng.vec(rows * cols).iter().map(|v| 8.0 * v).collect();
    // Ties and a NaN: ties rank by lower index, NaN counts as -inf.
    x[5] = 9.0;
    x[17] = 9.0;
    x[1000 + 3] = f32::NAN;
    let temp = 0.7;
    let mut probs = vec![f32::NAN; rows * cols];
    kx.softmax(view(&x), view_mut(&mut probs), rows, cols, temp)
        .unwrap();
    let top = device_top_k(&kx, &x, rows, cols, k);
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let clean: Vec<f32> = row
            .iter()
            .map(|v| if v.is_nan() { f32::NEG_INFINITY } else { *v })
            .collect();
        let m = clean.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = clean
            .iter()
            .map(|v| f64::from(((v - m) / temp).exp()))
            .sum();
        if r != 1 {
            for j in 0..cols {
                let want = (f64::from(((clean[j] - m) / temp).exp()) / z) as f32;
                assert!((probs[r * cols + j] - want).abs() < 1e-6);
            }
        }
        assert_eq!(top[r], host_top_k(row, k), "row {r}");
    }
    assert_eq!((top[0][0].0, top[0][1].0), (5, 17));
}

/// The top-k kernel's (index, value) pairs, row by row.
fn device_top_k(
    kx: &Kernels,
    x: &[f32],
    rows: usize,
    cols: usize,
    k: usize,
) -> Vec<Vec<(i32, f32)>> {
    let (mut idx, mut val) = (vec![-1i32; rows * k], vec![f32::NAN; rows * k]);
    kx.top_k(
        view(x),
        view_mut(&mut idx),
        view_mut(&mut val),
        rows,
        cols,
        k,
    )
    .unwrap();
    idx.chunks_exact(k)
        .zip(val.chunks_exact(k))
        .map(|(i, v)| i.iter().copied().zip(v.iter().copied()).collect())
        .collect()
}

/// The k best entries of each row by the host's rule: larger first, ties by lower index, NaN
/// as -inf; the kernel must return exactly these, in this order.
fn host_top_k(row: &[f32], k: usize) -> Vec<(i32, f32)> {
    let clean: Vec<f32> = row
        .iter()
        .map(|v| if v.is_nan() { f32::NEG_INFINITY } else { *v })
        .collect();
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| clean[b].total_cmp(&clean[a]).then(a.cmp(&b)));
    order[..k].iter().map(|&j| (j as i32, clean[j])).collect()
}

/// Rows that defeat shortcuts in the top-k kernel's rounds: the best entries all owned by one
/// thread (its candidate list must refill round after round), long runs of ties across threads,
/// -inf and NaN entries among the picks, k equal to the row length, and k = 1.
#[test]
fn top_k_rounds_match_the_host_on_adversarial_rows() {
    let Some(e) = emu(64) else { return };
    let kx = host_exec(&e, 64).kernels;
    let threads = rwkv_cuda::launch::SAMPLING_THREADS as usize;
    let mut rng = Lcg(11);
    // 5000 columns give each thread ~20 entries, more than its 16-entry list holds.
    let one_thread: Vec<f32> = (0..5000)
        .map(|c| {
            if c % threads == 7 {
                100.0 + c as f32
            } else {
                rng.next()
            }
        })
        .collect();
    let ties: Vec<f32> = (0..3000).map(|c| (c % 3) as f32).collect();
    let mut special: Vec<f32> = rng.vec(300);
    for c in (0..300).step_by(5) {
        special[c] = f32::NEG_INFINITY;
    }
    for c in (1..300).step_by(7) {
        special[c] = f32::NAN;
    }
    special[299] = f32::INFINITY;
    let random: Vec<f32> = rng.vec(3000).iter().map(|v| 8.0 * v).collect();
    for (what, row, ks) in [
        (
            "one thread owns the best",
            &one_thread,
            &[1, 16, 17, 40][..],
        ),
        ("ties across threads", &ties, &[33][..]),
        ("-inf, NaN and +inf", &special, &[1, 300][..]),
        ("random", &random, &[64][..]),
    ] {
        let (rows, cols) = (2, row.len());
        let x: Vec<f32> = row.iter().chain(row.iter().rev()).copied().collect();
        for &k in ks {
            let top = device_top_k(&kx, &x, rows, cols, k);
            for (r, got) in top.iter().enumerate() {
                let want = host_top_k(&x[r * cols..(r + 1) * cols], k);
                assert_eq!(*got, want, "{what}: row {r}, k = {k}");
            }
        }
    }
}

#[test]
fn row_mass_is_the_softmax_max_and_denominator() {
    let Some(e) = emu(64) else { return };
    let kx = host_exec(&e, 64).kernels;
    let mut rng = Lcg(9);
    let (rows, cols) = (4, 777);
    let mut x: Vec<f32> = rng.vec(rows * cols).iter().map(|v| 6.0 * v).collect();
    // A NaN counts as -inf; +inf as the largest finite value; a row of -inf has no mass.
    x[10] = f32::NAN;
    x[cols + 4] = f32::INFINITY;
    x[3 * cols..].fill(f32::NEG_INFINITY);
    let (mut max, mut sum) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
    kx.row_mass(view(&x), view_mut(&mut max), view_mut(&mut sum), rows, cols)
        .unwrap();
    for r in 0..2 {
        let clean: Vec<f32> = x[r * cols..(r + 1) * cols]
            .iter()
            .map(|&v| {
                if v.is_nan() {
                    f32::NEG_INFINITY
                } else {
                    v.min(f32::MAX)
                }
            })
            .collect();
        let m = clean.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = clean.iter().map(|&v| f64::from((v - m).exp())).sum();
        assert_eq!(max[r], m, "row {r}");
        assert!(
            (f64::from(sum[r]) - z).abs() <= 1e-5 * z,
            "row {r}: {} vs {z}",
            sum[r]
        );
    }
    assert_eq!((max[1], sum[1]), (f32::MAX, 1.0), "+inf dominates alone");
    assert_eq!((max[3], sum[3]), (f32::NEG_INFINITY, 0.0));
}
