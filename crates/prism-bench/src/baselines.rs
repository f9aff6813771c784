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

extern "C" {
    /// S11's bound: [`BIDIR`] with `branches` downloads per upload. Piece
    /// `i` (`input[i]`, `lens[i]` floats, `<= max_len`) is copied once host
    /// to device on one stream and `branches` times device to host, into
    /// `output[b * count + i]` for branch `b`, on another; all issued
    /// together, no kernel. Writes the GPU time of the whole batch to
    /// `*ms`; 0 or an error code (`prism_error_string`). Synchronous.
    pub fn prism_bench_fanout_bidir(
        input: *const *const f32,
        output: *const *mut f32,
        lens: *const u64,
        count: u64,
        max_len: u64,
        branches: i32,
        ms: *mut f32,
    ) -> i32;
}

/// S10, one stream: per iteration k1, k2, k3, a 4-byte copy to pinned host
/// memory, `cudaStreamSynchronize`, a host read.
pub const S10_STREAMS: i32 = 0;
/// S10 as a CUDA graph: the iteration's four steps captured once, replayed
/// with `cudaGraphLaunch`, then `cudaStreamSynchronize` and a host read.
pub const S10_GRAPH: i32 = 1;
/// k1's factor (`PRISM_S10_A`).
pub const S10_A: f32 = 0.999;
/// k1's addend (`PRISM_S10_B`).
pub const S10_B: f32 = 0.001;
/// k2's addend before the wrap into [0, 1) (`PRISM_S10_C`).
pub const S10_C: f32 = 0.381966;
/// Threads of k3's single block (`PRISM_S10_SUM_THREADS`): its summation
/// order depends on it.
pub const S10_SUM_THREADS: usize = 1024;

// S10 (cuda/s10.cu; the contract is in cuda/baselines.h). The launchers
// only enqueue work on `stream` and return 0 or a CUDA error code
// (`PRISM_ERR_KERNELS_NOT_BUILT` without nvcc); `x` is a device array of at
// least `off + w` floats, the window is `x[off .. off + w)`. They are for
// prism's side of S10 (`s10::s10_prism`, which lands with prism's "outside
// work" API); `prism_s10_initial` is for the tests (the CPU reference has
// its own copy of the formula, `s10::initial`).
#[allow(dead_code)]
extern "C" {
    /// k1: `x[off + j] = fmaf(x[off + j], a, b)` for `j < w`.
    pub fn prism_s10_k1(
        x: *mut f32,
        off: u64,
        w: u64,
        a: f32,
        b: f32,
        stream: prism_cuda_sys::prism_stream_t,
    ) -> i32;
    /// k2: `y = fmaxf(x[off + j], 0) + c; x[off + j] = y - floorf(y)`.
    pub fn prism_s10_k2(
        x: *mut f32,
        off: u64,
        w: u64,
        c: f32,
        stream: prism_cuda_sys::prism_stream_t,
    ) -> i32;
    /// k3: `*acc` = the sum of the window (one device float, overwritten),
    /// in the fixed order of [`S10_SUM_THREADS`] strided partial sums
    /// combined by a tree.
    pub fn prism_s10_k3(
        x: *const f32,
        off: u64,
        w: u64,
        acc: *mut f32,
        stream: prism_cuda_sys::prism_stream_t,
    ) -> i32;
    /// `x[i] = prism_s10_initial(i)` for `i < n`: S10's initial data.
    pub fn prism_s10_fill(x: *mut f32, n: u64, stream: prism_cuda_sys::prism_stream_t) -> i32;
    /// S10's initial value at index `i`, in [-1, 1) (host arithmetic,
    /// compiled in every build).
    pub fn prism_s10_initial(i: u64) -> f32;
}

extern "C" {
    /// The CUDA C++ baseline of S10 in `mode` ([`S10_STREAMS`] or
    /// [`S10_GRAPH`]) on the current device: `n` floats filled by
    /// `prism_s10_fill`, `warmup` untimed then `iters` timed iterations
    /// over the window `[off, off + w)`. Writes the wall time per timed
    /// iteration (µs), the value read back after the last iteration, and,
    /// if `window_out` is not null, the final window (`w` floats). 0 or an
    /// error code (`prism_error_string`). Synchronous; frees what it made.
    pub fn prism_bench_s10(
        mode: i32,
        n: u64,
        off: u64,
        w: u64,
        warmup: u64,
        iters: u64,
        window_out: *mut f32,
        us_per_iter: *mut f64,
        final_acc: *mut f32,
    ) -> i32;
}

/// The message of a launcher's or baseline's status code
/// (`prism_error_string`).
pub fn error_message(code: i32) -> String {
    // SAFETY: prism_error_string returns a static C string for any code.
    unsafe { std::ffi::CStr::from_ptr(prism_cuda_sys::prism_error_string(code)) }
        .to_string_lossy()
        .into_owned()
}
