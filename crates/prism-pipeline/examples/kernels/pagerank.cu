// PageRank's three kernels for prism-pipeline's `pagerank` example (a
// stand-in for a user's own kernels, not part of prism's kernel library):
// `cargo xtask build-kernels` compiles this file to pagerank.ptx beside it
// (committed), which the example embeds and loads at run time.
//
// The graph is pull-based CSR of in-edges: the in-neighbours of vertex v
// are col_idx[row_ptr[v] .. row_ptr[v + 1]]. inv_deg[u] is 1 / out-degree
// of u, 0 for a dangling vertex (no out-edge), whose rank is spread over
// every vertex instead. Launch each kernel with blocks of 256 threads and
// enough blocks to cover n (the two reductions need every thread of a
// block, and a block size that is a multiple of 32).

#define BLOCK 256

// Sum of `x` over the block, valid in thread 0 (every thread must call it).
__device__ float block_sum(float x) {
    __shared__ float warp_sums[BLOCK / 32];
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
        x = lane < (blockDim.x >> 5) ? warp_sums[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
    }
    return x;
}

// contrib[v] = rank[v] * inv_deg[v]; *dangling += the ranks of dangling
// vertices (*dangling must be 0 before: the example fills it).
extern "C" __global__ void pr_contrib(const float *__restrict__ rank,
                                      const float *__restrict__ inv_deg,
                                      float *__restrict__ contrib, float *__restrict__ dangling,
                                      unsigned n) {
    const unsigned v = blockIdx.x * blockDim.x + threadIdx.x;
    float d = 0.0f;
    if (v < n) {
        const float r = rank[v], w = inv_deg[v];
        contrib[v] = r * w;
        if (w == 0.0f) d = r;
    }
    d = block_sum(d);
    if (threadIdx.x == 0 && d != 0.0f) atomicAdd(dangling, d);
}

// next[v] = (1 - damping) / n + damping * (sum of contrib over the
// in-neighbours of v + *dangling / n).
extern "C" __global__ void pr_gather(const unsigned *__restrict__ row_ptr,
                                     const unsigned *__restrict__ col_idx,
                                     const float *__restrict__ contrib,
                                     const float *__restrict__ dangling, float *__restrict__ next,
                                     unsigned n, float damping) {
    const unsigned v = blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= n) return;
    float s = 0.0f;
    const unsigned end = row_ptr[v + 1];
    for (unsigned e = row_ptr[v]; e < end; ++e) s += contrib[col_idx[e]];
    const float inv_n = 1.0f / static_cast<float>(n);
    next[v] = (1.0f - damping) * inv_n + damping * (s + *dangling * inv_n);
}

// *residual += sum over v of |next[v] - rank[v]| (the L1 norm of the
// change; *residual must be 0 before), then rank[v] = next[v].
extern "C" __global__ void pr_residual(const float *__restrict__ next, float *__restrict__ rank,
                                       float *__restrict__ residual, unsigned n) {
    const unsigned v = blockIdx.x * blockDim.x + threadIdx.x;
    float diff = 0.0f;
    if (v < n) {
        const float x = next[v];
        diff = fabsf(x - rank[v]);
        rank[v] = x;
    }
    diff = block_sum(diff);
    if (threadIdx.x == 0) atomicAdd(residual, diff);
}
