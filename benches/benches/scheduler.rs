//! The engine's own cost per step at batch 64, apart from the model: what continuous batching
//! adds to every decode step.
//!
//! - `scheduler_step/*`: [`Scheduler::plan`] plus the bookkeeping the engine does with it each
//!   step (admission, one `on_token` per decode), for 64 decoding sequences alone and with 8
//!   long prompts being prefilled in chunks alongside.
//! - `engine_step/*`: a whole [`Engine`] serving 64 concurrent generations (greedy, and with
//!   the reference's default top-p sampling) on a backend
//!   that does no model work, shaped like the 0.2B benchmark model (C=768, L=12, V=65536). The
//!   backend logs when each forward call starts and ends; the time reported per step is the gap
//!   between two forward calls, i.e. everything the engine does that is not the backend:
//!   sampling 64 rows of 65536 logits, penalties, scheduling, event sends and retirement.
//!
//! `cargo bench -p rwkv-benches --bench scheduler` (add `-- --quick` for a short run).

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use rwkv_engine::{
    Engine, EngineConfig, GenerateRequest, SamplingParams, Scheduler, SchedulerConfig, SeqId,
};
use rwkv_model::{Backend, BackendError, DType, Logits, ModelConfig, SeqStep, State};

const BATCH: usize = 64;

/// The benchmark model's shape (`rwkv bench --make-model 768,12,65536`).
fn model_config() -> ModelConfig {
    ModelConfig {
        n_embd: 768,
        n_layer: 12,
        n_head: 12,
        head_size: 64,
        dim_ffn: 2688,
        vocab_size: 65536,
        maa_lora: 32,
        decay_lora: 64,
        weight_dtype: DType::BF16,
        has_time_state: false,
    }
}

/// A scheduler with `decodes` sequences decoding and `prefills` sequences in the middle of
/// prompts too long to ever finish during the bench.
fn busy_scheduler(decodes: usize, prefills: usize) -> Scheduler {
    let mut s = Scheduler::new(SchedulerConfig::default()).unwrap();
    let n = (decodes + prefills) as SeqId;
    for id in 0..n {
        s.enqueue(id).unwrap();
    }
    for id in s.admit(n as usize) {
        if (id as usize) < decodes {
            s.start(id, 0, 0);
            s.on_token(id);
        } else {
            s.start(id, 0, usize::MAX / 2);
        }
    }
    s
}

fn scheduler_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler_step");
    for (name, prefills) in [("decode64", 0), ("decode64_prefill8", 8)] {
        let mut s = busy_scheduler(BATCH, prefills);
        g.bench_function(name, |b| {
            b.iter(|| {
                // What the engine asks of the scheduler every step: admission (nobody waits),
                // the plan, and one sampled token per decode.
                black_box(s.admit(0));
                let plan = s.plan();
                for item in &plan {
                    if item.decode {
                        s.on_token(item.id);
                    }
                }
                black_box(plan.len())
            })
        });
    }
    g.finish();
}

/// One forward call: when it started and ended, and how many logit rows it returned.
type StepLog = Arc<Mutex<Vec<(Instant, Instant, usize)>>>;

/// A backend without a model: each requested row is a copy of one fixed logits row shaped like a
/// trained model's: a bulk of normally distributed logits (std 2) and 32 candidates well above
/// it, so that top-p 0.85 keeps about 8 tokens. The largest candidate is the last entry, so
/// greedy sampling scans the whole row (on real logits it stops on average half-way).
struct NoModel {
    config: ModelConfig,
    row: Vec<f32>,
    log: StepLog,
    /// Told once `steps` forward calls have run.
    done: (usize, Sender<()>),
}

impl NoModel {
    fn new(steps: usize, done: Sender<()>) -> (Self, StepLog) {
        let config = model_config();
        let vocab = config.vocab_size;
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut uniform = move || {
            // xorshift64*: plenty for a fixed test row.
            rng ^= rng >> 12;
            rng ^= rng << 25;
            rng ^= rng >> 27;
            (rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32
        };
        // Box-Muller, std 2.
        let mut row: Vec<f32> = (0..vocab)
            .map(|_| {
                let (u1, u2) = (uniform().max(1e-7), uniform());
                2.0 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect();
        // Candidates at 18, 17.75, ...: their mass dwarfs the bulk's (65536 · e^2 ≈ e^13).
        for i in 0..32 {
            let at = if i == 0 {
                vocab - 1
            } else {
                (i * 2039) % vocab
            };
            row[at] = 18.0 - 0.25 * i as f32;
        }
        let log = StepLog::default();
        let backend = Self {
            config,
            row,
            log: log.clone(),
            done: (steps, done),
        };
        (backend, log)
    }
}

impl Backend for NoModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn name(&self) -> String {
        "no-model".into()
    }

    fn num_slots(&self) -> usize {
        BATCH
    }

    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Logits, BackendError> {
        if self.log.lock().unwrap().is_empty() {
            // Lets every request of the batch arrive before the second step, so that the whole
            // batch decodes in lockstep from then on.
            std::thread::sleep(Duration::from_millis(50));
        }
        let start = Instant::now();
        // A real backend computes a greedy decode's candidates from its row, so this one
        // builds the rows and picks the candidates on the host, as the CPU backend does.
        let full_steps = rwkv_model::backend::tops_as_last(steps);
        let rows: usize = full_steps
            .iter()
            .map(|s| s.output.rows(s.tokens.len()))
            .sum();
        let mut data = Vec::with_capacity(rows * self.row.len());
        for _ in 0..rows {
            data.extend_from_slice(&self.row);
        }
        let mut log = self.log.lock().unwrap();
        log.push((start, Instant::now(), rows));
        if log.len() == self.done.0 {
            let _ = self.done.1.send(());
        }
        let full = Logits {
            vocab: self.config.vocab_size,
            data,
            ..Logits::default()
        };
        Ok(rwkv_model::backend::take_candidates(steps, full))
    }

    fn load_state(&mut self, _: usize, _: &State) -> Result<(), BackendError> {
        Ok(())
    }

    fn save_state(&mut self, _: usize) -> Result<State, BackendError> {
        Ok(State::zeros(&self.config))
    }

    fn reset_state(&mut self, _: usize) -> Result<(), BackendError> {
        Ok(())
    }

    fn copy_state(&mut self, _: usize, _: usize) -> Result<(), BackendError> {
        Ok(())
    }
}

/// Runs 64 greedy generations and returns the engine's time between forward calls over
/// `measured` steady decode steps. The first two steps, which prefill the prompts and save
/// their states to the prefix cache, are left out.
fn engine_overhead(measured: usize, sampling: &SamplingParams) -> Duration {
    let steps = measured + 3;
    let (done_tx, done_rx) = mpsc::channel();
    let (backend, log) = NoModel::new(steps, done_tx);
    let cfg = EngineConfig {
        prefix_cache_bytes: 256 << 20,
        ..EngineConfig::default()
    };
    let engine = Engine::start(backend, cfg).unwrap();
    let streams: Vec<_> = (0..BATCH as u32)
        .map(|i| {
            let req = GenerateRequest {
                tenant: "bench".into(),
                tokens: vec![i + 1],
                params: SamplingParams {
                    max_tokens: steps,
                    ..sampling.clone()
                },
                ..GenerateRequest::default()
            };
            engine.generate(req).unwrap()
        })
        .collect();
    // Waiting here rather than reading the streams keeps this thread off the CPU meanwhile.
    done_rx.recv().unwrap();
    drop(streams);
    engine.shutdown();
    let log = log.lock().unwrap();
    let window = &log[2..steps];
    assert!(
        window.iter().all(|&(_, _, rows)| rows == BATCH),
        "a measured step did not decode the whole batch"
    );
    window.windows(2).map(|w| w[1].0 - w[0].1).sum()
}

fn engine_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine_step");
    g.sample_size(10);
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    // The reference defaults: temperature 1, top-p 0.85, presence and frequency penalties.
    let nucleus = SamplingParams {
        seed: Some(1),
        ..SamplingParams::default()
    };
    for (name, sampling) in [("greedy", greedy), ("top_p_0.85", nucleus)] {
        g.bench_function(format!("no_model_64x65536_{name}"), |b| {
            b.iter_custom(|iters| engine_overhead(iters as usize, &sampling))
        });
    }
    g.finish();
}

criterion_group!(benches, scheduler_step, engine_step);
criterion_main!(benches);
