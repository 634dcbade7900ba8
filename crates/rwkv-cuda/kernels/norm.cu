// Normalisations (op families 5 and 6). Biased variance, two passes over the row like the
// CPU reference: mean, then mean((x - mean)^2); out = (x - mean) / sqrt(var + eps) * w + b.
//
// layer_norm_f32:     grid = rows, block = a multiple of 32. out f32 [rows, cols].
// layer_norm_bf16:    grid = out rows, reads input row idx[r]; writes a bf16 GEMM input
//                     (used for ln_out on the gathered rows that need logits).
// residual_layer_norm_f32: grid = rows. The residual update of gemm_out_f32 (x += gate * (tmp_hi
//                     + tmp_lo), gate optional) followed by out = LN(x): the add that ends one
//                     block and the LayerNorm that starts the next, in one launch.
// group_norm_gate_f32: grid = rows * (cols / n), block = n rounded up to 32. Per-head GroupNorm
//                     of y, times the gate g (already silu'd), written as the bf16 GEMM input of
//                     the output projection.

__device__ __forceinline__ void row_stats(const float* __restrict__ xr, int cols, float* scratch,
                                          float* mean_out, float* inv_out, float eps) {
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        s += xr[c];
    }
    const float mean = block_sum(s, scratch) / (float)cols;
    float q = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = xr[c] - mean;
        q += d * d;
    }
    const float var = block_sum(q, scratch) / (float)cols;
    *mean_out = mean;
    *inv_out = 1.0f / sqrtf(var + eps);
}

extern "C" __global__ void layer_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ b, float* __restrict__ out,
                                          int cols, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (i64)blockIdx.x * cols;
    float* orow = out + (i64)blockIdx.x * cols;
    float mean, inv;
    row_stats(xr, cols, scratch, &mean, &inv, eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        orow[c] = (xr[c] - mean) * inv * w[c] + b[c];
    }
}

extern "C" __global__ void layer_norm_bf16(const float* __restrict__ x, const int* __restrict__ idx,
                                           const float* __restrict__ w, const float* __restrict__ b,
                                           bf16_t* __restrict__ out, int rows, int cols, int split,
                                           float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (i64)idx[blockIdx.x] * cols;
    const i64 base = (i64)blockIdx.x * cols;
    float mean, inv;
    row_stats(xr, cols, scratch, &mean, &inv, eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        store_split(out, base + c, (i64)rows * cols, split, (xr[c] - mean) * inv * w[c] + b[c]);
    }
}

extern "C" __global__ void residual_layer_norm_f32(const float* __restrict__ tmp,
                                                   const float* __restrict__ gate, float* x,
                                                   const float* __restrict__ w,
                                                   const float* __restrict__ b,
                                                   float* __restrict__ out, int rows, int cols,
                                                   int split, float eps) {
    __shared__ float scratch[32];
    const i64 n = (i64)rows * cols;
    const i64 base = (i64)blockIdx.x * cols;
    float* xr = x + base;
    // Same arithmetic, in the same order, as gemm_out_f32 with act none and accumulate.
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = tmp[base + c];
        if (split) {
            v += tmp[base + c + n];
        }
        if (gate) {
            v *= gate[base + c];
        }
        xr[c] = xr[c] + v;
    }
    // row_stats walks the columns with the same stride, so every thread first reads back the
    // columns it has just written: no barrier is needed before it.
    float mean, inv;
    row_stats(xr, cols, scratch, &mean, &inv, eps);
    float* orow = out + base;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        orow[c] = (xr[c] - mean) * inv * w[c] + b[c];
    }
}

extern "C" __global__ void group_norm_gate_f32(const float* __restrict__ y, const float* __restrict__ g,
                                               const float* __restrict__ w, const float* __restrict__ b,
                                               bf16_t* __restrict__ out, int rows, int cols, int n,
                                               int split, float eps) {
    __shared__ float scratch[32];
    const int heads = cols / n;
    const int row = blockIdx.x / heads;
    const int h = blockIdx.x % heads;
    const int j = threadIdx.x;
    const bool valid = j < n;
    const i64 i = (i64)row * cols + (i64)h * n + j;
    const float v = valid ? y[i] : 0.0f;
    const float mean = block_sum(v, scratch) / (float)n;
    const float d = valid ? v - mean : 0.0f;
    const float var = block_sum(d * d, scratch) / (float)n;
    if (valid) {
        const int c = h * n + j;
        const float o = d * (1.0f / sqrtf(var + eps)) * w[c] + b[c];
        store_split(out, i, (i64)rows * cols, split, o * g[i]);
    }
}
