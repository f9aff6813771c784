/* prism-bench built without nvcc: the baselines (baselines.cu, s10.cu) are unavailable. */
#include "baselines.h"

int prism_bench_pieces(const float *const *in, float *const *out, const uint64_t *lens,
                       uint64_t count, uint64_t max_len, float a, float b, int32_t iters,
                       int32_t mode, int32_t nstreams, float *ms) {
    (void)in; (void)out; (void)lens; (void)count; (void)max_len; (void)a; (void)b; (void)iters;
    (void)mode; (void)nstreams; (void)ms;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}

int prism_bench_fanout_bidir(const float *const *in, float *const *out, const uint64_t *lens,
                             uint64_t count, uint64_t max_len, int32_t branches, float *ms) {
    (void)in; (void)out; (void)lens; (void)count; (void)max_len; (void)branches; (void)ms;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}

int prism_s10_k1(float *x, uint64_t off, uint64_t w, float a, float b, prism_stream_t stream) {
    (void)x; (void)off; (void)w; (void)a; (void)b; (void)stream;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}

int prism_s10_k2(float *x, uint64_t off, uint64_t w, float c, prism_stream_t stream) {
    (void)x; (void)off; (void)w; (void)c; (void)stream;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}

int prism_s10_k3(const float *x, uint64_t off, uint64_t w, float *acc, prism_stream_t stream) {
    (void)x; (void)off; (void)w; (void)acc; (void)stream;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}

int prism_s10_fill(float *x, uint64_t n, prism_stream_t stream) {
    (void)x; (void)n; (void)stream;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}

/* Host arithmetic only: the same in every build. */
float prism_s10_initial(uint64_t i) { return prism_s10_initial_value(i); }

int prism_bench_s10(int32_t mode, uint64_t n, uint64_t off, uint64_t w, uint64_t warmup,
                    uint64_t iters, float *window_out, double *us_per_iter, float *final_acc) {
    (void)mode; (void)n; (void)off; (void)w; (void)warmup; (void)iters; (void)window_out;
    (void)us_per_iter; (void)final_acc;
    return PRISM_ERR_KERNELS_NOT_BUILT;
}
