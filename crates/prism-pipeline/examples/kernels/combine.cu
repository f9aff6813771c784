// A stand-in for a user's own join kernel (two inputs, one output), used by
// the stage-graph tests and the `fanout` example: `cargo xtask
// build-kernels` compiles it to combine.ptx beside it (committed), which
// they embed and load at run time through cudarc. Not part of prism's
// kernel library.
extern "C" __global__ void combine(const float *x, const float *y, float *out,
                                   unsigned long long n, float a, float b) {
    unsigned long long i = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x;
    if (i < n) out[i] = fmaf(a, x[i], b * y[i]);
}
