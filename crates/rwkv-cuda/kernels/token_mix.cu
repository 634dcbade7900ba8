// Token shift and the data-dependent mixes of the time-mix and channel-mix (op families 3 and 7).
// Spec 2.3 and 2.6: dx = prev - a, where prev is the previous row of the same sequence, or for
// the first row of a sequence the shift state of its slot (which holds the previous token's
// LayerNorm output). All element-wise kernels use a grid-stride loop over rows * cols.
//
// tmix_shift_f32:  dx = prev - a (f32) and the ddlerp LoRA input xm = a + dx * maa_x (bf16 GEMM input).
// tmix_mix_f32:    m_j = maa_w2 LoRA output j (f32 [5][S*rows][cols], j in order w, k, v, r, g,
//                  hi/lo halves summed here); x_j = a + dx * (lambda_j + m_j), written as five
//                  bf16 GEMM inputs [5][S*rows][cols]. lambda is packed [5][cols] in the same order.
// cmix_shift_f32:  channel-mix: dx = prev - b; x_k = b + dx * maa_k, x_r = b + dx * maa_r (bf16).
//
// The shift kernels also update the shift state: the thread of a sequence's first row, the only
// one that reads the slot's shift, replaces it with the sequence's last row (row_last) after
// reading it. Slots are distinct within a step, so no other thread touches that value.

// The previous row's value of column `col`; for a sequence's first row, the slot's shift state,
// which is then replaced by the sequence's last row.
__device__ __forceinline__ float shift_value(const float* __restrict__ a, float* __restrict__ pool,
                                             const int* __restrict__ row_prev,
                                             const int* __restrict__ row_last, i64 state_stride,
                                             i64 shift_off, int row, int col, int cols) {
    const int p = row_prev[row];
    if (p >= 0) {
        return a[(i64)p * cols + col];
    }
    float* shift = pool + (i64)(-p - 1) * state_stride + shift_off + col;
    const float prev = *shift;
    *shift = a[(i64)row_last[row] * cols + col];
    return prev;
}

extern "C" __global__ void tmix_shift_f32(const float* __restrict__ a, float* __restrict__ pool,
                                          const int* __restrict__ row_prev,
                                          const int* __restrict__ row_last, i64 state_stride, i64 shift_off,
                                          const float* __restrict__ maa_x, float* __restrict__ dx,
                                          bf16_t* __restrict__ xm, int rows, int cols, int split) {
    const i64 n = (i64)rows * cols;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const int row = (int)(i / cols);
        const int col = (int)(i % cols);
        const float cur = a[i];
        const float d = shift_value(a, pool, row_prev, row_last, state_stride, shift_off, row, col, cols) - cur;
        dx[i] = d;
        store_split(xm, i, n, split, cur + d * maa_x[col]);
    }
}

extern "C" __global__ void tmix_mix_f32(const float* __restrict__ a, const float* __restrict__ dx,
                                        const float* __restrict__ m, const float* __restrict__ lambda,
                                        bf16_t* __restrict__ xs, int rows, int cols, int split) {
    const i64 n = (i64)rows * cols;
    const i64 stride = (split ? 2 : 1) * n; // one target's block in m and in xs
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const int col = (int)(i % cols);
        const float cur = a[i];
        const float d = dx[i];
#pragma unroll
        for (int j = 0; j < 5; j++) {
            float mj = m[j * stride + i];
            if (split) {
                mj += m[j * stride + n + i];
            }
            store_split(xs + j * stride, i, n, split, cur + d * (lambda[j * cols + col] + mj));
        }
    }
}

extern "C" __global__ void cmix_shift_f32(const float* __restrict__ b, float* __restrict__ pool,
                                          const int* __restrict__ row_prev,
                                          const int* __restrict__ row_last, i64 state_stride, i64 shift_off,
                                          const float* __restrict__ maa_k, const float* __restrict__ maa_r,
                                          bf16_t* __restrict__ xk, bf16_t* __restrict__ xr,
                                          int rows, int cols, int split) {
    const i64 n = (i64)rows * cols;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const int row = (int)(i / cols);
        const int col = (int)(i % cols);
        const float cur = b[i];
        const float d = shift_value(b, pool, row_prev, row_last, state_stride, shift_off, row, col, cols) - cur;
        store_split(xk, i, n, split, cur + d * maa_k[col]);
        store_split(xr, i, n, split, cur + d * maa_r[col]);
    }
}
