//! The RWKV-6 forward pass over a ragged batch on the device (spec sections 2 and 3).
//!
//! All new tokens of all sequences are stacked into one [rows, C] activation matrix (see
//! `plan.rs`); only the token shift and the WKV recurrence look at sequence boundaries, through
//! the row metadata, and both read and write the slots in the pool in place.
//!
//! Numerics: activations, norms, decay and the recurrence are f32; weights are bf16; GEMM
//! inputs are bf16. With [`GemmPrecision::Split`] (the default) every GEMM input is carried as
//! hi + lo bf16 halves stacked as 2·rows rows, so X·W is computed from ~16 mantissa bits of X
//! with f32 accumulation (within ~1e-5 of an f32 GEMM on the same bf16 weights), at twice the
//! GEMM rows (nearly free for decode, which is bound by reading the weights).
//! [`GemmPrecision::Bf16`] rounds GEMM inputs to bf16, like the reference's `cuda bf16`.

use rwkv_model::{Candidate, ModelConfig, NucleusRow, ShardPlan};

mod head;

use crate::error::{CudaError, Result};
use crate::gemm::{BatchStrides, GemmSpec, WeightLayout};
use crate::kernels::{Act, Bf16Buf, DevBuf, F32Buf, I32Buf, Kernels, PoolArg, ShiftRows};
use crate::plan::{BatchPlan, PackedMeta};
use crate::pool::PoolLayout;
use crate::weights::{Layer, WeightViews};

/// How GEMM inputs are rounded to bf16.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemmPrecision {
    /// hi + lo bf16 halves: f32-class accuracy (the default; matches the CPU reference).
    #[default]
    Split,
    /// One bf16 rounding of each input: half the GEMM work, ~1e-2 relative logit error.
    Bf16,
}

impl GemmPrecision {
    pub fn split(self) -> bool {
        self == GemmPrecision::Split
    }

    /// What a backend's name carries for this precision: nothing for the default, `-bf16` for
    /// rounded inputs (their results differ, so caches and reports keyed by name must tell).
    pub fn name_suffix(self) -> &'static str {
        match self {
            GemmPrecision::Split => "",
            GemmPrecision::Bf16 => "-bf16",
        }
    }
}

/// The part of the model a step computes: all of it, or one tensor-parallel rank's shard
/// (`rwkv_model::shard`: its heads, its channel-mix columns, partial outputs summed across ranks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// Attention channels of the heads computed here (C for the whole model).
    pub channels: usize,
    /// Channel-mix hidden columns computed here (F for the whole model).
    pub ffn: usize,
    /// Whether `att.output` and `ffn.value` produce partial sums that [`Exec::all_reduce_sum`]
    /// adds up across ranks before they join the residual stream.
    pub reduce: bool,
    /// Whether this part computes the head (the whole model, or rank 0).
    pub head: bool,
}

impl Part {
    /// The whole model on one device.
    pub fn whole(cfg: &ModelConfig) -> Self {
        Self {
            channels: cfg.n_embd,
            ffn: cfg.dim_ffn,
            reduce: false,
            head: true,
        }
    }

    /// The shard of one rank.
    pub fn of(plan: &ShardPlan) -> Self {
        Self {
            channels: plan.channels().len(),
            ffn: plan.ffn_cols().len(),
            reduce: true,
            head: plan.rank == 0,
        }
    }
}

/// Rows of logits computed per head GEMM (bounds the head's scratch memory).
pub const HEAD_CHUNK: usize = 128;

/// Most candidates a row may ask for on the device (`OutputRows::Top`); more are picked from a
/// downloaded row on the host.
pub const MAX_DEVICE_CANDIDATES: usize = 64;

/// Number of [rows, C] f32 activation buffers: x, a, dx, r, k, v, w, g, y.
pub const ACT_BUFFERS: usize = 9;

/// What the forward pass needs from the machine it runs on: kernels, GEMMs and copies. The
/// device implements it with the compute stream and cuBLAS; the host emulation test with
/// plain memory, so the whole pass can be checked against the CPU backend without a GPU.
pub trait Exec {
    fn kernels(&self) -> &Kernels;
    /// `strides.count` GEMMs Y_b = X_b · op(W_b) (see `gemm.rs`).
    fn gemm(
        &self,
        spec: &GemmSpec,
        strides: &BatchStrides,
        w: Bf16Buf,
        x: Bf16Buf,
        y: F32Buf,
    ) -> Result<()>;
    fn upload_u32(&self, src: &[u32], dst: DevBuf<u32>) -> Result<()>;
    fn upload_i32(&self, src: &[i32], dst: I32Buf) -> Result<()>;
    fn download_f32(&self, src: F32Buf, dst: &mut [f32]) -> Result<()>;
    fn download_i32(&self, src: I32Buf, dst: &mut [i32]) -> Result<()>;
    /// Replaces `buf` with its element-wise sum over the ranks of a tensor-parallel group
    /// (ordered after the work issued so far). Only called for a [`Part`] with `reduce`.
    fn all_reduce_sum(&self, buf: F32Buf) -> Result<()> {
        let _ = buf;
        Err(CudaError::Unsupported(
            "an all-reduce on a device without a tensor-parallel group".into(),
        ))
    }
    /// Waits until everything issued has finished.
    fn synchronize(&self) -> Result<()>;
}

/// Element counts of the scratch buffers for a capacity of `rows` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScratchSizes {
    pub rows: usize,
    /// Each of the [`ACT_BUFFERS`] f32 activation buffers.
    pub act: usize,
    /// bf16 ddlerp outputs `[5][S*rows][C]`.
    pub xs: usize,
    /// bf16 GEMM input `[S*rows][widest input]`.
    pub gin: usize,
    /// f32 GEMM output `[S*rows][widest output]` (also `[5][S*rows][C]`).
    pub tmp: usize,
    pub tokens: usize,
    /// Packed row metadata (at most 7 values per row; see `plan.rs`).
    pub meta: usize,
    /// Head scratch for [`HEAD_CHUNK`] rows.
    pub hx: usize,
    pub htmp: usize,
    pub hout: usize,
    /// Candidates of [`HEAD_CHUNK`] rows: token ids and logits.
    pub tidx: usize,
    pub tval: usize,
    /// Each of [`HEAD_CHUNK`] rows' largest logit and softmax denominator (nucleus rows).
    pub tmass: usize,
}

impl ScratchSizes {
    pub fn new(cfg: &ModelConfig, split: bool, rows: usize) -> Self {
        let s = if split { 2 } else { 1 };
        let (c, f, v) = (cfg.n_embd, cfg.dim_ffn, cfg.vocab_size);
        let (dm5, dd) = (5 * cfg.maa_lora, cfg.decay_lora);
        Self {
            rows,
            act: rows * c,
            xs: 5 * s * rows * c,
            gin: s * rows * c.max(f).max(dm5).max(dd),
            tmp: s * rows * (5 * c).max(f).max(dm5).max(dd),
            tokens: rows,
            meta: 8 * rows,
            hx: s * HEAD_CHUNK * c,
            htmp: s * HEAD_CHUNK * v,
            hout: HEAD_CHUNK * v,
            tidx: HEAD_CHUNK * MAX_DEVICE_CANDIDATES,
            tval: HEAD_CHUNK * MAX_DEVICE_CANDIDATES,
            tmass: 2 * HEAD_CHUNK,
        }
    }
}

/// Views of the scratch buffers (sized by [`ScratchSizes`]).
#[derive(Clone, Copy, Debug)]
pub struct StepBufs {
    pub rows: usize,
    /// x, a, dx, r, k, v, w, g, y.
    pub act: [F32Buf; ACT_BUFFERS],
    pub xs: Bf16Buf,
    pub gin: Bf16Buf,
    pub tmp: F32Buf,
    pub tokens: DevBuf<u32>,
    pub meta: I32Buf,
    pub hx: Bf16Buf,
    pub htmp: F32Buf,
    pub hout: F32Buf,
    pub tidx: I32Buf,
    pub tval: F32Buf,
    pub tmass: F32Buf,
}

/// Named activation buffers of one step.
struct Bufs {
    x: F32Buf,
    a: F32Buf,
    dx: F32Buf,
    r: F32Buf,
    k: F32Buf,
    v: F32Buf,
    w: F32Buf,
    g: F32Buf,
    y: F32Buf,
    xs: Bf16Buf,
    gin: Bf16Buf,
    tmp: F32Buf,
}

/// Device views of the packed row metadata.
struct Meta {
    shift: ShiftRows,
    dec_row: I32Buf,
    dec_slot: I32Buf,
    pre_first: I32Buf,
    pre_end: I32Buf,
    pre_slot: I32Buf,
    head_rows: I32Buf,
    top_rows: I32Buf,
}

impl Meta {
    fn new(all: I32Buf, m: &PackedMeta) -> Result<Self> {
        let v = |r: &std::ops::Range<usize>| all.slice(r.start, r.len());
        Ok(Self {
            shift: ShiftRows {
                prev: v(&m.row_prev)?,
                last: v(&m.row_last)?,
            },
            dec_row: v(&m.dec_row)?,
            dec_slot: v(&m.dec_slot)?,
            pre_first: v(&m.pre_first)?,
            pre_end: v(&m.pre_end)?,
            pre_slot: v(&m.pre_slot)?,
            head_rows: v(&m.head_rows)?,
            top_rows: v(&m.top_rows)?,
        })
    }
}

type LayerViews = Layer<F32Buf, Bf16Buf>;

/// Everything one forward step needs.
pub struct Step<'a> {
    pub exec: &'a dyn Exec,
    pub cfg: &'a ModelConfig,
    pub weights: &'a WeightViews,
    pub pool: PoolArg,
    pub layout: PoolLayout,
    pub bufs: StepBufs,
    pub precision: GemmPrecision,
    /// The part of the model this step computes (its weights and pool layout are that part's).
    pub part: Part,
}

impl Step<'_> {
    /// Runs the step described by `plan`, writes the requested logit rows to `logits`
    /// (`plan.head_rows.len() * vocab` values; none where the part has no head), appends the
    /// candidates of the `Top` rows to `top` and the kept sets (or rows) of the `Nucleus` rows
    /// to `nucleus`. The caller orders the pool's slots against the copy stream around this
    /// call.
    ///
    /// The three phases, [`Step::upload`], [`Step::body`] and [`Step::finish`], can also be
    /// run one by one: the body alone issues device work only, so it can be captured in a
    /// CUDA graph and replayed (`graph.rs`).
    pub fn run(
        &self,
        plan: &BatchPlan,
        logits: &mut [f32],
        top: &mut Vec<Candidate>,
        nucleus: &mut Vec<NucleusRow>,
    ) -> Result<()> {
        if !self.upload(plan, logits.len())? {
            return Ok(());
        }
        self.body(plan)?;
        self.finish(plan, logits, top, nucleus)
    }

    /// Checks the step against the scratch capacity and the logits buffer (`logits_len`
    /// values) and uploads its tokens and row metadata. Returns false for a step without rows,
    /// which has nothing more to do.
    pub fn upload(&self, plan: &BatchPlan, logits_len: usize) -> Result<bool> {
        let rows = plan.rows();
        let vocab = self.cfg.vocab_size;
        let head_len = if self.part.head {
            plan.head_rows.len() * vocab
        } else {
            0
        };
        if logits_len != head_len {
            return Err(CudaError::shape("forward", "logits buffer size"));
        }
        if let Some(&k) = plan
            .top_k
            .iter()
            .find(|&&k| k == 0 || k > MAX_DEVICE_CANDIDATES)
        {
            return Err(CudaError::shape(
                "forward",
                format!("{k} candidates per row (1 to {MAX_DEVICE_CANDIDATES} on the device)"),
            ));
        }
        if rows == 0 {
            return Ok(false);
        }
        if rows > self.bufs.rows {
            return Err(CudaError::shape(
                "forward",
                format!("{rows} rows exceed the scratch capacity {}", self.bufs.rows),
            ));
        }
        let (packed, _) = plan.packed();
        self.exec.upload_u32(&plan.tokens, self.bufs.tokens)?;
        self.exec.upload_i32(&packed, self.bufs.meta)?;
        Ok(true)
    }

    /// The embedding and every layer, on the device only: no copies, no host waits. Every
    /// launch argument is a function of the scratch buffers, the pool, the weights and the
    /// plan's shape (rows, decode and prefill sequence counts), so a captured body replays
    /// correctly for any plan of the same shape once its tokens and metadata are uploaded.
    pub fn body(&self, plan: &BatchPlan) -> Result<()> {
        let (b, meta) = self.views(plan)?;
        let (rows, c, vocab) = (plan.rows(), self.cfg.n_embd, self.cfg.vocab_size);
        let layers = &self.weights.layers;
        self.kx()
            .embedding(self.weights.emb, vocab, self.bufs.tokens, b.x, rows, c)?;
        // Each block leaves the next block's LayerNorm of x in `a` (fused with its residual
        // update), so only the first one is computed on its own.
        if let Some(first) = layers.first() {
            let (w, bias) = first.ln1;
            self.kx().layer_norm(b.x, w, bias, b.a, rows, c)?;
        }
        for (l, lw) in layers.iter().enumerate() {
            self.time_mix(l, lw, &b, &meta, plan)?;
            let next_ln1 = layers.get(l + 1).map(|next| next.ln1);
            self.channel_mix(l, lw, &b, &meta, plan, next_ln1)?;
        }
        Ok(())
    }

    /// The head (where this part has it) and its downloads, then waits for the device.
    pub fn finish(
        &self,
        plan: &BatchPlan,
        logits: &mut [f32],
        top: &mut Vec<Candidate>,
        nucleus: &mut Vec<NucleusRow>,
    ) -> Result<()> {
        if self.part.head {
            let (b, meta) = self.views(plan)?;
            self.head(&b, &meta, plan, logits)?;
            self.head_candidates(&b, &meta, plan, top, nucleus)?;
        }
        self.exec.synchronize()
    }

    /// The named scratch buffers and the device views of the plan's metadata.
    fn views(&self, plan: &BatchPlan) -> Result<(Bufs, Meta)> {
        let [x, a, dx, r, k, v, w, g, y] = self.bufs.act;
        let b = Bufs {
            x,
            a,
            dx,
            r,
            k,
            v,
            w,
            g,
            y,
            xs: self.bufs.xs,
            gin: self.bufs.gin,
            tmp: self.bufs.tmp,
        };
        Ok((b, Meta::new(self.bufs.meta, &plan.layout())?))
    }

    fn kx(&self) -> &Kernels {
        self.exec.kernels()
    }

    fn gemm(&self, spec: &GemmSpec, w: Bf16Buf, x: Bf16Buf, y: F32Buf) -> Result<()> {
        let one = BatchStrides {
            count: 1,
            w: 0,
            x: 0,
            y: 0,
        };
        self.exec.gemm(spec, &one, w, x, y)
    }

    fn rows_s(&self, rows: usize) -> usize {
        if self.precision.split() {
            2 * rows
        } else {
            rows
        }
    }

    fn time_mix(
        &self,
        l: usize,
        lw: &LayerViews,
        b: &Bufs,
        m: &Meta,
        plan: &BatchPlan,
    ) -> Result<()> {
        let kx = self.kx();
        let cfg = self.cfg;
        let (c, dm, dd) = (cfg.n_embd, cfg.maa_lora, cfg.decay_lora);
        let (rows, split) = (plan.rows(), self.precision.split());
        let rs = self.rows_s(rows);
        let n = rs * c; // one [S*rows, C] GEMM input or output
                        // This part's heads: r, k, v, g, w and y are [rows, ch] (ch = C for the whole model).
        let ch = self.part.channels;
        let nh = rs * ch;
        let pool = self.pool;
        let lay = &self.layout;

        // a = LN(x; ln1) (left by the previous block); dx = prev - a; LoRA input
        // xm = a + dx * maa_x; shift state <- a.
        kx.tmix_shift(
            b.a,
            pool,
            lay.att_shift(l),
            m.shift,
            lw.maa_x,
            b.dx,
            b.gin,
            rows,
            c,
            split,
        )?;

        // z = tanh(xm @ maa_w1) [rows, 5 Dm]; m_j = z_j @ maa_w2[j] -> tmp [5][S*rows][C].
        self.gemm(
            &GemmSpec::dense(WeightLayout::InOut, 5 * dm, c, rs),
            lw.maa_w1,
            b.gin,
            b.tmp,
        )?;
        kx.gemm_out_bf16(b.tmp, b.gin, None, rows, 5 * dm, split, Act::Tanh)?;
        let w2 = GemmSpec {
            layout: WeightLayout::InOut,
            out_features: c,
            in_features: dm,
            rows: rs,
            ldx: 5 * dm,
        };
        let w2_strides = BatchStrides {
            count: 5,
            w: dm * c,
            x: dm,
            y: n,
        };
        self.exec.gemm(&w2, &w2_strides, lw.maa_w2, b.gin, b.tmp)?;
        // x_w, x_k, x_v, x_r, x_g -> xs [5][S*rows][C].
        kx.tmix_mix(b.a, b.dx, b.tmp, lw.maa_lambda, b.xs, rows, c, split)?;

        // k, v, r, g from x_k, x_v, x_r, x_g (xs blocks 1..5) in one batched GEMM.
        let proj = GemmSpec::dense(WeightLayout::OutIn, ch, c, rs);
        let proj_strides = BatchStrides {
            count: 4,
            w: ch * c,
            x: n,
            y: nh,
        };
        self.exec
            .gemm(&proj, &proj_strides, lw.kvrg, b.xs.slice(n, 4 * n)?, b.tmp)?;
        kx.kvrg_out(b.tmp, [b.k, b.v, b.r, b.g], rows, ch, split)?;

        // w = exp(-exp(time_decay + tanh(x_w @ decay_w1) @ decay_w2)), f32, for this part's
        // channels (a shard holds those columns of decay_w2 and entries of time_decay).
        let x_w = b.xs.slice(0, n)?;
        self.gemm(
            &GemmSpec::dense(WeightLayout::InOut, dd, c, rs),
            lw.decay_w1,
            x_w,
            b.tmp,
        )?;
        kx.gemm_out_bf16(b.tmp, b.gin, None, rows, dd, split, Act::Tanh)?;
        self.gemm(
            &GemmSpec::dense(WeightLayout::InOut, ch, dd, rs),
            lw.decay_w2,
            b.gin,
            b.tmp,
        )?;
        kx.gemm_out_f32(
            b.tmp,
            b.w,
            Some(lw.time_decay),
            None,
            rows,
            ch,
            split,
            Act::Decay,
            false,
        )?;

        // WKV: decode kernel for one-token sequences, prefill kernel for the others.
        let rkvw = [b.r, b.k, b.v, b.w];
        let u = lw.faaaa;
        let wkv = lay.wkv(l);
        kx.wkv6_decode(
            pool,
            wkv,
            m.dec_row,
            m.dec_slot,
            plan.dec_row.len(),
            rkvw,
            u,
            b.y,
            rows,
            ch,
        )?;
        kx.wkv6_prefill(
            pool,
            wkv,
            m.pre_first,
            m.pre_end,
            m.pre_slot,
            plan.pre_first.len(),
            rkvw,
            u,
            b.y,
            rows,
            ch,
        )?;

        // x += Wo · (GroupNorm(y) * g); a shard's Wo holds its heads' input columns.
        kx.group_norm_gate(b.y, b.g, lw.ln_x.0, lw.ln_x.1, b.gin, rows, ch, split)?;
        self.gemm(
            &GemmSpec::dense(WeightLayout::OutIn, c, ch, rs),
            lw.output,
            b.gin,
            b.tmp,
        )?;
        self.add_to_residual(b, rows, None, Some(lw.ln2))
    }

    /// x += the [S*rows, C] GEMM output in `tmp` (times `gate`), then, when the next block's
    /// LayerNorm is given, a = LN(x) in the same launch. A shard's output is a partial sum: it
    /// is formed in `y`, summed across ranks, then added.
    fn add_to_residual(
        &self,
        b: &Bufs,
        rows: usize,
        gate: Option<F32Buf>,
        next_ln: Option<(F32Buf, F32Buf)>,
    ) -> Result<()> {
        let kx = self.kx();
        let (c, split) = (self.cfg.n_embd, self.precision.split());
        let (sum, gate, split) = if self.part.reduce {
            let partial = b.y.slice(0, rows * c)?;
            kx.gemm_out_f32(b.tmp, partial, None, gate, rows, c, split, Act::None, false)?;
            self.exec.all_reduce_sum(partial)?;
            (partial, None, false)
        } else {
            (b.tmp, gate, split)
        };
        match next_ln {
            Some(ln) => kx.residual_layer_norm(sum, gate, b.x, ln, b.a, rows, c, split),
            None => kx.gemm_out_f32(sum, b.x, None, gate, rows, c, split, Act::None, true),
        }
    }

    fn channel_mix(
        &self,
        l: usize,
        lw: &LayerViews,
        b: &Bufs,
        m: &Meta,
        plan: &BatchPlan,
        next_ln1: Option<(F32Buf, F32Buf)>,
    ) -> Result<()> {
        let kx = self.kx();
        let (c, f) = (self.cfg.n_embd, self.part.ffn);
        let (rows, split) = (plan.rows(), self.precision.split());
        let rs = self.rows_s(rows);
        let n = rs * c;
        let pool = self.pool;
        let off = self.layout.ffn_shift(l);

        // b = LN(x; ln2) (left in `a` by the time mix); x_k, x_r from the shift; shift state <- b.
        let (xk, xr) = (b.xs.slice(0, n)?, b.xs.slice(n, n)?);
        kx.cmix_shift(
            b.a,
            pool,
            off,
            m.shift,
            lw.ffn_maa_k,
            lw.ffn_maa_r,
            xk,
            xr,
            rows,
            c,
            split,
        )?;

        // kk = relu(Wk x_k)^2; rr = sigmoid(Wr x_r); x += rr * (Wv kk).
        self.gemm(
            &GemmSpec::dense(WeightLayout::OutIn, f, c, rs),
            lw.ffn_key,
            xk,
            b.tmp,
        )?;
        kx.gemm_out_bf16(b.tmp, b.gin, None, rows, f, split, Act::Relu2)?;
        self.gemm(
            &GemmSpec::dense(WeightLayout::OutIn, c, c, rs),
            lw.ffn_receptance,
            xr,
            b.tmp,
        )?;
        kx.gemm_out_f32(b.tmp, b.r, None, None, rows, c, split, Act::Sigmoid, false)?;
        self.gemm(
            &GemmSpec::dense(WeightLayout::OutIn, c, f, rs),
            lw.ffn_value,
            b.gin,
            b.tmp,
        )?;
        self.add_to_residual(b, rows, Some(b.r), next_ln1)
    }
}
