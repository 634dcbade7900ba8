// GEMM input and output conversions (op family 9 of the backend, plus the GEMM epilogue).
//
// to_bf16_f32:  f32 [rows, cols] -> bf16 GEMM input (hi rows, then lo rows when split).
// to_f32_bf16:  bf16 [n] -> f32 [n] (exact).
// gemm_out_f32: f32 GEMM result (split: [2*rows, cols], hi part then lo part) ->
//               out = (accumulate ? out : 0) + (gate ? gate : 1) * act(sum + (bias ? bias[col] : 0))
// gemm_out_bf16: the same sum and activation, written as a bf16 GEMM input for the next GEMM.
// kvrg_out_f32: the batched k, v, r, g projection's output (four [S*rows, cols] blocks of tmp, in
//               that order) summed into k, v, r and silu(g): one launch instead of four.

extern "C" __global__ void to_bf16_f32(const float* __restrict__ x, bf16_t* __restrict__ out,
                                       int rows, int cols, int split) {
    const i64 n = (i64)rows * cols;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        store_split(out, i, n, split, x[i]);
    }
}

extern "C" __global__ void to_f32_bf16(const bf16_t* __restrict__ x, float* __restrict__ out, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        out[i] = bf16_to_f32(x[i]);
    }
}

__device__ __forceinline__ float gemm_sum(const float* __restrict__ tmp, const float* __restrict__ bias,
                                          i64 i, i64 n, int cols, int split) {
    float s = tmp[i];
    if (split) {
        s += tmp[i + n];
    }
    if (bias) {
        s += bias[i % cols];
    }
    return s;
}

extern "C" __global__ void gemm_out_f32(const float* __restrict__ tmp, float* __restrict__ out,
                                        const float* __restrict__ bias, const float* __restrict__ gate,
                                        int rows, int cols, int split, int act, int accumulate) {
    const i64 n = (i64)rows * cols;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float v = apply_act(act, gemm_sum(tmp, bias, i, n, cols, split));
        if (gate) {
            v *= gate[i];
        }
        out[i] = accumulate ? out[i] + v : v;
    }
}

extern "C" __global__ void gemm_out_bf16(const float* __restrict__ tmp, bf16_t* __restrict__ out,
                                         const float* __restrict__ bias, int rows, int cols,
                                         int split, int act) {
    const i64 n = (i64)rows * cols;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        store_split(out, i, n, split, apply_act(act, gemm_sum(tmp, bias, i, n, cols, split)));
    }
}

extern "C" __global__ void kvrg_out_f32(const float* __restrict__ tmp, float* __restrict__ k,
                                        float* __restrict__ v, float* __restrict__ r,
                                        float* __restrict__ g, int rows, int cols, int split) {
    const i64 n = (i64)rows * cols;
    const i64 block = (split ? 2 : 1) * n; // one projection's output in tmp
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        k[i] = apply_act(ACT_NONE, gemm_sum(tmp, nullptr, i, n, cols, split));
        v[i] = apply_act(ACT_NONE, gemm_sum(tmp + block, nullptr, i, n, cols, split));
        r[i] = apply_act(ACT_NONE, gemm_sum(tmp + 2 * block, nullptr, i, n, cols, split));
        g[i] = apply_act(ACT_SILU, gemm_sum(tmp + 3 * block, nullptr, i, n, cols, split));
    }
}
