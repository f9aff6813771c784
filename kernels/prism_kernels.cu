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

__device__ __forceinline__ float fma_steps(float v, float a, float b, int iters) {
    for (int k = 0; k < iters; ++k) v = fmaf(v, a, b);
    return v;
}

// Vectorised body: 16-byte loads and stores when both pointers are 16-byte aligned.
__global__ void fma_chain_vec4(const float4 *x, float4 *y, uint64_t n4,
                               float a, float b, int iters) {
    uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < n4;
         i += stride) {
        float4 v = x[i];
        v.x = fma_steps(v.x, a, b, iters);
        v.y = fma_steps(v.y, a, b, iters);
        v.z = fma_steps(v.z, a, b, iters);
        v.w = fma_steps(v.w, a, b, iters);
        y[i] = v;
    }
}

__global__ void fma_chain_scalar(const float *x, float *y, uint64_t begin, uint64_t n, float a,
                                 float b, int iters) {
    uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    for (uint64_t i = begin + blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < n;
         i += stride) {
        y[i] = fma_steps(x[i], a, b, iters);
    }
}

__device__ __forceinline__ uint32_t pattern(uint32_t seed, uint64_t i) {
    uint32_t h = static_cast<uint32_t>(i) ^ static_cast<uint32_t>(i >> 32) * 0x9E3779B9u ^ seed;
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

__global__ void fill_pattern(uint32_t *buf, uint64_t n, uint32_t seed) {
    uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < n;
         i += stride) {
        buf[i] = pattern(seed, i);
    }
}

__global__ void check_pattern(const uint32_t *buf, uint64_t n, uint32_t seed,
                              unsigned long long *mismatches, unsigned long long *first_bad) {
    uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    unsigned long long local = 0;
    unsigned long long first = ULLONG_MAX;
    for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < n;
         i += stride) {
        if (buf[i] != pattern(seed, i)) {
            ++local;
            if (i < first) first = i;
        }
    }
    if (local != 0) {
        atomicAdd(mismatches, local);
        atomicMin(first_bad, first);
    }
}

__global__ void spin_ns(uint64_t nanoseconds) {
    uint64_t start;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    uint64_t now = start;
    while (now - start < nanoseconds) {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    }
}

__global__ void fault(unsigned int *bad) { *bad = 0xDEADBEEFu; }

__global__ void group_sum(const float *__restrict__ x, uint64_t n, uint32_t group,
                          float *__restrict__ out, uint64_t groups) {
    uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    for (uint64_t j = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; j < groups;
         j += stride) {
        uint64_t begin = j * group;
        uint64_t end = begin + group < n ? begin + group : n;
        float acc = 0.0f;
        for (uint64_t i = begin; i < end; ++i) acc += x[i];
        out[j] = acc;
    }
}

__global__ void clamp(const float *x, float *y, uint64_t n, float lo, float hi) {
    uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < n;
         i += stride) {
        y[i] = fminf(fmaxf(x[i], lo), hi);
    }
}

// Copies `bytes` bytes from src to dst within one block: 16-byte accesses
// when both ends are 16-byte aligned, bytes otherwise.
__device__ __forceinline__ void block_copy(unsigned char *dst, const unsigned char *src,
                                           uint64_t bytes) {
    if ((reinterpret_cast<uintptr_t>(dst) % 16 == 0) && (reinterpret_cast<uintptr_t>(src) % 16 == 0)) {
        uint64_t n16 = bytes / 16;
        const uint4 *s4 = reinterpret_cast<const uint4 *>(src);
        uint4 *d4 = reinterpret_cast<uint4 *>(dst);
        for (uint64_t i = threadIdx.x; i < n16; i += blockDim.x) d4[i] = s4[i];
        for (uint64_t i = n16 * 16 + threadIdx.x; i < bytes; i += blockDim.x) dst[i] = src[i];
    } else {
        for (uint64_t i = threadIdx.x; i < bytes; i += blockDim.x) dst[i] = src[i];
    }
}

__global__ void gather_bytes(const uint64_t *desc, unsigned char *dst) {
    const uint64_t *d = desc + 3 * static_cast<uint64_t>(blockIdx.x);
    block_copy(dst + d[1], reinterpret_cast<const unsigned char *>(d[0]), d[2]);
}

__global__ void scatter_bytes(const unsigned char *src, const uint64_t *desc) {
    const uint64_t *d = desc + 3 * static_cast<uint64_t>(blockIdx.x);
    block_copy(reinterpret_cast<unsigned char *>(d[0]), src + d[1], d[2]);
}

}  // namespace

extern "C" int prism_kernels_available(void) { return 1; }

extern "C" int prism_preload_kernels(void) {
    // Asking for a kernel's attributes loads its module into the current
    // context (CUDA loads modules lazily, at the first launch, by default).
    const void *kernels[] = {
        reinterpret_cast<const void *>(fma_chain_vec4),
        reinterpret_cast<const void *>(fma_chain_scalar),
        reinterpret_cast<const void *>(fill_pattern),
        reinterpret_cast<const void *>(check_pattern),
        reinterpret_cast<const void *>(spin_ns),
        reinterpret_cast<const void *>(fault),
        reinterpret_cast<const void *>(group_sum),
        reinterpret_cast<const void *>(clamp),
        reinterpret_cast<const void *>(gather_bytes),
        reinterpret_cast<const void *>(scatter_bytes),
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
            fma_chain_vec4<<<blocks_for(n4), kBlock, 0, s>>>(
                reinterpret_cast<const float4 *>(x), reinterpret_cast<float4 *>(y), n4, a, b,
                iters);
            if (int err = check_launch()) return err;
        }
        head = n4 * 4;
    }
    if (head < n) {
        fma_chain_scalar<<<blocks_for(n - head), kBlock, 0, s>>>(x, y, head, n, a, b, iters);
        if (int err = check_launch()) return err;
    }
    return 0;
}

extern "C" int prism_gather_bytes(const uint64_t *desc, uint64_t count, unsigned char *dst,
                                  prism_stream_t stream) {
    if (count == 0) return 0;
    if (count > 0x7fffffffull) return PRISM_ERR_INVALID_ARGUMENT;
    gather_bytes<<<static_cast<unsigned int>(count), kBlock, 0,
                   reinterpret_cast<cudaStream_t>(stream)>>>(desc, dst);
    return check_launch();
}

extern "C" int prism_scatter_bytes(const unsigned char *src, const uint64_t *desc, uint64_t count,
                                   prism_stream_t stream) {
    if (count == 0) return 0;
    if (count > 0x7fffffffull) return PRISM_ERR_INVALID_ARGUMENT;
    scatter_bytes<<<static_cast<unsigned int>(count), kBlock, 0,
                    reinterpret_cast<cudaStream_t>(stream)>>>(src, desc);
    return check_launch();
}

extern "C" int prism_fill_pattern_u32(uint32_t *buf, uint64_t n, uint32_t seed,
                                      prism_stream_t stream) {
    if (n == 0) return 0;
    fill_pattern<<<blocks_for(n), kBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(buf, n,
                                                                                       seed);
    return check_launch();
}

extern "C" int prism_check_pattern_u32(const uint32_t *buf, uint64_t n, uint32_t seed,
                                       unsigned long long *mismatches,
                                       unsigned long long *first_bad, prism_stream_t stream) {
    if (n == 0) return 0;
    check_pattern<<<blocks_for(n), kBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        buf, n, seed, mismatches, first_bad);
    return check_launch();
}

extern "C" int prism_spin_ns(uint64_t nanoseconds, prism_stream_t stream) {
    spin_ns<<<1, 1, 0, reinterpret_cast<cudaStream_t>(stream)>>>(nanoseconds);
    return check_launch();
}

extern "C" int prism_fault(prism_stream_t stream) {
    // An address no allocation can have: the kernel's store raises an illegal-address fault.
    fault<<<1, 1, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<unsigned int *>(static_cast<uintptr_t>(0x10)));
    return check_launch();
}

extern "C" int prism_group_sum_f32(const float *x, uint64_t n, uint32_t group, float *out,
                                   prism_stream_t stream) {
    if (group == 0) return PRISM_ERR_INVALID_ARGUMENT;
    if (n == 0) return 0;
    uint64_t groups = (n + group - 1) / group;
    group_sum<<<blocks_for(groups), kBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        x, n, group, out, groups);
    return check_launch();
}

extern "C" int prism_clamp_f32(const float *x, float *y, uint64_t n, float lo, float hi,
                               prism_stream_t stream) {
    if (n == 0) return 0;
    clamp<<<blocks_for(n), kBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(x, y, n, lo, hi);
    return check_launch();
}
