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

/*
 * S11's bound (fan-out), and PRISM_BENCH_BIDIR's copies (branches = 1):
 * every piece is copied once host to device (in[i], lens[i] floats, on one
 * stream) and `branches` times device to host (into out[b * count + i] for
 * branch b, on a second stream), all issued together, no kernel: H2D of
 * piece i, then its `branches` D2H, piece after piece. Writes the GPU time
 * from an event before the first copy to one after the last, to *ms.
 * Device buffers, streams and events are made before and freed after the
 * timed region. 1 <= branches <= PRISM_BENCH_MAX_BRANCHES. Synchronous.
 */
#define PRISM_BENCH_MAX_BRANCHES 16
int prism_bench_fanout_bidir(const float *const *in, float *const *out, const uint64_t *lens,
                             uint64_t count, uint64_t max_len, int32_t branches, float *ms);

/*
 * S10 (cuda/s10.cu): many small iterations over resident data. Each iteration
 * runs three small kernels over a fixed window x[off .. off + w) of a device
 * array of n floats, then reads a 4-byte sum back to the host and waits:
 *   k1 prism_s10_k1: x[off + j] = fmaf(x[off + j], a, b)
 *   k2 prism_s10_k2: y = fmaxf(x[off + j], 0) + c; x[off + j] = y - floorf(y)
 *   k3 prism_s10_k3: *acc = sum of x[off .. off + w), in a fixed order (below)
 * The window and the constants stay the same for the whole run, so a CUDA
 * graph captured once replays the iteration with no parameter updates.
 *
 * The launchers only enqueue work on `stream` (no allocation, no
 * synchronisation) and return 0 or the cudaError_t of cudaGetLastError()
 * after the launch (PRISM_ERR_KERNELS_NOT_BUILT from the stub). `x` points to
 * the start of a device array of at least off + w floats (the window is
 * x[off .. off + w)); `acc` to one device float.
 *
 * The elementwise steps are exact IEEE operations (fmaf rounds once, like
 * Rust's f32::mul_add; the add rounds once; floorf and y - floorf(y) are
 * exact for y in [0, 2)), so a CPU replica matches them bit for bit. k3 is
 * one block of PRISM_S10_SUM_THREADS threads: thread t first adds
 * x[off + t], x[off + t + T], x[off + t + 2T], ... in that order (T =
 * PRISM_S10_SUM_THREADS, a sum starting at 0.0f), then the partial sums are
 * combined by a tree, for s = T/2, T/4, ..., 1: p[t] += p[t + s] for t < s,
 * and *acc = p[0] (overwritten, so no memset is needed between iterations).
 */
#define PRISM_S10_SUM_THREADS 1024
#define PRISM_S10_A 0.999f      /* k1's factor */
#define PRISM_S10_B 0.001f      /* k1's addend */
#define PRISM_S10_C 0.381966f   /* k2's addend before the wrap into [0, 1) */

#define PRISM_BENCH_S10_STREAMS 0 /* per iteration: k1, k2, k3, 4-byte D2H, cudaStreamSynchronize */
#define PRISM_BENCH_S10_GRAPH 1   /* the same four steps captured once as a CUDA graph, replayed,
                                     then cudaStreamSynchronize */

int prism_s10_k1(float *x, uint64_t off, uint64_t w, float a, float b, prism_stream_t stream);
int prism_s10_k2(float *x, uint64_t off, uint64_t w, float c, prism_stream_t stream);
int prism_s10_k3(const float *x, uint64_t off, uint64_t w, float *acc, prism_stream_t stream);

/* x[i] = prism_s10_initial_value(i) for i < n: S10's initial data. */
int prism_s10_fill(float *x, uint64_t n, prism_stream_t stream);

/* prism_s10_initial_value(i), callable from any language (compiled in every build). */
float prism_s10_initial(uint64_t i);

/*
 * Runs S10 with the CUDA runtime in `mode` (PRISM_BENCH_S10_*) on the
 * current device: allocates x (n floats) and fills it with
 * prism_s10_fill, allocates the device accumulator and a pinned host float,
 * runs `warmup` untimed iterations and then `iters` timed ones (k1 with
 * PRISM_S10_A/B, k2 with PRISM_S10_C, k3, the 4-byte copy to the pinned host
 * float, cudaStreamSynchronize, a host read of the value) on one
 * non-blocking stream, and writes the wall time per timed iteration
 * (steady clock) to *us_per_iter and the value read after the last
 * iteration to *final_acc. If window_out is not NULL, it receives the final
 * x[off .. off + w) (w floats of host memory, copied after the timing).
 * Frees everything before returning. 0 or an error code.
 */
int prism_bench_s10(int32_t mode, uint64_t n, uint64_t off, uint64_t w, uint64_t warmup,
                    uint64_t iters, float *window_out, double *us_per_iter, float *final_acc);

/*
 * S10's initial data: x[i] in [-1, 1), a hash of i (exact in f32):
 *   h = ((uint32_t)i * 0x9E3779B9) ^ (uint32_t)(i >> 32), then h ^= h >> 16;
 *   h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16 (uint32_t
 *   arithmetic, wrapping); x = (float)(h >> 8) * 2^-23 - 1.
 */
#ifdef __CUDACC__
#define PRISM_S10_HD __host__ __device__
#else
#define PRISM_S10_HD
#endif
static inline PRISM_S10_HD float prism_s10_initial_value(uint64_t i) {
    uint32_t h = ((uint32_t)i * 0x9E3779B9u) ^ (uint32_t)(i >> 32);
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return (float)(h >> 8) * (1.0f / 8388608.0f) - 1.0f;
}

#ifdef __cplusplus
}
#endif

#endif /* PRISM_BASELINES_H */
