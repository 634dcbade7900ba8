//! GEMMs through cuBLAS: bf16 weights times a bf16 activation matrix, f32 accumulation
//! (`CUBLAS_COMPUTE_32F`, which never uses TF32) and f32 output (`cublasGemmEx`).
//!
//! # Transpose flags
//!
//! cuBLAS is column-major; everything here is row-major, and a row-major [R, K] matrix is the
//! column-major [K, R] matrix with leading dimension K. With X the input [rows, in] (rows
//! `ldx` apart) and Y the output [rows, out], cuBLAS computes the column-major
//! Yᵀ [out, rows] (ldc = out) = op(A) · Xᵀ, where B = Xᵀ is X's memory as-is (transb = N,
//! ldb = ldx, n = rows, k = in):
//!
//! - nn.Linear weights W [out, in] (Y = X·Wᵀ): W's memory is the column-major [in, out]
//!   matrix Wᵀ, and Yᵀ = W·Xᵀ = (Wᵀ)ᵀ·Xᵀ, so transa = T, lda = in, m = out.
//! - LoRA matrices W [in, out] (Y = X·W): W's memory is the column-major [out, in] matrix Wᵀ,
//!   and Yᵀ = Wᵀ·Xᵀ, so transa = N, lda = out, m = out.

use cudarc::cublas::{result, sys, CudaBlas};

use crate::error::{CudaError, Result};
use crate::kernels::{Bf16Buf, F32Buf};

/// How a weight matrix is stored (row-major).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// nn.Linear: [out, in].
    OutIn,
    /// LoRA: [in, out].
    InOut,
}

/// The cuBLAS arguments of one GEMM (column-major view).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmDims {
    /// Whether A is transposed (B never is).
    pub transa: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub lda: i32,
    pub ldb: i32,
    pub ldc: i32,
}

/// One GEMM, Y[rows, out] = X[rows, in] · op(W): the shape and where its operands are.
#[derive(Clone, Copy, Debug)]
pub struct GemmSpec {
    pub layout: WeightLayout,
    pub out_features: usize,
    pub in_features: usize,
    pub rows: usize,
    /// Elements between consecutive rows of X (>= in_features).
    pub ldx: usize,
}

fn dim(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| CudaError::shape("gemm", format!("dimension {v} exceeds i32")))
}

impl GemmSpec {
    /// A dense GEMM: X rows are `in_features` apart.
    pub fn dense(
        layout: WeightLayout,
        out_features: usize,
        in_features: usize,
        rows: usize,
    ) -> Self {
        Self {
            layout,
            out_features,
            in_features,
            rows,
            ldx: in_features,
        }
    }

    /// The column-major cuBLAS arguments (see the module docs).
    pub fn dims(&self) -> Result<GemmDims> {
        if self.ldx < self.in_features {
            return Err(CudaError::shape(
                "gemm",
                format!(
                    "row stride {} < {} input features",
                    self.ldx, self.in_features
                ),
            ));
        }
        let (transa, lda) = match self.layout {
            WeightLayout::OutIn => (true, self.in_features),
            WeightLayout::InOut => (false, self.out_features),
        };
        Ok(GemmDims {
            transa,
            m: dim(self.out_features)?,
            n: dim(self.rows)?,
            k: dim(self.in_features)?,
            lda: dim(lda)?,
            ldb: dim(self.ldx)?,
            ldc: dim(self.out_features)?,
        })
    }

    /// Elements of W, X and Y one GEMM touches.
    pub fn extents(&self) -> (usize, usize, usize) {
        let x = if self.rows == 0 {
            0
        } else {
            (self.rows - 1) * self.ldx + self.in_features
        };
        (
            self.out_features * self.in_features,
            x,
            self.rows * self.out_features,
        )
    }
}

/// Strides (in elements) between the matrices of a strided batched GEMM.
#[derive(Clone, Copy, Debug)]
pub struct BatchStrides {
    pub count: usize,
    pub w: usize,
    pub x: usize,
    pub y: usize,
}

/// Checks that `count` GEMMs at the given strides stay inside the buffers.
pub fn check_extents(
    spec: &GemmSpec,
    b: &BatchStrides,
    w: usize,
    x: usize,
    y: usize,
) -> Result<()> {
    if b.count == 0 {
        return Ok(());
    }
    let (ew, ex, ey) = spec.extents();
    let last = b.count - 1;
    for (what, need, have) in [
        ("weight", last * b.w + ew, w),
        ("input", last * b.x + ex, x),
        ("output", last * b.y + ey, y),
    ] {
        if need > have {
            return Err(CudaError::shape(
                "gemm",
                format!("{what} buffer holds {have} elements, the GEMM touches {need}"),
            ));
        }
    }
    Ok(())
}

fn op(trans: bool) -> sys::cublasOperation_t {
    if trans {
        sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        sys::cublasOperation_t::CUBLAS_OP_N
    }
}

/// Y = X · op(W) for one GEMM (see [`gemm_batched`]).
pub fn gemm(blas: &CudaBlas, spec: &GemmSpec, w: Bf16Buf, x: Bf16Buf, y: F32Buf) -> Result<()> {
    let one = BatchStrides {
        count: 1,
        w: 0,
        x: 0,
        y: 0,
    };
    gemm_batched(blas, spec, &one, w, x, y)
}

/// `strides.count` GEMMs Y_b = X_b · op(W_b), W_b at `w + b * strides.w` and so on. The cuBLAS
/// handle's stream (the compute stream) runs it; the handle's context must be current.
pub fn gemm_batched(
    blas: &CudaBlas,
    spec: &GemmSpec,
    strides: &BatchStrides,
    w: Bf16Buf,
    x: Bf16Buf,
    y: F32Buf,
) -> Result<()> {
    if spec.rows == 0 || strides.count == 0 {
        return Ok(());
    }
    check_extents(spec, strides, w.len(), x.len(), y.len())?;
    let d = spec.dims()?;
    let (alpha, beta) = (1.0f32, 0.0f32);
    let handle = *blas.handle();
    let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
    let f32t = sys::cudaDataType_t::CUDA_R_32F;
    let compute = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
    let algo = sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
    // SAFETY: the pointers come from live device buffers whose lengths were checked above to
    // cover every element the GEMM(s) touch for these dimensions; alpha and beta are host
    // values that outlive the call (cuBLAS reads them before returning in host pointer mode).
    unsafe {
        if strides.count == 1 {
            result::gemm_ex(
                handle,
                op(d.transa),
                op(false),
                d.m,
                d.n,
                d.k,
                (&alpha as *const f32).cast(),
                w.ptr() as *const _,
                bf16,
                d.lda,
                x.ptr() as *const _,
                bf16,
                d.ldb,
                (&beta as *const f32).cast(),
                y.ptr() as *mut _,
                f32t,
                d.ldc,
                compute,
                algo,
            )
        } else {
            result::gemm_strided_batched_ex(
                handle,
                op(d.transa),
                op(false),
                d.m,
                d.n,
                d.k,
                (&alpha as *const f32).cast(),
                w.ptr() as *const _,
                bf16,
                d.lda,
                strides.w as i64,
                x.ptr() as *const _,
                bf16,
                d.ldb,
                strides.x as i64,
                (&beta as *const f32).cast(),
                y.ptr() as *mut _,
                f32t,
                d.ldc,
                strides.y as i64,
                dim(strides.count)?,
                compute,
                algo,
            )
        }
    }
    .map_err(CudaError::cublas("gemm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Column-major GEMM on the host with cuBLAS semantics, to check the flags by example.
    fn host_gemm(d: &GemmDims, a: &[f32], b: &[f32]) -> Vec<f32> {
        let (m, n, k) = (d.m as usize, d.n as usize, d.k as usize);
        let mut c = vec![0.0; d.ldc as usize * n];
        for j in 0..n {
            for i in 0..m {
                let mut s = 0.0;
                for p in 0..k {
                    let a_ip = if d.transa {
                        a[i * d.lda as usize + p]
                    } else {
                        a[p * d.lda as usize + i]
                    };
                    s += a_ip * b[j * d.ldb as usize + p];
                }
                c[j * d.ldc as usize + i] = s;
            }
        }
        c
    }

    #[test]
    fn linear_weights_compute_x_times_w_transposed() {
        // X [2, 3], W [out=4, in=3] row-major; Y = X Wᵀ row-major [2, 4].
        let x = [1.0, 2.0, 3.0, -1.0, 0.5, 2.0];
        let w: Vec<f32> = (0..12).map(|v| v as f32 - 5.0).collect();
        let spec = GemmSpec::dense(WeightLayout::OutIn, 4, 3, 2);
        let d = spec.dims().unwrap();
        assert_eq!(
            (d.transa, d.m, d.n, d.k, d.lda, d.ldb, d.ldc),
            (true, 4, 2, 3, 3, 3, 4)
        );
        let y = host_gemm(&d, &w, &x);
        for r in 0..2 {
            for o in 0..4 {
                let want: f32 = (0..3).map(|i| x[r * 3 + i] * w[o * 3 + i]).sum();
                assert_eq!(y[r * 4 + o], want);
            }
        }
    }

    #[test]
    fn lora_weights_compute_x_times_w_with_strided_input() {
        // X is the middle 2 columns of a [2, 5] matrix (ldx 5, offset 1); W [in=2, out=3].
        let full = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        let w = [1.0, -2.0, 0.5, 3.0, 1.5, -1.0];
        let spec = GemmSpec {
            layout: WeightLayout::InOut,
            out_features: 3,
            in_features: 2,
            rows: 2,
            ldx: 5,
        };
        let d = spec.dims().unwrap();
        assert_eq!((d.transa, d.lda, d.ldb, d.ldc), (false, 3, 5, 3));
        let y = host_gemm(&d, &w, &full[1..]);
        for r in 0..2 {
            for o in 0..3 {
                let want: f32 = (0..2).map(|i| full[r * 5 + 1 + i] * w[i * 3 + o]).sum();
                assert_eq!(y[r * 3 + o], want);
            }
        }
        assert_eq!(spec.extents(), (6, 7, 6));
    }

    #[test]
    fn extents_are_checked_for_every_batch() {
        let spec = GemmSpec::dense(WeightLayout::InOut, 8, 4, 3);
        let b = BatchStrides {
            count: 5,
            w: 32,
            x: 4,
            y: 24,
        };
        // Last weight ends at 4*32 + 32, last input at 4*4 + (2*4 + 4), last output at 4*24 + 24.
        assert!(check_extents(&spec, &b, 160, 28, 120).is_ok());
        assert!(check_extents(&spec, &b, 159, 28, 120).is_err());
        assert!(check_extents(&spec, &b, 160, 27, 120).is_err());
        assert!(check_extents(&spec, &b, 160, 28, 119).is_err());
        let narrow = GemmSpec { ldx: 3, ..spec };
        assert!(narrow.dims().is_err());
    }
}
