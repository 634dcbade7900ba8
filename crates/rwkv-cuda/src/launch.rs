//! Launching kernels: raw device buffers ([`DevBuf`]), launch-configuration math, and the
//! [`Launcher`] that runs a kernel by name (on the device, or in the host emulation of the
//! tests).
//!
//! Buffers are passed as [`DevBuf`]: a raw device pointer plus a length in elements, taken from
//! a live `CudaSlice`. Kernels run on the compute stream; the caller keeps the slices alive in
//! stream order (they are freed on the same stream, after the kernels that use them).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use crate::compile::{self, KERNEL_FILES};
use crate::device::Device;
use crate::error::{CudaError, Result};
use crate::profile::Profile;

/// A device pointer and its length in elements of `T`.
#[derive(Debug)]
pub struct DevBuf<T> {
    ptr: u64,
    len: usize,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for DevBuf<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DevBuf<T> {}

impl<T> DevBuf<T> {
    pub fn new(ptr: u64, len: usize) -> Self {
        Self {
            ptr,
            len,
            _t: PhantomData,
        }
    }

    /// The null pointer, for optional kernel arguments.
    pub fn null() -> Self {
        Self::new(0, 0)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Elements `start .. start + len`, bounds-checked.
    pub fn slice(&self, start: usize, len: usize) -> Result<Self> {
        match start.checked_add(len) {
            Some(end) if end <= self.len => Ok(Self::new(
                self.ptr + (start * std::mem::size_of::<T>()) as u64,
                len,
            )),
            _ => Err(CudaError::shape(
                "slice",
                format!("{start}+{len} exceeds a buffer of {}", self.len),
            )),
        }
    }

    /// Checks that the buffer holds at least `n` elements.
    pub fn need(&self, op: &'static str, what: &str, n: usize) -> Result<()> {
        if self.len >= n {
            Ok(())
        } else {
            Err(CudaError::shape(
                op,
                format!("`{what}` holds {} elements, needs {n}", self.len),
            ))
        }
    }
}

/// A bf16 buffer (bit patterns).
pub type Bf16Buf = DevBuf<u16>;
/// An f32 buffer.
pub type F32Buf = DevBuf<f32>;
/// An i32 buffer (row metadata).
pub type I32Buf = DevBuf<i32>;

/// Threads per block of the element-wise kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;
/// Grid cap of the element-wise kernels (they loop grid-stride beyond it).
pub const ELEMENTWISE_MAX_BLOCKS: usize = 8192;
/// Threads per block of the row-wise sampling kernels.
pub const SAMPLING_THREADS: u32 = 256;
/// Largest head size the WKV kernels accept (one thread per value column, the column of the
/// state in registers).
pub const MAX_HEAD_SIZE: usize = 128;

fn grid_dim(op: &'static str, blocks: usize) -> Result<u32> {
    match u32::try_from(blocks) {
        Ok(b) if b > 0 && b < (1 << 31) => Ok(b),
        _ => Err(CudaError::shape(op, format!("grid of {blocks} blocks"))),
    }
}

/// Grid-stride element-wise launch over `n` elements (`n` > 0).
pub fn elementwise_config(n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(ELEMENTWISE_THREADS as usize)
        .clamp(1, ELEMENTWISE_MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ELEMENTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row; about four columns per thread, a multiple of 32 between 32 and 1024.
pub fn row_config(rows: usize, cols: usize) -> Result<LaunchConfig> {
    let threads = cols.div_ceil(4).next_multiple_of(32).clamp(32, 1024);
    Ok(LaunchConfig {
        grid_dim: (grid_dim("row launch", rows)?, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// GroupNorm: one block per (row, head), the head size rounded up to whole warps.
pub fn group_config(rows: usize, heads: usize, head_size: usize) -> Result<LaunchConfig> {
    let threads = head_size.next_multiple_of(32);
    if threads > 1024 {
        return Err(CudaError::shape(
            "group_norm",
            format!("head size {head_size}"),
        ));
    }
    Ok(LaunchConfig {
        grid_dim: (grid_dim("group_norm", rows.saturating_mul(heads))?, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// WKV: one block per (sequence, head), one thread per value column.
pub fn wkv_config(seqs: usize, heads: usize, head_size: usize) -> Result<LaunchConfig> {
    if head_size == 0 || head_size > MAX_HEAD_SIZE {
        return Err(CudaError::shape("wkv6", format!("head size {head_size}")));
    }
    Ok(LaunchConfig {
        grid_dim: (grid_dim("wkv6", seqs.saturating_mul(heads))?, 1, 1),
        block_dim: (head_size as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Threads per value column of the WKV prefill kernel (`WKV_Q` in wkv6.cu): 4 where the block
/// is then whole warps (the partial sums are added with warp shuffles), else 1.
pub fn wkv_prefill_split(head_size: usize) -> usize {
    if head_size.is_multiple_of(8) {
        4
    } else {
        1
    }
}

/// The WKV prefill kernel: one block per (sequence, head) of `head_size` columns times
/// [`wkv_prefill_split`] threads each.
pub fn wkv_prefill_config(seqs: usize, heads: usize, head_size: usize) -> Result<LaunchConfig> {
    let mut cfg = wkv_config(seqs, heads, head_size)?;
    cfg.block_dim.0 *= wkv_prefill_split(head_size) as u32;
    Ok(cfg)
}

/// Row-wise sampling kernels: one block per row.
pub fn sampling_config(rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid_dim("sampling", rows)?, 1, 1),
        block_dim: (SAMPLING_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A kernel argument, in the C type the kernel declares.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// Any pointer.
    P(u64),
    /// `int`.
    I(i32),
    /// `long long` (`i64` in the kernels).
    L(i64),
    /// `float`.
    F(f32),
}

/// Runs a kernel by name. [`CudaLauncher`] launches on a device; tests plug in a host
/// emulator that runs the same `.cu` sources compiled as C++.
pub trait Launcher: Send + Sync {
    fn launch(&self, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()>;
}

/// Launches NVRTC-compiled kernels on the device's compute stream.
pub struct CudaLauncher {
    funcs: HashMap<&'static str, CudaFunction>,
    stream: Arc<CudaStream>,
    profile: Arc<Profile>,
}

impl CudaLauncher {
    /// Compiles (or takes from the cache) every kernel file for this device and loads it.
    pub fn load(dev: &Device, head_size: usize) -> Result<Self> {
        let mut funcs = HashMap::new();
        for file in KERNEL_FILES {
            let defines = compile::defines_for(file, head_size);
            let ptx = compile::compile(file, &defines, &dev.arch)?;
            let module = dev
                .ctx
                .load_module(ptx)
                .map_err(CudaError::driver("load module"))?;
            for &name in file.functions {
                let f = module
                    .load_function(name)
                    .map_err(CudaError::driver("load function"))?;
                funcs.insert(name, f);
            }
        }
        Ok(Self {
            funcs,
            stream: dev.compute.clone(),
            profile: dev.profile.clone(),
        })
    }
}

impl Launcher for CudaLauncher {
    fn launch(&self, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let f = self
            .funcs
            .get(name)
            .ok_or_else(|| CudaError::shape("launch", format!("no kernel `{name}`")))?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(v) => b.arg(v),
                Arg::I(v) => b.arg(v),
                Arg::L(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
            };
        }
        self.profile.span(
            &self.stream,
            || name.into(),
            || {
                // SAFETY: every `Kernels` wrapper passes the arguments in the order and C
                // types the kernel declares (reviewed against kernels/*.cu, and exercised by
                // the host emulation test), and has checked that every buffer holds the
                // elements the kernel touches for the given sizes. Row-metadata values (row
                // and slot indices) are built and bounds-checked on the host by
                // `plan::BatchPlan`.
                unsafe { b.launch(cfg) }.map_err(CudaError::driver(name))
            },
        )?;
        Ok(())
    }
}

/// Where the state pool is and how a slot is laid out, for kernels that read or write it.
#[derive(Clone, Copy, Debug)]
pub struct PoolArg {
    pub buf: F32Buf,
    /// f32 values per slot.
    pub stride: usize,
    pub slots: usize,
}

impl PoolArg {
    pub(crate) fn check(&self, op: &'static str, offset: usize, width: usize) -> Result<()> {
        let total = self.stride.checked_mul(self.slots);
        if total.is_none_or(|t| t > self.buf.len) || offset + width > self.stride {
            return Err(CudaError::shape(
                op,
                format!(
                    "pool of {} values cannot hold {} slots of {} with a part at {offset}+{width}",
                    self.buf.len, self.slots, self.stride
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elementwise_grid_covers_small_inputs_and_caps_large_ones() {
        assert_eq!(elementwise_config(1).grid_dim, (1, 1, 1));
        assert_eq!(elementwise_config(256).grid_dim, (1, 1, 1));
        assert_eq!(elementwise_config(257).grid_dim, (2, 1, 1));
        let big = elementwise_config(1 << 40);
        assert_eq!(big.grid_dim.0 as usize, ELEMENTWISE_MAX_BLOCKS);
        assert_eq!(big.block_dim, (ELEMENTWISE_THREADS, 1, 1));
    }

    #[test]
    fn row_blocks_are_whole_warps_within_limits() {
        for cols in [1, 8, 64, 127, 128, 2048, 4096, 65536] {
            let cfg = row_config(3, cols).unwrap();
            let t = cfg.block_dim.0;
            assert_eq!(t % 32, 0, "cols {cols}");
            assert!((32..=1024).contains(&t), "cols {cols}");
            assert_eq!(cfg.grid_dim, (3, 1, 1));
        }
        assert_eq!(row_config(1, 2048).unwrap().block_dim.0, 512);
        assert!(row_config(0, 8).is_err());
    }

    #[test]
    fn group_and_wkv_configs_follow_heads() {
        let g = group_config(5, 32, 64).unwrap();
        assert_eq!((g.grid_dim.0, g.block_dim.0), (160, 64));
        assert_eq!(group_config(1, 8, 8).unwrap().block_dim.0, 32);
        let w = wkv_config(7, 32, 64).unwrap();
        assert_eq!((w.grid_dim.0, w.block_dim.0), (224, 64));
        assert!(wkv_config(1, 1, MAX_HEAD_SIZE + 1).is_err());
        let p = wkv_prefill_config(7, 32, 64).unwrap();
        assert_eq!((p.grid_dim.0, p.block_dim.0), (224, 256));
        for n in [8, 64, MAX_HEAD_SIZE] {
            let t = wkv_prefill_config(1, 1, n).unwrap().block_dim.0;
            assert!(
                t.is_multiple_of(32) && t <= 1024,
                "head size {n}: {t} threads"
            );
        }
        assert_eq!(wkv_prefill_config(1, 1, 6).unwrap().block_dim.0, 6);
        assert!(wkv_config(1, 1, 0).is_err());
    }

    #[test]
    fn dev_buf_slices_are_bounds_checked() {
        let b: F32Buf = DevBuf::new(0x1000, 10);
        let s = b.slice(2, 8).unwrap();
        assert_eq!((s.ptr(), s.len()), (0x1008, 8));
        assert!(b.slice(3, 8).is_err());
        assert!(b.slice(usize::MAX, 2).is_err());
        assert!(b.need("t", "b", 10).is_ok());
        let err = b.need("t", "b", 11).unwrap_err().to_string();
        assert!(err.contains("`b` holds 10 elements, needs 11"), "{err}");
    }

    #[test]
    fn pool_checks_reject_parts_outside_a_slot() {
        let pool = PoolArg {
            buf: DevBuf::new(0, 100),
            stride: 50,
            slots: 2,
        };
        assert!(pool.check("t", 40, 10).is_ok());
        assert!(pool.check("t", 41, 10).is_err());
        let too_small = PoolArg { slots: 3, ..pool };
        assert!(too_small.check("t", 0, 1).is_err());
    }
}
