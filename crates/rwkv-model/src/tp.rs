//! A tensor-parallel [`Backend`] assembled from ranks.
//!
//! Each [`Rank`] holds one [`ShardPlan`]'s part of the weights and of every state slot, and runs
//! its part of a step, meeting the other ranks in its collective (an all-reduce after
//! `att.output` and after `ffn.value`). [`TpBackend`] drives the ranks on one thread each, so
//! their collective calls can meet, and turns full states into rank parts and back. The ranks
//! are the device-specific part (CUDA devices over NCCL, the kernel emulator in tests); this
//! module is the orchestration they share.
//!
//! A step runs in two rounds: every rank first [`prepare`](Rank::prepare)s (validates the plan,
//! grows its buffers), and only when all succeeded do they [`forward`](Rank::forward).
//! Preparation is where a rank can fail on its own (out of memory), so it is done before any
//! rank communicates, and such a step is refused with the group intact. A rank that fails later,
//! in the middle of the step (a device fault), would leave its peers waiting in a collective
//! forever: it aborts the group ([`GroupAbort`]), so they fail at once, and the backend refuses
//! every later step (the states are lost; the worker must be restarted).

use std::sync::{Arc, Mutex};

use crate::backend::{check_slot, check_state, validate_steps};
use crate::config::ModelConfig;
use crate::{Backend, BackendError, GroupAbort, Logits, SeqStep, ShardError, ShardPlan, State};

/// One rank of a tensor-parallel group. Its slots hold the rank's part of each state, laid out
/// as [`ShardPlan::state_part`] describes.
pub trait Rank: Send {
    fn plan(&self) -> &ShardPlan;

    /// Number of state slots.
    fn num_slots(&self) -> usize;

    /// Everything before the first collective call that can fail on this rank alone (buffers
    /// for `steps`). The steps were validated by the caller.
    fn prepare(&mut self, steps: &[SeqStep<'_>]) -> Result<(), BackendError>;

    /// Runs a prepared step; the rank that computes the head (rank 0) returns the logits, the
    /// others `None`.
    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Option<Logits>, BackendError>;

    /// Sets slot `slot` to a part produced by [`ShardPlan::state_part`].
    fn load_part(&mut self, slot: usize, part: &[f32]) -> Result<(), BackendError>;

    /// The rank's part of slot `slot`.
    fn save_part(&mut self, slot: usize) -> Result<Vec<f32>, BackendError>;

    /// Sets slot `slot` to the model's initial state.
    fn reset_slot(&mut self, slot: usize) -> Result<(), BackendError>;

    /// Copies slot `src` into slot `dst`.
    fn copy_slot(&mut self, src: usize, dst: usize) -> Result<(), BackendError>;

    /// [`Backend::decides_nucleus`] of the head rank.
    fn decides_nucleus(&self) -> bool {
        false
    }
}

/// The model sharded over `world` ranks, as one [`Backend`].
pub struct TpBackend<R> {
    config: ModelConfig,
    ranks: Vec<R>,
    name: String,
    /// Aborts the ranks' collectives.
    abort: Arc<dyn GroupAbort>,
    /// Why the group was aborted, once it was: every later call fails with it.
    failed: Mutex<Option<String>>,
}

impl<R: Rank> TpBackend<R> {
    /// Groups `ranks`, which must be ranks `0..world` of one world over `config`, in order, with
    /// the same number of slots; `abort` ends their collectives.
    pub fn new(
        config: ModelConfig,
        ranks: Vec<R>,
        name: String,
        abort: Arc<dyn GroupAbort>,
    ) -> Result<Self, BackendError> {
        let world = ranks.len();
        let bad = |why: String| BackendError::Device(format!("tensor-parallel group: {why}"));
        ShardPlan::validate(&config, world).map_err(|e: ShardError| bad(e.to_string()))?;
        for (i, r) in ranks.iter().enumerate() {
            let plan = ShardPlan::new(&config, i, world).map_err(|e| bad(e.to_string()))?;
            if r.plan() != &plan {
                return Err(bad(format!("rank {i} holds the shard of {:?}", r.plan())));
            }
            if r.num_slots() != ranks[0].num_slots() {
                return Err(bad(format!(
                    "rank {i} has {} slots, rank 0 has {}",
                    r.num_slots(),
                    ranks[0].num_slots()
                )));
            }
        }
        Ok(Self {
            config,
            ranks,
            name,
            abort,
            failed: Mutex::new(None),
        })
    }

    /// The error of an aborted group, if it was.
    fn check_alive(&self) -> Result<(), BackendError> {
        match &*self.failed.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Err(BackendError::Device(format!(
                "tensor-parallel group stopped after a rank failed ({why}); restart the worker"
            ))),
            None => Ok(()),
        }
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.ranks.len()
    }

    /// The ranks, in rank order (to set per-step options of a rank type).
    pub fn ranks_mut(&mut self) -> &mut [R] {
        &mut self.ranks
    }
}

/// Runs its closure when dropped, which happens only while the thread unwinds: on the normal
/// path it is forgotten.
struct OnPanic<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnPanic<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Runs `f` on every rank, each on its own thread (so their collective calls can meet), and
/// returns the results in rank order, or the first rank's error.
fn on_all<R: Send, T: Send>(
    ranks: &mut [R],
    f: impl Fn(usize, &mut R) -> Result<T, BackendError> + Sync,
) -> Result<Vec<T>, BackendError> {
    if let [only] = ranks {
        return Ok(vec![f(0, only)?]);
    }
    let f = &f;
    let results: Vec<Result<T, BackendError>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter_mut()
            .enumerate()
            .map(|(i, r)| s.spawn(move || f(i, r)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    results.into_iter().collect()
}

impl<R: Rank> Backend for TpBackend<R> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn num_slots(&self) -> usize {
        self.ranks[0].num_slots()
    }

    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Logits, BackendError> {
        self.check_alive()?;
        validate_steps(&self.config, self.num_slots(), steps)?;
        on_all(&mut self.ranks, |_, r| r.prepare(steps))?;
        // The first rank to fail mid-step (an error, or a panic) aborts the group, releasing
        // the others.
        let (abort, failed) = (&*self.abort, &self.failed);
        let outs = on_all(&mut self.ranks, |i, r| {
            let fail = |why: String| {
                failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(why);
                abort.abort();
            };
            let guard = OnPanic(|| fail(format!("rank {i} panicked")));
            let out = r.forward(steps);
            std::mem::forget(guard);
            out.inspect_err(|e| fail(format!("rank {i}: {e}")))
        });
        // Report the rank that failed first, not a peer that the abort released.
        let mut outs = outs.map_err(|e| self.check_alive().err().unwrap_or(e))?;
        outs.swap_remove(0).ok_or_else(|| {
            BackendError::Device("tensor parallel: rank 0 returned no logits".into())
        })
    }

    fn load_state(&mut self, slot: usize, state: &State) -> Result<(), BackendError> {
        self.check_alive()?;
        check_slot(slot, self.num_slots())?;
        check_state(&self.config, state)?;
        on_all(&mut self.ranks, |_, r| {
            let part = r.plan().state_part(state);
            r.load_part(slot, &part)
        })?;
        Ok(())
    }

    fn save_state(&mut self, slot: usize) -> Result<State, BackendError> {
        self.check_alive()?;
        check_slot(slot, self.num_slots())?;
        let parts = on_all(&mut self.ranks, |_, r| r.save_part(slot))?;
        let mut state = State::zeros(&self.config);
        for (r, part) in self.ranks.iter().zip(&parts) {
            r.plan()
                .write_state_part(part, &mut state)
                .map_err(|e| BackendError::State(e.to_string()))?;
        }
        Ok(state)
    }

    fn reset_state(&mut self, slot: usize) -> Result<(), BackendError> {
        self.check_alive()?;
        check_slot(slot, self.num_slots())?;
        on_all(&mut self.ranks, |_, r| r.reset_slot(slot))?;
        Ok(())
    }

    fn copy_state(&mut self, src: usize, dst: usize) -> Result<(), BackendError> {
        self.check_alive()?;
        check_slot(src, self.num_slots())?;
        check_slot(dst, self.num_slots())?;
        if src != dst {
            on_all(&mut self.ranks, |_, r| r.copy_slot(src, dst))?;
        }
        Ok(())
    }

    fn decides_nucleus(&self) -> bool {
        self.ranks[0].decides_nucleus()
    }

    fn broken(&self) -> Option<String> {
        self.check_alive().err().map(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::backend::OutputRows;
    use crate::tensor::DType;
    use crate::{Collective, InProcessCollective};

    fn cfg() -> ModelConfig {
        ModelConfig {
            n_embd: 16,
            n_layer: 1,
            n_head: 2,
            head_size: 8,
            dim_ffn: 8,
            vocab_size: 4,
            maa_lora: 2,
            decay_lora: 2,
            weight_dtype: DType::F32,
            has_time_state: false,
        }
    }

    /// How a fake rank's step goes.
    #[derive(Clone, Copy, PartialEq)]
    enum Fault {
        None,
        Error,
        Panic,
    }

    /// Meets its peers in one all-reduce per step, unless its fault strikes first.
    struct FakeRank {
        plan: ShardPlan,
        comm: InProcessCollective,
        fault: Fault,
    }

    impl Rank for FakeRank {
        fn plan(&self) -> &ShardPlan {
            &self.plan
        }
        fn num_slots(&self) -> usize {
            1
        }
        fn prepare(&mut self, _: &[SeqStep<'_>]) -> Result<(), BackendError> {
            Ok(())
        }
        fn forward(&mut self, _: &[SeqStep<'_>]) -> Result<Option<Logits>, BackendError> {
            match self.fault {
                Fault::Error => return Err(BackendError::Device("device lost".into())),
                Fault::Panic => panic!("rank fell over"),
                Fault::None => {}
            }
            let mut x = [1.0f32];
            self.comm
                .all_reduce_sum(&mut x)
                .map_err(|e| BackendError::Device(e.to_string()))?;
            Ok((self.plan.rank == 0).then(|| Logits {
                vocab: 4,
                data: vec![x[0]; 4],
                ..Logits::default()
            }))
        }
        fn load_part(&mut self, _: usize, _: &[f32]) -> Result<(), BackendError> {
            Ok(())
        }
        fn save_part(&mut self, _: usize) -> Result<Vec<f32>, BackendError> {
            Ok(vec![0.0; self.plan.state_part_len(1)])
        }
        fn reset_slot(&mut self, _: usize) -> Result<(), BackendError> {
            Ok(())
        }
        fn copy_slot(&mut self, _: usize, _: usize) -> Result<(), BackendError> {
            Ok(())
        }
    }

    fn group(faults: &[Fault]) -> TpBackend<FakeRank> {
        let comms = InProcessCollective::group(faults.len());
        let abort = comms[0].aborter();
        let ranks = comms
            .into_iter()
            .zip(faults)
            .enumerate()
            .map(|(i, (comm, &fault))| FakeRank {
                plan: ShardPlan::new(&cfg(), i, faults.len()).unwrap(),
                comm,
                fault,
            })
            .collect();
        TpBackend::new(cfg(), ranks, "fake".into(), abort).unwrap()
    }

    /// One step of `tp` on another thread; `None` if it hangs.
    fn step_within_a_minute(
        mut tp: TpBackend<FakeRank>,
    ) -> Option<(Result<Logits, BackendError>, TpBackend<FakeRank>)> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let toks = [1u32];
            let step = [SeqStep {
                slot: 0,
                tokens: &toks,
                output: OutputRows::Last,
            }];
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tp.forward(&step)));
            let out = out.unwrap_or_else(|_| Err(BackendError::Device("panicked".into())));
            let _ = tx.send((out, tp));
        });
        rx.recv_timeout(Duration::from_secs(60)).ok()
    }

    #[test]
    fn healthy_ranks_sum_and_rank_zero_answers() {
        let (out, _) = step_within_a_minute(group(&[Fault::None, Fault::None])).unwrap();
        assert_eq!(out.unwrap().data, [2.0; 4]);
    }

    #[test]
    fn a_failing_or_panicking_rank_aborts_its_peers_and_the_group_stays_down() {
        for fault in [Fault::Error, Fault::Panic] {
            let tp = group(&[Fault::None, fault]);
            let (out, mut tp) = step_within_a_minute(tp).expect("the step hung");
            assert!(out.is_err());
            let later = tp.save_state(0).unwrap_err().to_string();
            assert!(
                later.contains("rank 1") && later.contains("restart"),
                "{later}"
            );
            if fault == Fault::Error {
                assert!(later.contains("device lost"), "{later}");
            }
        }
    }

    #[test]
    fn ranks_must_be_one_world_in_order() {
        let comms = InProcessCollective::group(2);
        let abort = comms[0].aborter();
        let mut ranks: Vec<FakeRank> = comms
            .into_iter()
            .enumerate()
            .map(|(i, comm)| FakeRank {
                plan: ShardPlan::new(&cfg(), i, 2).unwrap(),
                comm,
                fault: Fault::None,
            })
            .collect();
        ranks.swap(0, 1);
        let err = TpBackend::new(cfg(), ranks, "fake".into(), abort)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("rank 0 holds the shard"), "{err}");
    }
}
