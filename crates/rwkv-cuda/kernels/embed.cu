// Embedding gather (op family 8): x[t] = f32(emb'[tokens[t]]), emb' the bf16 folded embedding
// [vocab, cols]. Token ids were validated against the vocabulary on the host.

extern "C" __global__ void embedding_bf16(const bf16_t* __restrict__ emb, const unsigned int* __restrict__ tokens,
                                          float* __restrict__ x, int rows, int cols) {
    const i64 n = (i64)rows * cols;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const int row = (int)(i / cols);
        const int col = (int)(i % cols);
        x[i] = bf16_to_f32(emb[(i64)tokens[row] * cols + col]);
    }
}
