// GEMM input and output conversions (op family 9 of the backend, plus the GEMM epilogue).
//
// to_bf16_f32:  f32 [rows, cols] -> bf16 GEMM input (hi rows, then lo rows when split).
// to_f32_bf16:  bf16 [n] -> f32 [n] (exact).
// gemm_out_f32: f32 GEMM result (split: [2*rows, cols], hi part then lo part) ->
//               out = (accumulate ? out : 0) + (gate ? gate : 1) * act(sum + (bias ? bias[col] : 0))
// gemm_out_bf16: the same sum and activation, written as a bf16 GEMM input for the next GEMM.

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
