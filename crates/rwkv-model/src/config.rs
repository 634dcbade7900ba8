//! Model hyper-parameters, inferred from tensor names and shapes (there is no config file).

use crate::checkpoint::Checkpoint;
use crate::error::{ModelError, Result};
use crate::tensor::DType;

/// The shape of an RWKV-6 model. Every number is read from the checkpoint, never assumed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelConfig {
    /// C: embedding width (= attention width in every released model).
    pub n_embd: usize,
    /// L: number of blocks.
    pub n_layer: usize,
    /// H: number of heads.
    pub n_head: usize,
    /// N: head size (64 in released models; 8 or 16 in tiny test models).
    pub head_size: usize,
    /// F: channel-mix hidden width.
    pub dim_ffn: usize,
    /// V: rows of the embedding and head.
    pub vocab_size: usize,
    /// Dm: rank of the ddlerp ("maa") LoRA.
    pub maa_lora: usize,
    /// Dd: rank of the decay LoRA.
    pub decay_lora: usize,
    /// Storage dtype of the large matrices.
    pub weight_dtype: DType,
    /// Whether the checkpoint carries a state-tuned initial state (`att.time_state`) in any block.
    pub has_time_state: bool,
}

impl ModelConfig {
    /// Infers the configuration from a checkpoint (spec section 1.3) and rejects other versions.
    pub fn infer(ckpt: &Checkpoint) -> Result<Self> {
        let not_v6 = |reason: &str| ModelError::NotRwkv6 {
            path: ckpt.path().to_owned(),
            reason: reason.to_owned(),
        };
        let names = ckpt.tensors().keys();
        if ckpt
            .tensors()
            .keys()
            .any(|k| k.contains("att.r_k") || k.contains("att.w0"))
        {
            return Err(not_v6("it has RWKV-7 tensors (att.r_k / att.w0)"));
        }
        if !ckpt.tensors().keys().any(|k| k.contains("time_maa")) {
            return Err(not_v6(
                "no `time_maa` tensors (RWKV-4/5 or not an RWKV model)",
            ));
        }
        let n_layer = names
            .filter_map(|k| {
                k.strip_prefix("blocks.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .ok_or_else(|| not_v6("no `blocks.N.` tensors"))?
            .checked_add(1)
            .ok_or_else(|| not_v6("block index is too large"))?;
        let dims = |name: &str, rank: usize| -> Result<Vec<usize>> {
            let t = ckpt.require(name)?;
            if t.shape().len() != rank || t.shape().contains(&0) {
                return Err(ModelError::BadShape {
                    path: ckpt.path().to_owned(),
                    name: name.to_owned(),
                    expected: vec![],
                    got: t.shape().to_vec(),
                });
            }
            Ok(t.shape().to_vec())
        };
        let emb = dims("emb.weight", 2)?;
        let faaaa = dims("blocks.0.att.time_faaaa", 2)?;
        let cfg = Self {
            n_embd: emb[1],
            n_layer,
            n_head: faaaa[0],
            head_size: faaaa[1],
            dim_ffn: dims("blocks.0.ffn.key.weight", 2)?[0],
            vocab_size: emb[0],
            maa_lora: dims("blocks.0.att.time_maa_w2", 3)?[1],
            decay_lora: dims("blocks.0.att.time_decay_w1", 2)?[1],
            weight_dtype: ckpt.require("blocks.0.att.key.weight")?.dtype(),
            has_time_state: ckpt
                .tensors()
                .keys()
                .any(|k| k.ends_with(".att.time_state")),
        };
        if cfg.n_head * cfg.head_size != cfg.n_embd {
            return Err(not_v6(&format!(
                "time_faaaa is [{}, {}] but n_embd is {}: heads x head size must equal n_embd",
                cfg.n_head, cfg.head_size, cfg.n_embd
            )));
        }
        Ok(cfg)
    }

    /// Exact parameter count from the shapes (spec section 6).
    pub fn param_count(&self) -> u64 {
        let (v, c, f) = (
            self.vocab_size as u64,
            self.n_embd as u64,
            self.dim_ffn as u64,
        );
        let (dm, dd, l) = (
            self.maa_lora as u64,
            self.decay_lora as u64,
            self.n_layer as u64,
        );
        2 * v * c + 4 * c + l * (6 * c * c + 2 * c * f + 10 * c * dm + 2 * c * dd + 16 * c)
    }

    /// f32 values in one layer's state: two shift vectors and the H x N x N WKV matrix.
    pub fn layer_state_len(&self) -> usize {
        self.n_embd * (2 + self.head_size)
    }

    /// f32 values in one sequence's whole state.
    pub fn state_len(&self) -> usize {
        self.n_layer * self.layer_state_len()
    }

    /// Bytes of one sequence's state (all f32): 264·L·C for head size 64.
    pub fn state_bytes(&self) -> usize {
        self.state_len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;
    use std::collections::BTreeMap;

    /// Regression (found writing the `weights` fuzz target): `blocks.<usize::MAX>.` made
    /// `n_layer = max + 1` overflow.
    #[test]
    fn huge_block_index_is_an_error_not_an_overflow() {
        let mut tensors = BTreeMap::new();
        let t = Tensor::from_f32(DType::F32, vec![1], &[0.0]);
        tensors.insert(format!("blocks.{}.att.time_maa_x", usize::MAX), t);
        let ckpt = Checkpoint::from_tensors("t", tensors);
        let err = ModelConfig::infer(&ckpt).unwrap_err().to_string();
        assert!(err.contains("too large"), "{err}");
    }
}
