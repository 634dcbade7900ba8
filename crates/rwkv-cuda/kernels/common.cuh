// Prelude prepended to every kernel file before NVRTC compiles it (see src/compile.rs).
// No #include: NVRTC from PyPI ships no CUDA headers, so bf16 is handled as raw bits here.
//
// Conventions shared by all kernels:
// - Activations are f32, row-major [rows, cols]. GEMM inputs are bf16 bit patterns
//   (unsigned short). With `split` = 1 a GEMM input holds 2*rows rows: rows [0, rows) are
//   hi = bf16(x) and rows [rows, 2*rows) are lo = bf16(x - hi), so hi + lo carries ~16
//   mantissa bits and a bf16 GEMM over both halves is accurate to ~1e-5 relative.
// - The state pool is one f32 buffer: slot s starts at s * state_stride; inside a slot,
//   layer l starts at l * layer_len and holds [att_shift C][wkv H*N*N][ffn_shift C], the wkv
//   part indexed [head][key i][value j] (the host `State` layout, so a slot swaps in one copy).
// - Row metadata is i32. A `row_prev` entry >= 0 names the previous row of the same sequence;
//   a negative entry -(slot + 1) says the row is the first of its sequence and its previous
//   token lives in the shift state of that slot.

typedef unsigned short bf16_t;
typedef long long i64;

#define NEG_INF __int_as_float(0xff800000)

#define ACT_NONE 0
#define ACT_TANH 1
#define ACT_SILU 2
#define ACT_RELU2 3
#define ACT_SIGMOID 4
#define ACT_DECAY 5

__device__ __forceinline__ float bf16_to_f32(bf16_t h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// Round to nearest even, NaN stays NaN (quieted).
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (bf16_t)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// Writes x as a GEMM input element: hi at `i`, lo at `i + lo_offset` when split.
__device__ __forceinline__ void store_split(bf16_t* out, i64 i, i64 lo_offset, int split, float x) {
    const bf16_t hi = f32_to_bf16(x);
    out[i] = hi;
    if (split) {
        out[i + lo_offset] = f32_to_bf16(x - bf16_to_f32(hi));
    }
}

__device__ __forceinline__ float sigmoidf_(float x) {
    return 1.0f / (1.0f + expf(-x));
}

__device__ __forceinline__ float apply_act(int act, float x) {
    switch (act) {
    case ACT_TANH: return tanhf(x);
    case ACT_SILU: return x * sigmoidf_(x);
    case ACT_RELU2: { const float r = fmaxf(x, 0.0f); return r * r; }
    case ACT_SIGMOID: return sigmoidf_(x);
    case ACT_DECAY: return expf(-expf(x));
    default: return x;
    }
}

// Sum over the block; every thread gets the result. blockDim.x must be a multiple of 32
// (at most 1024) and every thread of the block must call it. `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    __syncthreads(); // scratch may still be read by a previous call
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    const int warps = blockDim.x >> 5;
    float t = lane < warps ? scratch[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
        t += __shfl_xor_sync(0xffffffffu, t, o);
    }
    return t;
}

// Max over the block, same contract as block_sum.
__device__ float block_max(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    const int warps = blockDim.x >> 5;
    float t = lane < warps ? scratch[lane] : NEG_INF;
    for (int o = 16; o > 0; o >>= 1) {
        t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
    }
    return t;
}
