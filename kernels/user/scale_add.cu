// A stand-in for a user's own kernel: compiled to PTX by prism-cuda-sys's
// build script (prism_cuda_sys::EXAMPLE_USER_PTX) and loaded at run time
// through cudarc by prism-pipeline's `custom_kernel` example. Not part of
// prism's kernel library.
extern "C" __global__ void scale_add(const float *x, float *y, unsigned long long n, float a,
                                     float b) {
    unsigned long long i = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x;
    if (i < n) y[i] = fmaf(a, x[i], b);
}
