/*
 * Launchers of a build without nvcc: each returns PRISM_ERR_KERNELS_NOT_BUILT,
 * so a binary built without the CUDA toolkit links and reports a typed error
 * instead of failing to link. Including the header makes the C compiler reject
 * any stub whose signature drifts from it; `cargo xtask build-kernels --check`
 * checks that every declared launcher has a stub.
 */
#include "prism_kernels.h"

int prism_kernels_available(void) { return 0; }

int prism_preload_kernels(void) { return PRISM_ERR_KERNELS_NOT_BUILT; }

const char *prism_error_string(int code) {
    switch (code) {
        case 0: return "success";
        case PRISM_ERR_KERNELS_NOT_BUILT: return "kernels were not built (no nvcc at build time)";
        case PRISM_ERR_INVALID_ARGUMENT: return "invalid argument";
        default: return "CUDA error (this build has no CUDA runtime to describe it)";
    }
}

int prism_fma_chain_f32(const float *x, float *y, uint64_t n, float a, float b, int32_t iters,
                        prism_stream_t stream) {
    (void)x; (void)y; (void)n; (void)a; (void)b; (void)iters; (void)stream;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}

int prism_gather_bytes(const uint64_t *desc, uint64_t count, unsigned char *dst,
                       prism_stream_t stream) {
    (void)desc; (void)count; (void)dst; (void)stream;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}

int prism_scatter_bytes(const unsigned char *src, const uint64_t *desc, uint64_t count,
                        prism_stream_t stream) {
    (void)src; (void)desc; (void)count; (void)stream;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}

int prism_fill_pattern_u32(uint32_t *buf, uint64_t n, uint32_t seed, prism_stream_t stream) {
    (void)buf; (void)n; (void)seed; (void)stream;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}

int prism_check_pattern_u32(const uint32_t *buf, uint64_t n, uint32_t seed,
                            unsigned long long *mismatches, unsigned long long *first_bad,
                            prism_stream_t stream) {
    (void)buf; (void)n; (void)seed; (void)mismatches; (void)first_bad; (void)stream;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}

int prism_spin_ns(uint64_t nanoseconds, prism_stream_t stream) {
    (void)nanoseconds; (void)stream;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}

int prism_fault(prism_stream_t stream) {
    (void)stream;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}

int prism_group_sum_f32(const float *x, uint64_t n, uint32_t group, float *out,
                        prism_stream_t stream) {
    (void)x; (void)n; (void)group; (void)out; (void)stream;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}

int prism_clamp_f32(const float *x, float *y, uint64_t n, float lo, float hi,
                    prism_stream_t stream) {
    (void)x; (void)y; (void)n; (void)lo; (void)hi; (void)stream;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}
