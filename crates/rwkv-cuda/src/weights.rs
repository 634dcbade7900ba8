//! The model's weights in the layout the kernels use: matrices as bf16 bit patterns
//! (`Tensor::to_bf16_bits`, exact for bf16 checkpoints), vectors as f32 (exact upcasts).
//!
//! One generic shape, [`Layer`] / [`Weights`], is instantiated three times: host vectors
//! (packing and checks), device buffers (uploaded once), and raw views for kernel arguments.

use cudarc::driver::CudaSlice;
use rwkv_model::shard::{slice_cols, slice_rows};
use rwkv_model::weights::{AttWeights, BlockWeights, NormWeights};
use rwkv_model::{ModelConfig, ModelWeights, ShardPlan, Tensor};

use crate::device::Device;
use crate::error::{CudaError, Result};
use crate::forward::Part;
use crate::kernels::{Bf16Buf, DevBuf, F32Buf};

/// One block's weights; `F` holds f32 vectors, `H` bf16 matrices.
#[derive(Clone, Debug)]
pub struct Layer<F, H> {
    pub ln1: (F, F),
    pub ln2: (F, F),
    /// μx `[C]`.
    pub maa_x: F,
    /// λw, λk, λv, λr, λg packed `[5][C]` (the order of the maa_w2 slices).
    pub maa_lambda: F,
    /// `[C, 5·Dm]`, [in, out].
    pub maa_w1: H,
    /// `[5, Dm, C]`, five [in, out] slices.
    pub maa_w2: H,
    /// d0 `[C]`.
    pub time_decay: F,
    /// `[C, Dd]` and `[Dd, C]`, [in, out].
    pub decay_w1: H,
    pub decay_w2: H,
    /// u = time_faaaa, `[H·N]`.
    pub faaaa: F,
    /// key, value, receptance, gate packed `[4][C][C]` (each nn.Linear [out, in]), in the order
    /// of the ddlerp outputs x_k, x_v, x_r, x_g, so one strided batched GEMM does all four.
    pub kvrg: H,
    /// `[C, C]`, [out, in].
    pub output: H,
    pub ln_x: (F, F),
    pub ffn_maa_k: F,
    pub ffn_maa_r: F,
    /// `[F, C]`, `[C, C]`, `[C, F]`: nn.Linear [out, in].
    pub ffn_key: H,
    pub ffn_receptance: H,
    pub ffn_value: H,
}

/// All weights of a model.
#[derive(Clone, Debug)]
pub struct Weights<F, H> {
    /// emb' (ln0 folded, rounded to the checkpoint dtype) `[V, C]`.
    pub emb: H,
    pub ln_out: (F, F),
    /// `[V, C]`, [out, in].
    pub head: H,
    pub layers: Vec<Layer<F, H>>,
}

pub type HostLayer = Layer<Vec<f32>, Vec<u16>>;
pub type DeviceWeights = Weights<CudaSlice<f32>, CudaSlice<u16>>;
pub type WeightViews = Weights<F32Buf, Bf16Buf>;

impl<F, H> Layer<F, H> {
    /// The same layer with every tensor converted.
    pub fn map<F2, H2>(
        &self,
        f: &mut impl FnMut(&F) -> Result<F2>,
        h: &mut impl FnMut(&H) -> Result<H2>,
    ) -> Result<Layer<F2, H2>> {
        Ok(Layer {
            ln1: (f(&self.ln1.0)?, f(&self.ln1.1)?),
            ln2: (f(&self.ln2.0)?, f(&self.ln2.1)?),
            maa_x: f(&self.maa_x)?,
            maa_lambda: f(&self.maa_lambda)?,
            maa_w1: h(&self.maa_w1)?,
            maa_w2: h(&self.maa_w2)?,
            time_decay: f(&self.time_decay)?,
            decay_w1: h(&self.decay_w1)?,
            decay_w2: h(&self.decay_w2)?,
            faaaa: f(&self.faaaa)?,
            kvrg: h(&self.kvrg)?,
            output: h(&self.output)?,
            ln_x: (f(&self.ln_x.0)?, f(&self.ln_x.1)?),
            ffn_maa_k: f(&self.ffn_maa_k)?,
            ffn_maa_r: f(&self.ffn_maa_r)?,
            ffn_key: h(&self.ffn_key)?,
            ffn_receptance: h(&self.ffn_receptance)?,
            ffn_value: h(&self.ffn_value)?,
        })
    }
}

impl<F, H> Weights<F, H> {
    /// The same weights with every tensor converted.
    pub fn map<F2, H2>(
        &self,
        f: &mut impl FnMut(&F) -> Result<F2>,
        h: &mut impl FnMut(&H) -> Result<H2>,
    ) -> Result<Weights<F2, H2>> {
        Ok(Weights {
            emb: h(&self.emb)?,
            ln_out: (f(&self.ln_out.0)?, f(&self.ln_out.1)?),
            head: h(&self.head)?,
            layers: self
                .layers
                .iter()
                .map(|l| l.map(f, h))
                .collect::<Result<_>>()?,
        })
    }
}

fn check(name: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(CudaError::shape(
            "weights",
            format!("`{name}` has {got} values, the config implies {want}"),
        ))
    }
}

fn f32s(name: &str, t: &Tensor, len: usize) -> Result<Vec<f32>> {
    let v = t.to_f32();
    check(name, v.len(), len)?;
    Ok(v)
}

fn bf16s(name: &str, t: &Tensor, len: usize) -> Result<Vec<u16>> {
    let v = t.to_bf16_bits();
    check(name, v.len(), len)?;
    Ok(v)
}

fn norm(name: &str, n: &NormWeights, c: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    Ok((f32s(name, &n.weight, c)?, f32s(name, &n.bias, c)?))
}

fn packed<T>(
    name: &str,
    parts: &[&Tensor],
    each: usize,
    conv: fn(&Tensor) -> Vec<T>,
) -> Result<Vec<T>> {
    let mut v = Vec::with_capacity(parts.len() * each);
    for t in parts {
        let part = conv(t);
        check(name, part.len(), each)?;
        v.extend(part);
    }
    Ok(v)
}

impl HostLayer {
    /// Converts and packs one block of `part` (the whole model, or a rank's shard from
    /// [`shard_block`]), checking every size against the config.
    pub fn from_block(cfg: &ModelConfig, part: &Part, b: &BlockWeights) -> Result<Self> {
        let (c, dm, dd) = (cfg.n_embd, cfg.maa_lora, cfg.decay_lora);
        // The sharded widths: this part's attention channels and channel-mix columns.
        let (ch, f) = (part.channels, part.ffn);
        let a = &b.att;
        Ok(Layer {
            ln1: norm("ln1", &b.ln1, c)?,
            ln2: norm("ln2", &b.ln2, c)?,
            maa_x: f32s("time_maa_x", &a.time_maa_x, c)?,
            maa_lambda: packed(
                "time_maa_{w,k,v,r,g}",
                &[
                    &a.time_maa_w,
                    &a.time_maa_k,
                    &a.time_maa_v,
                    &a.time_maa_r,
                    &a.time_maa_g,
                ],
                c,
                Tensor::to_f32,
            )?,
            maa_w1: bf16s("time_maa_w1", &a.time_maa_w1, c * 5 * dm)?,
            maa_w2: bf16s("time_maa_w2", &a.time_maa_w2, 5 * dm * c)?,
            time_decay: f32s("time_decay", &a.time_decay, ch)?,
            decay_w1: bf16s("time_decay_w1", &a.time_decay_w1, c * dd)?,
            decay_w2: bf16s("time_decay_w2", &a.time_decay_w2, dd * ch)?,
            faaaa: f32s("time_faaaa", &a.time_faaaa, ch)?,
            kvrg: packed(
                "att.{key,value,receptance,gate}",
                &[&a.key, &a.value, &a.receptance, &a.gate],
                ch * c,
                Tensor::to_bf16_bits,
            )?,
            output: bf16s("att.output", &a.output, c * ch)?,
            ln_x: norm("ln_x", &a.ln_x, ch)?,
            ffn_maa_k: f32s("ffn.time_maa_k", &b.ffn.time_maa_k, c)?,
            ffn_maa_r: f32s("ffn.time_maa_r", &b.ffn.time_maa_r, c)?,
            ffn_key: bf16s("ffn.key", &b.ffn.key, f * c)?,
            ffn_receptance: bf16s("ffn.receptance", &b.ffn.receptance, c * c)?,
            ffn_value: bf16s("ffn.value", &b.ffn.value, c * f)?,
        })
    }
}

/// One block as a rank holds it on a device: [`ShardPlan::block`], and also the rank's
/// columns of `time_decay_w2` and entries of `time_decay`, so a rank computes the decay of its
/// own channels only (the CPU shard computes all C and keeps its own).
pub fn shard_block(plan: &ShardPlan, b: &BlockWeights) -> BlockWeights {
    let mut blk = plan.block(b);
    let ch = plan.channels();
    blk.att = AttWeights {
        time_decay: slice_rows(&b.att.time_decay, ch.clone()),
        time_decay_w2: slice_cols(&b.att.time_decay_w2, ch),
        ..blk.att
    };
    blk
}

/// Converts the whole model's weights (`shard` None) or one rank's shard, one layer at a time,
/// through `f` (f32 vectors) and `h` (bf16 matrices): uploading them, or keeping them on the
/// host for the emulation tests.
pub fn convert<F, H>(
    w: &ModelWeights,
    shard: Option<&ShardPlan>,
    f: &mut impl FnMut(&Vec<f32>) -> Result<F>,
    h: &mut impl FnMut(&Vec<u16>) -> Result<H>,
) -> Result<Weights<F, H>> {
    let cfg = &w.config;
    let part = shard.map_or_else(|| Part::whole(cfg), Part::of);
    let (c, v) = (cfg.n_embd, cfg.vocab_size);
    if w.blocks.len() != cfg.n_layer {
        return Err(CudaError::shape(
            "weights",
            "block count differs from n_layer",
        ));
    }
    let ln_out = norm("ln_out", &w.ln_out, c)?;
    Ok(Weights {
        emb: h(&bf16s("emb", &w.emb, v * c)?)?,
        ln_out: (f(&ln_out.0)?, f(&ln_out.1)?),
        // Only the part that computes the head holds it (V x C, the largest matrix); the other
        // ranks keep one placeholder value, which nothing reads.
        head: if part.head {
            h(&bf16s("head", &w.head, v * c)?)?
        } else {
            h(&vec![0u16])?
        },
        layers: w
            .blocks
            .iter()
            .map(|b| match shard {
                Some(plan) => HostLayer::from_block(cfg, &part, &shard_block(plan, b)),
                None => HostLayer::from_block(cfg, &part, b),
            })
            .map(|l| l?.map(f, h))
            .collect::<Result<_>>()?,
    })
}

/// Uploads every tensor of the model (or of a rank's shard) to the device.
pub fn upload(dev: &Device, w: &ModelWeights, shard: Option<&ShardPlan>) -> Result<DeviceWeights> {
    convert(w, shard, &mut |v| dev.upload(v), &mut |v| dev.upload(v))
}

/// Raw views of device weights for kernel arguments (valid while `w` lives).
pub fn views(dev: &Device, w: &DeviceWeights) -> WeightViews {
    let mut f = |s: &CudaSlice<f32>| Ok(dev.buf(s));
    let mut h = |s: &CudaSlice<u16>| Ok(dev.buf(s));
    w.map(&mut f, &mut h).expect("taking views cannot fail")
}

/// Raw views of host vectors (for the host emulation of the kernels).
pub fn host_views(w: &Weights<Vec<f32>, Vec<u16>>) -> WeightViews {
    let mut f = |v: &Vec<f32>| Ok(DevBuf::new(v.as_ptr() as u64, v.len()));
    let mut h = |v: &Vec<u16>| Ok(DevBuf::new(v.as_ptr() as u64, v.len()));
    w.map(&mut f, &mut h).expect("taking views cannot fail")
}
