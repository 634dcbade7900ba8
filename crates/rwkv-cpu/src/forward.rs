//! The RWKV-6 forward pass over a ragged batch (spec sections 2 and 3).
//!
//! All new tokens of all sequences are stacked into one [T, C] activation matrix so every
//! projection reads its weights once per step; only the token shift and the WKV recurrence look
//! at sequence boundaries.

use rwkv_model::{OutputRows, SeqStep, State};

use crate::model::{Block, ChannelMix, CpuModel, TimeMix};
use crate::ops::matmul::matmul;
use crate::ops::norm::{group_norm_rows, layer_norm_rows};
use crate::ops::wkv::{wkv6_sequence, WkvInputs};

/// Row ranges of each sequence inside the stacked activations.
struct Layout {
    spans: Vec<std::ops::Range<usize>>,
    rows: usize,
}

impl Layout {
    fn new(steps: &[SeqStep<'_>]) -> Self {
        let mut spans = Vec::with_capacity(steps.len());
        let mut rows = 0;
        for s in steps {
            spans.push(rows..rows + s.tokens.len());
            rows += s.tokens.len();
        }
        Self { spans, rows }
    }
}

/// Runs one step. `states[i]` is the state of `steps[i]`; returns the requested logit rows.
pub fn forward(model: &CpuModel, steps: &[SeqStep<'_>], states: &mut [&mut State]) -> Vec<f32> {
    let c = model.config.n_embd;
    let layout = Layout::new(steps);
    let mut x = Vec::with_capacity(layout.rows * c);
    for s in steps {
        for &t in s.tokens {
            x.extend_from_slice(&model.emb[t as usize * c..(t as usize + 1) * c]);
        }
    }
    for (n, block) in model.blocks.iter().enumerate() {
        time_mix(block, &block.att, n, &layout, &mut x, states, model);
        channel_mix(block, &block.ffn, n, &layout, &mut x, states);
    }
    head(model, steps, &layout, &x)
}

/// `prev - a` where `prev` is `a` shifted down one row within each sequence, its first row taken
/// from the shift state; the shift state then becomes each sequence's last row of `a`.
fn token_shift(a: &[f32], c: usize, layout: &Layout, shifts: &mut [&mut [f32]]) -> Vec<f32> {
    let mut dx = vec![0.0; a.len()];
    for (span, shift) in layout.spans.iter().zip(shifts.iter_mut()) {
        if span.is_empty() {
            continue;
        }
        for r in span.clone() {
            let prev = if r == span.start {
                &shift[..]
            } else {
                &a[(r - 1) * c..r * c]
            };
            for ((d, p), cur) in dx[r * c..(r + 1) * c]
                .iter_mut()
                .zip(prev)
                .zip(&a[r * c..(r + 1) * c])
            {
                *d = p - cur;
            }
        }
        shift.copy_from_slice(&a[(span.end - 1) * c..span.end * c]);
    }
    dx
}

/// `a + dx ⊙ mix` row by row.
fn lerp(a: &[f32], dx: &[f32], mix: &[f32]) -> Vec<f32> {
    let c = mix.len();
    let mut out = Vec::with_capacity(a.len());
    for (ar, dr) in a.chunks_exact(c).zip(dx.chunks_exact(c)) {
        out.extend(ar.iter().zip(dr).zip(mix).map(|((a, d), m)| a + d * m));
    }
    out
}

fn project(x: &[f32], rows: usize, w: &crate::ops::matmul::Matrix) -> Vec<f32> {
    let mut out = vec![0.0; rows * w.rows];
    matmul(x, rows, w, &mut out);
    out
}

fn time_mix(
    block: &Block,
    att: &TimeMix,
    n: usize,
    layout: &Layout,
    x: &mut [f32],
    states: &mut [&mut State],
    model: &CpuModel,
) {
    let cfg = &model.config;
    let (c, rows, dm) = (cfg.n_embd, layout.rows, cfg.maa_lora);
    let mut a = vec![0.0; x.len()];
    layer_norm_rows(x, &block.ln1.weight, &block.ln1.bias, &mut a);
    let dx = {
        let mut shifts: Vec<&mut [f32]> = states
            .iter_mut()
            .map(|s| s.layer_mut(n).att_shift)
            .collect();
        token_shift(&a, c, layout, &mut shifts)
    };
    // ddlerp: z = tanh(xm @ w1), m_j = z_j @ w2[j], x_j = a + dx ⊙ (λ_j + m_j).
    let xm = lerp(&a, &dx, &att.maa_x);
    let mut z = project(&xm, rows, &att.maa_w1);
    z.iter_mut().for_each(|v| *v = v.tanh());
    let mixed: Vec<Vec<f32>> = (0..5)
        .map(|j| {
            let zj: Vec<f32> = z
                .chunks_exact(5 * dm)
                .flat_map(|r| &r[j * dm..(j + 1) * dm])
                .copied()
                .collect();
            let mut m = project(&zj, rows, &att.maa_w2[j]);
            for (row, (ar, dr)) in m
                .chunks_exact_mut(c)
                .zip(a.chunks_exact(c).zip(dx.chunks_exact(c)))
            {
                for (i, v) in row.iter_mut().enumerate() {
                    *v = ar[i] + dr[i] * (att.maa[j][i] + *v);
                }
            }
            m
        })
        .collect();
    let [x_w, x_k, x_v, x_r, x_g] = [0, 1, 2, 3, 4].map(|j| &mixed[j]);
    let r = project(x_r, rows, &att.receptance);
    let k = project(x_k, rows, &att.key);
    let v = project(x_v, rows, &att.value);
    let mut g = project(x_g, rows, &att.gate);
    g.iter_mut().for_each(|v| *v = *v / (1.0 + (-*v).exp()));
    // Decay: w = exp(-exp(time_decay + tanh(x_w @ dw1) @ dw2)), in f32.
    let mut dl = project(x_w, rows, &att.decay_w1);
    dl.iter_mut().for_each(|v| *v = v.tanh());
    let mut w = project(&dl, rows, &att.decay_w2);
    for row in w.chunks_exact_mut(c) {
        for (v, d0) in row.iter_mut().zip(&att.decay) {
            *v = (-(d0 + *v).exp()).exp();
        }
    }
    let mut y = vec![0.0; rows * c];
    for (span, state) in layout.spans.iter().zip(states.iter_mut()) {
        let rr = span.start * c..span.end * c;
        let inputs = WkvInputs {
            r: &r[rr.clone()],
            k: &k[rr.clone()],
            v: &v[rr.clone()],
            w: &w[rr.clone()],
            u: &att.faaaa,
        };
        wkv6_sequence(&inputs, cfg.head_size, state.layer_mut(n).wkv, &mut y[rr]);
    }
    group_norm_rows(&mut y, cfg.head_size, &att.ln_x.weight, &att.ln_x.bias);
    y.iter_mut().zip(&g).for_each(|(y, g)| *y *= g);
    let out = project(&y, rows, &att.output);
    x.iter_mut().zip(&out).for_each(|(x, o)| *x += o);
}

fn channel_mix(
    block: &Block,
    ffn: &ChannelMix,
    n: usize,
    layout: &Layout,
    x: &mut [f32],
    states: &mut [&mut State],
) {
    let (c, rows) = (ffn.maa_k.len(), layout.rows);
    let mut b = vec![0.0; x.len()];
    layer_norm_rows(x, &block.ln2.weight, &block.ln2.bias, &mut b);
    let dx = {
        let mut shifts: Vec<&mut [f32]> = states
            .iter_mut()
            .map(|s| s.layer_mut(n).ffn_shift)
            .collect();
        token_shift(&b, c, layout, &mut shifts)
    };
    let x_k = lerp(&b, &dx, &ffn.maa_k);
    let x_r = lerp(&b, &dx, &ffn.maa_r);
    let mut kk = project(&x_k, rows, &ffn.key);
    kk.iter_mut().for_each(|v| *v = v.max(0.0) * v.max(0.0));
    let kv = project(&kk, rows, &ffn.value);
    let r = project(&x_r, rows, &ffn.receptance);
    for ((x, r), kv) in x.iter_mut().zip(&r).zip(&kv) {
        *x += kv / (1.0 + (-r).exp());
    }
}

/// ln_out and the head, only for the rows the caller asked for.
fn head(model: &CpuModel, steps: &[SeqStep<'_>], layout: &Layout, x: &[f32]) -> Vec<f32> {
    let c = model.config.n_embd;
    let mut picked = Vec::new();
    for (s, span) in steps.iter().zip(&layout.spans) {
        let first = match s.output {
            OutputRows::None => continue,
            OutputRows::Last => span.end.saturating_sub(1).max(span.start),
            OutputRows::All => span.start,
        };
        for r in first..span.end {
            picked.extend_from_slice(&x[r * c..(r + 1) * c]);
        }
    }
    let rows = picked.len() / c;
    let mut normed = vec![0.0; picked.len()];
    layer_norm_rows(
        &picked,
        &model.ln_out.weight,
        &model.ln_out.bias,
        &mut normed,
    );
    project(&normed, rows, &model.head)
}
