// The WKV6 recurrence (spec 2.4, op families 1 and 2), f32 throughout, reading and writing each
// sequence's state in place in the slot pool. Compile with -DHEAD_SIZE=N.
//
// Per head h, with S the state [key i][value j] before the token:
//   y[j]    = sum_i r[i] * (u[i] * k[i] * v[j] + S[i][j])
//   S'[i][j] = w[i] * S[i][j] + k[i] * v[j]
// Launch: grid = sequences * H blocks (block b * H + h is head h of sequence b), HEAD_SIZE
// threads; thread j owns value column j, so for each key i a warp reads S[i][j..j+31]:
// consecutive addresses (the pool is key-major per head), i.e. coalesced.
//
// wkv6_decode_f32:  one token per sequence: row dec_row[b], slot dec_slot[b]. Streams the state
//                   column through registers (read, update, write back per key).
// wkv6_prefill_f32: tokens pre_first[b] .. pre_end[b]-1 of sequence b, sequential in time like
//                   the official kernel; the column lives in registers and is written back once
//                   (block layout below).
// r, k, v, w, y are [rows, C] f32 (C = H * HEAD_SIZE); w is the decay exp(-exp(d)); u is [C].

#ifndef HEAD_SIZE
#error "wkv6.cu needs -DHEAD_SIZE=<head size>"
#endif
#define WKV_N HEAD_SIZE

extern "C" __global__ void __launch_bounds__(WKV_N)
wkv6_decode_f32(float* __restrict__ pool, i64 state_stride, i64 wkv_off,
                const int* __restrict__ dec_row, const int* __restrict__ dec_slot, int heads,
                const float* __restrict__ r, const float* __restrict__ k, const float* __restrict__ v,
                const float* __restrict__ w, const float* __restrict__ u, float* __restrict__ y) {
    __shared__ float sr[WKV_N], sk[WKV_N], sw[WKV_N], su[WKV_N];
    const int b = blockIdx.x / heads;
    const int h = blockIdx.x % heads;
    const int j = threadIdx.x;
    const int cols = heads * WKV_N;
    const i64 base = (i64)dec_row[b] * cols + (i64)h * WKV_N;
    float* s = pool + (i64)dec_slot[b] * state_stride + wkv_off + (i64)h * WKV_N * WKV_N;
    sr[j] = r[base + j];
    sk[j] = k[base + j];
    sw[j] = w[base + j];
    su[j] = u[h * WKV_N + j];
    __syncthreads();
    const float vj = v[base + j];
    float yj = 0.0f;
#pragma unroll 16
    for (int i = 0; i < WKV_N; i++) {
        const float sij = s[i * WKV_N + j];
        const float kv = sk[i] * vj;
        yj += sr[i] * (su[i] * kv + sij);
        s[i * WKV_N + j] = sij * sw[i] + kv;
    }
    y[base + j] = yj;
}

// Prefill: each value column j is split over WKV_Q threads (adjacent lanes), each owning
// WKV_KPER keys of the column, so a block has WKV_N * WKV_Q threads: four times the warps of one
// thread per column, and a quarter of the serial work per token. The lanes' partial y are
// added with shuffles. Tokens come in chunks of WKV_T: r, k, w, v of the whole chunk are loaded
// into shared memory at once (one global-latency wait per chunk, not per token), and the
// chunk's tokens then run from shared memory without barriers. r, k, w (read per key) are
// padded by one float per key group so the WKV_Q groups of a warp hit distinct banks.
// Must match `wkv_prefill_split` in launch.rs: 4 lanes per column when that makes whole warps.
#define WKV_Q ((WKV_N % 8 == 0) ? 4 : 1)
#define WKV_KPER (WKV_N / WKV_Q)
#define WKV_PAD (WKV_N + WKV_Q)
#define WKV_T (WKV_N > 64 ? 16 : 32)

extern "C" __global__ void __launch_bounds__(WKV_N * WKV_Q)
wkv6_prefill_f32(float* __restrict__ pool, i64 state_stride, i64 wkv_off,
                 const int* __restrict__ pre_first, const int* __restrict__ pre_end,
                 const int* __restrict__ pre_slot, int heads,
                 const float* __restrict__ r, const float* __restrict__ k, const float* __restrict__ v,
                 const float* __restrict__ w, const float* __restrict__ u, float* __restrict__ y) {
    __shared__ float cr[WKV_T * WKV_PAD], ck[WKV_T * WKV_PAD], cw[WKV_T * WKV_PAD];
    __shared__ float cv[WKV_T * WKV_N], su[WKV_PAD];
    const int b = blockIdx.x / heads;
    const int h = blockIdx.x % heads;
    const int tid = threadIdx.x;
    const int j = tid / WKV_Q;         // value column
    const int q = tid % WKV_Q;         // key group
    const int key0 = q * WKV_KPER;     // first key of the group
    const int pk0 = q * (WKV_KPER + 1); // its padded index
    const int cols = heads * WKV_N;
    float* s = pool + (i64)pre_slot[b] * state_stride + wkv_off + (i64)h * WKV_N * WKV_N;
    float st[WKV_KPER];
#pragma unroll
    for (int ii = 0; ii < WKV_KPER; ii++) {
        st[ii] = s[(key0 + ii) * WKV_N + j];
    }
    for (int c = tid; c < WKV_N; c += WKV_N * WKV_Q) {
        su[c + c / WKV_KPER] = u[h * WKV_N + c];
    }
    const int t0 = pre_first[b], t1 = pre_end[b];
    for (int tc = t0; tc < t1; tc += WKV_T) {
        const int n = t1 - tc < WKV_T ? t1 - tc : WKV_T;
        __syncthreads(); // the previous chunk is consumed (and su is written, the first time)
        for (int e = tid; e < n * WKV_N; e += WKV_N * WKV_Q) {
            const int tt = e / WKV_N, c = e % WKV_N;
            const i64 at = (i64)(tc + tt) * cols + (i64)h * WKV_N + c;
            const int pc = tt * WKV_PAD + c + c / WKV_KPER;
            cr[pc] = r[at];
            ck[pc] = k[at];
            cw[pc] = w[at];
            cv[tt * WKV_N + c] = v[at];
        }
        __syncthreads();
        for (int tt = 0; tt < n; tt++) {
            const float vj = cv[tt * WKV_N + j];
            const float* rr = cr + tt * WKV_PAD + pk0;
            const float* kk = ck + tt * WKV_PAD + pk0;
            const float* ww = cw + tt * WKV_PAD + pk0;
            float yj = 0.0f;
#pragma unroll
            for (int ii = 0; ii < WKV_KPER; ii++) {
                const float kv = kk[ii] * vj;
                yj += rr[ii] * (su[pk0 + ii] * kv + st[ii]);
                st[ii] = st[ii] * ww[ii] + kv;
            }
#pragma unroll
            for (int o = 1; o < WKV_Q; o <<= 1) {
                yj += __shfl_xor_sync(0xffffffffu, yj, o);
            }
            if (q == 0) {
                y[(i64)(tc + tt) * cols + (i64)h * WKV_N + j] = yj;
            }
        }
    }
#pragma unroll
    for (int ii = 0; ii < WKV_KPER; ii++) {
        s[(key0 + ii) * WKV_N + j] = st[ii];
    }
}
