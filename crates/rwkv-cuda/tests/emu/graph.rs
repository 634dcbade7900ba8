//! CUDA-graph replay, emulated, through the backend's own `graph::run_body`: a decode body is
//! recorded once per batch size, the second time that size is seen (nothing runs while
//! recording, as in a stream capture), and replayed for later steps of the same shape with
//! other slots, tokens and outputs. Logits, candidates and every state must equal launching the
//! same steps one kernel at a time, bit for bit. This checks the two facts CUDA graphs rely on:
//! the body issues device work only, and its launch arguments depend on the plan's shape alone.

use super::graph_script::{graph_script, ScriptTokens};
use super::model::{fixture, tokens};
use super::*;
use rwkv_cuda::graph::{run_body, GraphCache, GraphPolicy, Recorder, GRAPH_MAX_ROWS};

/// One captured operation.
enum Op {
    Launch(&'static str, LaunchConfig, Vec<Arg>),
    Gemm(GemmSpec, BatchStrides, Bf16Buf, Bf16Buf, F32Buf),
}

/// The operations issued while a capture is open (`Some`).
type Tape = Arc<Mutex<Option<Vec<Op>>>>;

struct RecLauncher {
    inner: EmuLauncher,
    tape: Tape,
}

impl Launcher for RecLauncher {
    fn launch(&self, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> rwkv_cuda::Result<()> {
        if let Some(ops) = self.tape.lock().unwrap().as_mut() {
            ops.push(Op::Launch(name, cfg, args.to_vec()));
            return Ok(());
        }
        self.inner.launch(name, cfg, args)
    }
}

/// The host machine, with a capture mode like a CUDA stream's: launches and GEMMs are
/// recorded instead of run, and a copy or a wait is an error (a capture would fail on it).
struct RecExec {
    host: HostExec,
    replayer: EmuLauncher,
    tape: Tape,
}

impl RecExec {
    fn capturing(&self) -> bool {
        self.tape.lock().unwrap().is_some()
    }

    fn no_host_work(&self, what: &str) {
        assert!(!self.capturing(), "{what} inside a captured body");
    }

    fn capture(
        &self,
        body: &mut dyn FnMut() -> rwkv_cuda::Result<()>,
    ) -> rwkv_cuda::Result<Vec<Op>> {
        *self.tape.lock().unwrap() = Some(Vec::new());
        let issued = body();
        let ops = self.tape.lock().unwrap().take().unwrap();
        issued.map(|()| ops)
    }

    fn replay(&self, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Launch(name, cfg, args) => self.replayer.launch(name, *cfg, args).unwrap(),
                Op::Gemm(spec, strides, w, x, y) => {
                    self.host.gemm(spec, strides, *w, *x, *y).unwrap()
                }
            }
        }
    }
}

impl Exec for RecExec {
    fn kernels(&self) -> &Kernels {
        &self.host.kernels
    }

    fn gemm(
        &self,
        spec: &GemmSpec,
        strides: &BatchStrides,
        w: Bf16Buf,
        x: Bf16Buf,
        y: F32Buf,
    ) -> rwkv_cuda::Result<()> {
        if let Some(ops) = self.tape.lock().unwrap().as_mut() {
            ops.push(Op::Gemm(*spec, *strides, w, x, y));
            return Ok(());
        }
        self.host.gemm(spec, strides, w, x, y)
    }

    fn upload_u32(&self, src: &[u32], dst: DevBuf<u32>) -> rwkv_cuda::Result<()> {
        self.no_host_work("an upload");
        self.host.upload_u32(src, dst)
    }

    fn upload_i32(&self, src: &[i32], dst: I32Buf) -> rwkv_cuda::Result<()> {
        self.no_host_work("an upload");
        self.host.upload_i32(src, dst)
    }

    fn download_f32(&self, src: F32Buf, dst: &mut [f32]) -> rwkv_cuda::Result<()> {
        self.no_host_work("a download");
        self.host.download_f32(src, dst)
    }

    fn download_i32(&self, src: I32Buf, dst: &mut [i32]) -> rwkv_cuda::Result<()> {
        self.no_host_work("a download");
        self.host.download_i32(src, dst)
    }

    fn synchronize(&self) -> rwkv_cuda::Result<()> {
        self.no_host_work("a wait for the device");
        Ok(())
    }
}

/// The emulator's stand-in for a stream capture, optionally failing like a driver without graph
/// support.
struct TapeRecorder<'a> {
    exec: &'a RecExec,
    captures: &'a std::cell::Cell<usize>,
    fail: bool,
}

impl Recorder for TapeRecorder<'_> {
    type Graph = Vec<Op>;

    fn capture(
        &self,
        issue: &mut dyn FnMut() -> rwkv_cuda::Result<()>,
    ) -> rwkv_cuda::Result<Vec<Op>> {
        if self.fail {
            return Err(rwkv_cuda::CudaError::Unsupported(
                "emulated: this driver cannot capture".into(),
            ));
        }
        self.captures.set(self.captures.get() + 1);
        self.exec.capture(issue)
    }

    fn launch(&self, ops: &Vec<Op>) -> rwkv_cuda::Result<()> {
        self.exec.replay(ops);
        Ok(())
    }
}

struct GraphModel {
    cfg: ModelConfig,
    _weights: Weights<Vec<f32>, Vec<u16>>,
    views: WeightViews,
    pool: Vec<f32>,
    layout: PoolLayout,
    exec: RecExec,
    bufs: StepBufs,
    _scratch: Scratch,
    /// Recorded bodies (None: every step runs launch by launch).
    graphs: Option<GraphCache<Vec<Op>>>,
    captures: std::cell::Cell<usize>,
    /// Every capture fails (a driver without graph support).
    fail_captures: bool,
}

const CAPACITY: usize = 16;

impl GraphModel {
    fn new(e: &Arc<Emu>, w: &ModelWeights, slots: usize, graphs: bool) -> Self {
        let cfg = w.config.clone();
        let host =
            weights::convert(w, None, &mut |v| Ok(v.clone()), &mut |v| Ok(v.clone())).unwrap();
        let views = weights::host_views(&host);
        let layout = PoolLayout::new(&cfg, slots);
        let tape = Tape::default();
        let launcher = RecLauncher {
            inner: EmuLauncher(e.clone()),
            tape: tape.clone(),
        };
        let exec = RecExec {
            host: HostExec {
                kernels: Kernels::with_launcher(Box::new(launcher), cfg.head_size),
                comm: None,
                fail_after_reduces: None,
                reduces: Default::default(),
            },
            replayer: EmuLauncher(e.clone()),
            tape,
        };
        let mut scratch = Scratch::new(&ScratchSizes::new(&cfg, true, CAPACITY));
        Self {
            pool: w.initial_state().as_flat().repeat(slots),
            bufs: scratch.bufs(CAPACITY),
            _scratch: scratch,
            cfg,
            _weights: host,
            views,
            layout,
            exec,
            graphs: graphs.then(GraphCache::default),
            captures: Default::default(),
            fail_captures: false,
        }
    }

    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Logits {
        validate_steps(&self.cfg, self.layout.slots, steps).unwrap();
        let plan = BatchPlan::new(steps).unwrap();
        let mut logits = vec![0.0; plan.head_rows.len() * self.cfg.vocab_size];
        let step = Step {
            exec: &self.exec,
            cfg: &self.cfg,
            weights: &self.views,
            pool: PoolArg {
                buf: view_mut(&mut self.pool),
                stride: self.layout.state_len(),
                slots: self.layout.slots,
            },
            layout: self.layout,
            bufs: self.bufs,
            precision: GemmPrecision::Split,
            part: Part::whole(&self.cfg),
        };
        let (mut top, mut nucleus) = (Vec::new(), Vec::new());
        match &mut self.graphs {
            // The backend's own sequence (`CudaBackend::run_prepared`), with the recorder
            // standing in for the stream.
            Some(graphs) => {
                let recorder = TapeRecorder {
                    exec: &self.exec,
                    captures: &self.captures,
                    fail: self.fail_captures,
                };
                let policy = GraphPolicy {
                    enabled: true,
                    max_rows: GRAPH_MAX_ROWS,
                };
                assert!(step.upload(&plan, logits.len()).unwrap());
                run_body(graphs, policy, 0, &recorder, &step, &plan).unwrap();
                step.finish(&plan, &mut logits, &mut top, &mut nucleus)
                    .unwrap();
            }
            None => step
                .run(&plan, &mut logits, &mut top, &mut nucleus)
                .unwrap(),
        }
        Logits {
            vocab: self.cfg.vocab_size,
            data: logits,
            top,
            nucleus,
        }
    }
}

/// Runs the same script of prefills and decodes through an eager model and one that replays
/// graphs (captures failing when `fail_captures`), checks every step's outputs and states are
/// equal bit for bit, and returns the replaying model. None without g++.
fn replay_script(fail_captures: bool) -> Option<GraphModel> {
    let w = ModelWeights::load(fixture("rwkv6-tiny-c128-l2.safetensors")).unwrap();
    let e = emu(w.config.head_size)?;
    let v = w.config.vocab_size;
    let mut eager = GraphModel::new(&e, &w, 6, false);
    let mut replay = GraphModel::new(&e, &w, 6, true);
    replay.fail_captures = fail_captures;
    let toks = ScriptTokens::new(|n, seed| tokens(v, n, seed));
    let script = graph_script(&toks);
    for (i, steps) in script.iter().enumerate() {
        let want = eager.forward(steps);
        let got = replay.forward(steps);
        assert!(
            got.data == want.data,
            "step {i}: logits differ by up to {}",
            max_abs(&got.data, &want.data)
        );
        assert_eq!(got.top, want.top, "step {i}: candidates");
        assert!(got.data.iter().all(|x| x.is_finite()), "step {i}");
        assert!(
            got.data.len() + got.top.len() > 0,
            "step {i} returns something"
        );
        assert!(
            replay.pool == eager.pool,
            "step {i}: states differ by up to {}",
            max_abs(&replay.pool, &eager.pool)
        );
    }
    Some(replay)
}

#[test]
fn replayed_decode_bodies_equal_eager_steps_bit_for_bit() {
    let Some(replay) = replay_script(false) else {
        return;
    };
    // Captured once per shape, at its second step: three rows, one row, two rows.
    assert_eq!(replay.captures.get(), 3);
    let graphs = replay.graphs.as_ref().unwrap();
    assert_eq!((graphs.len(), graphs.disabled()), (3, None));
}

#[test]
fn a_driver_that_cannot_capture_gets_eager_steps_and_graphs_turned_off() {
    let Some(replay) = replay_script(true) else {
        return;
    };
    assert_eq!(replay.captures.get(), 0);
    let graphs = replay.graphs.as_ref().unwrap();
    assert!(graphs.is_empty());
    let why = graphs.disabled().expect("graphs turned off");
    assert!(why.contains("cannot capture"), "{why}");
}
