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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// How long an abort waits for ranks to leave NCCL calls before freeing the communicators
/// anyway (a rank blocked inside a collective, waiting for the failed peer, never leaves; that
/// is the case `ncclCommAbort` exists for).
const ABORT_GRACE: Duration = Duration::from_millis(200);

/// Orders the group's NCCL calls against its abort, so that no rank calls into a communicator
/// that the abort already freed: a rank counts itself in before it checks the flag, and the
/// abort sets the flag before it waits for the count to reach zero. With sequentially
/// consistent atomics either the rank sees the flag and stays out, or the abort sees the rank
/// and waits for it (up to a grace period).
#[derive(Debug, Default)]
pub(crate) struct CallGate {
    closed: AtomicBool,
    in_call: AtomicUsize,
}

/// A rank inside the gate; leaving drops the count.
pub(crate) struct InCall<'a>(&'a CallGate);

impl Drop for InCall<'_> {
    fn drop(&mut self) {
        self.0.in_call.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CallGate {
    /// Enters for one call, or `None` once the gate is closed.
    pub(crate) fn enter(&self) -> Option<InCall<'_>> {
        self.in_call.fetch_add(1, Ordering::SeqCst);
        let guard = InCall(self);
        (!self.closed.load(Ordering::SeqCst)).then_some(guard)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Closes the gate (false if it already was), then waits up to `grace` for the ranks
    /// inside to leave.
    pub(crate) fn close(&self, grace: Duration) -> bool {
        if self.closed.swap(true, Ordering::SeqCst) {
            return false;
        }
        let until = Instant::now() + grace;
        while self.in_call.load(Ordering::SeqCst) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

/// One rank's NCCL communicator.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    /// Closed once the group is aborted: the communicator is gone (NCCL freed it).
    gate: Arc<CallGate>,
}

/// Aborts every communicator of a group at once (`ncclCommAbort`, which NCCL allows from
/// another thread while ranks wait inside collectives): their pending all-reduces end and every
/// later one fails.
pub struct NcclAbort {
    /// The communicators, as addresses (NCCL handles are thread-safe to abort).
    comms: Vec<usize>,
    gate: Arc<CallGate>,
}

impl GroupAbort for NcclAbort {
    fn abort(&self) {
        if !self.gate.close(ABORT_GRACE) {
            return;
        }
        for &comm in &self.comms {
            // SAFETY: each communicator was created by `NcclComm::group` and is aborted once
            // (the gate closes once); no rank enters a call after the gate closed, and those
            // inside were given the grace period (one still inside is blocked in a collective,
            // which `ncclCommAbort` is documented to end). Its `NcclComm` skips destroying it.
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
        let gate = Arc::new(CallGate::default());
        let abort = Arc::new(NcclAbort {
            comms: comms.iter().map(|&c| c as usize).collect(),
            gate: gate.clone(),
        });
        let comms = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| Self {
                comm,
                rank,
                world,
                gate: gate.clone(),
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
        let Some(_in_call) = self.gate.enter() else {
            return Err(CudaError::Nccl {
                op: "ncclAllReduce",
                detail: "the tensor-parallel group was aborted".into(),
            });
        };
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
        if self.gate.is_closed() {
            return; // ncclCommAbort freed it
        }
        // SAFETY: the communicator was created by `group` and is destroyed once; its rank's
        // stream is synchronized by the backend's drop before the communicator goes.
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_gate_lets_no_call_in_and_closes_once() {
        let gate = CallGate::default();
        assert!(gate.enter().is_some());
        assert!(gate.close(Duration::ZERO));
        assert!(gate.enter().is_none());
        assert!(!gate.close(Duration::ZERO), "a second abort does nothing");
        assert_eq!(
            gate.in_call.load(Ordering::SeqCst),
            0,
            "refused calls are not counted"
        );
    }

    #[test]
    fn closing_waits_for_a_call_in_flight_and_gives_up_after_the_grace() {
        let gate = Arc::new(CallGate::default());
        let (entered, leave) = (std::sync::Barrier::new(2), std::sync::mpsc::channel::<()>());
        let (entered, (leave_tx, leave_rx)) = (Arc::new(entered), leave);
        let rank = {
            let (gate, entered) = (gate.clone(), entered.clone());
            std::thread::spawn(move || {
                let call = gate.enter().unwrap();
                entered.wait();
                leave_rx.recv().unwrap();
                drop(call);
            })
        };
        entered.wait();
        // Leaves after 50 ms: the close waits for it.
        let t = Instant::now();
        let leaver = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            leave_tx.send(()).unwrap();
        });
        assert!(gate.close(Duration::from_secs(30)));
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert_eq!(gate.in_call.load(Ordering::SeqCst), 0);
        rank.join().unwrap();
        leaver.join().unwrap();

        // A call that never leaves (blocked in a collective): the close gives up after the
        // grace period.
        let stuck = CallGate::default();
        let call = stuck.enter().unwrap();
        let t = Instant::now();
        assert!(stuck.close(Duration::from_millis(20)));
        assert!(t.elapsed() >= Duration::from_millis(20));
        drop(call);
    }
}
