/*
 * prism kernel launchers: the C ABI between the .cu files in kernels/ and Rust.
 *
 * Every launcher enqueues work on the given stream and returns at once.
 * Return value: 0 on success; a positive value is the cudaError_t reported by
 * the CUDA runtime (launch-configuration errors and cudaGetLastError() after
 * the launch); PRISM_ERR_KERNELS_NOT_BUILT means this binary was built
 * without nvcc and holds no kernels.
 *
 * The header depends on no CUDA header, so bindings can be generated without
 * the CUDA toolkit. prism_stream_t is ABI-identical to cudaStream_t and to the
 * driver API's CUstream (both are `struct CUstream_st *`).
 *
 * Contracts common to all launchers: device pointers point into allocations
 * of the current context with at least the stated number of elements; the
 * caller keeps them alive and untouched by other streams until the work on
 * `stream` has completed.
 */
#ifndef PRISM_KERNELS_H
#define PRISM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st *prism_stream_t;

/* Returned by every launcher of a build that compiled no kernels. */
#define PRISM_ERR_KERNELS_NOT_BUILT 100001
/* Returned when an argument is out of range (n too large for the grid, iters < 0). */
#define PRISM_ERR_INVALID_ARGUMENT 100002

/* Non-zero when this build holds real kernels. */
int prism_kernels_available(void);

/*
 * Loads every prism kernel into the current context now, instead of at its
 * first launch (CUDA's lazy module loading stalls the launching thread
 * there). 0 on success, else a launcher-style error code.
 */
int prism_preload_kernels(void);

/*
 * Host memory: copies `bytes` bytes from src to dst (which must not overlap)
 * with non-temporal (streaming) stores where the CPU has them (x86_64): the
 * destination is not read into the cache first, which saves a third of the
 * memory traffic of a large copy. Compiled in every build, with or without
 * nvcc.
 */
void prism_copy_stream(void *dst, const void *src, size_t bytes);

/* A static, human-readable description of a launcher's return code. */
const char *prism_error_string(int code);

/* y[i] = x after `iters` steps of x = fma(x, a, b), for i < n. x and y may be equal. */
int prism_fma_chain_f32(const float *x, float *y, uint64_t n, float a, float b, int32_t iters,
                        prism_stream_t stream);

/*
 * buf[i] = prism_pattern(seed, i) for i < n, where
 *   h = (uint32_t)i ^ (uint32_t)(i >> 32) * 0x9E3779B9 ^ seed, then the
 *   murmur3 finaliser: h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13;
 *   h *= 0xC2B2AE35; h ^= h >> 16.
 */
int prism_fill_pattern_u32(uint32_t *buf, uint64_t n, uint32_t seed, prism_stream_t stream);

/*
 * Compares buf[i] with prism_pattern(seed, i) for i < n. Adds the number of
 * mismatches to *mismatches and lowers *first_bad to the smallest mismatching
 * index (set *first_bad to UINT64_MAX beforehand). Both are device pointers.
 */
int prism_check_pattern_u32(const uint32_t *buf, uint64_t n, uint32_t seed,
                            unsigned long long *mismatches, unsigned long long *first_bad,
                            prism_stream_t stream);

/* One thread spins for `nanoseconds` of GPU global time: a long kernel for tests. */
int prism_spin_ns(uint64_t nanoseconds, prism_stream_t stream);

/* Writes through an invalid device address: a deliberate fault for error-path tests. */
int prism_fault(prism_stream_t stream);

/* out[j] = sum of x[j*group .. min((j+1)*group, n)]: a stage that shrinks its data. */
int prism_group_sum_f32(const float *x, uint64_t n, uint32_t group, float *out,
                        prism_stream_t stream);

/* y[i] = min(max(x[i], lo), hi). x and y may be equal. */
int prism_clamp_f32(const float *x, float *y, uint64_t n, float lo, float hi,
                    prism_stream_t stream);

/*
 * Zero-copy gather: for each of `count` descriptors (src, dst_offset, bytes),
 * three uint64 each, copies `bytes` bytes from device-accessible (mapped,
 * page-locked) host memory at `src` to dst + dst_offset, one block per
 * descriptor. `desc` itself must be device-accessible (device or mapped host
 * memory). The SMs read the host memory over the bus, so many small host
 * buffers move as one launch instead of one copy each.
 */
int prism_gather_bytes(const uint64_t *desc, uint64_t count, unsigned char *dst,
                       prism_stream_t stream);

/* Zero-copy scatter: descriptors (dst, src_offset, bytes); copies
 * src + src_offset to mapped host memory at dst, one block per descriptor. */
int prism_scatter_bytes(const unsigned char *src, const uint64_t *desc, uint64_t count,
                        prism_stream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* PRISM_KERNELS_H */
