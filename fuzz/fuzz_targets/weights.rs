//! Shape and dtype validation of `ModelWeights::from_checkpoint`.
//!
//! Raw bytes rarely survive the file parsers with a tensor set that looks like a model, so this
//! target is structured: it starts from a valid tiny random model and lets the input edit it,
//! 4 bytes per edit (tensor, operation, two arguments): drop a tensor, give it another shape or
//! dtype, rename it to another (possibly huge) block index, or add a `time_state`. Loading must
//! then either succeed with consistent shapes or fail with an error.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rwkv_model::synthetic::{random_checkpoint, SyntheticSpec};
use rwkv_model::{Checkpoint, DType, ModelWeights, Tensor};

fn base() -> &'static BTreeMap<String, Tensor> {
    static BASE: OnceLock<BTreeMap<String, Tensor>> = OnceLock::new();
    BASE.get_or_init(|| {
        let spec = SyntheticSpec {
            n_embd: 32,
            n_layer: 2,
            vocab_size: 12,
            head_size: 8,
            maa_lora: 2,
            decay_lora: 3,
            seed: 1,
        };
        random_checkpoint(&spec)
    })
}

fn dim(b: u8) -> usize {
    match b {
        250 => 1 << 20,
        251 => usize::MAX / 2,
        _ => usize::from(b % 20),
    }
}

fn zeros(dtype: DType, shape: Vec<usize>) -> Option<Tensor> {
    let len = shape
        .iter()
        .try_fold(dtype.size(), |a, &d| a.checked_mul(d))?;
    // Keep real allocations small; a huge shape with no bytes cannot be built as a Tensor.
    (len <= 1 << 16).then(|| Tensor::from_bytes(dtype, shape, vec![0; len]))
}

fuzz_target!(|data: &[u8]| {
    let mut tensors = base().clone();
    for op in data.chunks_exact(4) {
        let names: Vec<String> = tensors.keys().cloned().collect();
        if names.is_empty() {
            break;
        }
        let name = &names[usize::from(op[0]) % names.len()];
        let (a, b) = (op[2], op[3]);
        match op[1] % 6 {
            0 => {
                tensors.remove(name);
            }
            1 => {
                // Another shape, rank 0 to 3.
                let dtype = tensors[name].dtype();
                let shape: Vec<usize> = [a, b, a ^ b]
                    .iter()
                    .take(usize::from(a % 4))
                    .map(|&x| dim(x))
                    .collect();
                if let Some(t) = zeros(dtype, shape) {
                    tensors.insert(name.clone(), t);
                }
            }
            2 => {
                let t = &tensors[name];
                let dtype = [DType::BF16, DType::F16, DType::F32][usize::from(a % 3)];
                let t = Tensor::from_f32(dtype, t.shape().to_vec(), &t.to_f32());
                tensors.insert(name.clone(), t);
            }
            3 => {
                // Move the tensor to another block index (possibly absurdly large).
                let t = tensors.remove(name).unwrap();
                let rest = name.split_once('.').map(|(_, r)| r).unwrap_or(name);
                let rest = rest.split_once('.').map(|(_, r)| r).unwrap_or(rest);
                let idx = match a {
                    255 => usize::MAX,
                    254 => usize::MAX - 1,
                    _ => usize::from(a % 4),
                };
                tensors.insert(format!("blocks.{idx}.{rest}"), t);
            }
            4 => {
                let shape = vec![dim(a), dim(b), dim(a.wrapping_add(b))];
                if let Some(t) = zeros(DType::BF16, shape) {
                    tensors.insert(format!("blocks.{}.att.time_state", b % 3), t);
                }
            }
            _ => {
                // Squeeze or unsqueeze a vector.
                let t = &tensors[name];
                let shape = match t.shape() {
                    [1, 1, n] => vec![*n],
                    [n] => vec![1, 1, *n],
                    s => s.iter().rev().copied().collect(),
                };
                let t = Tensor::from_bytes(t.dtype(), shape, t.bytes().to_vec());
                tensors.insert(name.clone(), t);
            }
        }
    }
    let ckpt = Checkpoint::from_tensors("fuzz", tensors);
    if let Ok(w) = ModelWeights::from_checkpoint(&ckpt) {
        let c = w.config.n_embd;
        assert_eq!(w.emb.shape(), [w.config.vocab_size, c]);
        assert_eq!(w.blocks.len(), w.config.n_layer);
        let _ = w.config.param_count();
        let state = w.initial_state();
        assert_eq!(state.as_flat().len(), w.config.state_len());
    }
});
