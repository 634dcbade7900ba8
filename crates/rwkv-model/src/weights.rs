//! Typed, shape-checked weights of an RWKV-6 model. Field names are the checkpoint keys.
//!
//! Loading applies the one load-time transform that changes numbers (spec section 1.5 step 1):
//! ln0 is folded into the embedding and the result is rounded to the storage dtype. Everything
//! else is kept as stored; backends decide their own layouts and precisions.

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::state::State;
use crate::tensor::Tensor;

/// A LayerNorm or GroupNorm affine pair.
#[derive(Clone, Debug)]
pub struct NormWeights {
    pub weight: Tensor,
    pub bias: Tensor,
}

/// `blocks.{n}.att.*`. Shapes are as stored, except that `[1, 1, C]` vectors are squeezed to `[C]`.
#[derive(Clone, Debug)]
pub struct AttWeights {
    pub time_maa_x: Tensor,
    pub time_maa_w: Tensor,
    pub time_maa_k: Tensor,
    pub time_maa_v: Tensor,
    pub time_maa_r: Tensor,
    pub time_maa_g: Tensor,
    /// [C, 5·Dm], already [in, out].
    pub time_maa_w1: Tensor,
    /// [5, Dm, C], slices in the order w, k, v, r, g.
    pub time_maa_w2: Tensor,
    pub time_decay: Tensor,
    /// [C, Dd], [in, out].
    pub time_decay_w1: Tensor,
    /// [Dd, C], [in, out].
    pub time_decay_w2: Tensor,
    /// [H, N], the bonus u, used raw.
    pub time_faaaa: Tensor,
    /// nn.Linear weights, [out, in].
    pub receptance: Tensor,
    pub key: Tensor,
    pub value: Tensor,
    pub gate: Tensor,
    pub output: Tensor,
    pub ln_x: NormWeights,
    /// [H, N_value, N_key] state-tuned initial WKV state, when present.
    pub time_state: Option<Tensor>,
}

/// `blocks.{n}.ffn.*`.
#[derive(Clone, Debug)]
pub struct FfnWeights {
    pub time_maa_k: Tensor,
    pub time_maa_r: Tensor,
    /// [F, C].
    pub key: Tensor,
    /// [C, C].
    pub receptance: Tensor,
    /// [C, F].
    pub value: Tensor,
}

#[derive(Clone, Debug)]
pub struct BlockWeights {
    pub ln1: NormWeights,
    pub ln2: NormWeights,
    pub att: AttWeights,
    pub ffn: FfnWeights,
}

/// All weights of a model, validated against its [`ModelConfig`].
#[derive(Clone, Debug)]
pub struct ModelWeights {
    pub config: ModelConfig,
    /// emb' = LN(emb; ln0) rounded to the storage dtype, [V, C].
    pub emb: Tensor,
    pub blocks: Vec<BlockWeights>,
    pub ln_out: NormWeights,
    /// [V, C], nn.Linear [out, in].
    pub head: Tensor,
}

/// Reads tensors by name and checks their shapes, naming the file in every error.
struct Loader<'a> {
    ckpt: &'a Checkpoint,
}

impl Loader<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.ckpt.require(name)?;
        if t.shape() != shape {
            return Err(ModelError::BadShape {
                path: self.ckpt.path().to_owned(),
                name: name.to_owned(),
                expected: shape.to_vec(),
                got: t.shape().to_vec(),
            });
        }
        Ok(t.clone())
    }

    /// A `[1, 1, C]` time-mix vector (or an already squeezed `[C]` one), returned as `[C]`.
    fn vector(&self, name: &str, c: usize) -> Result<Tensor> {
        let t = self.ckpt.require(name)?;
        match t.shape() {
            [1, 1, n] | [n] if *n == c => {
                Ok(Tensor::from_bytes(t.dtype(), vec![c], t.bytes().to_vec()))
            }
            _ => self.get(name, &[1, 1, c]),
        }
    }

    fn norm(&self, prefix: &str, c: usize) -> Result<NormWeights> {
        Ok(NormWeights {
            weight: self.get(&format!("{prefix}.weight"), &[c])?,
            bias: self.get(&format!("{prefix}.bias"), &[c])?,
        })
    }
}

impl ModelWeights {
    /// Opens a checkpoint file, infers its configuration and loads every tensor.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self> {
        Self::from_checkpoint(&Checkpoint::open(path)?)
    }

    /// Validates and types the tensors of an opened checkpoint.
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Self> {
        let config = ModelConfig::infer(ckpt)?;
        let ld = Loader { ckpt };
        let (c, v) = (config.n_embd, config.vocab_size);
        let raw_emb = ld.get("emb.weight", &[v, c])?;
        let ln0 = ld.norm("blocks.0.ln0", c)?;
        let emb = fold_ln0(&raw_emb, &ln0);
        let blocks = (0..config.n_layer)
            .map(|n| load_block(&ld, &config, n))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            ln_out: ld.norm("ln_out", c)?,
            head: ld.get("head.weight", &[v, c])?,
            emb,
            blocks,
            config,
        })
    }

    /// The state a new sequence starts from: zeros, or the state-tuned `time_state` transposed
    /// from its stored [H, value, key] layout to [H, key, value].
    pub fn initial_state(&self) -> State {
        let mut state = State::zeros(&self.config);
        let n = self.config.head_size;
        for (i, block) in self.blocks.iter().enumerate() {
            let Some(ts) = &block.att.time_state else {
                continue;
            };
            let stored = ts.to_f32();
            let wkv = state.layer_mut(i).wkv;
            for (h, head) in wkv.chunks_exact_mut(n * n).enumerate() {
                for key in 0..n {
                    for value in 0..n {
                        head[key * n + value] = stored[h * n * n + value * n + key];
                    }
                }
            }
        }
        state
    }
}

fn load_block(ld: &Loader<'_>, cfg: &ModelConfig, n: usize) -> Result<BlockWeights> {
    let (c, h, hs, f) = (cfg.n_embd, cfg.n_head, cfg.head_size, cfg.dim_ffn);
    let (dm, dd) = (cfg.maa_lora, cfg.decay_lora);
    let a = |s: &str| format!("blocks.{n}.att.{s}");
    let fk = |s: &str| format!("blocks.{n}.ffn.{s}");
    let time_state = match ld.ckpt.get(&a("time_state")) {
        Some(_) => Some(ld.get(&a("time_state"), &[h, hs, hs])?),
        None => None,
    };
    let att = AttWeights {
        time_maa_x: ld.vector(&a("time_maa_x"), c)?,
        time_maa_w: ld.vector(&a("time_maa_w"), c)?,
        time_maa_k: ld.vector(&a("time_maa_k"), c)?,
        time_maa_v: ld.vector(&a("time_maa_v"), c)?,
        time_maa_r: ld.vector(&a("time_maa_r"), c)?,
        time_maa_g: ld.vector(&a("time_maa_g"), c)?,
        time_maa_w1: ld.get(&a("time_maa_w1"), &[c, 5 * dm])?,
        time_maa_w2: ld.get(&a("time_maa_w2"), &[5, dm, c])?,
        time_decay: ld.vector(&a("time_decay"), c)?,
        time_decay_w1: ld.get(&a("time_decay_w1"), &[c, dd])?,
        time_decay_w2: ld.get(&a("time_decay_w2"), &[dd, c])?,
        time_faaaa: ld.get(&a("time_faaaa"), &[h, hs])?,
        receptance: ld.get(&a("receptance.weight"), &[c, c])?,
        key: ld.get(&a("key.weight"), &[c, c])?,
        value: ld.get(&a("value.weight"), &[c, c])?,
        gate: ld.get(&a("gate.weight"), &[c, c])?,
        output: ld.get(&a("output.weight"), &[c, c])?,
        ln_x: ld.norm(&a("ln_x"), c)?,
        time_state,
    };
    let ffn = FfnWeights {
        time_maa_k: ld.vector(&fk("time_maa_k"), c)?,
        time_maa_r: ld.vector(&fk("time_maa_r"), c)?,
        key: ld.get(&fk("key.weight"), &[f, c])?,
        receptance: ld.get(&fk("receptance.weight"), &[c, c])?,
        value: ld.get(&fk("value.weight"), &[c, f])?,
    };
    Ok(BlockWeights {
        ln1: ld.norm(&format!("blocks.{n}.ln1"), c)?,
        ln2: ld.norm(&format!("blocks.{n}.ln2"), c)?,
        att,
        ffn,
    })
}

/// emb' = LN(emb; ln0, eps 1e-5) computed in f32 and rounded to the storage dtype, as the
/// reference does when it runs the LayerNorm on the stored (bf16) tensors.
fn fold_ln0(emb: &Tensor, ln0: &NormWeights) -> Tensor {
    let c = emb.shape()[1];
    let (w, b) = (ln0.weight.to_f32(), ln0.bias.to_f32());
    let mut values = emb.to_f32();
    for row in values.chunks_exact_mut(c) {
        layer_norm_exact(row, &w, &b, 1e-5);
        for x in row.iter_mut() {
            *x = emb.dtype().round_f32(*x);
        }
    }
    Tensor::from_f32(emb.dtype(), emb.shape().to_vec(), &values)
}

/// LayerNorm of one row accumulated in f64 and rounded once to f32.
///
/// The fold's result is rounded to bf16, so a one-ulp f32 difference that lands on a bf16
/// rounding boundary flips a whole bf16 ulp (about 1e-2 relative) in the embedding. Torch's CPU
/// kernel is accurate to well under one f32 ulp; a naive f32 sum over C values is not, and it
/// measurably flipped entries on a C = 192 fixture (logit error 1.4e-4 instead of 3e-6).
fn layer_norm_exact(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, w), b) in x.iter_mut().zip(weight).zip(bias) {
        // torch computes (x - mean) * rstd in float, then the affine in float.
        let normed = ((f64::from(*v) - mean) * inv) as f32;
        *v = normed * w + b;
    }
}

/// LayerNorm over one row with biased variance; the shared definition of spec section 2.1.
pub fn layer_norm_in_place(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, w), b) in x.iter_mut().zip(weight).zip(bias) {
        *v = (*v - mean) * inv * w + b;
    }
}
