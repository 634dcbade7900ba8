// Sampling helpers for large batches (op family 10). One block per row; block size a multiple
// of 32.
//
// softmax_f32: out[row] = softmax(x[row] * inv_temp), max-subtracted.
// row_mass_f32: each row's largest entry m and softmax denominator sum(exp(x - m)) at T = 1
//              (NaN counts as -inf and +inf as the largest finite float, as the host sampler
//              cleans a row), for deciding a nucleus from the row's best candidates.
// topk_f32:    the k largest entries of each row, in order (ties: lower index first; NaN counts
//              as -inf), in rounds of TOPK_ROUND picks (see the kernel): ceil(k / TOPK_ROUND)
//              passes over the row.

extern "C" __global__ void softmax_f32(const float* __restrict__ x, float* __restrict__ out, int cols,
                                       float inv_temp) {
    __shared__ float scratch[32];
    const float* xr = x + (i64)blockIdx.x * cols;
    float* orow = out + (i64)blockIdx.x * cols;
    float m = NEG_INF;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        m = fmaxf(m, xr[c] * inv_temp);
    }
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        s += expf(xr[c] * inv_temp - m);
    }
    const float inv = 1.0f / block_sum(s, scratch);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        orow[c] = expf(xr[c] * inv_temp - m) * inv;
    }
}

__device__ __forceinline__ float clean_logit(float v) {
    return v != v ? NEG_INF : fminf(v, 3.402823466e38f);
}

extern "C" __global__ void row_mass_f32(const float* __restrict__ x, float* __restrict__ out_max,
                                        float* __restrict__ out_sum, int cols) {
    __shared__ float scratch[32];
    const float* xr = x + (i64)blockIdx.x * cols;
    float m = NEG_INF;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        m = fmaxf(m, clean_logit(xr[c]));
    }
    m = block_max(m, scratch);
    float s = 0.0f;
    if (m != NEG_INF) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            s += expf(clean_logit(xr[c]) - m);
        }
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        out_max[blockIdx.x] = m;
        out_sum[blockIdx.x] = s;
    }
}

// Does (av, ai) rank before (bv, bi)? Larger value first, then lower index.
__device__ __forceinline__ bool ranks_before(float av, int ai, float bv, int bi) {
    return av > bv || (av == bv && ai < bi);
}

__device__ __forceinline__ void warp_best(float* v, int* i) {
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, *v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, *i, o);
        if (ranks_before(ov, oi, *v, *i)) {
            *v = ov;
            *i = oi;
        }
    }
}

// Picks per round of topk_f32: the size of each thread's candidate list (registers).
#define TOPK_ROUND 16

// Inserts (v, c) into a list sorted best first, dropping its last entry. Every index is a
// compile-time constant once unrolled, so the list stays in registers.
__device__ __forceinline__ void topk_insert(float (&lv)[TOPK_ROUND], int (&li)[TOPK_ROUND], float v,
                                            int c) {
#pragma unroll
    for (int j = TOPK_ROUND - 1; j > 0; j--) {
        if (ranks_before(v, c, lv[j - 1], li[j - 1])) {
            lv[j] = lv[j - 1];
            li[j] = li[j - 1];
        } else if (ranks_before(v, c, lv[j], li[j])) {
            lv[j] = v;
            li[j] = c;
        }
    }
    if (ranks_before(v, c, lv[0], li[0])) {
        lv[0] = v;
        li[0] = c;
    }
}

// One block per row. A round finds the next TOPK_ROUND entries after the previous round's last
// pick: each thread keeps the TOPK_ROUND best of its own entries (c = threadIdx.x + j *
// blockDim.x) that rank after that pick, then the block merges the lists by repeated arg-max of
// their heads, the owner of each pick popping it. The round's entries are all in the lists (an
// entry missing from its thread's list ranks after TOPK_ROUND entries that are in it), and a
// round takes at most TOPK_ROUND picks, so no list runs dry before the round ends. The row is
// read ceil(k / TOPK_ROUND) times instead of k times.
extern "C" __global__ void topk_f32(const float* __restrict__ x, int* __restrict__ out_idx,
                                    float* __restrict__ out_val, int cols, int k) {
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ float pick_v;
    __shared__ int pick_i;
    const float* xr = x + (i64)blockIdx.x * cols;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const int none = 0x7fffffff; // with -inf: ranks after every entry, -inf ones included
    float prev_v = __int_as_float(0x7f800000); // +inf with index -1 ranks before everything
    int prev_i = -1;
    for (int done = 0; done < k; done += TOPK_ROUND) {
        float lv[TOPK_ROUND];
        int li[TOPK_ROUND];
#pragma unroll
        for (int j = 0; j < TOPK_ROUND; j++) {
            lv[j] = NEG_INF;
            li[j] = none;
        }
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float v = xr[c];
            if (v != v) {
                v = NEG_INF;
            }
            if (ranks_before(v, c, lv[TOPK_ROUND - 1], li[TOPK_ROUND - 1]) &&
                ranks_before(prev_v, prev_i, v, c)) {
                topk_insert(lv, li, v, c);
            }
        }
        const int picks = k - done < TOPK_ROUND ? k - done : TOPK_ROUND;
        for (int p = 0; p < picks; p++) {
            float bv = lv[0];
            int bi = li[0];
            warp_best(&bv, &bi);
            __syncthreads(); // the previous pick's sv, si and pick_* have been read
            if (lane == 0) {
                sv[warp] = bv;
                si[warp] = bi;
            }
            __syncthreads();
            if (warp == 0) {
                bv = lane < warps ? sv[lane] : NEG_INF;
                bi = lane < warps ? si[lane] : none;
                warp_best(&bv, &bi);
                if (lane == 0) {
                    out_idx[(i64)blockIdx.x * k + done + p] = bi;
                    out_val[(i64)blockIdx.x * k + done + p] = bv;
                    pick_v = bv;
                    pick_i = bi;
                }
            }
            __syncthreads();
            // Indices are unique to their thread, so only the pick's owner pops.
            if (li[0] == pick_i) {
#pragma unroll
                for (int j = 0; j < TOPK_ROUND - 1; j++) {
                    lv[j] = lv[j + 1];
                    li[j] = li[j + 1];
                }
                lv[TOPK_ROUND - 1] = NEG_INF;
                li[TOPK_ROUND - 1] = none;
            }
        }
        prev_v = pick_v;
        prev_i = pick_i;
    }
}
