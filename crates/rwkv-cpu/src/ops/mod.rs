//! Numeric kernels, one file per op family.

pub mod matmul;
pub mod norm;
pub mod wkv;
