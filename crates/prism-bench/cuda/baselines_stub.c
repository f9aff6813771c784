/* prism-bench built without nvcc: the baselines are unavailable. */
#include "baselines.h"

int prism_bench_pieces(const float *const *in, float *const *out, const uint64_t *lens,
                       uint64_t count, uint64_t max_len, float a, float b, int32_t iters,
                       int32_t mode, int32_t nstreams, float *ms) {
    (void)in; (void)out; (void)lens; (void)count; (void)max_len; (void)a; (void)b; (void)iters;
    (void)mode; (void)nstreams; (void)ms;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}
