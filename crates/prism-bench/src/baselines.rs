//! The C ABI of `cuda/baselines.cu` (declared in `cuda/baselines.h`): the
//! hand-written CUDA C++ the benchmark compares prism against.

/// One stream: H2D, kernel, D2H per piece.
pub const SEQUENTIAL: i32 = 0;
/// Piece i on stream i % nstreams, one buffer set per stream.
pub const MULTISTREAM: i32 = 1;
/// All H2D on one stream, all D2H on another, no kernel.
pub const BIDIR: i32 = 2;
/// All kernels back to back on device-resident data.
pub const KERNEL_ONLY: i32 = 3;
/// One stream: H2D, kernel, D2H, synchronise, per piece.
pub const STEP: i32 = 4;
/// As STEP, the three captured once as a CUDA graph.
pub const STEP_GRAPH: i32 = 5;
/// Groups of pieces, one `cudaMemcpyBatchAsync` per direction and group.
pub const BATCHED: i32 = 6;

extern "C" {
    /// Runs `count` pieces (`in[i]` -> `out[i]`, `lens[i]` floats, pinned
    /// host memory, `lens[i] <= max_len`) in `mode` and writes the GPU time
    /// of the whole batch to `*ms`; 0 or an error code (`prism_error_string`).
    /// Synchronous: it waits for its own work before returning.
    pub fn prism_bench_pieces(
        input: *const *const f32,
        output: *const *mut f32,
        lens: *const u64,
        count: u64,
        max_len: u64,
        a: f32,
        b: f32,
        iters: i32,
        mode: i32,
        nstreams: i32,
        ms: *mut f32,
    ) -> i32;
}
