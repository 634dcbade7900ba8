//! Weights in the layout the CPU kernels want. nn.Linear matrices are [out, in] and LoRA matrices
//! are transposed to [out, in] too, so one product kernel serves every projection.
//!
//! [`Precision::F32`] is the exact reference: every weight upcast to f32. [`Precision::Bf16`]
//! keeps the matrices and the embedding in bf16 (the file dtype; values are identical to the f32
//! upcast, only the summation order differs) in the panel layout of [`crate::ops::gemm`].
//! [`Precision::Int8`] additionally quantizes the large projections and the head to int8 with one
//! scale per output row; the small LoRA matrices stay bf16. Vectors (norms, mixes, decay, bonus)
//! are f32 in every mode.

use rwkv_model::weights::{AttWeights, BlockWeights, FfnWeights, NormWeights};
use rwkv_model::{ModelConfig, ModelWeights, Tensor};

use crate::ops::gemm::{self, Isa, PackedMatrix};
use crate::ops::matmul::{self, Matrix};
use crate::ops::pool::Pool;

/// How the CPU backend stores and multiplies weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 weights: the reference (spec section 7.1, `cpu fp32`).
    #[default]
    F32,
    /// bf16 weights read directly by the kernels, f32 activations and accumulation.
    Bf16,
    /// int8 weights with per-output-row scales for the big matrices, bf16 LoRA, f32 activations.
    Int8,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "int8" | "i8" => Ok(Self::Int8),
            other => Err(format!("unknown precision `{other}` (f32, bf16, int8)")),
        }
    }
}

/// Options of [`crate::CpuBackend::with_options`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuOptions {
    pub precision: Precision,
    /// Threads for the fast kernels; 0 = one per available core.
    pub threads: usize,
    /// Force a kernel set (tests, benchmarks); `None` = the best this CPU supports. Asking for one
    /// the CPU lacks panics (see [`Isa::is_supported`]).
    pub isa: Option<Isa>,
}

/// A projection weight in one of the storage formats.
pub enum Linear {
    F32(Matrix),
    Packed(PackedMatrix),
}

impl Linear {
    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            Linear::F32(m) => m.rows,
            Linear::Packed(m) => m.rows,
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            Linear::F32(m) => m.cols,
            Linear::Packed(m) => m.cols,
        }
    }
}

/// The folded embedding emb' [V, C].
pub enum Embedding {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl Embedding {
    /// Appends row `t` (C values) to `out` as f32.
    pub fn push_row(&self, t: usize, c: usize, out: &mut Vec<f32>) {
        match self {
            Embedding::F32(e) => out.extend_from_slice(&e[t * c..(t + 1) * c]),
            Embedding::Bf16(e) => out.extend(
                e[t * c..(t + 1) * c]
                    .iter()
                    .map(|b| f32::from_bits(u32::from(*b) << 16)),
            ),
        }
    }
}

/// How matrices are built for a precision.
#[derive(Clone, Copy)]
struct Builder {
    precision: Precision,
}

impl Builder {
    /// An nn.Linear weight [out, in]; `big` ones are quantized in int8 mode.
    fn linear(self, t: &Tensor, big: bool) -> Linear {
        let (rows, cols) = (t.shape()[0], t.shape()[1]);
        match (self.precision, big) {
            (Precision::F32, _) => Linear::F32(Matrix::new(rows, cols, t.to_f32())),
            (Precision::Int8, true) => Linear::Packed(PackedMatrix::int8(rows, cols, &t.to_f32())),
            _ => Linear::Packed(PackedMatrix::bf16(rows, cols, &t.to_bf16_bits())),
        }
    }

    /// A LoRA matrix stored [in, out] (or a slice of one).
    fn lora(self, inputs: usize, outputs: usize, t: &Tensor, part: usize) -> Linear {
        let len = inputs * outputs;
        let range = part * len..(part + 1) * len;
        match self.precision {
            Precision::F32 => Linear::F32(Matrix::from_in_out(inputs, outputs, &t.to_f32()[range])),
            _ => Linear::Packed(PackedMatrix::bf16_from_in_out(
                inputs,
                outputs,
                &t.to_bf16_bits()[range],
            )),
        }
    }
}

pub struct Norm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

pub struct TimeMix {
    pub maa_x: Vec<f32>,
    /// Static mixes λ in the order w, k, v, r, g.
    pub maa: [Vec<f32>; 5],
    /// [5·Dm, C].
    pub maa_w1: Linear,
    /// Five [C, Dm] matrices in the order w, k, v, r, g.
    pub maa_w2: Vec<Linear>,
    pub decay: Vec<f32>,
    pub decay_w1: Linear,
    pub decay_w2: Linear,
    pub faaaa: Vec<f32>,
    pub receptance: Linear,
    pub key: Linear,
    pub value: Linear,
    pub gate: Linear,
    pub output: Linear,
    pub ln_x: Norm,
}

pub struct ChannelMix {
    pub maa_k: Vec<f32>,
    pub maa_r: Vec<f32>,
    pub key: Linear,
    pub receptance: Linear,
    pub value: Linear,
}

pub struct Block {
    pub ln1: Norm,
    pub ln2: Norm,
    pub att: TimeMix,
    pub ffn: ChannelMix,
}

pub struct CpuModel {
    pub config: ModelConfig,
    pub precision: Precision,
    /// Folded embedding emb' [V, C].
    pub emb: Embedding,
    pub blocks: Vec<Block>,
    pub ln_out: Norm,
    pub head: Linear,
    pub pool: Pool,
    pub isa: Isa,
}

fn norm(n: &NormWeights) -> Norm {
    Norm {
        weight: n.weight.to_f32(),
        bias: n.bias.to_f32(),
    }
}

impl CpuModel {
    /// The f32 reference model.
    pub fn new(w: &ModelWeights) -> Self {
        Self::with_options(w, CpuOptions::default())
    }

    pub fn with_options(w: &ModelWeights, opts: CpuOptions) -> Self {
        let b = Builder {
            precision: opts.precision,
        };
        let emb = match opts.precision {
            Precision::F32 => Embedding::F32(w.emb.to_f32()),
            _ => Embedding::Bf16(w.emb.to_bf16_bits()),
        };
        Self {
            config: w.config.clone(),
            precision: opts.precision,
            emb,
            blocks: w
                .blocks
                .iter()
                .map(|blk| block(b, &w.config, blk))
                .collect(),
            ln_out: norm(&w.ln_out),
            head: b.linear(&w.head, true),
            pool: Pool::new(opts.threads),
            isa: match opts.isa {
                Some(isa) => {
                    assert!(
                        isa.is_supported(),
                        "this CPU cannot run the {isa:?} kernels"
                    );
                    isa
                }
                None => Isa::detect(),
            },
        }
    }

    /// `x · Wᵀ` for `rows` rows of `x`.
    pub fn project(&self, x: &[f32], rows: usize, w: &Linear) -> Vec<f32> {
        let mut out = vec![0.0; rows * w.rows()];
        match w {
            Linear::F32(m) => matmul::matmul(x, rows, m, &mut out),
            Linear::Packed(m) => gemm::matmul(&self.pool, self.isa, x, rows, m, &mut out),
        }
        out
    }

    /// [`CpuModel::project`] for inputs with many exact zeros (ffn.value after relu²): the fast
    /// paths skip the weights of inputs that are zero in every row; the f32 reference does not.
    pub fn project_skip_zeros(&self, x: &[f32], rows: usize, w: &Linear) -> Vec<f32> {
        match w {
            Linear::F32(_) => self.project(x, rows, w),
            Linear::Packed(m) => {
                let mut out = vec![0.0; rows * m.rows];
                gemm::matmul_skip_zeros(&self.pool, self.isa, x, rows, m, &mut out);
                out
            }
        }
    }

    /// One logit: row `t` of the head times a normalised activation row.
    pub fn head_dot(&self, t: usize, x: &[f32]) -> f32 {
        match &self.head {
            Linear::F32(m) => matmul::dot(x, m.row(t)),
            Linear::Packed(m) => m.row_dot(t, x),
        }
    }

    /// Bytes of weight data held (the matrices and the embedding).
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &Linear| match l {
            Linear::F32(m) => m.data.len() * 4,
            Linear::Packed(m) => m.bytes(),
        };
        let emb = match &self.emb {
            Embedding::F32(e) => e.len() * 4,
            Embedding::Bf16(e) => e.len() * 2,
        };
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                let a = &b.att;
                let f = &b.ffn;
                [
                    &a.maa_w1,
                    &a.decay_w1,
                    &a.decay_w2,
                    &a.receptance,
                    &a.key,
                    &a.value,
                    &a.gate,
                    &a.output,
                    &f.key,
                    &f.receptance,
                    &f.value,
                ]
                .into_iter()
                .chain(&a.maa_w2)
                .map(lin)
                .sum::<usize>()
            })
            .sum();
        emb + blocks + lin(&self.head)
    }
}

fn block(b: Builder, cfg: &ModelConfig, blk: &BlockWeights) -> Block {
    Block {
        ln1: norm(&blk.ln1),
        ln2: norm(&blk.ln2),
        att: time_mix(b, cfg, &blk.att),
        ffn: channel_mix(b, &blk.ffn),
    }
}

fn time_mix(b: Builder, cfg: &ModelConfig, a: &AttWeights) -> TimeMix {
    let (c, dm, dd) = (cfg.n_embd, cfg.maa_lora, cfg.decay_lora);
    TimeMix {
        maa_x: a.time_maa_x.to_f32(),
        maa: [
            &a.time_maa_w,
            &a.time_maa_k,
            &a.time_maa_v,
            &a.time_maa_r,
            &a.time_maa_g,
        ]
        .map(Tensor::to_f32),
        maa_w1: b.lora(c, 5 * dm, &a.time_maa_w1, 0),
        maa_w2: (0..5).map(|j| b.lora(dm, c, &a.time_maa_w2, j)).collect(),
        decay: a.time_decay.to_f32(),
        decay_w1: b.lora(c, dd, &a.time_decay_w1, 0),
        decay_w2: b.lora(dd, c, &a.time_decay_w2, 0),
        faaaa: a.time_faaaa.to_f32(),
        receptance: b.linear(&a.receptance, true),
        key: b.linear(&a.key, true),
        value: b.linear(&a.value, true),
        gate: b.linear(&a.gate, true),
        output: b.linear(&a.output, true),
        ln_x: norm(&a.ln_x),
    }
}

fn channel_mix(b: Builder, f: &FfnWeights) -> ChannelMix {
    ChannelMix {
        maa_k: f.time_maa_k.to_f32(),
        maa_r: f.time_maa_r.to_f32(),
        key: b.linear(&f.key, true),
        receptance: b.linear(&f.receptance, true),
        value: b.linear(&f.value, true),
    }
}
