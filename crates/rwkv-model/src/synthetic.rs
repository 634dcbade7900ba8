//! Random-weight RWKV-6 checkpoints with the same value distributions as the project's fixture
//! generator (`shared/tools/make_fixtures.py`), for benchmarks, the demo model and tests.

use std::collections::BTreeMap;

use crate::tensor::{DType, Tensor};

/// The shape of a model to generate.
#[derive(Clone, Copy, Debug)]
pub struct SyntheticSpec {
    pub n_embd: usize,
    pub n_layer: usize,
    pub vocab_size: usize,
    pub head_size: usize,
    pub maa_lora: usize,
    pub decay_lora: usize,
    pub seed: u64,
}

impl SyntheticSpec {
    /// Released-model conventions: head size 64 (or smaller for tiny widths), LoRA 32/64
    /// (64/128 at C = 4096).
    pub fn new(n_embd: usize, n_layer: usize, vocab_size: usize) -> Self {
        let big = n_embd >= 4096;
        Self {
            n_embd,
            n_layer,
            vocab_size,
            head_size: 64.min(n_embd),
            maa_lora: if big { 64 } else { 32 },
            decay_lora: if big { 128 } else { 64 },
            seed: 0,
        }
    }
}

/// A small deterministic generator (SplitMix64 + Box-Muller); statistical quality is ample for
/// random weights and it keeps this crate free of RNG dependencies.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

/// Generates every tensor of an RWKV-6 checkpoint in bf16, keyed by checkpoint name.
pub fn random_checkpoint(spec: &SyntheticSpec) -> BTreeMap<String, Tensor> {
    let SyntheticSpec {
        n_embd: c,
        n_layer: l,
        vocab_size: v,
        ..
    } = *spec;
    let (h, n) = (c / spec.head_size, spec.head_size);
    let f = (c * 7 / 2) / 32 * 32;
    let (dm, dd) = (spec.maa_lora, spec.decay_lora);
    let mut rng = Rng(spec.seed);
    let mut out = BTreeMap::new();
    let mut gen = |name: String, shape: Vec<usize>, mut f: Box<dyn FnMut(&mut Rng) -> f32>| {
        let len: usize = shape.iter().product();
        let values: Vec<f32> = (0..len).map(|_| f(&mut rng)).collect();
        out.insert(name, Tensor::from_f32(DType::BF16, shape, &values));
    };
    let normal = |std: f32, mean: f32| -> Box<dyn FnMut(&mut Rng) -> f32> {
        Box::new(move |r| mean + std * r.normal())
    };
    let uniform = || -> Box<dyn FnMut(&mut Rng) -> f32> { Box::new(|r| r.uniform()) };
    gen("emb.weight".into(), vec![v, c], normal(0.5, 0.0));
    gen("blocks.0.ln0.weight".into(), vec![c], normal(0.1, 1.0));
    gen("blocks.0.ln0.bias".into(), vec![c], normal(0.1, 0.0));
    let (lin_c, lin_f) = ((c as f32).powf(-0.5), (f as f32).powf(-0.5));
    for i in 0..l {
        let b = format!("blocks.{i}.");
        for ln in ["ln1", "ln2"] {
            gen(format!("{b}{ln}.weight"), vec![c], normal(0.2, 1.0));
            gen(format!("{b}{ln}.bias"), vec![c], normal(0.1, 0.0));
        }
        let a = format!("{b}att.");
        for m in ["x", "w", "k", "v", "r", "g"] {
            gen(format!("{a}time_maa_{m}"), vec![1, 1, c], uniform());
        }
        gen(format!("{a}time_maa_w1"), vec![c, 5 * dm], normal(0.3, 0.0));
        gen(format!("{a}time_maa_w2"), vec![5, dm, c], normal(0.3, 0.0));
        let ratio = i as f32 / (l.max(2) - 1) as f32;
        let mut ch = 0usize;
        gen(
            format!("{a}time_decay"),
            vec![1, 1, c],
            Box::new(move |r| {
                let pos = ch as f32 / (c - 1).max(1) as f32;
                ch += 1;
                -6.0 + 5.0 * pos.powf(0.7 + 1.3 * ratio) + 0.3 * r.normal()
            }),
        );
        gen(format!("{a}time_decay_w1"), vec![c, dd], normal(0.3, 0.0));
        gen(format!("{a}time_decay_w2"), vec![dd, c], normal(0.3, 0.0));
        gen(format!("{a}time_faaaa"), vec![h, n], normal(0.5, 0.0));
        for p in ["receptance", "key", "value", "gate", "output"] {
            gen(format!("{a}{p}.weight"), vec![c, c], normal(lin_c, 0.0));
        }
        gen(format!("{a}ln_x.weight"), vec![c], normal(0.2, 1.0));
        gen(format!("{a}ln_x.bias"), vec![c], normal(0.1, 0.0));
        let fk = format!("{b}ffn.");
        gen(format!("{fk}time_maa_k"), vec![1, 1, c], uniform());
        gen(format!("{fk}time_maa_r"), vec![1, 1, c], uniform());
        gen(format!("{fk}key.weight"), vec![f, c], normal(lin_c, 0.0));
        gen(
            format!("{fk}receptance.weight"),
            vec![c, c],
            normal(lin_c, 0.0),
        );
        gen(format!("{fk}value.weight"), vec![c, f], normal(lin_f, 0.0));
    }
    gen("ln_out.weight".into(), vec![c], normal(0.1, 1.0));
    gen("ln_out.bias".into(), vec![c], normal(0.1, 0.0));
    gen("head.weight".into(), vec![v, c], normal(lin_c * 3.0, 0.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Checkpoint, ModelWeights};

    #[test]
    fn generated_checkpoint_loads_with_the_requested_shape() {
        let spec = SyntheticSpec {
            head_size: 16,
            ..SyntheticSpec::new(64, 2, 50)
        };
        let ckpt = Checkpoint::from_tensors("synthetic", random_checkpoint(&spec));
        let w = ModelWeights::from_checkpoint(&ckpt).unwrap();
        let cfg = &w.config;
        assert_eq!(
            (
                cfg.n_embd,
                cfg.n_layer,
                cfg.vocab_size,
                cfg.head_size,
                cfg.n_head
            ),
            (64, 2, 50, 16, 4)
        );
        assert_eq!((cfg.dim_ffn, cfg.maa_lora, cfg.decay_lora), (224, 32, 64));
    }
}
