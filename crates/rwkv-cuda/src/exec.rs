//! The device side of [`Exec`]: kernels and cuBLAS on the compute stream, plus the scratch
//! buffers of the forward pass.

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use crate::device::Device;
use crate::error::{CudaError, Result};
use crate::forward::{Exec, ScratchSizes, StepBufs, ACT_BUFFERS};
use crate::gemm::{gemm_batched, BatchStrides, GemmSpec};
use crate::kernels::{Bf16Buf, DevBuf, F32Buf, I32Buf, Kernels};
use crate::nccl::NcclComm;

/// Runs a forward step on a device.
pub struct CudaExec<'a> {
    pub dev: &'a Device,
    pub kernels: &'a Kernels,
    /// The rank's communicator, when the step is one rank's shard.
    pub comm: Option<&'a NcclComm>,
}

fn check_copy(op: &'static str, buf: usize, host: usize) -> Result<()> {
    if host <= buf {
        Ok(())
    } else {
        Err(CudaError::shape(
            op,
            format!("{host} values into a buffer of {buf}"),
        ))
    }
}

impl Exec for CudaExec<'_> {
    fn kernels(&self) -> &Kernels {
        self.kernels
    }

    fn gemm(
        &self,
        spec: &GemmSpec,
        strides: &BatchStrides,
        w: Bf16Buf,
        x: Bf16Buf,
        y: F32Buf,
    ) -> Result<()> {
        let name = || {
            let batch = if strides.count > 1 {
                format!("{}x ", strides.count)
            } else {
                String::new()
            };
            format!(
                "gemm {batch}{}x{} ({} rows)",
                spec.out_features, spec.in_features, spec.rows
            )
            .into()
        };
        self.dev.profile.span(&self.dev.compute, name, || {
            gemm_batched(&self.dev.blas, spec, strides, w, x, y)
        })
    }

    fn upload_u32(&self, src: &[u32], dst: DevBuf<u32>) -> Result<()> {
        check_copy("upload", dst.len(), src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: `dst` is a live device buffer of at least `src.len()` elements (checked);
        // from pageable memory the driver stages `src` before returning, so it may be dropped
        // afterwards, and the copy is ordered before later work on the compute stream.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst.ptr(), src, self.dev.compute.cu_stream())
        }
        .map_err(CudaError::driver("upload tokens"))
    }

    fn upload_i32(&self, src: &[i32], dst: I32Buf) -> Result<()> {
        check_copy("upload", dst.len(), src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: as in `upload_u32`.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst.ptr(), src, self.dev.compute.cu_stream())
        }
        .map_err(CudaError::driver("upload row metadata"))
    }

    fn download_f32(&self, src: F32Buf, dst: &mut [f32]) -> Result<()> {
        check_copy("download", src.len(), dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: `src` is a live device buffer of at least `dst.len()` elements (checked). The
        // copy is queued on the compute stream after the kernels that produce `src`. From
        // pageable memory the call returns once the copy has finished; into pinned memory (the
        // backend's staging buffer, which outlives the step) it returns at once, and
        // `synchronize` at the end of the step waits for it before anyone reads `dst`.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(dst, src.ptr(), self.dev.compute.cu_stream())
        }
        .map_err(CudaError::driver("download logits"))
    }

    fn download_i32(&self, src: I32Buf, dst: &mut [i32]) -> Result<()> {
        check_copy("download", src.len(), dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: as in `download_f32`; the callers download into pageable memory, so the copy
        // has finished when this returns.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(dst, src.ptr(), self.dev.compute.cu_stream())
        }
        .map_err(CudaError::driver("download candidates"))
    }

    fn all_reduce_sum(&self, buf: F32Buf) -> Result<()> {
        let comm = self.comm.ok_or_else(|| {
            CudaError::Unsupported("an all-reduce without a tensor-parallel group".into())
        })?;
        self.dev.profile.span(
            &self.dev.compute,
            || "nccl all-reduce".into(),
            || comm.all_reduce_sum(buf, self.dev.compute.cu_stream()),
        )
    }

    fn synchronize(&self) -> Result<()> {
        self.dev
            .compute
            .synchronize()
            .map_err(CudaError::driver("forward"))
    }
}

/// Device scratch buffers, grown to the largest step seen.
pub struct Workspace {
    sizes: ScratchSizes,
    /// Counts reallocations: CUDA graphs captured with the buffers of one generation must not
    /// be replayed after the next.
    generation: u64,
    act: Vec<CudaSlice<f32>>,
    xs: CudaSlice<u16>,
    gin: CudaSlice<u16>,
    tmp: CudaSlice<f32>,
    tokens: CudaSlice<u32>,
    meta: CudaSlice<i32>,
    hx: CudaSlice<u16>,
    htmp: CudaSlice<f32>,
    hout: CudaSlice<f32>,
    tidx: CudaSlice<i32>,
    tval: CudaSlice<f32>,
    tmass: CudaSlice<f32>,
}

fn alloc<T: DeviceRepr + ValidAsZeroBits>(dev: &Device, len: usize) -> Result<CudaSlice<T>> {
    dev.zeros(len)
}

impl Workspace {
    /// Allocates scratch for `rows` rows.
    pub fn new(
        dev: &Device,
        cfg: &rwkv_model::ModelConfig,
        split: bool,
        rows: usize,
    ) -> Result<Self> {
        let sizes = ScratchSizes::new(cfg, split, rows.max(1));
        Ok(Self {
            act: (0..ACT_BUFFERS)
                .map(|_| alloc(dev, sizes.act))
                .collect::<Result<_>>()?,
            xs: alloc(dev, sizes.xs)?,
            gin: alloc(dev, sizes.gin)?,
            tmp: alloc(dev, sizes.tmp)?,
            tokens: alloc(dev, sizes.tokens)?,
            meta: alloc(dev, sizes.meta)?,
            hx: alloc(dev, sizes.hx)?,
            htmp: alloc(dev, sizes.htmp)?,
            hout: alloc(dev, sizes.hout)?,
            tidx: alloc(dev, sizes.tidx)?,
            tval: alloc(dev, sizes.tval)?,
            tmass: alloc(dev, sizes.tmass)?,
            sizes,
            generation: 0,
        })
    }

    /// See the field; grows by one at each reallocation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Views for a step of `rows` rows, reallocating (to the next power of two) when the step
    /// is larger than any before. Old buffers are freed on the compute stream, after the work
    /// already issued on them.
    pub fn bufs(
        &mut self,
        dev: &Device,
        cfg: &rwkv_model::ModelConfig,
        split: bool,
        rows: usize,
    ) -> Result<StepBufs> {
        if rows > self.sizes.rows {
            let generation = self.generation + 1;
            // The old buffers go first (swapped for one-row ones), so growing never holds the
            // old and the new scratch at once: at long prefills the split buffers alone are
            // hundreds of MiB. Freed on the compute stream, their memory is reused in stream
            // order. If the large allocation fails, the one-row scratch stays (a new
            // generation: no graph refers to it) and the next step tries again.
            *self = Self::new(dev, cfg, split, 1)?;
            self.generation = generation;
            *self = Self::new(dev, cfg, split, rows.next_power_of_two().max(16))?;
            self.generation = generation;
        }
        let mut act = [DevBuf::null(); ACT_BUFFERS];
        for (v, s) in act.iter_mut().zip(&self.act) {
            *v = dev.buf(s);
        }
        Ok(StepBufs {
            rows: self.sizes.rows,
            act,
            xs: dev.buf(&self.xs),
            gin: dev.buf(&self.gin),
            tmp: dev.buf(&self.tmp),
            tokens: dev.buf(&self.tokens),
            meta: dev.buf(&self.meta),
            hx: dev.buf(&self.hx),
            htmp: dev.buf(&self.htmp),
            hout: dev.buf(&self.hout),
            tidx: dev.buf(&self.tidx),
            tval: dev.buf(&self.tval),
            tmass: dev.buf(&self.tmass),
        })
    }
}
