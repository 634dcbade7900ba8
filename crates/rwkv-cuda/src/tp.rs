//! Tensor parallelism over the GPUs of one worker: the model sharded by `rwkv_model::shard`
//! (heads for r/k/v/g/WKV/GroupNorm, channel-mix columns, row-parallel `att.output` and
//! `ffn.value`), one [`CudaRank`] per device, partial sums added by NCCL all-reduces on each
//! rank's compute stream. `rwkv_model::tp::TpBackend` drives the ranks (one thread each) and
//! assembles full states from their parts.

use rwkv_model::tp::{Rank, TpBackend};
use rwkv_model::{BackendError, Logits, ModelWeights, SeqStep, ShardPlan};

use crate::backend::{check_model, finish_candidates, CudaBackend, CudaOptions};
use crate::device::device_count;
use crate::error::{CudaError, Result};
use crate::nccl::NcclComm;
use crate::plan::BatchPlan;

/// The model sharded over several devices, as one `rwkv_model::Backend`.
pub type TpCudaBackend = TpBackend<CudaRank>;

/// One device of a tensor-parallel group: a [`CudaBackend`] holding one rank's shard.
pub struct CudaRank {
    body: CudaBackend,
    plan: ShardPlan,
    /// The step prepared by [`Rank::prepare`], run by [`Rank::forward`].
    prepared: Option<BatchPlan>,
}

/// Shards `weights` over `devices` (rank i on device `devices[i]`; distinct devices whose
/// number divides the model's heads), each with `slots` slots of its part of every state.
pub fn tensor_parallel(
    weights: &ModelWeights,
    slots: usize,
    devices: &[usize],
    options: CudaOptions,
) -> Result<TpCudaBackend> {
    let cfg = &weights.config;
    check_model(cfg)?;
    let plans = ShardPlan::all(cfg, devices.len())
        .map_err(|e| CudaError::Unsupported(format!("sharding over {devices:?}: {e}")))?;
    let present = device_count()?;
    for (i, &d) in devices.iter().enumerate() {
        if d >= present {
            return Err(CudaError::NoDevice(format!(
                "device {d} (this machine has {present})"
            )));
        }
        if devices[..i].contains(&d) {
            return Err(CudaError::Unsupported(format!(
                "device {d} is listed twice; each rank needs a device of its own"
            )));
        }
    }
    let (comms, abort) = NcclComm::group(devices)?;
    let ranks = plans
        .into_iter()
        .zip(comms)
        .zip(devices)
        .map(|((plan, comm), &device)| {
            let body = CudaBackend::build(weights, slots, device, options, Some((&plan, comm)))?;
            Ok(CudaRank {
                body,
                plan,
                prepared: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let name = format!(
        "cuda-tp{}:{}",
        options.precision.name_suffix(),
        devices
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    Ok(TpBackend::new(cfg.clone(), ranks, name, abort)?)
}

impl Rank for CudaRank {
    fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    fn num_slots(&self) -> usize {
        rwkv_model::Backend::num_slots(&self.body)
    }

    fn prepare(&mut self, steps: &[SeqStep<'_>]) -> Result<(), BackendError> {
        // `TpBackend` validated the steps.
        let device_steps = CudaBackend::device_steps(steps);
        self.prepared = Some(self.body.prepare_step(&device_steps)?);
        Ok(())
    }

    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Option<Logits>, BackendError> {
        let plan = self.prepared.take().ok_or_else(|| {
            BackendError::Device("tensor parallel: forward without prepare".into())
        })?;
        let logits = self.body.run_prepared(&plan)?;
        if self.plan.rank != 0 {
            return Ok(None);
        }
        let device_steps = CudaBackend::device_steps(steps);
        Ok(Some(finish_candidates(steps, device_steps, logits)))
    }

    fn load_part(&mut self, slot: usize, part: &[f32]) -> Result<(), BackendError> {
        Ok(self.body.load_slot(slot, part)?)
    }

    fn save_part(&mut self, slot: usize) -> Result<Vec<f32>, BackendError> {
        Ok(self.body.save_slot(slot)?)
    }

    fn reset_slot(&mut self, slot: usize) -> Result<(), BackendError> {
        rwkv_model::Backend::reset_state(&mut self.body, slot)
    }

    fn copy_slot(&mut self, src: usize, dst: usize) -> Result<(), BackendError> {
        rwkv_model::Backend::copy_state(&mut self.body, src, dst)
    }

    fn decides_nucleus(&self) -> bool {
        true
    }
}
