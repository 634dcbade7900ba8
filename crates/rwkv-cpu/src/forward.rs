//! The RWKV-6 forward pass over a ragged batch (spec sections 2 and 3).
//!
//! All new tokens of all sequences are stacked into one [T, C] activation matrix so every
//! projection reads its weights once per step; only the token shift and the WKV recurrence look
//! at sequence boundaries.

use rwkv_model::{OutputRows, SeqStep, State};

use crate::model::{Block, ChannelMix, CpuModel, Linear, TimeMix};
use std::sync::Mutex;

use crate::ops::norm::{group_norm_rows, layer_norm_rows, LN_EPS};
use crate::ops::pool::split;
use crate::ops::wkv::{wkv6_heads, WkvInputs};
use rwkv_model::weights::layer_norm_in_place;

/// Row ranges of each sequence inside the stacked activations.
pub(crate) struct Layout {
    pub(crate) spans: Vec<std::ops::Range<usize>>,
    pub(crate) rows: usize,
}

impl Layout {
    pub(crate) fn new(steps: &[SeqStep<'_>]) -> Self {
        let mut spans = Vec::with_capacity(steps.len());
        let mut rows = 0;
        for s in steps {
            spans.push(rows..rows + s.tokens.len());
            rows += s.tokens.len();
        }
        Self { spans, rows }
    }
}

/// Which logits the head computes for each requested row.
#[derive(Clone, Copy)]
pub enum HeadRows<'a> {
    /// The whole vocabulary.
    Full,
    /// Only these token ids, in this order.
    Candidates(&'a [u32]),
}

/// Runs one step. `states[i]` is the state of `steps[i]`; returns the requested logit rows.
pub fn forward(model: &CpuModel, steps: &[SeqStep<'_>], states: &mut [&mut State]) -> Vec<f32> {
    forward_with_head(model, steps, states, HeadRows::Full)
}

/// [`forward`] with a choice of head columns.
/// The row layout of a step and its stacked embedding rows [rows, C].
pub(crate) fn embed(model: &CpuModel, steps: &[SeqStep<'_>]) -> (Layout, Vec<f32>) {
    let c = model.config.n_embd;
    let layout = Layout::new(steps);
    let mut x = Vec::with_capacity(layout.rows * c);
    for s in steps {
        for &t in s.tokens {
            model.emb.push_row(t as usize, c, &mut x);
        }
    }
    (layout, x)
}

pub fn forward_with_head(
    model: &CpuModel,
    steps: &[SeqStep<'_>],
    states: &mut [&mut State],
    which: HeadRows<'_>,
) -> Vec<f32> {
    let (layout, mut x) = embed(model, steps);
    for (n, block) in model.blocks.iter().enumerate() {
        time_mix(block, &block.att, n, &layout, &mut x, states, model);
        channel_mix(block, &block.ffn, n, &layout, &mut x, states, model);
    }
    head(model, steps, &layout, &x, which)
}

/// `prev - a` where `prev` is `a` shifted down one row within each sequence, its first row taken
/// from the shift state; the shift state then becomes each sequence's last row of `a`.
pub(crate) fn token_shift(
    a: &[f32],
    c: usize,
    layout: &Layout,
    shifts: &mut [&mut [f32]],
) -> Vec<f32> {
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
pub(crate) fn lerp(a: &[f32], dx: &[f32], mix: &[f32]) -> Vec<f32> {
    let c = mix.len();
    let mut out = Vec::with_capacity(a.len());
    for (ar, dr) in a.chunks_exact(c).zip(dx.chunks_exact(c)) {
        out.extend(ar.iter().zip(dr).zip(mix).map(|((a, d), m)| a + d * m));
    }
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
    let (c, rows) = (cfg.n_embd, layout.rows);
    let project = |x: &[f32], rows: usize, w: &Linear| model.project(x, rows, w);
    let mut a = vec![0.0; x.len()];
    par_layer_norm(model, x, &block.ln1.weight, &block.ln1.bias, &mut a);
    let dx = {
        let mut shifts: Vec<&mut [f32]> = states
            .iter_mut()
            .map(|s| s.layer_mut(n).att_shift)
            .collect();
        token_shift(&a, c, layout, &mut shifts)
    };
    let mixed = ddlerp(model, att, &a, &dx, rows);
    let [x_w, x_k, x_v, x_r, x_g] = [0, 1, 2, 3, 4].map(|j| &mixed[j]);
    let r = project(x_r, rows, &att.receptance);
    let k = project(x_k, rows, &att.key);
    let v = project(x_v, rows, &att.value);
    let mut g = project(x_g, rows, &att.gate);
    par_rows(model, &mut g, c, |_, ch| {
        ch.iter_mut().for_each(|v| *v = *v / (1.0 + (-*v).exp()))
    });
    let w = decay(model, att, x_w, rows);
    let mut y = vec![0.0; rows * c];
    wkv_all(
        model,
        n,
        layout,
        (&r, &k, &v, &w),
        &att.faaaa,
        states,
        &mut y,
    );
    par_rows(model, &mut y, c, |_, ch| {
        group_norm_rows(ch, cfg.head_size, &att.ln_x.weight, &att.ln_x.bias)
    });
    y.iter_mut().zip(&g).for_each(|(y, g)| *y *= g);
    let out = project(&y, rows, &att.output);
    x.iter_mut().zip(&out).for_each(|(x, o)| *x += o);
}

/// The five data-dependent mixes (ddlerp) x_w, x_k, x_v, x_r, x_g, each [rows, C]:
/// z = tanh(xm @ w1), m_j = z_j @ w2[j], x_j = a + dx ⊙ (λ_j + m_j).
pub(crate) fn ddlerp(
    model: &CpuModel,
    att: &TimeMix,
    a: &[f32],
    dx: &[f32],
    rows: usize,
) -> Vec<Vec<f32>> {
    let (c, dm) = (model.config.n_embd, model.config.maa_lora);
    let project = |x: &[f32], rows: usize, w: &Linear| model.project(x, rows, w);
    let xm = lerp(a, dx, &att.maa_x);
    let mut z = project(&xm, rows, &att.maa_w1);
    z.iter_mut().for_each(|v| *v = v.tanh());
    (0..5)
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
        .collect()
}

/// The decay w = exp(-exp(time_decay + tanh(x_w @ dw1) @ dw2)) [rows, C], in f32.
pub(crate) fn decay(model: &CpuModel, att: &TimeMix, x_w: &[f32], rows: usize) -> Vec<f32> {
    let c = model.config.n_embd;
    let project = |x: &[f32], rows: usize, w: &Linear| model.project(x, rows, w);
    let mut dl = project(x_w, rows, &att.decay_w1);
    dl.iter_mut().for_each(|v| *v = v.tanh());
    let mut w = project(&dl, rows, &att.decay_w2);
    par_rows(model, &mut w, c, |_, ch| {
        for row in ch.chunks_exact_mut(c) {
            for (v, d0) in row.iter_mut().zip(&att.decay) {
                *v = (-(d0 + *v).exp()).exp();
            }
        }
    });
    w
}

fn channel_mix(
    block: &Block,
    ffn: &ChannelMix,
    n: usize,
    layout: &Layout,
    x: &mut [f32],
    states: &mut [&mut State],
    model: &CpuModel,
) {
    let project = |x: &[f32], rows: usize, w: &Linear| model.project(x, rows, w);
    let (c, rows) = (ffn.maa_k.len(), layout.rows);
    let mut b = vec![0.0; x.len()];
    par_layer_norm(model, x, &block.ln2.weight, &block.ln2.bias, &mut b);
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
    let kv = model.project_skip_zeros(&kk, rows, &ffn.value);
    let r = project(&x_r, rows, &ffn.receptance);
    par_rows(model, x, c, |r0, ch| {
        let at = r0 * c..r0 * c + ch.len();
        for ((x, r), kv) in ch.iter_mut().zip(&r[at.clone()]).zip(&kv[at]) {
            *x += kv / (1.0 + (-r).exp());
        }
    });
}

/// ln_out and the head, only for the rows the caller asked for.
pub(crate) fn head(
    model: &CpuModel,
    steps: &[SeqStep<'_>],
    layout: &Layout,
    x: &[f32],
    which: HeadRows<'_>,
) -> Vec<f32> {
    let c = model.config.n_embd;
    let mut picked = Vec::new();
    for (s, span) in steps.iter().zip(&layout.spans) {
        let first = match s.output {
            OutputRows::None => continue,
            OutputRows::Last | OutputRows::Top(_) | OutputRows::Nucleus(_) => {
                span.end.saturating_sub(1).max(span.start)
            }
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
    match which {
        HeadRows::Full => model.project(&normed, rows, &model.head),
        HeadRows::Candidates(ids) => normed
            .chunks_exact(c)
            .flat_map(|row| ids.iter().map(move |&t| model.head_dot(t as usize, row)))
            .collect(),
    }
}

/// The WKV recurrence of every sequence of the step, spread over the pool: by sequence when
/// there are enough of them (batched decode), else by groups of heads (prefill of one sequence).
/// Each task computes into its own buffer, scattered into `y` afterwards; the arithmetic per
/// head is the same however the work is split.
fn wkv_all(
    model: &CpuModel,
    n: usize,
    layout: &Layout,
    (r, k, v, w): (&[f32], &[f32], &[f32], &[f32]),
    u: &[f32],
    states: &mut [&mut State],
    y: &mut [f32],
) {
    let (c, hs) = (model.config.n_embd, model.config.head_size);
    let heads = c / hs;
    let threads = model.pool.threads();
    let groups = if layout.spans.len() >= threads || layout.rows < 4 {
        1
    } else {
        threads.min(heads)
    };
    struct Task<'a> {
        span: std::ops::Range<usize>,
        heads: std::ops::Range<usize>,
        state: &'a mut [f32],
        out: Vec<f32>,
    }
    let mut tasks = Vec::new();
    for (span, state) in layout.spans.iter().zip(states.iter_mut()) {
        if span.is_empty() {
            continue;
        }
        let mut rest = state.layer_mut(n).wkv;
        for g in 0..groups {
            let hr = split(heads, groups, g);
            let (mine, tail) = rest.split_at_mut(hr.len() * hs * hs);
            rest = tail;
            tasks.push(Mutex::new(Task {
                span: span.clone(),
                heads: hr,
                state: mine,
                out: Vec::new(),
            }));
        }
    }
    let run = |task: &Mutex<Task<'_>>| {
        let mut guard = task.lock().unwrap_or_else(|e| e.into_inner());
        let t = &mut *guard;
        let rr = t.span.start * c..t.span.end * c;
        let inputs = WkvInputs {
            r: &r[rr.clone()],
            k: &k[rr.clone()],
            v: &v[rr.clone()],
            w: &w[rr],
            u,
        };
        let width = t.heads.len() * hs;
        t.out = vec![0.0; t.span.len() * width];
        wkv6_heads(&inputs, hs, t.heads.start, t.state, &mut t.out, width);
    };
    let parts = threads.min(tasks.len());
    if parts <= 1 {
        tasks.iter().for_each(run);
    } else {
        model.pool.run(|part| {
            if part < parts {
                tasks[split(tasks.len(), parts, part)].iter().for_each(run);
            }
        });
    }
    for task in tasks {
        let t = task.into_inner().unwrap_or_else(|e| e.into_inner());
        let width = t.heads.len() * hs;
        for (i, row) in t.out.chunks_exact(width).enumerate() {
            let at = (t.span.start + i) * c + t.heads.start * hs;
            y[at..at + width].copy_from_slice(row);
        }
    }
}

/// Below this many values an elementwise pass stays on the calling thread.
const PAR_MIN_VALUES: usize = 16 * 1024;

/// Runs `f(first_row, rows)` over `data` ([rows, width]) split into row chunks across the pool
/// when there is enough work; every element sees the same arithmetic either way.
pub(crate) fn par_rows(
    model: &CpuModel,
    data: &mut [f32],
    width: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) {
    let rows = data.len() / width;
    let parts = model.pool.threads().min(rows);
    if parts <= 1 || data.len() < PAR_MIN_VALUES {
        f(0, data);
        return;
    }
    let mut chunks = Vec::with_capacity(parts);
    let mut rest = data;
    for p in 0..parts {
        let r = split(rows, parts, p);
        let (mine, tail) = rest.split_at_mut(r.len() * width);
        rest = tail;
        chunks.push(Mutex::new((r.start, mine)));
    }
    model.pool.run(|p| {
        if let Some(chunk) = chunks.get(p) {
            let mut guard = chunk.lock().unwrap_or_else(|e| e.into_inner());
            let (first, rows) = &mut *guard;
            f(*first, rows);
        }
    });
}

/// `out = LN(x)` row by row, on the pool for large inputs.
pub(crate) fn par_layer_norm(
    model: &CpuModel,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    if x.len() < PAR_MIN_VALUES {
        layer_norm_rows(x, weight, bias, out);
        return;
    }
    out.copy_from_slice(x);
    par_rows(model, out, weight.len(), |_, ch| {
        for row in ch.chunks_exact_mut(weight.len()) {
            layer_norm_in_place(row, weight, bias, LN_EPS);
        }
    });
}
