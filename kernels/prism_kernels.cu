// prism's CUDA kernels and their C launchers (declared in prism_kernels.h).
#include <climits>
#include <cstdint>
#include <cuda_runtime.h>

#include "prism_kernels.h"

namespace {

constexpr int kBlock = 256;
// Grid cap for grid-stride kernels: enough blocks to fill any current GPU many times over.
constexpr uint64_t kMaxBlocks = 65535ull * 8ull;

int check_launch() {
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? 0 : static_cast<int>(err);
}

unsigned int blocks_for(uint64_t work_items) {
    uint64_t blocks = (work_items + kBlock - 1) / kBlock;
    if (blocks == 0) blocks = 1;
    if (blocks > kMaxBlocks) blocks = kMaxBlocks;
    return static_cast<unsigned int>(blocks);
}

}  // namespace

#include "prism_device.cuh"

extern "C" int prism_kernels_available(void) { return 1; }

extern "C" int prism_preload_kernels(void) {
    // Asking for a kernel's attributes loads its module into the current
    // context (CUDA loads modules lazily, at the first launch, by default).
    const void *kernels[] = {
        reinterpret_cast<const void *>(prism_k_fma_chain_vec4),
        reinterpret_cast<const void *>(prism_k_fma_chain_scalar),
        reinterpret_cast<const void *>(prism_k_fill_pattern),
        reinterpret_cast<const void *>(prism_k_check_pattern),
        reinterpret_cast<const void *>(prism_k_spin_ns),
        reinterpret_cast<const void *>(prism_k_fault),
        reinterpret_cast<const void *>(prism_k_group_sum),
        reinterpret_cast<const void *>(prism_k_clamp),
        reinterpret_cast<const void *>(prism_k_gather_bytes),
        reinterpret_cast<const void *>(prism_k_scatter_bytes),
    };
    for (const void *k : kernels) {
        cudaFuncAttributes attr;
        cudaError_t e = cudaFuncGetAttributes(&attr, k);
        if (e != cudaSuccess) {
            // Clear the runtime's last error, so that the next launch on this
            // thread does not report it as its own.
            (void)cudaGetLastError();
            return static_cast<int>(e);
        }
    }
    return 0;
}

extern "C" const char *prism_error_string(int code) {
    switch (code) {
        case 0: return "success";
        case PRISM_ERR_KERNELS_NOT_BUILT: return "kernels were not built (no nvcc at build time)";
        case PRISM_ERR_INVALID_ARGUMENT: return "invalid argument";
        default: return cudaGetErrorString(static_cast<cudaError_t>(code));
    }
}

extern "C" int prism_fma_chain_f32(const float *x, float *y, uint64_t n, float a, float b,
                                   int32_t iters, prism_stream_t stream) {
    if (iters < 0) return PRISM_ERR_INVALID_ARGUMENT;
    if (n == 0) return 0;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    uint64_t head = 0;
    bool aligned = (reinterpret_cast<uintptr_t>(x) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(y) % 16 == 0);
    if (aligned) {
        uint64_t n4 = n / 4;
        if (n4 != 0) {
            prism_k_fma_chain_vec4<<<blocks_for(n4), kBlock, 0, s>>>(
                reinterpret_cast<const float4 *>(x), reinterpret_cast<float4 *>(y), n4, a, b,
                iters);
            if (int err = check_launch()) return err;
        }
        head = n4 * 4;
    }
    if (head < n) {
        prism_k_fma_chain_scalar<<<blocks_for(n - head), kBlock, 0, s>>>(x, y, head, n, a, b, iters);
        if (int err = check_launch()) return err;
    }
    return 0;
}

extern "C" int prism_gather_bytes(const uint64_t *desc, uint64_t count, unsigned char *dst,
                                  prism_stream_t stream) {
    if (count == 0) return 0;
    if (count > 0x7fffffffull) return PRISM_ERR_INVALID_ARGUMENT;
    prism_k_gather_bytes<<<static_cast<unsigned int>(count), kBlock, 0,
                   reinterpret_cast<cudaStream_t>(stream)>>>(desc, dst);
    return check_launch();
}

extern "C" int prism_scatter_bytes(const unsigned char *src, const uint64_t *desc, uint64_t count,
                                   prism_stream_t stream) {
    if (count == 0) return 0;
    if (count > 0x7fffffffull) return PRISM_ERR_INVALID_ARGUMENT;
    prism_k_scatter_bytes<<<static_cast<unsigned int>(count), kBlock, 0,
                    reinterpret_cast<cudaStream_t>(stream)>>>(src, desc);
    return check_launch();
}

extern "C" int prism_fill_pattern_u32(uint32_t *buf, uint64_t n, uint32_t seed,
                                      prism_stream_t stream) {
    if (n == 0) return 0;
    prism_k_fill_pattern<<<blocks_for(n), kBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(buf, n,
                                                                                       seed);
    return check_launch();
}

extern "C" int prism_check_pattern_u32(const uint32_t *buf, uint64_t n, uint32_t seed,
                                       unsigned long long *mismatches,
                                       unsigned long long *first_bad, prism_stream_t stream) {
    if (n == 0) return 0;
    prism_k_check_pattern<<<blocks_for(n), kBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        buf, n, seed, mismatches, first_bad);
    return check_launch();
}

extern "C" int prism_spin_ns(uint64_t nanoseconds, prism_stream_t stream) {
    prism_k_spin_ns<<<1, 1, 0, reinterpret_cast<cudaStream_t>(stream)>>>(nanoseconds);
    return check_launch();
}

extern "C" int prism_fault(prism_stream_t stream) {
    // An address no allocation can have: the kernel's store raises an illegal-address fault.
    prism_k_fault<<<1, 1, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<unsigned int *>(static_cast<uintptr_t>(0x10)));
    return check_launch();
}

extern "C" int prism_group_sum_f32(const float *x, uint64_t n, uint32_t group, float *out,
                                   prism_stream_t stream) {
    if (group == 0) return PRISM_ERR_INVALID_ARGUMENT;
    if (n == 0) return 0;
    uint64_t groups = (n + group - 1) / group;
    prism_k_group_sum<<<blocks_for(groups), kBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        x, n, group, out, groups);
    return check_launch();
}

extern "C" int prism_clamp_f32(const float *x, float *y, uint64_t n, float lo, float hi,
                               prism_stream_t stream) {
    if (n == 0) return 0;
    prism_k_clamp<<<blocks_for(n), kBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(x, y, n, lo, hi);
    return check_launch();
}
