//! Tensor-parallel forward on CPU: `world` ranks on threads, each holding its shard of the
//! weights ([`ShardPlan`]) and its heads' part of every state, meeting in an all-reduce after
//! `att.output` and after `ffn.value` (DESIGN.md, "Tensor parallel").
//!
//! Per layer, every rank computes the replicated parts itself (ln1/ln2, token shift, the ddlerp
//! LoRA, the decay LoRA, `ffn.receptance`); its heads' r/k/v/g, WKV and GroupNorm; a partial
//! `att.output` over its heads' input columns; its FFN columns of relu²(key) and a partial
//! `ffn.value`. The partials are summed by the [`Collective`], so every rank ends each layer
//! with the same full residual stream. Rank 0 alone runs the head.
//!
//! This is the CPU check of the sharding math (the unsharded [`crate::forward`] is the
//! reference) and the model for the CUDA/NCCL backend; it reuses the unsharded forward's
//! pieces, so only the sharding differs. The ranks are driven by `rwkv_model::tp::TpBackend`,
//! as the CUDA ranks are.

use rwkv_model::backend::{take_candidates, tops_as_last, validate_steps};
use rwkv_model::tp::{Rank, TpBackend};
use rwkv_model::{
    Backend, BackendError, Collective, CollectiveError, InProcessCollective, Logits, ModelConfig,
    ModelWeights, SeqStep, ShardError, ShardPlan, State,
};

use crate::forward::{
    ddlerp, decay, embed, head, lerp, par_layer_norm, par_rows, token_shift, HeadRows, Layout,
};
use crate::model::{Block, ChannelMix, CpuModel, CpuOptions, TimeMix};
use crate::ops::norm::group_norm_rows;
use crate::ops::wkv::{wkv6_heads, WkvInputs};

/// One sequence's state as one rank holds it. Per layer: `att_shift` (C values, replicated), the
/// rank's heads of `wkv` [H/world, N, N], `ffn_shift` (C values, replicated).
#[derive(Clone, Debug, PartialEq)]
pub struct RankState {
    c: usize,
    wkv_len: usize,
    data: Vec<f32>,
}

impl RankState {
    /// This rank's part of a full state.
    pub fn from_full(plan: &ShardPlan, state: &State) -> Self {
        Self {
            c: plan.n_embd(),
            wkv_len: plan.wkv_len(),
            data: plan.state_part(state),
        }
    }

    fn layer_len(&self) -> usize {
        2 * self.c + self.wkv_len
    }

    /// Mutable layer `i`: (att_shift, wkv slice, ffn_shift).
    pub fn layer_mut(&mut self, i: usize) -> (&mut [f32], &mut [f32], &mut [f32]) {
        let len = self.layer_len();
        let l = &mut self.data[i * len..(i + 1) * len];
        let (att, rest) = l.split_at_mut(self.c);
        let (wkv, ffn) = rest.split_at_mut(self.wkv_len);
        (att, wkv, ffn)
    }
}

/// One rank: its plan, its sharded model, its end of the collective and its slots.
pub struct CpuRank {
    plan: ShardPlan,
    model: CpuModel,
    comm: InProcessCollective,
    slots: Vec<RankState>,
    initial: RankState,
    /// Set for a step of [`TpCpuBackend::forward_candidates`]: the head computes only these.
    candidates: Option<Vec<u32>>,
}

impl CpuRank {
    /// Runs one step on this rank; rank 0 returns the logits.
    fn run(
        &mut self,
        steps: &[SeqStep<'_>],
        which: HeadRows<'_>,
    ) -> Result<Option<Vec<f32>>, CollectiveError> {
        let mut by_slot: Vec<Option<&mut RankState>> = self.slots.iter_mut().map(Some).collect();
        let mut states: Vec<&mut RankState> = steps
            .iter()
            .map(|s| {
                by_slot[s.slot]
                    .take()
                    .expect("slots were validated to be distinct")
            })
            .collect();
        let sh = Shard {
            model: &self.model,
            plan: &self.plan,
            comm: &self.comm,
        };
        sh.forward(steps, &mut states, which)
    }
}

/// The sharded forward of one rank.
struct Shard<'a> {
    model: &'a CpuModel,
    plan: &'a ShardPlan,
    comm: &'a dyn Collective,
}

impl Shard<'_> {
    fn forward(
        &self,
        steps: &[SeqStep<'_>],
        states: &mut [&mut RankState],
        which: HeadRows<'_>,
    ) -> Result<Option<Vec<f32>>, CollectiveError> {
        let model = self.model;
        let (layout, mut x) = embed(model, steps);
        for (n, block) in model.blocks.iter().enumerate() {
            self.time_mix(block, &block.att, n, &layout, &mut x, states)?;
            self.channel_mix(block, &block.ffn, n, &layout, &mut x, states)?;
        }
        Ok((self.comm.rank() == 0).then(|| head(model, steps, &layout, &x, which)))
    }

    fn time_mix(
        &self,
        block: &Block,
        att: &TimeMix,
        n: usize,
        layout: &Layout,
        x: &mut [f32],
        states: &mut [&mut RankState],
    ) -> Result<(), CollectiveError> {
        let model = self.model;
        let cfg = &model.config;
        let (c, hs, rows) = (cfg.n_embd, cfg.head_size, layout.rows);
        let (mine, cl) = (self.plan.channels(), self.plan.channels().len());
        let mut a = vec![0.0; x.len()];
        par_layer_norm(model, x, &block.ln1.weight, &block.ln1.bias, &mut a);
        let dx = {
            let mut shifts: Vec<&mut [f32]> = states.iter_mut().map(|s| s.layer_mut(n).0).collect();
            token_shift(&a, c, layout, &mut shifts)
        };
        let mixed = ddlerp(model, att, &a, &dx, rows);
        let [x_w, x_k, x_v, x_r, x_g] = [0, 1, 2, 3, 4].map(|j| &mixed[j]);
        // The rank's heads only: [rows, C/world].
        let r = model.project(x_r, rows, &att.receptance);
        let k = model.project(x_k, rows, &att.key);
        let v = model.project(x_v, rows, &att.value);
        let mut g = model.project(x_g, rows, &att.gate);
        par_rows(model, &mut g, cl, |_, ch| {
            ch.iter_mut().for_each(|v| *v = *v / (1.0 + (-*v).exp()))
        });
        // The decay LoRA is replicated and yields all C channels; keep this rank's.
        let w_full = decay(model, att, x_w, rows);
        let w: Vec<f32> = w_full
            .chunks_exact(c)
            .flat_map(|row| &row[mine.clone()])
            .copied()
            .collect();
        let mut y = vec![0.0; rows * cl];
        for (span, state) in layout.spans.iter().zip(states.iter_mut()) {
            if span.is_empty() {
                continue;
            }
            let at = span.start * cl..span.end * cl;
            let inputs = WkvInputs {
                r: &r[at.clone()],
                k: &k[at.clone()],
                v: &v[at.clone()],
                w: &w[at.clone()],
                u: &att.faaaa,
            };
            wkv6_heads(&inputs, hs, 0, state.layer_mut(n).1, &mut y[at], cl);
        }
        par_rows(model, &mut y, cl, |_, ch| {
            group_norm_rows(ch, hs, &att.ln_x.weight, &att.ln_x.bias)
        });
        y.iter_mut().zip(&g).for_each(|(y, g)| *y *= g);
        // Row-parallel: a partial [rows, C] over the rank's input columns, summed across ranks.
        let mut out = model.project(&y, rows, &att.output);
        self.comm.all_reduce_sum(&mut out)?;
        x.iter_mut().zip(&out).for_each(|(x, o)| *x += o);
        Ok(())
    }

    fn channel_mix(
        &self,
        block: &Block,
        ffn: &ChannelMix,
        n: usize,
        layout: &Layout,
        x: &mut [f32],
        states: &mut [&mut RankState],
    ) -> Result<(), CollectiveError> {
        let model = self.model;
        let (c, rows) = (ffn.maa_k.len(), layout.rows);
        let mut b = vec![0.0; x.len()];
        par_layer_norm(model, x, &block.ln2.weight, &block.ln2.bias, &mut b);
        let dx = {
            let mut shifts: Vec<&mut [f32]> = states.iter_mut().map(|s| s.layer_mut(n).2).collect();
            token_shift(&b, c, layout, &mut shifts)
        };
        let x_k = lerp(&b, &dx, &ffn.maa_k);
        let x_r = lerp(&b, &dx, &ffn.maa_r);
        // The rank's FFN columns, then a partial ffn.value summed across ranks.
        let mut kk = model.project(&x_k, rows, &ffn.key);
        kk.iter_mut().for_each(|v| *v = v.max(0.0) * v.max(0.0));
        let mut kv = model.project_skip_zeros(&kk, rows, &ffn.value);
        self.comm.all_reduce_sum(&mut kv)?;
        let r = model.project(&x_r, rows, &ffn.receptance);
        par_rows(model, x, c, |r0, ch| {
            let at = r0 * c..r0 * c + ch.len();
            for ((x, r), kv) in ch.iter_mut().zip(&r[at.clone()]).zip(&kv[at]) {
                *x += kv / (1.0 + (-r).exp());
            }
        });
        Ok(())
    }
}

impl Rank for CpuRank {
    fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    fn num_slots(&self) -> usize {
        self.slots.len()
    }

    fn prepare(&mut self, _steps: &[SeqStep<'_>]) -> Result<(), BackendError> {
        // Host memory is allocated as the step runs; nothing can fail on one rank alone first.
        Ok(())
    }

    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Option<Logits>, BackendError> {
        let candidates = self.candidates.take();
        let which = match &candidates {
            Some(ids) => HeadRows::Candidates(ids),
            None => HeadRows::Full,
        };
        let data = self
            .run(steps, which)
            .map_err(|e| BackendError::Device(format!("tensor parallel: {e}")))?;
        Ok(data.map(|data| Logits {
            vocab: self.model.config.vocab_size,
            data,
            ..Logits::default()
        }))
    }

    fn load_part(&mut self, slot: usize, part: &[f32]) -> Result<(), BackendError> {
        let state = &mut self.slots[slot];
        if part.len() != state.data.len() {
            return Err(BackendError::State(format!(
                "rank {} part of {} values, its slots hold {}",
                self.plan.rank,
                part.len(),
                state.data.len()
            )));
        }
        state.data.copy_from_slice(part);
        Ok(())
    }

    fn save_part(&mut self, slot: usize) -> Result<Vec<f32>, BackendError> {
        Ok(self.slots[slot].data.clone())
    }

    fn reset_slot(&mut self, slot: usize) -> Result<(), BackendError> {
        self.slots[slot].clone_from(&self.initial);
        Ok(())
    }

    fn copy_slot(&mut self, src: usize, dst: usize) -> Result<(), BackendError> {
        let copy = self.slots[src].clone();
        self.slots[dst] = copy;
        Ok(())
    }
}

/// The CPU backend sharded over `world` in-process ranks (threads).
pub struct TpCpuBackend {
    inner: TpBackend<CpuRank>,
}

impl TpCpuBackend {
    /// f32 weights sharded over `world` ranks, with `slots` state slots.
    pub fn new(weights: &ModelWeights, slots: usize, world: usize) -> Result<Self, ShardError> {
        Self::with_options(weights, slots, world, CpuOptions::default())
    }

    /// Like [`TpCpuBackend::new`] with a precision and kernel set; `options.threads` is the
    /// total across ranks (0 = one per core), each rank getting an equal share (at least 1).
    pub fn with_options(
        weights: &ModelWeights,
        slots: usize,
        world: usize,
        options: CpuOptions,
    ) -> Result<Self, ShardError> {
        let plans = ShardPlan::all(&weights.config, world)?;
        let total = match options.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            t => t,
        };
        let rank_options = CpuOptions {
            threads: (total / world).max(1),
            ..options
        };
        let initial = weights.initial_state();
        let comms = InProcessCollective::group(world);
        let abort = comms[0].aborter();
        let ranks = plans
            .into_iter()
            .zip(comms)
            .map(|(plan, comm)| {
                // The rank's view: sharded blocks, everything else shared (tensors are
                // reference-counted, so the clone copies no weight data).
                let view = ModelWeights {
                    blocks: weights.blocks.iter().map(|b| plan.block(b)).collect(),
                    ..weights.clone()
                };
                let initial = RankState::from_full(&plan, &initial);
                CpuRank {
                    model: CpuModel::with_options(&view, rank_options),
                    comm,
                    slots: vec![initial.clone(); slots],
                    initial,
                    plan,
                    candidates: None,
                }
            })
            .collect();
        let name = format!("cpu-tp{world}");
        let inner = TpBackend::new(weights.config.clone(), ranks, name, abort)
            .expect("the ranks were built from one world's plans");
        Ok(Self { inner })
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.inner.world()
    }

    /// Like [`crate::CpuBackend::forward_candidates`]: only the logits of `candidates`.
    pub fn forward_candidates(
        &mut self,
        steps: &[SeqStep<'_>],
        candidates: &[u32],
    ) -> Result<Vec<f32>, BackendError> {
        let vocab = self.config().vocab_size;
        if let Some(&token) = candidates.iter().find(|&&t| t as usize >= vocab) {
            return Err(BackendError::BadToken { token, vocab });
        }
        // Only rank 0 computes the head.
        self.inner.ranks_mut()[0].candidates = Some(candidates.to_vec());
        let out = self.inner.forward(steps);
        self.inner.ranks_mut()[0].candidates = None;
        Ok(out?.data)
    }
}

impl Backend for TpCpuBackend {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    fn name(&self) -> String {
        self.inner.name()
    }

    fn num_slots(&self) -> usize {
        self.inner.num_slots()
    }

    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Logits, BackendError> {
        validate_steps(self.config(), self.num_slots(), steps)?;
        let full = self.inner.forward(&tops_as_last(steps))?;
        Ok(take_candidates(steps, full))
    }

    fn load_state(&mut self, slot: usize, state: &State) -> Result<(), BackendError> {
        self.inner.load_state(slot, state)
    }

    fn save_state(&mut self, slot: usize) -> Result<State, BackendError> {
        self.inner.save_state(slot)
    }

    fn reset_state(&mut self, slot: usize) -> Result<(), BackendError> {
        self.inner.reset_state(slot)
    }

    fn copy_state(&mut self, src: usize, dst: usize) -> Result<(), BackendError> {
        self.inner.copy_state(src, dst)
    }

    fn broken(&self) -> Option<String> {
        self.inner.broken()
    }
}
