//! Numeric kernels, one file per op family.

pub mod gemm;
pub mod matmul;
pub mod norm;
pub mod pool;
pub mod wkv;
