/*
 * The benchmark's baselines (baselines.cu): hand-written CUDA C++ with the
 * runtime API, what a user would write instead of prism. Built by
 * prism-bench's build script with nvcc (baselines_stub.c without nvcc, where
 * the function returns PRISM_ERR_KERNELS_NOT_BUILT). Not part of prism.
 */
#ifndef PRISM_BASELINES_H
#define PRISM_BASELINES_H

#include "prism_kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PRISM_BENCH_MAX_STREAMS 8
#define PRISM_BENCH_SEQUENTIAL 0  /* one stream: H2D, kernel, D2H per piece */
#define PRISM_BENCH_MULTISTREAM 1 /* piece i on stream i % nstreams, one buffer set per stream */
#define PRISM_BENCH_BIDIR 2       /* all H2D on one stream, all D2H on another, no kernel */
#define PRISM_BENCH_KERNEL_ONLY 3 /* all kernels back to back on device-resident data */
#define PRISM_BENCH_STEP 4        /* one stream: H2D, kernel, D2H, synchronise, per piece */
#define PRISM_BENCH_STEP_GRAPH 5  /* as STEP, the three captured once as a CUDA graph */
#define PRISM_BENCH_BATCHED 6     /* groups of PRISM_BENCH_BATCH_ITEMS pieces, group g on stream
                                     g % nstreams: one cudaMemcpyBatchAsync in, one kernel over
                                     the group, one cudaMemcpyBatchAsync out */
#define PRISM_BENCH_BATCH_ITEMS 256

/*
 * Runs `count` pieces (in[i] -> out[i], lens[i] floats, pinned host memory,
 * lens[i] <= max_len) in `mode` and writes the GPU time of the whole batch,
 * from an event before the first call to one after the last, to *ms. Device
 * buffers and streams are made before and freed after the timed region.
 * Outputs hold y = fma^iters(x) for the sequential, multistream and step
 * modes. The step modes synchronise after every piece and are timed on the
 * host (steady clock) instead: a synchronous round trip per piece. The
 * graph form captures piece 0's step and replays it `count` times.
 */
int prism_bench_pieces(const float *const *in, float *const *out, const uint64_t *lens,
                       uint64_t count, uint64_t max_len, float a, float b, int32_t iters,
                       int32_t mode, int32_t nstreams, float *ms);

#ifdef __cplusplus
}
#endif

#endif /* PRISM_BASELINES_H */
