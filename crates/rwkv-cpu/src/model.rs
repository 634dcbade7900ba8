//! Weights in the layout the CPU kernels want: f32, nn.Linear matrices as [out, in], LoRA
//! matrices transposed to [out, in] too, so one product kernel serves every projection.

use rwkv_model::weights::{AttWeights, BlockWeights, FfnWeights, NormWeights};
use rwkv_model::{ModelConfig, ModelWeights, Tensor};

use crate::ops::matmul::Matrix;

pub struct Norm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

pub struct TimeMix {
    pub maa_x: Vec<f32>,
    /// Static mixes λ in the order w, k, v, r, g.
    pub maa: [Vec<f32>; 5],
    /// [5·Dm, C].
    pub maa_w1: Matrix,
    /// Five [C, Dm] matrices in the order w, k, v, r, g.
    pub maa_w2: Vec<Matrix>,
    pub decay: Vec<f32>,
    pub decay_w1: Matrix,
    pub decay_w2: Matrix,
    pub faaaa: Vec<f32>,
    pub receptance: Matrix,
    pub key: Matrix,
    pub value: Matrix,
    pub gate: Matrix,
    pub output: Matrix,
    pub ln_x: Norm,
}

pub struct ChannelMix {
    pub maa_k: Vec<f32>,
    pub maa_r: Vec<f32>,
    pub key: Matrix,
    pub receptance: Matrix,
    pub value: Matrix,
}

pub struct Block {
    pub ln1: Norm,
    pub ln2: Norm,
    pub att: TimeMix,
    pub ffn: ChannelMix,
}

pub struct CpuModel {
    pub config: ModelConfig,
    /// Folded embedding emb' [V, C].
    pub emb: Vec<f32>,
    pub blocks: Vec<Block>,
    pub ln_out: Norm,
    pub head: Matrix,
}

fn linear(t: &Tensor) -> Matrix {
    Matrix::new(t.shape()[0], t.shape()[1], t.to_f32())
}

fn norm(n: &NormWeights) -> Norm {
    Norm {
        weight: n.weight.to_f32(),
        bias: n.bias.to_f32(),
    }
}

impl CpuModel {
    pub fn new(w: &ModelWeights) -> Self {
        Self {
            config: w.config.clone(),
            emb: w.emb.to_f32(),
            blocks: w.blocks.iter().map(|b| block(&w.config, b)).collect(),
            ln_out: norm(&w.ln_out),
            head: linear(&w.head),
        }
    }
}

fn block(cfg: &ModelConfig, b: &BlockWeights) -> Block {
    Block {
        ln1: norm(&b.ln1),
        ln2: norm(&b.ln2),
        att: time_mix(cfg, &b.att),
        ffn: channel_mix(&b.ffn),
    }
}

fn time_mix(cfg: &ModelConfig, a: &AttWeights) -> TimeMix {
    let (c, dm, dd) = (cfg.n_embd, cfg.maa_lora, cfg.decay_lora);
    let w2 = a.time_maa_w2.to_f32();
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
        maa_w1: Matrix::from_in_out(c, 5 * dm, &a.time_maa_w1.to_f32()),
        maa_w2: w2
            .chunks_exact(dm * c)
            .map(|s| Matrix::from_in_out(dm, c, s))
            .collect(),
        decay: a.time_decay.to_f32(),
        decay_w1: Matrix::from_in_out(c, dd, &a.time_decay_w1.to_f32()),
        decay_w2: Matrix::from_in_out(dd, c, &a.time_decay_w2.to_f32()),
        faaaa: a.time_faaaa.to_f32(),
        receptance: linear(&a.receptance),
        key: linear(&a.key),
        value: linear(&a.value),
        gate: linear(&a.gate),
        output: linear(&a.output),
        ln_x: norm(&a.ln_x),
    }
}

fn channel_mix(f: &FfnWeights) -> ChannelMix {
    ChannelMix {
        maa_k: f.time_maa_k.to_f32(),
        maa_r: f.time_maa_r.to_f32(),
        key: linear(&f.key),
        receptance: linear(&f.receptance),
        value: linear(&f.value),
    }
}
