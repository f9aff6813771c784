// A stage kernel with resident state, for prism-pipeline's GPU test of
// stages that own device buffers (tests/gpu_resident.rs): a lookup table
// uploaded once and an accumulator that every chunk adds to. `cargo xtask
// build-kernels` compiles it to table_acc.ptx beside it (committed). Not
// part of prism's kernel library.
//
// y[i] = x[i] * w[i % k]; acc[i] += y[i], for i < n. The products and sums
// are rounded one at a time (no fused multiply-add), so a CPU loop gives
// the same bits.
extern "C" __global__ void table_acc(const float *x, float *y, const float *w, float *acc,
                                     unsigned long long n, unsigned long long k) {
    unsigned long long i = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x;
    if (i < n) {
        const float v = __fmul_rn(x[i], w[i % k]);
        y[i] = v;
        acc[i] = __fadd_rn(acc[i], v);
    }
}
