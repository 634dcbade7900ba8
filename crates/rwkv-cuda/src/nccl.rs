//! NCCL communicators for tensor parallelism inside one worker process: one per device of the
//! group, created together by `ncclCommInitAll`, each used by its rank's thread only. The
//! all-reduce runs in place on the rank's compute stream, so it is ordered after the kernels
//! that produce the partial sums and before those that read the total, with no host sync.
//!
//! libnccl is opened at run time like the other CUDA libraries. cudarc looks for `libnccl.so`
//! (and a few versioned names, not `libnccl.so.2`); where only `libnccl.so.2` is installed (the
//! PyPI wheel `nvidia-nccl-cu13`, PyTorch's environment), a `libnccl.so` symlink to it on
//! `LD_LIBRARY_PATH` makes it loadable. [`nccl_available`] probes before any call, since cudarc
//! panics on a missing library.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::sys::CUstream;
use cudarc::nccl::{result, sys};
use rwkv_model::GroupAbort;

use crate::error::{CudaError, Result};
use crate::kernels::F32Buf;

/// Whether the NCCL library can be opened.
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen libnccl under cudarc's candidate names; no symbol is called.
    unsafe { sys::is_culib_present() }
}

fn missing() -> CudaError {
    CudaError::MissingLibrary {
        lib: "nccl",
        hint: "sharding a model over several GPUs needs libnccl.so on the library path (where \
               only libnccl.so.2 is installed, add a libnccl.so symlink to it)"
            .into(),
    }
}

fn nccl(op: &'static str) -> impl FnOnce(result::NcclError) -> CudaError {
    move |e| CudaError::Nccl {
        op,
        detail: format!("{:?}", e.0),
    }
}

/// One rank's NCCL communicator.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    /// Set once the group is aborted: the communicator is gone (NCCL freed it).
    aborted: Arc<AtomicBool>,
}

/// Aborts every communicator of a group at once (`ncclCommAbort`, which NCCL allows from
/// another thread while ranks wait inside collectives): their pending all-reduces end and every
/// later one fails.
pub struct NcclAbort {
    /// The communicators, as addresses (NCCL handles are thread-safe to abort).
    comms: Vec<usize>,
    aborted: Arc<AtomicBool>,
}

impl GroupAbort for NcclAbort {
    fn abort(&self) {
        if self.aborted.swap(true, Ordering::SeqCst) {
            return;
        }
        for &comm in &self.comms {
            // SAFETY: each communicator was created by `NcclComm::group` and is aborted once
            // (guarded by `aborted`); its `NcclComm` skips destroying it afterwards.
            let _ = unsafe { result::comm_abort(comm as sys::ncclComm_t) };
        }
        tracing::error!("tensor-parallel group aborted after a rank failed");
    }
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; each rank's communicator is owned by that rank and used from one thread at a time
// (`&mut` access through its backend).
unsafe impl Send for NcclComm {}
// SAFETY: shared references only reach `all_reduce_sum`, which the owning rank calls from the
// one thread running its step.
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Communicators for ranks `0..ordinals.len()`, rank i on device `ordinals[i]`, and the
    /// group's abort. The devices must be distinct (NCCL refuses two ranks on one device).
    pub fn group(ordinals: &[usize]) -> Result<(Vec<Self>, Arc<NcclAbort>)> {
        if !nccl_available() {
            return Err(missing());
        }
        let devs = ordinals
            .iter()
            .map(|&o| i32::try_from(o).map_err(|_| CudaError::NoDevice(format!("device {o}"))))
            .collect::<Result<Vec<i32>>>()?;
        let world = devs.len();
        let n = i32::try_from(world).map_err(|_| CudaError::NoDevice("too many devices".into()))?;
        let mut comms = vec![std::ptr::null_mut(); world];
        // SAFETY: `comms` has room for `n` communicators and `devs` holds `n` device ordinals.
        unsafe { result::comm_init_all(comms.as_mut_ptr(), n, devs.as_ptr()) }
            .map_err(nccl("ncclCommInitAll"))?;
        let aborted = Arc::new(AtomicBool::new(false));
        let abort = Arc::new(NcclAbort {
            comms: comms.iter().map(|&c| c as usize).collect(),
            aborted: aborted.clone(),
        });
        let comms = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| Self {
                comm,
                rank,
                world,
                aborted: aborted.clone(),
            })
            .collect();
        Ok((comms, abort))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Sums `buf` across the group in place, queued on `stream` (the rank's compute stream, in
    /// the rank's device context).
    pub fn all_reduce_sum(&self, buf: F32Buf, stream: CUstream) -> Result<()> {
        if self.aborted.load(Ordering::SeqCst) {
            return Err(CudaError::Nccl {
                op: "ncclAllReduce",
                detail: "the tensor-parallel group was aborted".into(),
            });
        }
        if buf.is_empty() {
            return Ok(());
        }
        // SAFETY: `buf` is a live device buffer of `buf.len()` f32 values on this rank's device
        // (the forward pass's scratch); in-place all-reduce is allowed (send == recv), and the
        // operation is ordered on `stream` like the kernels around it.
        unsafe {
            result::all_reduce(
                buf.ptr() as *const c_void,
                buf.ptr() as *mut c_void,
                buf.len(),
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                stream as sys::cudaStream_t,
            )
        }
        .map_err(nccl("ncclAllReduce"))?;
        Ok(())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.aborted.load(Ordering::SeqCst) {
            return; // ncclCommAbort freed it
        }
        // SAFETY: the communicator was created by `group` and is destroyed once; its rank's
        // stream is synchronized by the backend's drop before the communicator goes.
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}
