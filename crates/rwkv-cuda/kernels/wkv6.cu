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
//                   the official kernel; the column lives in registers and is written back once.
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

extern "C" __global__ void __launch_bounds__(WKV_N)
wkv6_prefill_f32(float* __restrict__ pool, i64 state_stride, i64 wkv_off,
                 const int* __restrict__ pre_first, const int* __restrict__ pre_end,
                 const int* __restrict__ pre_slot, int heads,
                 const float* __restrict__ r, const float* __restrict__ k, const float* __restrict__ v,
                 const float* __restrict__ w, const float* __restrict__ u, float* __restrict__ y) {
    __shared__ float sr[WKV_N], sk[WKV_N], sw[WKV_N], su[WKV_N];
    const int b = blockIdx.x / heads;
    const int h = blockIdx.x % heads;
    const int j = threadIdx.x;
    const int cols = heads * WKV_N;
    float* s = pool + (i64)pre_slot[b] * state_stride + wkv_off + (i64)h * WKV_N * WKV_N;
    float st[WKV_N];
#pragma unroll
    for (int i = 0; i < WKV_N; i++) {
        st[i] = s[i * WKV_N + j];
    }
    su[j] = u[h * WKV_N + j];
    const int t1 = pre_end[b];
    for (int t = pre_first[b]; t < t1; t++) {
        const i64 base = (i64)t * cols + (i64)h * WKV_N;
        __syncthreads(); // the previous token's reads of sr/sk/sw are done
        sr[j] = r[base + j];
        sk[j] = k[base + j];
        sw[j] = w[base + j];
        __syncthreads();
        const float vj = v[base + j];
        float yj = 0.0f;
#pragma unroll
        for (int i = 0; i < WKV_N; i++) {
            const float kv = sk[i] * vj;
            yj += sr[i] * (su[i] * kv + st[i]);
            st[i] = st[i] * sw[i] + kv;
        }
        y[base + j] = yj;
    }
#pragma unroll
    for (int i = 0; i < WKV_N; i++) {
        s[i * WKV_N + j] = st[i];
    }
}
