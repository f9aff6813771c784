// A stand-in for a user's own kernel, used by prism-pipeline's
// `custom_kernel` example and the differential test: `cargo xtask
// build-kernels` compiles it to scale_add.ptx beside it (committed), which
// they embed and load at run time through cudarc. Not part of prism's
// kernel library.
extern "C" __global__ void scale_add(const float *x, float *y, unsigned long long n, float a,
                                     float b) {
    unsigned long long i = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x;
    if (i < n) y[i] = fmaf(a, x[i], b);
}
