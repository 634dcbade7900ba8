//! The recurrent state of one sequence, in the layout every backend and file format shares.
//!
//! Per layer, in order: `att_shift` [C] (the ln1 output of the previous token), `wkv` [H, N, N]
//! indexed [head][key channel][value channel], `ffn_shift` [C] (the ln2 output of the previous
//! token); all f32. Serialized as `{prefix}.{i}.att_shift`, `{prefix}.{i}.wkv`, `{prefix}.{i}.ffn_shift`.

use std::collections::BTreeMap;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::tensor::{DType, Tensor};

/// One sequence's state as a flat f32 buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    n_embd: usize,
    n_head: usize,
    head_size: usize,
    data: Vec<f32>,
}

/// Borrowed views of one layer of a [`State`].
pub struct LayerState<'a> {
    pub att_shift: &'a mut [f32],
    pub wkv: &'a mut [f32],
    pub ffn_shift: &'a mut [f32],
}

impl State {
    /// The all-zero state, which is the initial state of a model without `time_state`.
    pub fn zeros(cfg: &ModelConfig) -> Self {
        Self {
            n_embd: cfg.n_embd,
            n_head: cfg.n_head,
            head_size: cfg.head_size,
            data: vec![0.0; cfg.state_len()],
        }
    }

    /// Wraps a flat buffer laid out as described in the module docs.
    pub fn from_flat(cfg: &ModelConfig, data: Vec<f32>) -> Result<Self> {
        if data.len() != cfg.state_len() {
            return Err(ModelError::State(format!(
                "flat state has {} values, the model needs {}",
                data.len(),
                cfg.state_len()
            )));
        }
        Ok(Self {
            n_embd: cfg.n_embd,
            n_head: cfg.n_head,
            head_size: cfg.head_size,
            data,
        })
    }

    pub fn as_flat(&self) -> &[f32] {
        &self.data
    }

    pub fn as_flat_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn n_layer(&self) -> usize {
        self.data.len() / self.layer_len()
    }

    fn layer_len(&self) -> usize {
        self.n_embd * (2 + self.head_size)
    }

    /// Mutable views of layer `i`.
    pub fn layer_mut(&mut self, i: usize) -> LayerState<'_> {
        let (c, len) = (self.n_embd, self.layer_len());
        let layer = &mut self.data[i * len..(i + 1) * len];
        let (att_shift, rest) = layer.split_at_mut(c);
        let (wkv, ffn_shift) = rest.split_at_mut(len - 2 * c);
        LayerState {
            att_shift,
            wkv,
            ffn_shift,
        }
    }

    /// Immutable copy-free access to layer `i`: (att_shift, wkv, ffn_shift).
    pub fn layer(&self, i: usize) -> (&[f32], &[f32], &[f32]) {
        let (c, len) = (self.n_embd, self.layer_len());
        let layer = &self.data[i * len..(i + 1) * len];
        (&layer[..c], &layer[c..len - c], &layer[len - c..])
    }

    /// The state as named f32 tensors (`{prefix}.{i}.att_shift` and so on).
    pub fn to_tensors(&self, prefix: &str) -> BTreeMap<String, Tensor> {
        let (h, n) = (self.n_head, self.head_size);
        let mut out = BTreeMap::new();
        for i in 0..self.n_layer() {
            let (att, wkv, ffn) = self.layer(i);
            out.insert(
                format!("{prefix}.{i}.att_shift"),
                Tensor::from_f32(DType::F32, vec![att.len()], att),
            );
            out.insert(
                format!("{prefix}.{i}.wkv"),
                Tensor::from_f32(DType::F32, vec![h, n, n], wkv),
            );
            out.insert(
                format!("{prefix}.{i}.ffn_shift"),
                Tensor::from_f32(DType::F32, vec![ffn.len()], ffn),
            );
        }
        out
    }

    /// Reads a state written by [`State::to_tensors`]; every tensor must be present with its shape.
    pub fn from_tensors(
        cfg: &ModelConfig,
        tensors: &BTreeMap<String, Tensor>,
        prefix: &str,
    ) -> Result<Self> {
        let mut state = Self::zeros(cfg);
        let (c, h, n) = (cfg.n_embd, cfg.n_head, cfg.head_size);
        for i in 0..cfg.n_layer {
            let fetch = |part: &str, shape: &[usize]| -> Result<Vec<f32>> {
                let name = format!("{prefix}.{i}.{part}");
                let t = tensors
                    .get(&name)
                    .ok_or_else(|| ModelError::State(format!("missing tensor `{name}`")))?;
                if t.shape() != shape {
                    return Err(ModelError::State(format!(
                        "tensor `{name}` has shape {:?}, expected {shape:?}",
                        t.shape()
                    )));
                }
                Ok(t.to_f32())
            };
            let (att, wkv, ffn) = (
                fetch("att_shift", &[c])?,
                fetch("wkv", &[h, n, n])?,
                fetch("ffn_shift", &[c])?,
            );
            let layer = state.layer_mut(i);
            layer.att_shift.copy_from_slice(&att);
            layer.wkv.copy_from_slice(&wkv);
            layer.ffn_shift.copy_from_slice(&ffn);
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        ModelConfig {
            n_embd: 16,
            n_layer: 2,
            n_head: 2,
            head_size: 8,
            dim_ffn: 32,
            vocab_size: 10,
            maa_lora: 4,
            decay_lora: 4,
            weight_dtype: DType::BF16,
            has_time_state: false,
        }
    }

    #[test]
    fn tensors_round_trip_through_named_layout() {
        let cfg = cfg();
        let data: Vec<f32> = (0..cfg.state_len()).map(|i| i as f32).collect();
        let state = State::from_flat(&cfg, data).unwrap();
        let named = state.to_tensors("state");
        assert_eq!(named["state.1.wkv"].shape(), &[2, 8, 8]);
        assert_eq!(named["state.0.att_shift"].to_f32()[3], 3.0);
        assert_eq!(State::from_tensors(&cfg, &named, "state").unwrap(), state);
    }

    #[test]
    fn missing_or_misshapen_state_tensors_are_named() {
        let cfg = cfg();
        let mut named = State::zeros(&cfg).to_tensors("s");
        named.remove("s.1.ffn_shift");
        let err = State::from_tensors(&cfg, &named, "s")
            .unwrap_err()
            .to_string();
        assert!(err.contains("s.1.ffn_shift"), "{err}");
        named.insert(
            "s.1.ffn_shift".into(),
            Tensor::from_f32(DType::F32, vec![3], &[0.0; 3]),
        );
        let err = State::from_tensors(&cfg, &named, "s")
            .unwrap_err()
            .to_string();
        assert!(err.contains("shape"), "{err}");
    }
}
