//! Opening a device: probing for the driver, the context, the two streams and cuBLAS.
//!
//! Stream model: all kernels and GEMMs run on one `compute` stream, in issue order. The `copy`
//! stream only moves state slots between the device pool and pinned host buffers; the pool
//! (see `pool.rs`) orders it against `compute` with events per slot. cudarc's automatic
//! per-buffer event tracking is switched off before anything is allocated: it would record two
//! events per kernel argument per launch, and our ordering is explicit instead.

use std::mem::ManuallyDrop;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr};

use crate::compile::arch_name;
use crate::error::{CudaError, Result};
use crate::kernels::DevBuf;
use crate::profile::Profile;

/// cuBLAS workspace per handle: what the cuBLAS guide recommends for Hopper (32 MiB), more than
/// enough elsewhere.
pub const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Whether the CUDA driver library (libcuda) can be opened. Creating a context without it
/// would panic inside cudarc, so every entry point probes this first.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen libcuda under its usual names; no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether cuBLAS can be opened.
pub fn cublas_available() -> bool {
    // SAFETY: as above, a dlopen probe only.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// Number of CUDA devices, or `NoDevice` when there is no driver.
pub fn device_count() -> Result<usize> {
    if !driver_available() {
        return Err(no_driver());
    }
    let n = CudaContext::device_count().map_err(|e| CudaError::NoDevice(e.to_string()))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

fn no_driver() -> CudaError {
    CudaError::NoDevice("the CUDA driver library (libcuda.so) is not installed".into())
}

/// An opened device: context, streams, cuBLAS handle and facts used for compilation.
pub struct Device {
    pub ctx: Arc<CudaContext>,
    /// Every kernel and GEMM runs here.
    pub compute: Arc<CudaStream>,
    /// State swaps between the pool and pinned host memory run here.
    pub copy: Arc<CudaStream>,
    /// Per-kernel timing of the compute stream, when switched on (`profile.rs`).
    pub profile: Arc<Profile>,
    /// cuBLAS handle bound to `compute`. Dropped by hand (see `Drop for Device`).
    pub blas: ManuallyDrop<CudaBlas>,
    /// The handle's workspace, owned here so that it outlives the handle and never moves: a
    /// GEMM captured in a CUDA graph keeps using it (cuBLAS would otherwise allocate one
    /// during the capture).
    _blas_workspace: CudaSlice<u8>,
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    /// NVRTC target, `sm_XY`.
    pub arch: String,
}

impl Drop for Device {
    /// cudarc's `CudaBlas` unwraps the result of destroying its handle, which fails after a
    /// sticky device fault: that would turn a broken GPU into a panic wherever the backend is
    /// dropped. The panic is contained here and logged; the workspace (dropped next, after the
    /// handle) is freed either way.
    fn drop(&mut self) {
        // SAFETY: `blas` is not used again; this is the only place that takes it.
        let blas = unsafe { ManuallyDrop::take(&mut self.blas) };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(blas))).is_err() {
            tracing::warn!(
                device = self.ordinal,
                "the cuBLAS handle could not be destroyed (the device had failed)"
            );
        }
    }
}

impl Device {
    /// Opens device `ordinal`. Returns `NoDevice` (never panics) when the driver or the device
    /// is missing, so callers can fall back to the CPU backend.
    pub fn open(ordinal: usize) -> Result<Self> {
        if !driver_available() {
            return Err(no_driver());
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| CudaError::NoDevice(format!("device {ordinal}: {e}")))?;
        // SAFETY: called before this context allocates anything; from here on every buffer is
        // used on the compute stream only, except the state pool and pinned buffers, whose
        // cross-stream use is ordered by explicit events (pool.rs), and `Drop` of the backend
        // synchronises both streams before any buffer is freed.
        unsafe { ctx.disable_event_tracking() };
        let compute = ctx
            .new_stream()
            .map_err(CudaError::driver("create compute stream"))?;
        let copy = ctx
            .new_stream()
            .map_err(CudaError::driver("create copy stream"))?;
        if !cublas_available() {
            return Err(CudaError::MissingLibrary {
                lib: "cublas",
                hint: "install `nvidia-cublas` (PyPI) or a CUDA toolkit and put its lib folder \
                       on LD_LIBRARY_PATH"
                    .into(),
            });
        }
        let blas = CudaBlas::new(compute.clone()).map_err(CudaError::cublas("create handle"))?;
        let blas_workspace = compute
            .alloc_zeros::<u8>(CUBLAS_WORKSPACE_BYTES)
            .map_err(CudaError::driver("allocate cuBLAS workspace"))?;
        {
            let (ptr, _sync) = blas_workspace.device_ptr(&compute);
            // SAFETY: the handle is live; the buffer holds CUBLAS_WORKSPACE_BYTES bytes and is
            // kept in the returned Device after the handle (fields drop in order, so the
            // handle is destroyed first). Nothing sets the handle's stream again, which would
            // reset the workspace.
            let set = unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ptr as *mut std::ffi::c_void,
                    CUBLAS_WORKSPACE_BYTES,
                )
            };
            // Not fatal: cuBLAS keeps its own workspace, and a graph capture that needs one
            // then fails and the backend runs without graphs.
            if let Err(e) = set.result() {
                tracing::warn!(error = %e, "cuBLAS refused our workspace; keeping its own");
            }
        }
        let compute_capability = ctx
            .compute_capability()
            .map_err(CudaError::driver("compute capability"))?;
        let name = ctx.name().map_err(CudaError::driver("device name"))?;
        Ok(Self {
            arch: arch_name(compute_capability.0, compute_capability.1),
            ctx,
            compute,
            copy,
            profile: Arc::default(),
            blas: ManuallyDrop::new(blas),
            _blas_workspace: blas_workspace,
            ordinal,
            name,
            compute_capability,
        })
    }

    /// Makes this device's context current on the calling thread (cuBLAS calls need it).
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(CudaError::driver("bind context"))
    }

    /// Uploads a host slice into a new device buffer on the compute stream.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.compute
            .clone_htod(data)
            .map_err(CudaError::driver("upload"))
    }

    /// A zeroed device buffer on the compute stream.
    pub fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        self.compute
            .alloc_zeros(len.max(1))
            .map_err(CudaError::driver("allocate"))
    }

    /// The raw view of a buffer for kernel arguments.
    pub fn buf<T>(&self, s: &CudaSlice<T>) -> DevBuf<T> {
        let (ptr, _sync) = s.device_ptr(&self.compute);
        DevBuf::new(ptr, s.len())
    }
}
