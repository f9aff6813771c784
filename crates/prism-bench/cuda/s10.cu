// S10 of the benchmark: many small iterations over resident data, each three
// small kernels and a 4-byte value read back (see baselines.h for the
// contract, the kernels' arithmetic and the order of k3's sum). The
// launchers are what prism's side calls too, so both sides run the same
// kernels; prism_bench_s10 is the hand-written CUDA C++ baseline (one
// stream, plain or replayed as a CUDA graph).
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>

#include "baselines.h"

// The kernels have C names, as prism's own (prism_device.cuh), so that
// profiles and traces show them as written.

// k1: x[j] = fmaf(x[j], a, b) for j < w (x already points at the window).
extern "C" __global__ void prism_s10_scale(float *__restrict__ x, uint64_t w, float a, float b) {
    uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    for (uint64_t j = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; j < w;
         j += stride)
        x[j] = fmaf(x[j], a, b);
}

// k2: y = max(x[j], 0) + c, x[j] = y - floor(y): a relu, then a shift that
// wraps into [0, 1). Both roundings are IEEE (one add), the wrap is exact.
extern "C" __global__ void prism_s10_relu_mix(float *__restrict__ x, uint64_t w, float c) {
    uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    for (uint64_t j = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; j < w;
         j += stride) {
        float y = fmaxf(x[j], 0.0f) + c;
        x[j] = y - floorf(y);
    }
}

// k3: one block of PRISM_S10_SUM_THREADS threads; *acc = sum of x[0 .. w) in
// the fixed order baselines.h describes (strided partial sums, then a tree;
// the warp shuffles below pair lanes t and t + k as the tree does).
extern "C" __global__ void __launch_bounds__(PRISM_S10_SUM_THREADS)
    prism_s10_sum(const float *__restrict__ x, uint64_t w, float *__restrict__ acc) {
    __shared__ float p[PRISM_S10_SUM_THREADS];
    constexpr uint64_t T = PRISM_S10_SUM_THREADS;
    constexpr int kBatch = 16;
    const unsigned t = threadIdx.x;
    float s = 0.0f;
    uint64_t j = t;
    // Loads in batches, so kBatch of them are in flight at once, but the
    // adds still in index order (a plain unrolled loop would wait for each
    // load behind its bounds check).
    for (; j + (kBatch - 1) * T < w; j += kBatch * T) {
        float v[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) v[u] = x[j + u * T];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) s += v[u];
    }
    for (; j < w; j += T) s += x[j];
    p[t] = s;
    __syncthreads();
    for (unsigned k = PRISM_S10_SUM_THREADS / 2; k >= 32; k >>= 1) {
        if (t < k) p[t] += p[t + k];
        __syncthreads();
    }
    if (t < 32) {
        float v = p[t];
        for (unsigned k = 16; k > 0; k >>= 1) v += __shfl_down_sync(0xffffffffu, v, k);
        if (t == 0) *acc = v;
    }
}

// x[i] = prism_s10_initial_value(i) for i < n.
extern "C" __global__ void prism_s10_fill_initial(float *__restrict__ x, uint64_t n) {
    uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < n;
         i += stride)
        x[i] = prism_s10_initial_value(i);
}

namespace {

constexpr unsigned kBlock = 256;
// Grid cap for the grid-stride kernels (as prism's own launchers).
constexpr uint64_t kMaxBlocks = 65535ull * 8ull;

unsigned blocks_for(uint64_t items) {
    uint64_t blocks = (items + kBlock - 1) / kBlock;
    if (blocks == 0) blocks = 1;
    if (blocks > kMaxBlocks) blocks = kMaxBlocks;
    return static_cast<unsigned>(blocks);
}

int check_launch() {
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? 0 : static_cast<int>(e);
}

#define S10_CHECK(call)                                           \
    do {                                                          \
        cudaError_t e_ = (call);                                  \
        if (e_ != cudaSuccess) return static_cast<int>(e_);       \
    } while (0)

// What a run owns; freed in reverse order on every return path.
struct S10Run {
    cudaStream_t stream = nullptr;
    float *x = nullptr;
    float *acc = nullptr;
    float *host = nullptr;  // pinned: the 4-byte read-back lands here
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    ~S10Run() {
        // Finish any work still queued (an error path) before freeing.
        if (stream) cudaStreamSynchronize(stream);
        if (exec) cudaGraphExecDestroy(exec);
        if (graph) cudaGraphDestroy(graph);
        if (host) cudaFreeHost(host);
        if (acc) cudaFree(acc);
        if (x) cudaFree(x);
        if (stream) cudaStreamDestroy(stream);
    }
};

// One iteration's work, enqueued on r.stream: k1, k2, k3, the 4-byte copy.
int enqueue_iteration(const S10Run &r, uint64_t off, uint64_t w) {
    prism_stream_t s = reinterpret_cast<prism_stream_t>(r.stream);
    if (int e = prism_s10_k1(r.x, off, w, PRISM_S10_A, PRISM_S10_B, s)) return e;
    if (int e = prism_s10_k2(r.x, off, w, PRISM_S10_C, s)) return e;
    if (int e = prism_s10_k3(r.x, off, w, r.acc, s)) return e;
    S10_CHECK(cudaMemcpyAsync(r.host, r.acc, sizeof(float), cudaMemcpyDeviceToHost, r.stream));
    return 0;
}

}  // namespace

extern "C" int prism_s10_k1(float *x, uint64_t off, uint64_t w, float a, float b,
                            prism_stream_t stream) {
    if (w == 0) return 0;
    prism_s10_scale<<<blocks_for(w), kBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        x + off, w, a, b);
    return check_launch();
}

extern "C" int prism_s10_k2(float *x, uint64_t off, uint64_t w, float c, prism_stream_t stream) {
    if (w == 0) return 0;
    prism_s10_relu_mix<<<blocks_for(w), kBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        x + off, w, c);
    return check_launch();
}

extern "C" int prism_s10_k3(const float *x, uint64_t off, uint64_t w, float *acc,
                            prism_stream_t stream) {
    prism_s10_sum<<<1, PRISM_S10_SUM_THREADS, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        x + off, w, acc);
    return check_launch();
}

extern "C" int prism_s10_fill(float *x, uint64_t n, prism_stream_t stream) {
    if (n == 0) return 0;
    prism_s10_fill_initial<<<blocks_for(n), kBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        x, n);
    return check_launch();
}

extern "C" float prism_s10_initial(uint64_t i) { return prism_s10_initial_value(i); }

extern "C" int prism_bench_s10(int32_t mode, uint64_t n, uint64_t off, uint64_t w,
                               uint64_t warmup, uint64_t iters, float *window_out,
                               double *us_per_iter, float *final_acc) {
    if ((mode != PRISM_BENCH_S10_STREAMS && mode != PRISM_BENCH_S10_GRAPH) || w == 0 ||
        off > n || w > n - off || iters == 0 || !us_per_iter || !final_acc)
        return PRISM_ERR_INVALID_ARGUMENT;
    S10Run r;
    S10_CHECK(cudaStreamCreateWithFlags(&r.stream, cudaStreamNonBlocking));
    S10_CHECK(cudaMalloc(&r.x, n * sizeof(float)));
    S10_CHECK(cudaMalloc(&r.acc, sizeof(float)));
    S10_CHECK(cudaMallocHost(&r.host, sizeof(float)));
    *r.host = NAN;
    if (int e = prism_s10_fill(r.x, n, reinterpret_cast<prism_stream_t>(r.stream))) return e;
    S10_CHECK(cudaStreamSynchronize(r.stream));
    if (mode == PRISM_BENCH_S10_GRAPH) {
        S10_CHECK(cudaStreamBeginCapture(r.stream, cudaStreamCaptureModeThreadLocal));
        int e = enqueue_iteration(r, off, w);
        // End the capture on every path, so the stream is usable (and
        // freeable) again; a failed capture yields no graph.
        cudaError_t end = cudaStreamEndCapture(r.stream, &r.graph);
        if (e) return e;
        S10_CHECK(end);
        S10_CHECK(cudaGraphInstantiate(&r.exec, r.graph, 0));
    }
    // The host reads the value after each wait through a volatile pointer,
    // so no read can be dropped or hoisted.
    volatile float *host = r.host;
    float last = NAN;
    auto iteration = [&]() -> int {
        if (mode == PRISM_BENCH_S10_GRAPH) {
            S10_CHECK(cudaGraphLaunch(r.exec, r.stream));
        } else if (int e = enqueue_iteration(r, off, w)) {
            return e;
        }
        S10_CHECK(cudaStreamSynchronize(r.stream));
        last = *host;
        return 0;
    };
    // Warm-up (untimed): module loading, the graph's first upload, clocks.
    for (uint64_t i = 0; i < warmup; ++i)
        if (int e = iteration()) return e;
    auto t0 = std::chrono::steady_clock::now();
    for (uint64_t i = 0; i < iters; ++i)
        if (int e = iteration()) return e;
    auto t1 = std::chrono::steady_clock::now();
    *us_per_iter = std::chrono::duration<double, std::micro>(t1 - t0).count() /
                   static_cast<double>(iters);
    *final_acc = last;
    if (window_out) {
        S10_CHECK(cudaMemcpyAsync(window_out, r.x + off, w * sizeof(float),
                                  cudaMemcpyDeviceToHost, r.stream));
        S10_CHECK(cudaStreamSynchronize(r.stream));
    }
    return 0;
}
