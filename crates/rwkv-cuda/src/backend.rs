//! [`CudaBackend`]: the `rwkv_model::Backend` implementation on one device, which is also
//! the body of one rank of the tensor-parallel backend (`tp.rs`).

use std::borrow::Cow;

use cudarc::driver::CudaSlice;
use rwkv_model::backend::{check_state, take_candidates, tops_as_last, validate_steps};
use rwkv_model::{
    Backend, BackendError, Logits, ModelConfig, ModelWeights, OutputRows, SeqStep, ShardPlan, State,
};

use crate::device::Device;
use crate::error::{CudaError, Result};
use crate::exec::{CudaExec, Workspace};
use crate::forward::{GemmPrecision, Part, Step, MAX_DEVICE_CANDIDATES};
use crate::graph::{self, Graph, GraphCache, GraphPolicy, StreamRecorder, GRAPH_MAX_ROWS};
use crate::kernels::{Kernels, MAX_HEAD_SIZE};
use crate::nccl::NcclComm;
use crate::plan::BatchPlan;
use crate::pool::{HostState, PoolLayout, StatePool};
use crate::profile::KernelTime;
use crate::weights::{self, DeviceWeights, WeightViews};

/// Options of a [`CudaBackend`].
#[derive(Clone, Copy, Debug)]
pub struct CudaOptions {
    pub precision: GemmPrecision,
    /// Replay decode steps of up to [`GRAPH_MAX_ROWS`] sequences from CUDA graphs (`graph.rs`).
    /// On by default; a rank of a tensor-parallel group always runs eagerly.
    pub graphs: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            precision: GemmPrecision::default(),
            graphs: true,
        }
    }
}

/// The k best entries of each row, from [`CudaBackend::top_k_probs`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TopK {
    pub k: usize,
    /// Token ids, `k` per row, best first.
    pub ids: Vec<u32>,
    /// Their probabilities (softmax of the whole row at the given temperature).
    pub probs: Vec<f32>,
}

/// The RWKV-6 model on one CUDA device, with a pool of state slots in device memory.
pub struct CudaBackend {
    cfg: ModelConfig,
    options: CudaOptions,
    kernels: Kernels,
    /// Raw views of `_weights` for kernel arguments (valid while it lives).
    views: WeightViews,
    _weights: DeviceWeights,
    /// The model's initial state (zeros or `time_state`), for `reset_state`.
    initial: CudaSlice<f32>,
    pool: StatePool,
    ws: Workspace,
    /// Captured decode bodies by batch size.
    graphs: GraphCache<Graph>,
    /// Pinned host memory the logits are downloaded into: from pinned memory the copies run
    /// asynchronously at full link speed, so the head's chunks queue back to back and the step
    /// waits once (a pageable copy blocks per chunk and runs several times slower).
    logits_host: Option<HostState>,
    /// The part of the model held here: all of it, or a tensor-parallel rank's shard.
    part: Part,
    /// A tensor-parallel rank's end of its group's communicator.
    comm: Option<NcclComm>,
    /// The first error after which the device is unusable ([`is_sticky`]), once there was one.
    broken: Option<String>,
    dev: Device,
}

impl CudaBackend {
    /// Uploads `weights` to device `device_ordinal`, compiles the kernels for it and allocates
    /// `slots` state slots, each set to the model's initial state. Returns
    /// [`CudaError::NoDevice`] where there is no CUDA driver or device (fall back to the CPU).
    pub fn new(weights: &ModelWeights, slots: usize, device_ordinal: usize) -> Result<Self> {
        Self::with_options(weights, slots, device_ordinal, CudaOptions::default())
    }

    /// [`CudaBackend::new`] with options.
    pub fn with_options(
        weights: &ModelWeights,
        slots: usize,
        device_ordinal: usize,
        options: CudaOptions,
    ) -> Result<Self> {
        Self::build(weights, slots, device_ordinal, options, None)
    }

    /// A whole-model backend (`shard` None) or one rank of a tensor-parallel group (its plan
    /// and its end of the group's communicator): the rank's shard of the weights, and slots
    /// that hold its part of each state.
    pub(crate) fn build(
        weights: &ModelWeights,
        slots: usize,
        device_ordinal: usize,
        options: CudaOptions,
        shard: Option<(&ShardPlan, NcclComm)>,
    ) -> Result<Self> {
        let cfg = weights.config.clone();
        check_model(&cfg)?;
        let dev = Device::open(device_ordinal)?;
        if cfg.weight_dtype != rwkv_model::DType::BF16 {
            tracing::warn!(
                dtype = %cfg.weight_dtype,
                "CUDA backend keeps weights in bf16; this checkpoint's weights are rounded"
            );
        }
        let kernels = Kernels::load(&dev, cfg.head_size)?;
        let (plan, comm) = shard.unzip();
        let weights_dev = weights::upload(&dev, weights, plan)?;
        let views = weights::views(&dev, &weights_dev);
        let (part, layout, initial) = match plan {
            None => (
                Part::whole(&cfg),
                PoolLayout::new(&cfg, slots),
                dev.upload(weights.initial_state().as_flat())?,
            ),
            Some(plan) => (
                Part::of(plan),
                PoolLayout {
                    n_head: plan.heads_per_rank(),
                    ..PoolLayout::new(&cfg, slots)
                },
                dev.upload(&plan.state_part(&weights.initial_state()))?,
            ),
        };
        let pool = StatePool::new(&dev, layout, &initial)?;
        let ws = Workspace::new(&dev, &cfg, options.precision.split(), 16)?;
        dev.compute
            .synchronize()
            .map_err(CudaError::driver("upload weights"))?;
        tracing::info!(
            device = %dev.name,
            arch = %dev.arch,
            slots,
            precision = ?options.precision,
            rank = ?plan.map(|p| (p.rank, p.world)),
            "CUDA backend ready"
        );
        Ok(Self {
            cfg,
            options,
            kernels,
            views,
            _weights: weights_dev,
            initial,
            pool,
            ws,
            graphs: GraphCache::default(),
            logits_host: None,
            part,
            comm,
            broken: None,
            dev,
        })
    }

    /// The device's name (e.g. `NVIDIA H100 80GB HBM3`).
    pub fn device_name(&self) -> &str {
        &self.dev.name
    }

    /// The NVRTC target the kernels were compiled for (`sm_90`).
    pub fn arch(&self) -> &str {
        &self.dev.arch
    }

    pub fn options(&self) -> CudaOptions {
        self.options
    }

    /// Turns CUDA graphs on or off from the next step (off drops the graphs kept).
    pub fn set_graphs(&mut self, on: bool) {
        self.options.graphs = on;
        if !on {
            self.graphs = GraphCache::default();
        }
    }

    /// Runs one step like [`Backend::forward`], without CUDA graphs, and returns with its output
    /// the device time of each kernel and GEMM shape in it (`profile.rs`), largest first.
    pub fn profile_step(
        &mut self,
        steps: &[SeqStep<'_>],
    ) -> Result<(Logits, Vec<KernelTime>), BackendError> {
        let graphs = self.options.graphs;
        self.options.graphs = false;
        self.dev.profile.start();
        let out = self.forward(steps);
        self.dev.profile.stop();
        self.options.graphs = graphs;
        let logits = out?;
        let report = self.dev.profile.report();
        Ok((logits, self.watch(report)?))
    }

    /// How many decode bodies are captured, and why graphs were turned off if a capture failed.
    pub fn graph_status(&self) -> (usize, Option<&str>) {
        (self.graphs.len(), self.graphs.disabled())
    }

    /// A pinned host buffer the size of one state (reuse it across swaps: pinning is slow).
    pub fn alloc_host_state(&self) -> Result<HostState> {
        self.dev.bind()?;
        HostState::alloc(&self.dev, self.pool.layout.state_len())
    }

    /// Copies a slot out to a new pinned host buffer (see [`CudaBackend::swap_out_into`]).
    pub fn swap_out(&mut self, slot: usize) -> Result<HostState> {
        let mut host = self.alloc_host_state()?;
        self.swap_out_into(slot, &mut host)?;
        Ok(host)
    }

    /// Starts copying a slot into `host` on the copy stream and returns at once; reading
    /// `host` waits for the copy. Compute work issued later on this slot waits for the copy
    /// to finish reading it; other slots are not held up.
    pub fn swap_out_into(&mut self, slot: usize, host: &mut HostState) -> Result<()> {
        self.dev.bind()?;
        self.pool.swap_out(&self.dev, slot, host)
    }

    /// Starts copying `host` into a slot on the copy stream and returns at once; the next
    /// forward step (or other compute work) on this slot waits for it.
    pub fn swap_in(&mut self, slot: usize, host: &mut HostState) -> Result<()> {
        self.dev.bind()?;
        self.pool.swap_in(&self.dev, slot, host)
    }

    /// Waits for all work on both streams.
    pub fn synchronize(&self) -> Result<()> {
        self.dev.bind()?;
        self.dev
            .copy
            .synchronize()
            .map_err(CudaError::driver("synchronize copy stream"))?;
        self.dev
            .compute
            .synchronize()
            .map_err(CudaError::driver("synchronize compute stream"))
    }

    /// Softmax at `temperature` and the `k` most likely tokens of each logit row, on the
    /// device (for large batches, where doing this on the host is the bottleneck).
    pub fn top_k_probs(&mut self, logits: &Logits, k: usize, temperature: f32) -> Result<TopK> {
        self.dev.bind()?;
        let (rows, cols) = (logits.rows(), logits.vocab);
        if rows == 0 || k == 0 {
            return Ok(TopK {
                k,
                ..TopK::default()
            });
        }
        let x = self.dev.upload(&logits.data[..rows * cols])?;
        let probs = self.dev.zeros::<f32>(rows * cols)?;
        let idx = self.dev.zeros::<i32>(rows * k)?;
        let val = self.dev.zeros::<f32>(rows * k)?;
        let d = &self.dev;
        self.kernels
            .softmax(d.buf(&x), d.buf(&probs), rows, cols, temperature)?;
        self.kernels
            .top_k(d.buf(&probs), d.buf(&idx), d.buf(&val), rows, cols, k)?;
        let ids = d
            .compute
            .clone_dtoh(&idx)
            .map_err(CudaError::driver("download top-k"))?;
        let probs = d
            .compute
            .clone_dtoh(&val)
            .map_err(CudaError::driver("download top-k"))?;
        d.compute
            .synchronize()
            .map_err(CudaError::driver("top-k"))?;
        Ok(TopK {
            k,
            ids: ids.into_iter().map(|i| i as u32).collect(),
            probs,
        })
    }
}

/// Rejects models the kernels cannot run.
pub(crate) fn check_model(cfg: &ModelConfig) -> Result<()> {
    if cfg.head_size == 0 || cfg.head_size > MAX_HEAD_SIZE {
        return Err(CudaError::Unsupported(format!(
            "head size {} (the WKV kernels take 1..={MAX_HEAD_SIZE})",
            cfg.head_size
        )));
    }
    if cfg.n_head * cfg.head_size != cfg.n_embd {
        return Err(CudaError::Unsupported(format!(
            "{} heads of {} do not make n_embd {}",
            cfg.n_head, cfg.head_size, cfg.n_embd
        )));
    }
    Ok(())
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Buffers are freed on the compute stream; the copy stream may still be using the pool
        // or a pinned buffer, so let both finish first. Errors here have nowhere to go, and
        // none may stop the waits: an error cudarc stored from an earlier failed free would
        // make `synchronize` return before waiting on either stream, so it is taken first
        // and each stream is waited on whatever the other's result.
        let _ = self.dev.ctx.check_err();
        let _ = self.dev.bind();
        let _ = self.dev.compute.synchronize();
        let _ = self.dev.copy.synchronize();
    }
}

impl CudaBackend {
    /// The steps as the device runs them: `Top` rows asking for more candidates than the
    /// device ranks become full rows, picked on the host by [`take_candidates`].
    pub(crate) fn device_steps<'s, 'a>(steps: &'s [SeqStep<'a>]) -> Cow<'s, [SeqStep<'a>]> {
        let on_device = steps.iter().all(|s| match s.output {
            OutputRows::Top(k) => k <= MAX_DEVICE_CANDIDATES,
            _ => true,
        });
        if on_device {
            Cow::Borrowed(steps)
        } else {
            Cow::Owned(tops_as_last(steps))
        }
    }

    /// Values of logits a step downloads here (none on a rank without the head).
    fn logits_len(&self, plan: &BatchPlan) -> usize {
        if self.part.head {
            plan.head_rows.len() * self.cfg.vocab_size
        } else {
            0
        }
    }

    /// Grows the scratch and staging buffers for a step of `steps` (validated, as the device
    /// runs them). Everything that can fail on this device alone happens here, before a rank
    /// of a tensor-parallel group enters the collective.
    pub(crate) fn prepare_step(&mut self, steps: &[SeqStep<'_>]) -> Result<BatchPlan> {
        self.dev.bind()?;
        let plan = BatchPlan::new(steps)?;
        if plan.rows() > 0 {
            // At least one value: a step of greedy decodes alone downloads no rows, and a
            // pinned buffer of zero bytes is not a buffer.
            let len = self.logits_len(&plan);
            pinned_at_least(&self.dev, &mut self.logits_host, len.max(1))?;
            let split = self.options.precision.split();
            self.ws.bufs(&self.dev, &self.cfg, split, plan.rows())?;
        }
        Ok(plan)
    }

    /// Runs a step prepared by [`CudaBackend::prepare_step`].
    pub(crate) fn run_prepared(&mut self, plan: &BatchPlan) -> Result<Logits> {
        self.dev.bind()?;
        let vocab = self.cfg.vocab_size;
        if plan.rows() == 0 {
            return Ok(Logits {
                vocab,
                ..Logits::default()
            });
        }
        let len = self.logits_len(plan);
        let staging = pinned_at_least(&self.dev, &mut self.logits_host, len.max(1))?;
        self.pool.before_compute(&self.dev, plan.slots())?;
        let split = self.options.precision.split();
        let bufs = self.ws.bufs(&self.dev, &self.cfg, split, plan.rows())?;
        let exec = CudaExec {
            dev: &self.dev,
            kernels: &self.kernels,
            comm: self.comm.as_ref(),
        };
        let step = Step {
            exec: &exec,
            cfg: &self.cfg,
            weights: &self.views,
            pool: self.pool.arg(&self.dev),
            layout: self.pool.layout,
            bufs,
            precision: self.options.precision,
            part: self.part,
        };
        // Record the slots' compute event even when the step failed part-way, so a later
        // swap still waits for whatever was issued. The step synchronizes before returning,
        // so the staging buffer holds the finished logits.
        let mut top = Vec::with_capacity(plan.top_k.iter().sum());
        let mut nucleus = Vec::new();
        let logits = &mut staging.as_mut_slice()?[..len];
        let policy = GraphPolicy {
            enabled: self.options.graphs,
            max_rows: GRAPH_MAX_ROWS,
        };
        let generation = self.ws.generation();
        let graphs = &mut self.graphs;
        let ran = (|| {
            if !step.upload(plan, logits.len())? {
                return Ok(());
            }
            graph::run_body(
                graphs,
                policy,
                generation,
                &StreamRecorder(&self.dev),
                &step,
                plan,
            )?;
            step.finish(plan, logits, &mut top, &mut nucleus)
        })();
        let recorded = self.pool.after_compute(&self.dev, plan.slots());
        if ran.is_err() || recorded.is_err() {
            // The head may have queued copies into the pinned staging buffer before the
            // failure, and only `finish` waits for them: wait here, so the next step cannot
            // free or reuse that buffer under a copy still writing into it. (An error cudarc
            // stored earlier would end the wait before it starts: it is taken first.)
            let _ = self.dev.ctx.check_err();
            let _ = self.dev.compute.synchronize();
        }
        recorded?;
        ran?;
        let data = copy_out(&staging.as_slice()?[..len]);
        Ok(Logits {
            vocab,
            data,
            top,
            nucleus,
        })
    }

    /// The pool's slot `slot` as stored (a rank's part of the state).
    pub(crate) fn save_slot(&mut self, slot: usize) -> Result<Vec<f32>> {
        self.pool.layout.check_slot(slot)?;
        self.dev.bind()?;
        self.pool.save(&self.dev, slot)
    }

    /// Overwrites slot `slot` with values in the pool's layout.
    pub(crate) fn load_slot(&mut self, slot: usize, data: &[f32]) -> Result<()> {
        self.pool.layout.check_slot(slot)?;
        self.dev.bind()?;
        self.pool.load(&self.dev, slot, data)
    }
}

impl Backend for CudaBackend {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn name(&self) -> String {
        let suffix = self.options.precision.name_suffix();
        format!("cuda{suffix}:{}", self.dev.ordinal)
    }

    fn num_slots(&self) -> usize {
        self.pool.layout.slots
    }

    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Logits, BackendError> {
        validate_steps(&self.cfg, self.pool.layout.slots, steps)?;
        let device_steps = Self::device_steps(steps);
        let ran = self
            .prepare_step(&device_steps)
            .and_then(|plan| self.run_prepared(&plan));
        let logits = self.watch(ran)?;
        Ok(finish_candidates(steps, device_steps, logits))
    }

    fn load_state(&mut self, slot: usize, state: &State) -> Result<(), BackendError> {
        check_state(&self.cfg, state)?;
        let loaded = self.load_slot(slot, state.as_flat());
        self.watch(loaded)
    }

    fn save_state(&mut self, slot: usize) -> Result<State, BackendError> {
        let saved = self.save_slot(slot);
        let data = self.watch(saved)?;
        State::from_flat(&self.cfg, data).map_err(|e| BackendError::State(e.to_string()))
    }

    fn reset_state(&mut self, slot: usize) -> Result<(), BackendError> {
        self.pool.layout.check_slot(slot)?;
        let reset = self
            .dev
            .bind()
            .and_then(|()| self.pool.fill(&self.dev, slot, &self.initial));
        self.watch(reset)
    }

    fn copy_state(&mut self, src: usize, dst: usize) -> Result<(), BackendError> {
        let copied = self
            .dev
            .bind()
            .and_then(|()| self.pool.copy(&self.dev, src, dst));
        self.watch(copied)
    }

    fn decides_nucleus(&self) -> bool {
        true
    }

    fn broken(&self) -> Option<String> {
        self.broken.clone()
    }
}

impl CudaBackend {
    /// Passes a result on, remembering an error after which the device is unusable, so the
    /// engine stops taking work ([`Backend::broken`]) instead of failing every step alike.
    fn watch<T>(&mut self, result: Result<T>) -> Result<T, BackendError> {
        if let Err(e) = &result {
            if is_sticky(e) && self.broken.is_none() {
                let why = format!("{} on {}: {e}", self.name(), self.dev.name);
                tracing::error!(error = %why, "the GPU is unusable until the process restarts");
                self.broken = Some(why);
            }
        }
        Ok(result?)
    }
}

/// Driver errors after which the CUDA context is corrupt for the rest of the process (the
/// "sticky" errors of the CUDA programming guide: a faulting kernel, an uncorrectable ECC error):
/// every later call fails the same way.
pub(crate) fn is_sticky(e: &CudaError) -> bool {
    use cudarc::driver::sys::CUresult as R;
    match e {
        CudaError::Driver { source, .. } => matches!(
            source.0,
            R::CUDA_ERROR_ILLEGAL_ADDRESS
                | R::CUDA_ERROR_LAUNCH_FAILED
                | R::CUDA_ERROR_ECC_UNCORRECTABLE
                | R::CUDA_ERROR_ASSERT
                | R::CUDA_ERROR_HARDWARE_STACK_ERROR
                | R::CUDA_ERROR_ILLEGAL_INSTRUCTION
                | R::CUDA_ERROR_MISALIGNED_ADDRESS
                | R::CUDA_ERROR_INVALID_ADDRESS_SPACE
                | R::CUDA_ERROR_INVALID_PC
        ),
        _ => false,
    }
}

/// The logits `steps` asked for, from a step run as `device_steps` (from
/// [`CudaBackend::device_steps`]): when some `Top` rows were run as full rows, their candidates
/// are picked from those rows here.
pub(crate) fn finish_candidates(
    steps: &[SeqStep<'_>],
    device_steps: Cow<'_, [SeqStep<'_>]>,
    logits: Logits,
) -> Logits {
    match device_steps {
        Cow::Borrowed(_) => logits,
        Cow::Owned(_) => take_candidates(steps, logits),
    }
}

/// The pinned buffer in `slot`, replaced by a larger one when it holds fewer than `len` values.
fn pinned_at_least<'a>(
    dev: &Device,
    slot: &'a mut Option<HostState>,
    len: usize,
) -> Result<&'a mut HostState> {
    if slot.as_ref().is_none_or(|h| h.len() < len) {
        // Free the old buffer first: pinned memory is a scarce resource.
        *slot = None;
        *slot = Some(HostState::alloc(dev, len)?);
    }
    slot.as_mut()
        .ok_or_else(|| CudaError::shape("forward", "logits staging buffer"))
}

/// Copies the logits out of the staging buffer into an owned vector. Large batches copy on
/// several threads: a 256-row batch is 64 MiB, and one core's copy (with the page faults of
/// the fresh vector) would take longer than the step's GPU work.
fn copy_out(src: &[f32]) -> Vec<f32> {
    const PER_THREAD: usize = 1 << 20;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(src.len() / PER_THREAD);
    if threads <= 1 {
        return src.to_vec();
    }
    let mut out = vec![0.0f32; src.len()];
    let chunk = src.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (dst, src) in out.chunks_mut(chunk).zip(src.chunks(chunk)) {
            s.spawn(move || dst.copy_from_slice(src));
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_that_corrupt_the_context_break_the_backend() {
        use cudarc::driver::result::DriverError;
        use cudarc::driver::sys::CUresult as R;
        let driver = |code| CudaError::Driver {
            op: "forward",
            source: DriverError(code),
        };
        assert!(is_sticky(&driver(R::CUDA_ERROR_ILLEGAL_ADDRESS)));
        assert!(is_sticky(&driver(R::CUDA_ERROR_ECC_UNCORRECTABLE)));
        // Out of memory, a bad argument or a shape error leave the device usable.
        assert!(!is_sticky(&driver(R::CUDA_ERROR_OUT_OF_MEMORY)));
        assert!(!is_sticky(&driver(R::CUDA_ERROR_INVALID_VALUE)));
        assert!(!is_sticky(&CudaError::shape("forward", "rows")));
    }

    #[test]
    fn unsupported_head_sizes_are_rejected_before_touching_a_device() {
        let mut cfg = ModelConfig {
            n_embd: 512,
            n_layer: 1,
            n_head: 2,
            head_size: 256,
            dim_ffn: 64,
            vocab_size: 10,
            maa_lora: 4,
            decay_lora: 4,
            weight_dtype: rwkv_model::DType::BF16,
            has_time_state: false,
        };
        assert!(matches!(check_model(&cfg), Err(CudaError::Unsupported(_))));
        cfg.head_size = 64;
        cfg.n_head = 8;
        assert!(check_model(&cfg).is_ok());
    }
}
