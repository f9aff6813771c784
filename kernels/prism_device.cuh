// prism's device code: the kernels behind the launchers in prism_kernels.cu.
//
// Each kernel is `extern "C"` so that it keeps its name in PTX: a build
// without nvcc loads the committed prism_kernels.ptx (made from
// prism_kernels.cu by `cargo xtask build-kernels`) through the driver API and
// launches these same kernels by name, with the grid each launcher computes
// (prism-stream's kernels/builtin.rs mirrors that arithmetic). Keep the two
// in step: a GPU test compares both paths bit for bit.
#pragma once

#include <climits>
#include <cstdint>

static __device__ __forceinline__ float fma_steps(float v, float a, float b, int iters) {
    for (int k = 0; k < iters; ++k) v = fmaf(v, a, b);
    return v;
}

// Vectorised body: 16-byte loads and stores when both pointers are 16-byte aligned.
extern "C" __global__ void prism_k_fma_chain_vec4(const float4 *x, float4 *y, uint64_t n4,
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

extern "C" __global__ void prism_k_fma_chain_scalar(const float *x, float *y, uint64_t begin, uint64_t n, float a,
                                 float b, int iters) {
    uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    for (uint64_t i = begin + blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < n;
         i += stride) {
        y[i] = fma_steps(x[i], a, b, iters);
    }
}

static __device__ __forceinline__ uint32_t pattern(uint32_t seed, uint64_t i) {
    uint32_t h = static_cast<uint32_t>(i) ^ static_cast<uint32_t>(i >> 32) * 0x9E3779B9u ^ seed;
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

extern "C" __global__ void prism_k_fill_pattern(uint32_t *buf, uint64_t n, uint32_t seed) {
    uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < n;
         i += stride) {
        buf[i] = pattern(seed, i);
    }
}

extern "C" __global__ void prism_k_check_pattern(const uint32_t *buf, uint64_t n, uint32_t seed,
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

extern "C" __global__ void prism_k_spin_ns(uint64_t nanoseconds) {
    uint64_t start;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    uint64_t now = start;
    while (now - start < nanoseconds) {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    }
}

extern "C" __global__ void prism_k_fault(unsigned int *bad) { *bad = 0xDEADBEEFu; }

extern "C" __global__ void prism_k_group_sum(const float *__restrict__ x, uint64_t n, uint32_t group,
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

extern "C" __global__ void prism_k_clamp(const float *x, float *y, uint64_t n, float lo, float hi) {
    uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < n;
         i += stride) {
        y[i] = fminf(fmaxf(x[i], lo), hi);
    }
}

// Copies `bytes` bytes from src to dst within one block: 16-byte accesses
// when both ends are 16-byte aligned, bytes otherwise.
static __device__ __forceinline__ void block_copy(unsigned char *dst, const unsigned char *src,
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

extern "C" __global__ void prism_k_gather_bytes(const uint64_t *desc, unsigned char *dst) {
    const uint64_t *d = desc + 3 * static_cast<uint64_t>(blockIdx.x);
    block_copy(dst + d[1], reinterpret_cast<const unsigned char *>(d[0]), d[2]);
}

extern "C" __global__ void prism_k_scatter_bytes(const unsigned char *src, const uint64_t *desc) {
    const uint64_t *d = desc + 3 * static_cast<uint64_t>(blockIdx.x);
    block_copy(reinterpret_cast<unsigned char *>(d[0]), src + d[1], d[2]);
}
