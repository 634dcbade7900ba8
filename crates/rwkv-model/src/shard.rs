//! The tensor-parallel shard plan of DESIGN.md: which part of every weight and of the state a
//! rank holds.
//!
//! - Heads are split across ranks in contiguous groups of `n_head / world`: the rows (output
//!   channels) of `att.receptance`, `att.key`, `att.value` and `att.gate`, the heads' slices of
//!   `time_faaaa`, `time_decay`, `ln_x` (GroupNorm is per head) and of the WKV state.
//! - `att.output` ([C, C], [out, in]) is row-parallel: a rank holds the input columns of its
//!   heads and produces a partial [T, C] that an all-reduce sums.
//! - The channel-mix hidden width F is split into contiguous column ranges: the rows of
//!   `ffn.key` ([F, C]) and the input columns of `ffn.value` ([C, F]), which is row-parallel
//!   like `att.output`. Ranges are near-equal (the first `F % world` ranks get one more column),
//!   so `world` need not divide F.
//! - Everything else is replicated: embedding, LayerNorms, the token-shift mixes, the ddlerp
//!   and decay LoRAs (the decay LoRA yields all C channels; a rank keeps its own after the
//!   `time_decay` add, so `time_decay` is kept whole), `ffn.receptance`, `ln_out` and the head.

use std::ops::Range;

use crate::config::ModelConfig;
use crate::state::State;
use crate::tensor::Tensor;
use crate::weights::{AttWeights, BlockWeights, FfnWeights, NormWeights};

/// Why a shard plan cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("tensor-parallel world size must be at least 1, got 0")]
    EmptyWorld,
    #[error("tensor-parallel world size {world} does not divide the model's {n_head} heads")]
    HeadsNotDivisible { world: usize, n_head: usize },
    #[error("tensor-parallel world size {world} exceeds the channel-mix width {dim_ffn}")]
    FfnTooNarrow { world: usize, dim_ffn: usize },
    #[error("rank {rank} is outside the tensor-parallel world of {world}")]
    BadRank { rank: usize, world: usize },
    #[error("rank {rank}'s part of a state has {len} values, its shard needs {want}")]
    StatePart {
        rank: usize,
        len: usize,
        want: usize,
    },
}

/// The part of the model that rank `rank` of `world` holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    pub rank: usize,
    pub world: usize,
    n_embd: usize,
    n_head: usize,
    head_size: usize,
    dim_ffn: usize,
}

impl ShardPlan {
    /// Checks that `world` splits the model (it must divide the heads and not exceed F).
    pub fn validate(cfg: &ModelConfig, world: usize) -> Result<(), ShardError> {
        if world == 0 {
            return Err(ShardError::EmptyWorld);
        }
        if !cfg.n_head.is_multiple_of(world) {
            return Err(ShardError::HeadsNotDivisible {
                world,
                n_head: cfg.n_head,
            });
        }
        if world > cfg.dim_ffn {
            return Err(ShardError::FfnTooNarrow {
                world,
                dim_ffn: cfg.dim_ffn,
            });
        }
        Ok(())
    }

    /// The plan of one rank.
    pub fn new(cfg: &ModelConfig, rank: usize, world: usize) -> Result<Self, ShardError> {
        Self::validate(cfg, world)?;
        if rank >= world {
            return Err(ShardError::BadRank { rank, world });
        }
        Ok(Self {
            rank,
            world,
            n_embd: cfg.n_embd,
            n_head: cfg.n_head,
            head_size: cfg.head_size,
            dim_ffn: cfg.dim_ffn,
        })
    }

    /// The plans of every rank, in rank order.
    pub fn all(cfg: &ModelConfig, world: usize) -> Result<Vec<Self>, ShardError> {
        Self::validate(cfg, world)?;
        (0..world).map(|r| Self::new(cfg, r, world)).collect()
    }

    /// Heads per rank.
    pub fn heads_per_rank(&self) -> usize {
        self.n_head / self.world
    }

    /// This rank's heads.
    pub fn heads(&self) -> Range<usize> {
        let per = self.heads_per_rank();
        self.rank * per..(self.rank + 1) * per
    }

    /// This rank's attention channels (head-major: head h owns `h·N..(h+1)·N`).
    pub fn channels(&self) -> Range<usize> {
        let h = self.heads();
        h.start * self.head_size..h.end * self.head_size
    }

    /// This rank's channel-mix hidden columns: near-equal contiguous ranges of `0..F`.
    pub fn ffn_cols(&self) -> Range<usize> {
        let (q, r) = (self.dim_ffn / self.world, self.dim_ffn % self.world);
        let start = self.rank * q + self.rank.min(r);
        start..start + q + usize::from(self.rank < r)
    }

    /// This rank's values inside one layer's WKV state [H, N, N].
    pub fn wkv_range(&self) -> Range<usize> {
        let (h, nn) = (self.heads(), self.head_size * self.head_size);
        h.start * nn..h.end * nn
    }

    /// Length of this rank's slice of one layer's WKV state.
    pub fn wkv_len(&self) -> usize {
        self.wkv_range().len()
    }

    /// Full width C (replicated activations and shift states).
    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// Length of this rank's part of one sequence's state: per layer the two shift vectors
    /// (replicated, C each) and its heads' WKV values.
    pub fn state_part_len(&self, n_layer: usize) -> usize {
        n_layer * (2 * self.n_embd + self.wkv_len())
    }

    /// This rank's part of a full state, laid out like a state of the rank's heads only: per
    /// layer `[att_shift C][its heads' wkv][ffn_shift C]`.
    pub fn state_part(&self, state: &State) -> Vec<f32> {
        let wkv = self.wkv_range();
        let mut part = Vec::with_capacity(self.state_part_len(state.n_layer()));
        for i in 0..state.n_layer() {
            let (att, full_wkv, ffn) = state.layer(i);
            part.extend_from_slice(att);
            part.extend_from_slice(&full_wkv[wkv.clone()]);
            part.extend_from_slice(ffn);
        }
        part
    }

    /// Writes this rank's part (see [`ShardPlan::state_part`]) into a full state: its heads'
    /// WKV values and the shift vectors (which every rank holds equal).
    pub fn write_state_part(&self, part: &[f32], state: &mut State) -> Result<(), ShardError> {
        let want = self.state_part_len(state.n_layer());
        if part.len() != want {
            return Err(ShardError::StatePart {
                rank: self.rank,
                len: part.len(),
                want,
            });
        }
        let (c, wkv) = (self.n_embd, self.wkv_range());
        for (i, layer) in part.chunks_exact(2 * c + wkv.len()).enumerate() {
            let (att, rest) = layer.split_at(c);
            let (mine, ffn) = rest.split_at(wkv.len());
            let full = state.layer_mut(i);
            full.att_shift.copy_from_slice(att);
            full.wkv[wkv.clone()].copy_from_slice(mine);
            full.ffn_shift.copy_from_slice(ffn);
        }
        Ok(())
    }

    /// The weights of one block as this rank holds them: the sharded tensors have the rank's
    /// shapes (`receptance` [C/w, C], `output` [C, C/w], `ffn.key` [F_r, C], `ffn.value`
    /// [C, F_r], `time_faaaa` [H/w, N], `ln_x` [C/w], `time_state` [H/w, N, N]); the rest is
    /// shared with `blk` (tensors clone by reference count).
    pub fn block(&self, blk: &BlockWeights) -> BlockWeights {
        let (ch, hd, f) = (self.channels(), self.heads(), self.ffn_cols());
        let a = &blk.att;
        let att = AttWeights {
            time_faaaa: slice_rows(&a.time_faaaa, hd.clone()),
            receptance: slice_rows(&a.receptance, ch.clone()),
            key: slice_rows(&a.key, ch.clone()),
            value: slice_rows(&a.value, ch.clone()),
            gate: slice_rows(&a.gate, ch.clone()),
            output: slice_cols(&a.output, ch.clone()),
            ln_x: NormWeights {
                weight: slice_rows(&a.ln_x.weight, ch.clone()),
                bias: slice_rows(&a.ln_x.bias, ch),
            },
            time_state: a.time_state.as_ref().map(|t| slice_rows(t, hd)),
            ..a.clone()
        };
        let ffn = FfnWeights {
            key: slice_rows(&blk.ffn.key, f.clone()),
            value: slice_cols(&blk.ffn.value, f),
            ..blk.ffn.clone()
        };
        BlockWeights {
            ln1: blk.ln1.clone(),
            ln2: blk.ln2.clone(),
            att,
            ffn,
        }
    }
}

/// Rows `rows` of the first dimension of `t` (a vector's elements, a matrix's rows, a
/// [H, N, N] tensor's heads).
pub fn slice_rows(t: &Tensor, rows: Range<usize>) -> Tensor {
    let shape = t.shape();
    let inner: usize = shape[1..].iter().product();
    let size = t.dtype().size();
    let bytes = t.bytes()[rows.start * inner * size..rows.end * inner * size].to_vec();
    let mut new_shape = shape.to_vec();
    new_shape[0] = rows.len();
    Tensor::from_bytes(t.dtype(), new_shape, bytes)
}

/// Columns `cols` of a 2-D tensor.
pub fn slice_cols(t: &Tensor, cols: Range<usize>) -> Tensor {
    let [rows, width] = *t.shape() else {
        panic!("slice_cols needs a matrix, got shape {:?}", t.shape());
    };
    let size = t.dtype().size();
    let src = t.bytes();
    let mut bytes = Vec::with_capacity(rows * cols.len() * size);
    for r in 0..rows {
        let row = &src[r * width * size..(r + 1) * width * size];
        bytes.extend_from_slice(&row[cols.start * size..cols.end * size]);
    }
    Tensor::from_bytes(t.dtype(), vec![rows, cols.len()], bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    fn cfg(n_head: usize, dim_ffn: usize) -> ModelConfig {
        ModelConfig {
            n_embd: n_head * 8,
            n_layer: 1,
            n_head,
            head_size: 8,
            dim_ffn,
            vocab_size: 10,
            maa_lora: 4,
            decay_lora: 4,
            weight_dtype: DType::F32,
            has_time_state: false,
        }
    }

    #[test]
    fn heads_channels_and_state_ranges_tile_the_model() {
        let cfg = cfg(8, 100);
        for world in [1, 2, 4, 8] {
            let plans = ShardPlan::all(&cfg, world).unwrap();
            let mut next = (0, 0, 0, 0);
            for p in &plans {
                assert_eq!(p.heads().start, next.0);
                assert_eq!(p.channels().start, next.1);
                assert_eq!(p.wkv_range().start, next.2);
                assert_eq!(p.ffn_cols().start, next.3);
                assert_eq!(p.heads().len(), 8 / world);
                assert_eq!(p.channels().len(), 64 / world);
                next = (
                    p.heads().end,
                    p.channels().end,
                    p.wkv_range().end,
                    p.ffn_cols().end,
                );
            }
            assert_eq!(next, (8, 64, 8 * 64, 100));
        }
        // 100 columns over 8 ranks: four ranks of 13, four of 12.
        let lens: Vec<usize> = ShardPlan::all(&cfg, 8)
            .unwrap()
            .iter()
            .map(|p| p.ffn_cols().len())
            .collect();
        assert_eq!(lens, [13, 13, 13, 13, 12, 12, 12, 12]);
        let p = ShardPlan::new(&cfg, 1, 4).unwrap();
        assert_eq!((p.heads(), p.channels()), (2..4, 16..32));
        assert_eq!(p.wkv_range(), 128..256);
    }

    #[test]
    fn invalid_worlds_are_refused_with_the_numbers() {
        let cfg = cfg(4, 16);
        assert_eq!(ShardPlan::validate(&cfg, 0), Err(ShardError::EmptyWorld));
        assert_eq!(ShardPlan::all(&cfg, 0), Err(ShardError::EmptyWorld));
        let err = ShardPlan::validate(&cfg, 3).unwrap_err();
        assert_eq!(
            err,
            ShardError::HeadsNotDivisible {
                world: 3,
                n_head: 4
            }
        );
        assert!(err.to_string().contains("3") && err.to_string().contains("4 heads"));
        assert_eq!(
            ShardPlan::new(&cfg, 2, 2),
            Err(ShardError::BadRank { rank: 2, world: 2 })
        );
        assert_eq!(
            ShardPlan::validate(&ModelConfig { dim_ffn: 2, ..cfg }, 4),
            Err(ShardError::FfnTooNarrow {
                world: 4,
                dim_ffn: 2
            })
        );
    }

    #[test]
    fn state_parts_split_and_reassemble_a_state() {
        let cfg = ModelConfig {
            n_layer: 2,
            ..cfg(4, 16)
        };
        let values: Vec<f32> = (0..cfg.state_len()).map(|i| i as f32).collect();
        let full = State::from_flat(&cfg, values).unwrap();
        for world in [1, 2, 4] {
            let mut back = State::zeros(&cfg);
            for plan in ShardPlan::all(&cfg, world).unwrap() {
                let part = plan.state_part(&full);
                assert_eq!(part.len(), plan.state_part_len(cfg.n_layer));
                // The rank's WKV values are its heads' slice of each layer's [H, N, N].
                let (c, wl) = (cfg.n_embd, plan.wkv_len());
                assert_eq!(&part[c..c + wl], &full.layer(0).1[plan.wkv_range()]);
                plan.write_state_part(&part, &mut back).unwrap();
            }
            assert_eq!(back, full, "world {world}");
        }
        let plan = ShardPlan::new(&cfg, 1, 2).unwrap();
        let err = plan.write_state_part(&[0.0; 3], &mut State::zeros(&cfg));
        assert!(matches!(
            err,
            Err(ShardError::StatePart {
                rank: 1,
                len: 3,
                ..
            })
        ));
    }

    #[test]
    fn row_and_column_slices_pick_the_right_values() {
        // [3, 4] matrix with value 10·r + c.
        let values: Vec<f32> = (0..3)
            .flat_map(|r| (0..4).map(move |c| (10 * r + c) as f32))
            .collect();
        for dtype in [DType::F32, DType::BF16] {
            let t = Tensor::from_f32(dtype, vec![3, 4], &values);
            let rows = slice_rows(&t, 1..3);
            assert_eq!(rows.shape(), &[2, 4]);
            assert_eq!(rows.to_f32(), [10., 11., 12., 13., 20., 21., 22., 23.]);
            let cols = slice_cols(&t, 1..3);
            assert_eq!(cols.shape(), &[3, 2]);
            assert_eq!(cols.to_f32(), [1., 2., 11., 12., 21., 22.]);
        }
        let v = Tensor::from_f32(DType::F32, vec![5], &[0., 1., 2., 3., 4.]);
        assert_eq!(slice_rows(&v, 2..4).to_f32(), [2., 3.]);
        let heads = Tensor::from_f32(DType::F32, vec![2, 2, 2], &[0., 1., 2., 3., 4., 5., 6., 7.]);
        let h1 = slice_rows(&heads, 1..2);
        assert_eq!(h1.shape(), &[1, 2, 2]);
        assert_eq!(h1.to_f32(), [4., 5., 6., 7.]);
    }
}
