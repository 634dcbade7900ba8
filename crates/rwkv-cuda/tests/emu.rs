//! Runs the real kernel sources (`kernels/*.cu`, compiled as C++ against `tests/emu/emu.h`)
//! and the real forward-pass orchestration (`forward::Step`, with a host GEMM that follows
//! cuBLAS's column-major semantics) on the CPU, and compares them with plain host math and
//! with the CPU backend on the fixtures. No GPU needed; needs `g++` (C++20), else it skips.
//!
//! What this cannot see: the cudarc plumbing (allocation, copies, streams, events), cuBLAS
//! itself and real concurrency; the GPU tests cover those.

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::LaunchConfig;
use rwkv_cpu::CpuBackend;
use rwkv_cuda::compile::KERNEL_FILES;
use rwkv_cuda::forward::{Exec, GemmPrecision, Part, ScratchSizes, Step, StepBufs, ACT_BUFFERS};
use rwkv_cuda::gemm::{check_extents, BatchStrides, GemmSpec};
use rwkv_cuda::kernels::{Arg, Bf16Buf, DevBuf, F32Buf, I32Buf, Kernels, Launcher, PoolArg};
use rwkv_cuda::plan::BatchPlan;
use rwkv_cuda::pool::PoolLayout;
use rwkv_cuda::weights::{self, WeightViews, Weights};
use rwkv_model::backend::validate_steps;
use rwkv_model::{
    Backend, Candidate, Collective, InProcessCollective, Logits, ModelConfig, ModelWeights,
    OutputRows, SeqStep, ShardPlan,
};

type LaunchFn = unsafe extern "C" fn(*const c_char, u32, u32, *mut *mut c_void) -> c_int;
type HasFn = unsafe extern "C" fn(*const c_char) -> c_int;

/// The emulation library for one head size.
struct Emu {
    _lib: libloading::Library,
    launch: LaunchFn,
    has: HasFn,
}

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds (once per process and head size) and loads the emulation library, or `None` with a
/// message when there is no g++.
fn emu(head_size: usize) -> Option<Arc<Emu>> {
    type Libs = Mutex<Vec<(usize, Option<Arc<Emu>>)>>;
    static LIBS: OnceLock<Libs> = OnceLock::new();
    let libs = LIBS.get_or_init(|| Mutex::new(Vec::new()));
    let mut libs = libs.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, e)) = libs.iter().find(|(n, _)| *n == head_size) {
        return e.clone();
    }
    let built = build(head_size);
    libs.push((head_size, built.clone()));
    built
}

fn build(head_size: usize) -> Option<Arc<Emu>> {
    if Command::new("g++").arg("--version").output().is_err() {
        eprintln!("SKIPPED: g++ not found; the host emulation of the kernels needs a C++20 g++");
        return None;
    }
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("libemu-{}-{head_size}.so", std::process::id()));
    let status = Command::new("g++")
        .args([
            "-std=c++20",
            "-O2",
            "-fPIC",
            "-shared",
            "-fvisibility=hidden",
        ])
        .arg(format!("-DHEAD_SIZE={head_size}"))
        .arg(crate_dir().join("tests/emu/emu.cpp"))
        .arg("-o")
        .arg(&out)
        .status()
        .expect("run g++");
    assert!(status.success(), "g++ failed to build the kernel emulation");
    // SAFETY: the library was just built from our own sources; loading runs no initialisers
    // beyond the C++ runtime's.
    let lib = unsafe { libloading::Library::new(&out) }.expect("load emulation library");
    // SAFETY: the symbols are declared in tests/emu/emu.cpp with exactly these signatures.
    let (launch, has) = unsafe {
        (
            *lib.get::<LaunchFn>(b"emu_launch").unwrap(),
            *lib.get::<HasFn>(b"emu_has").unwrap(),
        )
    };
    Some(Arc::new(Emu {
        _lib: lib,
        launch,
        has,
    }))
}

static PROFILE: Mutex<std::collections::BTreeMap<&'static str, (u64, f64)>> =
    Mutex::new(std::collections::BTreeMap::new());

struct EmuLauncher(Arc<Emu>);

impl Launcher for EmuLauncher {
    fn launch(&self, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> rwkv_cuda::Result<()> {
        assert_eq!((cfg.grid_dim.1, cfg.grid_dim.2), (1, 1));
        assert_eq!((cfg.block_dim.1, cfg.block_dim.2), (1, 1));
        assert!(cfg.block_dim.0 <= 1024 && cfg.grid_dim.0 > 0);
        // Each value in the low bytes of its own 8-byte slot (little-endian), as cuLaunchKernel
        // expects: an array of pointers to the argument values.
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::P(p) => p,
                Arg::I(v) => u64::from(v as u32),
                Arg::L(v) => v as u64,
                Arg::F(v) => u64::from(v.to_bits()),
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| (s as *mut u64).cast::<c_void>())
            .collect();
        let cname = CString::new(name).unwrap();
        // One launch at a time across all loaded emulation libraries.
        static LAUNCH: Mutex<()> = Mutex::new(());
        let _one = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());
        let t0 = std::time::Instant::now();
        // SAFETY: the emulated kernel reads its arguments through these pointers, which live
        // until the call returns; buffer pointers are host memory sized by the wrappers' checks.
        let rc = unsafe {
            (self.0.launch)(
                cname.as_ptr(),
                cfg.grid_dim.0,
                cfg.block_dim.0,
                ptrs.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "emulator does not know kernel {name}");
        if std::env::var_os("EMU_PROFILE").is_some() {
            let mut p = PROFILE.lock().unwrap();
            let e = p.entry(name).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += t0.elapsed().as_secs_f64();
            eprintln!("PROFILE {name} {} {:.3}", e.0, e.1);
        }
        Ok(())
    }
}

/// A read-only buffer for the emulated kernels.
fn view<T>(v: &[T]) -> DevBuf<T> {
    DevBuf::new(v.as_ptr() as u64, v.len())
}

/// A buffer the emulated kernels write (the pointer comes from a unique borrow).
fn view_mut<T>(v: &mut [T]) -> DevBuf<T> {
    DevBuf::new(v.as_mut_ptr() as u64, v.len())
}

fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// The forward pass's machine, on the host: emulated kernels, a cuBLAS-semantics GEMM, and
/// for a tensor-parallel rank an in-process collective standing in for NCCL.
struct HostExec {
    kernels: Kernels,
    comm: Option<InProcessCollective>,
    /// Fails the all-reduce after this many succeeded (a device fault in the middle of a step).
    fail_after_reduces: Option<usize>,
    reduces: std::sync::atomic::AtomicUsize,
}

impl Exec for HostExec {
    fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    fn gemm(
        &self,
        spec: &GemmSpec,
        strides: &BatchStrides,
        w: Bf16Buf,
        x: Bf16Buf,
        y: F32Buf,
    ) -> rwkv_cuda::Result<()> {
        check_extents(spec, strides, w.len(), x.len(), y.len())?;
        let d = spec.dims()?;
        // SAFETY: the buffers are host vectors of these lengths (views made by this test).
        let (a, b, c) = unsafe {
            (
                std::slice::from_raw_parts(w.ptr() as *const u16, w.len()),
                std::slice::from_raw_parts(x.ptr() as *const u16, x.len()),
                std::slice::from_raw_parts_mut(y.ptr() as *mut f32, y.len()),
            )
        };
        let (m, n, k) = (d.m as usize, d.n as usize, d.k as usize);
        let (lda, ldb, ldc) = (d.lda as usize, d.ldb as usize, d.ldc as usize);
        for bt in 0..strides.count {
            let (a, b) = (&a[bt * strides.w..], &b[bt * strides.x..]);
            let c = &mut c[bt * strides.y..];
            // Column-major C[m, n] = op(A) · B, exactly as cublasGemmEx defines it. Summed in
            // f64 (each bf16 product is exact there): a serial f32 sum's rounding grows with K
            // and would hide the orchestration's own differences (a sharded K is split).
            for j in 0..n {
                for i in 0..m {
                    let mut s = 0.0f64;
                    for p in 0..k {
                        let aip = if d.transa {
                            a[i * lda + p]
                        } else {
                            a[p * lda + i]
                        };
                        s += f64::from(bf16_to_f32(aip)) * f64::from(bf16_to_f32(b[j * ldb + p]));
                    }
                    c[j * ldc + i] = s as f32;
                }
            }
        }
        Ok(())
    }

    fn upload_u32(&self, src: &[u32], dst: DevBuf<u32>) -> rwkv_cuda::Result<()> {
        assert!(src.len() <= dst.len());
        // SAFETY: `dst` views a host vector of at least `src.len()` elements.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.ptr() as *mut u32, src.len()) };
        Ok(())
    }

    fn upload_i32(&self, src: &[i32], dst: I32Buf) -> rwkv_cuda::Result<()> {
        assert!(src.len() <= dst.len());
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.ptr() as *mut i32, src.len()) };
        Ok(())
    }

    fn download_f32(&self, src: F32Buf, dst: &mut [f32]) -> rwkv_cuda::Result<()> {
        assert!(dst.len() <= src.len());
        // SAFETY: as above.
        unsafe {
            std::ptr::copy_nonoverlapping(src.ptr() as *const f32, dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }

    fn download_i32(&self, src: I32Buf, dst: &mut [i32]) -> rwkv_cuda::Result<()> {
        assert!(dst.len() <= src.len());
        // SAFETY: as above.
        unsafe {
            std::ptr::copy_nonoverlapping(src.ptr() as *const i32, dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }

    fn all_reduce_sum(&self, buf: F32Buf) -> rwkv_cuda::Result<()> {
        let comm = self
            .comm
            .as_ref()
            .expect("all-reduce on a rank with a collective");
        let done = self
            .reduces
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.fail_after_reduces.is_some_and(|n| done >= n) {
            return Err(rwkv_cuda::CudaError::shape(
                "all-reduce",
                "injected device fault",
            ));
        }
        // SAFETY: `buf` views a host vector of `buf.len()` f32 values that no one else touches
        // during the step.
        let data = unsafe { std::slice::from_raw_parts_mut(buf.ptr() as *mut f32, buf.len()) };
        comm.all_reduce_sum(data)
            .map_err(|e| rwkv_cuda::CudaError::shape("all-reduce", e.to_string()))
    }

    fn synchronize(&self) -> rwkv_cuda::Result<()> {
        Ok(())
    }
}

fn host_exec(e: &Arc<Emu>, head_size: usize) -> HostExec {
    HostExec {
        kernels: Kernels::with_launcher(Box::new(EmuLauncher(e.clone())), head_size),
        comm: None,
        fail_after_reduces: None,
        reduces: Default::default(),
    }
}

/// Host scratch for a step, every buffer starting as NaN (or an impossible index) so that reading
/// anything a step did not write shows up. Kept alive by its owner: the views point into it (the
/// graph test keeps one for all steps, like the backend's workspace, so recorded pointers stay
/// valid).
struct Scratch {
    act: Vec<Vec<f32>>,
    bf16: [Vec<u16>; 3],
    f32s: [Vec<f32>; 5],
    tokens: Vec<u32>,
    ints: [Vec<i32>; 2],
}

impl Scratch {
    fn new(s: &ScratchSizes) -> Self {
        Self {
            act: (0..ACT_BUFFERS).map(|_| vec![f32::NAN; s.act]).collect(),
            bf16: [s.xs, s.gin, s.hx].map(|n| vec![NAN_BF16; n]),
            f32s: [s.tmp, s.htmp, s.hout, s.tval, s.tmass].map(|n| vec![f32::NAN; n]),
            tokens: vec![u32::MAX; s.tokens],
            ints: [s.meta, s.tidx].map(|n| vec![i32::MIN; n]),
        }
    }

    fn bufs(&mut self, rows: usize) -> StepBufs {
        let mut act = [DevBuf::null(); ACT_BUFFERS];
        for (v, a) in act.iter_mut().zip(&mut self.act) {
            *v = view_mut(a);
        }
        let [xs, gin, hx] = &mut self.bf16;
        let [tmp, htmp, hout, tval, tmass] = &mut self.f32s;
        let [meta, tidx] = &mut self.ints;
        StepBufs {
            rows,
            act,
            xs: view_mut(xs),
            gin: view_mut(gin),
            tmp: view_mut(tmp),
            tokens: view_mut(&mut self.tokens),
            meta: view_mut(meta),
            hx: view_mut(hx),
            htmp: view_mut(htmp),
            hout: view_mut(hout),
            tidx: view_mut(tidx),
            tval: view_mut(tval),
            tmass: view_mut(tmass),
        }
    }
}

/// The model run through `forward::Step` on the host, with its own state pool.
struct EmuModel {
    cfg: ModelConfig,
    _weights: Weights<Vec<f32>, Vec<u16>>,
    views: WeightViews,
    pool: Vec<f32>,
    layout: PoolLayout,
    exec: HostExec,
    precision: GemmPrecision,
    part: Part,
}

const NAN_BF16: u16 = 0x7fc0;

impl EmuModel {
    fn new(e: &Arc<Emu>, w: &ModelWeights, slots: usize, precision: GemmPrecision) -> Self {
        let cfg = w.config.clone();
        let host =
            weights::convert(w, None, &mut |v| Ok(v.clone()), &mut |v| Ok(v.clone())).unwrap();
        let views = weights::host_views(&host);
        let layout = PoolLayout::new(&cfg, slots);
        let pool = w.initial_state().as_flat().repeat(slots);
        Self {
            exec: host_exec(e, cfg.head_size),
            part: Part::whole(&cfg),
            cfg,
            _weights: host,
            views,
            pool,
            layout,
            precision,
        }
    }

    /// One rank of a tensor-parallel group: its shard of the weights, slots holding its part
    /// of each state, its end of an in-process collective.
    fn rank(
        e: &Arc<Emu>,
        w: &ModelWeights,
        slots: usize,
        plan: &ShardPlan,
        comm: InProcessCollective,
    ) -> Self {
        let cfg = w.config.clone();
        let host = weights::convert(
            w,
            Some(plan),
            &mut |v| Ok(v.clone()),
            &mut |v| Ok(v.clone()),
        )
        .unwrap();
        let views = weights::host_views(&host);
        let layout = PoolLayout {
            n_head: plan.heads_per_rank(),
            ..PoolLayout::new(&cfg, slots)
        };
        let pool = plan.state_part(&w.initial_state()).repeat(slots);
        let mut exec = host_exec(e, cfg.head_size);
        exec.comm = Some(comm);
        Self {
            exec,
            part: Part::of(plan),
            cfg,
            _weights: host,
            views,
            pool,
            layout,
            precision: GemmPrecision::Split,
        }
    }

    fn state(&self, slot: usize) -> &[f32] {
        &self.pool[self.layout.slot_range(slot)]
    }

    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Vec<f32> {
        let (logits, top) = self.forward_with_candidates(steps);
        assert!(top.is_empty(), "use forward_with_candidates for Top rows");
        logits
    }

    /// The logit rows and the candidates of the `Top` rows.
    fn forward_with_candidates(&mut self, steps: &[SeqStep<'_>]) -> (Vec<f32>, Vec<Candidate>) {
        let out = self.forward_logits(steps).unwrap();
        assert!(
            out.nucleus.is_empty(),
            "use forward_logits for Nucleus rows"
        );
        (out.data, out.top)
    }

    /// Everything a step returns, as the backend contract lays it out.
    fn forward_logits(&mut self, steps: &[SeqStep<'_>]) -> rwkv_cuda::Result<Logits> {
        validate_steps(&self.cfg, self.layout.slots, steps).unwrap();
        let plan = BatchPlan::new(steps).unwrap();
        let head_rows = if self.part.head {
            plan.head_rows.len()
        } else {
            0
        };
        let mut logits = vec![0.0; head_rows * self.cfg.vocab_size];
        let s = ScratchSizes::new(&self.cfg, self.precision.split(), plan.rows().max(1));
        let mut scratch = Scratch::new(&s);
        let bufs = scratch.bufs(s.rows);
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
            bufs,
            precision: self.precision,
            part: self.part,
        };
        let (mut top, mut nucleus) = (Vec::new(), Vec::new());
        step.run(&plan, &mut logits, &mut top, &mut nucleus)?;
        Ok(Logits {
            vocab: self.cfg.vocab_size,
            data: logits,
            top,
            nucleus,
        })
    }
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let n: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A deterministic pseudo-random stream in [-1, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

#[test]
fn emulator_knows_every_kernel() {
    let Some(e) = emu(64) else { return };
    for file in KERNEL_FILES {
        for f in file.functions {
            let c = CString::new(*f).unwrap();
            // SAFETY: emu_has only reads the name.
            assert_eq!(
                unsafe { (e.has)(c.as_ptr()) },
                1,
                "{f} is not registered in emu.cpp"
            );
        }
    }
}

#[path = "emu/graph.rs"]
mod graph;
#[path = "common/graph_script.rs"]
mod graph_script;
#[path = "emu/kernels.rs"]
mod kernels;
#[path = "emu/model.rs"]
mod model;
#[path = "emu/tp.rs"]
mod tp;
