// Baselines for the benchmark: what a user would write by hand in CUDA C++.
// They launch the same fma kernel as prism (through prism_fma_chain_f32) and
// time themselves with CUDA events. See prism_kernels.h for the contract.
#include <cuda_runtime.h>

#include <chrono>

#include "baselines.h"

namespace {

struct Cleanup {
    cudaStream_t streams[PRISM_BENCH_MAX_STREAMS] = {};
    float *dev_in[PRISM_BENCH_MAX_STREAMS] = {};
    float *dev_out[PRISM_BENCH_MAX_STREAMS] = {};
    cudaEvent_t start = nullptr, stop = nullptr;
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    ~Cleanup() {
        if (exec) cudaGraphExecDestroy(exec);
        if (graph) cudaGraphDestroy(graph);
        for (int i = 0; i < PRISM_BENCH_MAX_STREAMS; ++i) {
            if (streams[i]) cudaStreamDestroy(streams[i]);
            if (dev_in[i]) cudaFree(dev_in[i]);
            if (dev_out[i]) cudaFree(dev_out[i]);
        }
        if (start) cudaEventDestroy(start);
        if (stop) cudaEventDestroy(stop);
    }
};

#define CHECK(call)                                   \
    do {                                              \
        cudaError_t e_ = (call);                      \
        if (e_ != cudaSuccess) return static_cast<int>(e_); \
    } while (0)

// Groups of PRISM_BENCH_BATCH_ITEMS pieces: one batched copy in, one
// kernel, one batched copy out per group, group g on stream g % nstreams.
int batched(const float *const *in, float *const *out, const uint64_t *lens, uint64_t count,
            uint64_t max_len, float a, float b, int32_t iters, int32_t nstreams, float *ms) {
    const uint64_t G = PRISM_BENCH_BATCH_ITEMS;
    Cleanup c;
    for (int s = 0; s < nstreams; ++s) {
        CHECK(cudaStreamCreateWithFlags(&c.streams[s], cudaStreamNonBlocking));
        CHECK(cudaMalloc(&c.dev_in[s], G * max_len * sizeof(float)));
        CHECK(cudaMalloc(&c.dev_out[s], G * max_len * sizeof(float)));
    }
    CHECK(cudaEventCreate(&c.start));
    CHECK(cudaEventCreate(&c.stop));
    CHECK(cudaDeviceSynchronize());
    void *dsts[PRISM_BENCH_BATCH_ITEMS];
    const void *srcs[PRISM_BENCH_BATCH_ITEMS];
    size_t sizes[PRISM_BENCH_BATCH_ITEMS];
    cudaMemcpyAttributes attr = {};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    size_t attr_idx = 0;
    CHECK(cudaEventRecord(c.start, c.streams[0]));
    for (int s = 1; s < nstreams; ++s) CHECK(cudaStreamWaitEvent(c.streams[s], c.start, 0));
    for (uint64_t first = 0, g = 0; first < count; first += G, ++g) {
        int s = static_cast<int>(g % static_cast<uint64_t>(nstreams));
        uint64_t n = count - first < G ? count - first : G;
        uint64_t at = 0;
        for (uint64_t k = 0; k < n; ++k) {
            dsts[k] = c.dev_in[s] + at;
            srcs[k] = in[first + k];
            sizes[k] = lens[first + k] * sizeof(float);
            at += lens[first + k];
        }
        CHECK(cudaMemcpyBatchAsync(dsts, srcs, sizes, n, &attr, &attr_idx, 1, c.streams[s]));
        int err = prism_fma_chain_f32(c.dev_in[s], c.dev_out[s], at, a, b, iters,
                                      reinterpret_cast<prism_stream_t>(c.streams[s]));
        if (err) return err;
        at = 0;
        for (uint64_t k = 0; k < n; ++k) {
            dsts[k] = out[first + k];
            srcs[k] = c.dev_out[s] + at;
            at += lens[first + k];
        }
        CHECK(cudaMemcpyBatchAsync(dsts, srcs, sizes, n, &attr, &attr_idx, 1, c.streams[s]));
    }
    for (int s = 1; s < nstreams; ++s) {
        cudaEvent_t done;
        CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
        CHECK(cudaEventRecord(done, c.streams[s]));
        CHECK(cudaStreamWaitEvent(c.streams[0], done, 0));
        CHECK(cudaEventDestroy(done));
    }
    CHECK(cudaEventRecord(c.stop, c.streams[0]));
    CHECK(cudaEventSynchronize(c.stop));
    CHECK(cudaEventElapsedTime(ms, c.start, c.stop));
    return 0;
}

}  // namespace

extern "C" int prism_bench_pieces(const float *const *in, float *const *out, const uint64_t *lens,
                                  uint64_t count, uint64_t max_len, float a, float b,
                                  int32_t iters, int32_t mode, int32_t nstreams, float *ms) {
    if (nstreams < 1 || nstreams > PRISM_BENCH_MAX_STREAMS || max_len == 0 || mode < 0 ||
        mode > PRISM_BENCH_BATCHED)
        return PRISM_ERR_INVALID_ARGUMENT;
    for (uint64_t i = 0; i < count; ++i)
        if (lens[i] > max_len) return PRISM_ERR_INVALID_ARGUMENT;
    if (mode == PRISM_BENCH_BATCHED) return batched(in, out, lens, count, max_len, a, b, iters, nstreams, ms);
    if (mode == PRISM_BENCH_BIDIR) return prism_bench_fanout_bidir(in, out, lens, count, max_len, 1, ms);
    Cleanup c;
    bool step = mode == PRISM_BENCH_STEP || mode == PRISM_BENCH_STEP_GRAPH;
    int used = mode == PRISM_BENCH_SEQUENTIAL || step ? 1 : (mode == PRISM_BENCH_MULTISTREAM ? nstreams : 2);
    for (int s = 0; s < used; ++s) {
        CHECK(cudaStreamCreateWithFlags(&c.streams[s], cudaStreamNonBlocking));
        CHECK(cudaMalloc(&c.dev_in[s], max_len * sizeof(float)));
        CHECK(cudaMalloc(&c.dev_out[s], max_len * sizeof(float)));
    }
    CHECK(cudaEventCreate(&c.start));
    CHECK(cudaEventCreate(&c.stop));
    if (mode == PRISM_BENCH_KERNEL_ONLY) {
        // Device-resident input: upload one piece's worth once, outside the timing.
        CHECK(cudaMemsetAsync(c.dev_in[0], 0, max_len * sizeof(float), c.streams[0]));
        if (count > 0) CHECK(cudaMemcpyAsync(c.dev_in[0], in[0], lens[0] * sizeof(float), cudaMemcpyHostToDevice, c.streams[0]));
    }
    CHECK(cudaDeviceSynchronize());
    if (step) {
        // A synchronous round trip per piece, as a user's blocking step: H2D,
        // kernel, D2H on one stream, then wait. Timed on the host.
        cudaStream_t s = c.streams[0];
        if (mode == PRISM_BENCH_STEP_GRAPH && count > 0) {
            size_t bytes = lens[0] * sizeof(float);
            CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
            CHECK(cudaMemcpyAsync(c.dev_in[0], in[0], bytes, cudaMemcpyHostToDevice, s));
            int err = prism_fma_chain_f32(c.dev_in[0], c.dev_out[0], lens[0], a, b, iters,
                                          reinterpret_cast<prism_stream_t>(s));
            if (err) return err;
            CHECK(cudaMemcpyAsync(out[0], c.dev_out[0], bytes, cudaMemcpyDeviceToHost, s));
            CHECK(cudaStreamEndCapture(s, &c.graph));
            CHECK(cudaGraphInstantiate(&c.exec, c.graph, 0));
            CHECK(cudaGraphLaunch(c.exec, s));  // warm-up
            CHECK(cudaStreamSynchronize(s));
        }
        auto t0 = std::chrono::steady_clock::now();
        for (uint64_t i = 0; i < count; ++i) {
            if (mode == PRISM_BENCH_STEP_GRAPH) {
                CHECK(cudaGraphLaunch(c.exec, s));
            } else {
                size_t bytes = lens[i] * sizeof(float);
                CHECK(cudaMemcpyAsync(c.dev_in[0], in[i], bytes, cudaMemcpyHostToDevice, s));
                int err = prism_fma_chain_f32(c.dev_in[0], c.dev_out[0], lens[i], a, b, iters,
                                              reinterpret_cast<prism_stream_t>(s));
                if (err) return err;
                CHECK(cudaMemcpyAsync(out[i], c.dev_out[0], bytes, cudaMemcpyDeviceToHost, s));
            }
            CHECK(cudaStreamSynchronize(s));
        }
        auto t1 = std::chrono::steady_clock::now();
        *ms = std::chrono::duration<float, std::milli>(t1 - t0).count();
        return 0;
    }
    // Every stream waits for `start` so the timed region holds all their work.
    CHECK(cudaEventRecord(c.start, c.streams[0]));
    for (int s = 1; s < used; ++s) CHECK(cudaStreamWaitEvent(c.streams[s], c.start, 0));
    for (uint64_t i = 0; i < count; ++i) {
        size_t bytes = lens[i] * sizeof(float);
        switch (mode) {
            case PRISM_BENCH_SEQUENTIAL:
            case PRISM_BENCH_MULTISTREAM: {
                // The classic multi-copy sample: piece i on stream i % n, one buffer set per stream.
                int s = static_cast<int>(i % static_cast<uint64_t>(used));
                CHECK(cudaMemcpyAsync(c.dev_in[s], in[i], bytes, cudaMemcpyHostToDevice, c.streams[s]));
                int err = prism_fma_chain_f32(c.dev_in[s], c.dev_out[s], lens[i], a, b, iters,
                                              reinterpret_cast<prism_stream_t>(c.streams[s]));
                if (err) return err;
                CHECK(cudaMemcpyAsync(out[i], c.dev_out[s], bytes, cudaMemcpyDeviceToHost, c.streams[s]));
                break;
            }
            case PRISM_BENCH_KERNEL_ONLY: {
                int err = prism_fma_chain_f32(c.dev_in[0], c.dev_out[0], lens[i], a, b, iters,
                                              reinterpret_cast<prism_stream_t>(c.streams[0]));
                if (err) return err;
                break;
            }
        }
    }
    for (int s = 1; s < used; ++s) {
        cudaEvent_t done;
        CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
        CHECK(cudaEventRecord(done, c.streams[s]));
        CHECK(cudaStreamWaitEvent(c.streams[0], done, 0));
        CHECK(cudaEventDestroy(done));
    }
    CHECK(cudaEventRecord(c.stop, c.streams[0]));
    CHECK(cudaEventSynchronize(c.stop));
    CHECK(cudaEventElapsedTime(ms, c.start, c.stop));
    return 0;
}

extern "C" int prism_bench_fanout_bidir(const float *const *in, float *const *out,
                                        const uint64_t *lens, uint64_t count, uint64_t max_len,
                                        int32_t branches, float *ms) {
    if (branches < 1 || branches > PRISM_BENCH_MAX_BRANCHES || max_len == 0)
        return PRISM_ERR_INVALID_ARGUMENT;
    for (uint64_t i = 0; i < count; ++i)
        if (lens[i] > max_len) return PRISM_ERR_INVALID_ARGUMENT;
    // Uploads into one device buffer on stream 0, downloads from another on
    // stream 1 (PRISM_BENCH_BIDIR is this with one branch).
    Cleanup c;
    for (int s = 0; s < 2; ++s) {
        CHECK(cudaStreamCreateWithFlags(&c.streams[s], cudaStreamNonBlocking));
        CHECK(cudaMalloc(&c.dev_in[s], max_len * sizeof(float)));
        CHECK(cudaMalloc(&c.dev_out[s], max_len * sizeof(float)));
    }
    CHECK(cudaEventCreate(&c.start));
    CHECK(cudaEventCreate(&c.stop));
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaEventRecord(c.start, c.streams[0]));
    CHECK(cudaStreamWaitEvent(c.streams[1], c.start, 0));
    for (uint64_t i = 0; i < count; ++i) {
        size_t bytes = lens[i] * sizeof(float);
        CHECK(cudaMemcpyAsync(c.dev_in[0], in[i], bytes, cudaMemcpyHostToDevice, c.streams[0]));
        for (int32_t b = 0; b < branches; ++b)
            CHECK(cudaMemcpyAsync(out[static_cast<uint64_t>(b) * count + i], c.dev_out[1], bytes,
                                  cudaMemcpyDeviceToHost, c.streams[1]));
    }
    cudaEvent_t done;
    CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    CHECK(cudaEventRecord(done, c.streams[1]));
    CHECK(cudaStreamWaitEvent(c.streams[0], done, 0));
    CHECK(cudaEventDestroy(done));
    CHECK(cudaEventRecord(c.stop, c.streams[0]));
    CHECK(cudaEventSynchronize(c.stop));
    CHECK(cudaEventElapsedTime(ms, c.start, c.stop));
    return 0;
}
