//! Dense products `Y = X · Wᵀ` with `W` stored [out, in] row-major (nn.Linear layout).

use std::thread;

/// A row-major [rows, cols] f32 matrix used as `W` in `X · Wᵀ`.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    /// Wraps [out, in] data.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data length");
        Self { rows, cols, data }
    }

    /// Builds the [out, in] matrix from data stored [in, out] (LoRA matrices are stored that way).
    pub fn from_in_out(inputs: usize, outputs: usize, data: &[f32]) -> Self {
        assert_eq!(data.len(), inputs * outputs, "matrix data length");
        let mut t = vec![0.0; data.len()];
        for i in 0..inputs {
            for o in 0..outputs {
                t[o * inputs + i] = data[i * outputs + o];
            }
        }
        Self::new(outputs, inputs, t)
    }

    pub fn row(&self, o: usize) -> &[f32] {
        &self.data[o * self.cols..(o + 1) * self.cols]
    }
}

/// Below this many multiply-adds a product runs on the calling thread: spawning costs more.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// `out[t][o] = Σ_i x[t][i] · w[o][i]` for `t < rows`; `out` is [rows, w.rows].
pub fn matmul(x: &[f32], rows: usize, w: &Matrix, out: &mut [f32]) {
    assert_eq!(x.len(), rows * w.cols, "matmul input shape");
    assert_eq!(out.len(), rows * w.rows, "matmul output shape");
    if out.is_empty() {
        return;
    }
    let threads = thread::available_parallelism().map_or(1, |n| n.get());
    if threads == 1 || rows * w.rows * w.cols < PARALLEL_MIN_WORK {
        let mut transposed = vec![0.0; out.len()];
        matmul_transposed(x, rows, w, 0, &mut transposed);
        transpose_into(&transposed, w.rows, rows, out);
        return;
    }
    // Each thread owns a contiguous range of output features and writes them feature-major, so
    // the ranges are disjoint slices; one transpose at the end restores [rows, out].
    let per = w.rows.div_ceil(threads);
    let mut transposed = vec![0.0; out.len()];
    thread::scope(|s| {
        for (chunk_idx, chunk) in transposed.chunks_mut(per * rows).enumerate() {
            s.spawn(move || matmul_transposed(x, rows, w, chunk_idx * per, chunk));
        }
    });
    transpose_into(&transposed, w.rows, rows, out);
}

/// Computes features `first..first + out_t.len() / rows` into `out_t` laid out [feature, row].
fn matmul_transposed(x: &[f32], rows: usize, w: &Matrix, first: usize, out_t: &mut [f32]) {
    for (k, col) in out_t.chunks_mut(rows).enumerate() {
        let wrow = w.row(first + k);
        for (t, y) in col.iter_mut().enumerate() {
            *y = dot(&x[t * w.cols..(t + 1) * w.cols], wrow);
        }
    }
}

fn transpose_into(src: &[f32], src_rows: usize, src_cols: usize, dst: &mut [f32]) {
    for r in 0..src_rows {
        for c in 0..src_cols {
            dst[c * src_rows + r] = src[r * src_cols + c];
        }
    }
}

/// Dot product with eight independent accumulators so the compiler vectorizes it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], rows: usize, w: &Matrix) -> Vec<f32> {
        let mut out = vec![0.0; rows * w.rows];
        for t in 0..rows {
            for o in 0..w.rows {
                out[t * w.rows + o] = (0..w.cols)
                    .map(|i| x[t * w.cols + i] * w.data[o * w.cols + i])
                    .sum();
            }
        }
        out
    }

    #[test]
    fn matches_naive_product_serial_and_parallel() {
        for (rows, inputs, outputs) in [(1, 13, 7), (3, 64, 33), (17, 256, 300)] {
            let x: Vec<f32> = (0..rows * inputs)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                .collect();
            let w: Vec<f32> = (0..inputs * outputs)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 7.0)
                .collect();
            let w = Matrix::new(outputs, inputs, w);
            let mut out = vec![0.0; rows * outputs];
            matmul(&x, rows, &w, &mut out);
            for (a, b) in out.iter().zip(naive(&x, rows, &w)) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn in_out_storage_is_transposed() {
        // [in=2, out=3] stored row-major: in 0 -> (1, 2, 3), in 1 -> (4, 5, 6).
        let w = Matrix::from_in_out(2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(w.row(2), &[3.0, 6.0]);
    }
}
