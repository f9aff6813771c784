//! A pipeline stage that calls cuBLAS: every chunk of the stream is a batch
//! of 64×64 f32 matrices A_i (row-major, 4096 floats each), and the stage
//! multiplies each by one resident 64×64 matrix W, C_i = A_i · W, with one
//! `cublasSgemmStridedBatched` call per chunk, while the ring uploads the
//! next chunk and downloads the last one. Every output is checked against
//! an f64 reference computed on the CPU.
//!
//! ```text
//! cargo run --release -p prism-pipeline --features cublas --example gemm_stage [-- --mib 1024 --chunk-mib 16 --slots 4]
//! ```
//!
//! The pattern, for any NVIDIA library:
//! - resident state (W, the cuBLAS handle) is made once, on a lane of the
//!   pipeline's GPU context, before `add_stage`;
//! - in `gpu()`, one outside-work block names every buffer the library call
//!   touches (`read(input)`, `read(&self.w)`, `write(output)`): prism orders
//!   the call after their earlier uses and fences it for their later ones;
//!   it also names the cuBLAS handle (`o.blas(..)`), whose workspace prism
//!   then orders like a buffer the call writes, so calls through the one
//!   handle never run at once on the pipeline's two compute streams;
//! - the call runs inside `unsafe { o.run(..) }` on views of those buffers,
//!   with the handle bound to the block's stream (`work.blas()`). That block
//!   is the only `unsafe` here; its `// SAFETY:` comment says why the shapes
//!   stay within the buffers.
//!
//! Row-major data and column-major cuBLAS: a row-major R×C matrix is,
//! byte for byte, the column-major C×R matrix of its transpose. So
//! C = A·W in row-major is Cᵀ = Wᵀ·Aᵀ in column-major, which is what the
//! call computes: cuBLAS's first operand is W (with batch stride 0, the
//! same W for every i), its second A_i; m = columns of W, n = rows of A_i,
//! k = their shared dimension; no transposition flags.
//!
//! Precision: cuBLAS's SGEMM computes in FP32 unless the handle's math mode
//! allows TF32 (`cublasSetMathMode(.., CUBLAS_TF32_TENSOR_OP_MATH)`), which
//! neither cudarc nor prism sets; `NVIDIA_TF32_OVERRIDE=0` can only turn
//! TF32 off, never on. The check's tolerance (see `TOLERANCE`) is set so
//! that FP32 passes with a wide margin, and the largest error it prints
//! shows which precision ran.
//!
//! Without a GPU, or without libcublas, it says what it needs and exits 0
//! (with `PRISM_REQUIRE_GPU=1`, as on the GPU test machine, it fails).
//! The first run pays cuBLAS's and the ring's one-time costs (kernel
//! loading, allocation); the second, warm run is the one measured against
//! the bound.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use prism_pipeline::{PipelineConfig, PipelineStageManager, PipelineStats, Stage, StageError};
use prism_stream::cudarc::cublas::result::CublasError;
use prism_stream::cudarc::cublas::sys::cublasOperation_t;
use prism_stream::cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use prism_stream::{Blas, DeviceBuffer, Gpu, HostAllocFlags, Lane, Launch, PinnedBuffer};
use prism_testing::{gpu_required, random_f32};
use rayon::prelude::*;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::prelude::*;

/// Rows of each A_i (and of C_i).
const M: usize = 64;
/// Columns of A_i, rows of W.
const K: usize = 64;
/// Columns of W (and of C_i).
const N: usize = 64;
/// Floats per input matrix A_i (16 KiB): a chunk must hold a whole number.
const A_LEN: usize = M * K;
/// Floats per output matrix C_i.
const C_LEN: usize = M * N;

/// Largest accepted |C_gpu − C_ref| / Σ_k |A_rk|·|W_kc|, per element.
///
/// Dividing by the sum of the terms' magnitudes, not by |C_ref|, is what
/// makes this a sound test of a dot product: with random signs C_ref can
/// be arbitrarily close to 0 (cancellation), and then no floating-point
/// GEMM gets a small error relative to C_ref itself. For that measure any
/// FP32 dot product of K terms, summed in any order (blocked, split-K,
/// with or without FMA), is within γ_K = K·u / (1 − K·u) ≈ 3.8e-6 for
/// K = 64 and u = 2⁻²⁴ (Higham, Accuracy and Stability of Numerical
/// Algorithms, §3.1); the f64 reference's own error is below 1e-14.
/// 1e-4 leaves a factor of 26 over that worst case, so a pass means FP32
/// arithmetic over the right operands; a wrong operand order, a missing
/// transposition or stale data gives errors of order 1. TF32 is caught
/// too, though no bound guarantees it: on a CPU model of this GEMM over
/// 8 Mi outputs of the example's random data, FP32 (one FMA chain per
/// element) had a largest error of 3.2e-7, while TF32 (inputs rounded to
/// 10 mantissa bits first) had 2.4e-4, with 2.2 % of the outputs over
/// 1e-4. The printed maximum says which precision ran.
const TOLERANCE: f64 = 1e-4;

/// Streams random 64×64 f32 matrices through a cuBLAS batched-GEMM stage
/// (C_i = A_i · W), twice, checks every output against an f64 CPU
/// reference and reports the warm run against the link bound.
#[derive(Debug, Parser)]
#[command(name = "gemm_stage", version)]
struct Args {
    /// MiB of f32 matrices to stream (16 KiB each)
    #[arg(long, value_name = "N", default_value_t = 1024)]
    mib: usize,
    /// Chunk size in MiB (a whole number of matrices: any whole MiB is)
    #[arg(long, value_name = "N", default_value_t = 16)]
    chunk_mib: usize,
    /// Ring slots (chunks in flight), 2 to 8
    #[arg(long, value_name = "N", default_value_t = 4)]
    slots: usize,
}

/// What the stage refuses or what failed in it.
#[derive(Debug, thiserror::Error)]
enum GemmStageError {
    /// The chunk does not hold a whole number of matrices.
    #[error("a chunk of {len} floats is not a whole number of {M}x{K} matrices ({A_LEN} floats each): make chunk_bytes and the total a multiple of {} bytes", A_LEN * 4)]
    PartialMatrix { len: usize },
    /// More matrices than one cuBLAS call takes (its batch count is an i32).
    #[error("a chunk of {matrices} matrices is more than one cuBLAS batch holds (i32::MAX)")]
    BatchTooLarge { matrices: usize },
    /// A buffer shorter than the chunk (prism's ring never hands one over;
    /// checked because the unsafe block relies on it).
    #[error("the {what} buffer holds {have} floats, the chunk needs {need}")]
    ShortBuffer {
        what: &'static str,
        have: usize,
        need: usize,
    },
    /// From prism's outside work (views, the handle's binding).
    #[error(transparent)]
    Prism(#[from] prism_stream::Error),
    /// From cuBLAS itself.
    #[error("cublasSgemmStridedBatched failed: {0}")]
    Cublas(#[from] CublasError),
}

/// The stage: W and a cuBLAS handle, both made once on the pipeline's GPU
/// context and kept for every chunk.
#[derive(Debug)]
struct GemmStage {
    /// W, K×N row-major, resident on the GPU.
    w: DeviceBuffer<f32>,
    /// Named in every GEMM's block: prism orders its workspace between
    /// calls (the pipeline alternates chunks between two compute streams).
    blas: Blas,
}

impl Stage<f32> for GemmStage {
    fn name(&self) -> &str {
        "gemm (cuBLAS)"
    }
    /// Output element i depends on a whole row of A_i, so chunks must not
    /// split a matrix: not elementwise (this also keeps the pipeline from
    /// ramping chunk sizes or choosing its own).
    fn elementwise(&self) -> bool {
        false
    }
    fn has_gpu(&self) -> bool {
        true
    }
    fn gpu(
        &mut self,
        launch: &mut Launch<'_>,
        input: &DeviceBuffer<f32>,
        output: &mut DeviceBuffer<f32>,
        len: usize,
    ) -> Result<(), StageError> {
        if !len.is_multiple_of(A_LEN) {
            return Err(GemmStageError::PartialMatrix { len }.into());
        }
        let matrices = len / A_LEN;
        let batch =
            i32::try_from(matrices).map_err(|_| GemmStageError::BatchTooLarge { matrices })?;
        for (what, have, need) in [
            ("input", input.len(), matrices * A_LEN),
            ("output", output.len(), matrices * C_LEN),
            ("W", self.w.len(), K * N),
        ] {
            if have < need {
                return Err(GemmStageError::ShortBuffer { what, have, need }.into());
            }
        }
        let cfg = gemm_config(batch);
        let mut o = launch.outside();
        let (a, w, c) = (o.read(input), o.read(&self.w), o.write(output));
        o.blas(&mut self.blas);
        // SAFETY: the work touches prism's memory only through the named
        // buffers, writes only `output`, and stays within them: cuBLAS reads W's K×N floats
        // (stride 0) and `batch` matrices of M×K floats from `input`, and
        // writes `batch` matrices of M×N floats to `output`, with leading
        // dimensions equal to the row lengths; the lengths were checked
        // above. The handle is bound to the block's stream by `work.blas`,
        // so the GEMM is enqueued there only (through cudarc's views,
        // which keep no address), and nothing here synchronises or records
        // events on that stream. cuBLAS's workspace is its own memory,
        // ordered between blocks by `o.blas`.
        unsafe {
            o.run(|work| -> Result<(), GemmStageError> {
                let (a, w, mut c) = (work.view(a)?, work.view(w)?, work.view_mut(c)?);
                work.blas()?.gemm_strided_batched(cfg, &w, &a, &mut c)?;
                Ok(())
            })
        }??;
        Ok(())
    }
}

/// The cuBLAS call for `batch` products C_i = A_i · W, all row-major: in
/// cuBLAS's column-major terms (module docs) Cᵀ (N×M) = Wᵀ (N×K) · Aᵀ (K×M)
/// for each i, so W is cuBLAS's first operand and A_i its second.
fn gemm_config(batch: i32) -> StridedBatchedConfig<f32> {
    StridedBatchedConfig {
        gemm: GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: N as i32,
            n: M as i32,
            k: K as i32,
            alpha: 1.0f32,
            lda: N as i32, // W: rows of N floats
            ldb: K as i32, // A_i: rows of K floats
            beta: 0.0f32,
            ldc: N as i32, // C_i: rows of N floats
        },
        batch_size: batch,
        stride_a: 0,            // the same W for every matrix
        stride_b: A_LEN as i64, // A_i, one after another
        stride_c: C_LEN as i64, // C_i, one after another
    }
}

fn main() -> ExitCode {
    // Logs to stderr, warnings only unless RUST_LOG says.
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::WARN));
    tracing_subscriber::fmt()
        .with_max_level(LevelFilter::TRACE)
        .with_span_events(FmtSpan::CLOSE)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .finish()
        .with(filter)
        .init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("prism gemm_stage: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Why the example cannot run here, said once: Ok(()) (exit 0) normally,
/// an error when the GPU run requires it (`PRISM_REQUIRE_GPU=1`).
fn cannot_run(why: String) -> Result<(), Box<dyn std::error::Error>> {
    let what = "this example runs cuBLAS on an NVIDIA GPU: it needs a CUDA driver \
                (R580+ for the default CUDA 13 build), a GPU, and libcublas (CUDA toolkit, \
                or the nvidia-cublas wheel) on the loader's path";
    if gpu_required() {
        return Err(format!("{why}; {what}").into());
    }
    println!("prism gemm_stage: {why}; {what}. Nothing to do here.");
    Ok(())
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.mib == 0 || args.chunk_mib == 0 {
        return Err("--mib and --chunk-mib must be at least 1".into());
    }
    let gpu = match Gpu::open(0) {
        Ok(gpu) => gpu,
        Err(e @ (prism_stream::Error::DriverNotFound | prism_stream::Error::NoDevice)) => {
            return cannot_run(format!("no usable GPU ({e})"));
        }
        Err(e) => return Err(e.into()),
    };
    if !Blas::available() {
        return cannot_run("libcublas could not be loaded".into());
    }
    // Resident state, made once on a lane of the pipeline's context.
    let mut lane = Lane::new(&gpu)?;
    let w_host = random_f32(0x5EED_0057, K * N);
    let w = DeviceBuffer::from_slice(&mut lane, &w_host)?;
    let blas = Blas::new(&lane)?;

    // Every chunk a whole number of matrices: whole MiB chunks are (1 MiB
    // is 64 matrices), and no ramp (the stage is not elementwise, so the
    // pipeline would not ramp it anyway; off says so).
    let config = PipelineConfig {
        chunk_bytes: args.chunk_mib << 20,
        slots: args.slots,
        ramp: false,
        adaptive: false,
        ..PipelineConfig::default()
    };
    let mut p = PipelineStageManager::<f32>::with_gpu(&gpu, config)?;
    p.add_stage(GemmStage { w, blas });

    let n = (args.mib << 20) / 4;
    let matrices = n / A_LEN;
    println!(
        "prism gemm_stage: {} MiB = {matrices} matrices of {M}x{K} f32, C_i = A_i * W ({K}x{N}) by \
         cublasSgemmStridedBatched, {} MiB chunks ({} matrices each), {} slots, on {}",
        args.mib,
        args.chunk_mib,
        (args.chunk_mib << 20) / (A_LEN * 4),
        args.slots,
        gpu.info().name
    );
    let src = PinnedBuffer::from_slice(&gpu, &random_f32(0x5EED_00A1, n), HostAllocFlags::DEFAULT)?;
    let mut dst = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT)?;
    let w64: Vec<f64> = w_host.iter().map(|&v| f64::from(v)).collect();

    let mut failed = false;
    for (k, label) in ["first (cold: pays cuBLAS and ring set-up)", "second (warm)"]
        .into_iter()
        .enumerate()
    {
        p.reset_stats();
        p.run_pinned(&src, &mut dst)?;
        let stats = p.get_stats().clone();
        let check = check(src.as_slice()?, dst.wait_slice()?, &w64);
        report(label, &stats);
        println!(
            "prism gemm_stage:   checked all {} outputs against the f64 CPU reference: max error {:.3e} \
             (|C_gpu - C_ref| / sum_k |A_rk W_kc|; tolerance {TOLERANCE:.0e}), {} over{}",
            n,
            check.max_err,
            check.bad,
            check
                .first_bad
                .map(|(m, i)| format!(" (first: matrix {m}, element {i})"))
                .unwrap_or_default()
        );
        failed |= check.bad != 0;
        if k == 1 {
            println!("{stats}");
            let eff = stats.overlap_efficiency();
            println!(
                "prism gemm_stage: warm run at {eff:.3} of the bound (issue #21's target: >= 0.95): {}",
                if eff >= 0.95 { "met" } else { "NOT met" }
            );
        }
    }
    if failed {
        return Err("outputs differ from the CPU reference beyond the tolerance".into());
    }
    println!("prism gemm_stage: OK");
    Ok(())
}

/// One run's line: wall time, the bound and what set it.
fn report(label: &str, s: &PipelineStats) {
    println!(
        "prism gemm_stage: {label} run: wall {:.1} ms ({:.1} GB/s both ways), bound {:.1} ms \
         (the busiest of upload {:.1}, compute {:.1} and download {:.1} ms, timed by CUDA \
         events in this run: {}), overlap efficiency (bound / wall) {:.3}",
        s.wall_ms,
        s.throughput_gbps(),
        s.bound_ms(),
        s.upload_ms,
        s.compute_busy_ms,
        s.download_ms,
        s.bottleneck(),
        s.overlap_efficiency()
    );
}

/// The outcome of checking every output.
#[derive(Debug, Default)]
struct Check {
    max_err: f64,
    bad: usize,
    /// (matrix, element) of the first output over the tolerance.
    first_bad: Option<(usize, usize)>,
}

/// Compares every C_i with A_i · W computed in f64 on all cores (rayon),
/// error per element as `TOLERANCE` defines it. NaN counts as over.
fn check(input: &[f32], output: &[f32], w: &[f64]) -> Check {
    input
        .par_chunks_exact(A_LEN)
        .zip(output.par_chunks_exact(C_LEN))
        .enumerate()
        .map(|(m, (a, c))| {
            let mut out = Check::default();
            let (mut acc, mut mag) = ([0.0f64; N], [0.0f64; N]);
            for r in 0..M {
                acc.fill(0.0);
                mag.fill(0.0);
                for (kk, &a_rk) in a[r * K..][..K].iter().enumerate() {
                    let a_rk = f64::from(a_rk);
                    for (col, &w_kc) in w[kk * N..][..N].iter().enumerate() {
                        acc[col] += a_rk * w_kc;
                        mag[col] += (a_rk * w_kc).abs();
                    }
                }
                for col in 0..N {
                    let got = f64::from(c[r * N + col]);
                    let err = (got - acc[col]).abs() / mag[col].max(f64::MIN_POSITIVE);
                    // A NaN output is over the tolerance, and shows as inf.
                    let err = if err.is_nan() { f64::INFINITY } else { err };
                    out.max_err = out.max_err.max(err);
                    if err > TOLERANCE {
                        out.bad += 1;
                        out.first_bad.get_or_insert((m, r * N + col));
                    }
                }
            }
            out
        })
        .reduce(Check::default, |x, y| Check {
            max_err: x.max_err.max(y.max_err),
            bad: x.bad + y.bad,
            first_bad: match (x.first_bad, y.first_bad) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        })
}

/// CPU checks of what can be checked without a GPU: the call's operands
/// and shapes (against a CPU model of cuBLAS's column-major definition),
/// and that `check` tells a right product from wrong ones.
/// `cargo test -p prism-pipeline --features cublas --example gemm_stage`
#[cfg(test)]
mod tests {
    use super::*;

    /// `cublasSgemmStridedBatched` as BLAS defines it (column-major:
    /// element (i, j) of an operand with leading dimension ld is at
    /// i + j·ld; C_b = alpha·A_b·B_b + beta·C_b, X_b at b·stride_x, C not
    /// read when beta is 0), for untransposed operands.
    fn sgemm_strided_batched_model(
        cfg: &StridedBatchedConfig<f32>,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
    ) {
        let g = &cfg.gemm;
        assert!(matches!(g.transa, cublasOperation_t::CUBLAS_OP_N));
        assert!(matches!(g.transb, cublasOperation_t::CUBLAS_OP_N));
        let [m, n, k, lda, ldb, ldc] = [g.m, g.n, g.k, g.lda, g.ldb, g.ldc].map(|v| v as usize);
        for batch in 0..cfg.batch_size as usize {
            let (ao, bo, co) = (
                batch * cfg.stride_a as usize,
                batch * cfg.stride_b as usize,
                batch * cfg.stride_c as usize,
            );
            for j in 0..n {
                for i in 0..m {
                    let mut acc = 0.0f32;
                    for l in 0..k {
                        acc += a[ao + i + l * lda] * b[bo + l + j * ldb];
                    }
                    let at = co + i + j * ldc;
                    // With beta = 0, BLAS does not read C (it may hold NaN).
                    let old = if g.beta == 0.0 { 0.0 } else { g.beta * c[at] };
                    c[at] = g.alpha * acc + old;
                }
            }
        }
    }

    #[test]
    fn the_cublas_call_computes_a_times_w_row_major() {
        let batch = 3;
        let w = random_f32(1, K * N);
        let a = random_f32(2, batch * A_LEN);
        let w64: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
        let cfg = gemm_config(batch as i32);
        // As the stage calls it: W first, the A_i second.
        let mut c = vec![f32::NAN; batch * C_LEN];
        sgemm_strided_batched_model(&cfg, &w, &a, &mut c);
        let good = check(&a, &c, &w64);
        assert_eq!(good.bad, 0, "{good:?}");
        assert!(good.max_err < 1e-5, "{good:?}");
        // Operands the other way round give W·A (stride 0 on the A_i: the
        // first A_i every time), which the check must refuse.
        let swapped = StridedBatchedConfig {
            stride_a: A_LEN as i64,
            stride_b: 0,
            ..cfg
        };
        let mut c = vec![f32::NAN; batch * C_LEN];
        sgemm_strided_batched_model(&swapped, &a, &w, &mut c);
        assert!(check(&a, &c, &w64).bad > batch * C_LEN / 2);
    }

    #[test]
    fn check_refuses_nan_and_stale_outputs() {
        let w = random_f32(3, K * N);
        let a = random_f32(4, 2 * A_LEN);
        let w64: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
        let mut c = vec![0.0f32; 2 * C_LEN];
        sgemm_strided_batched_model(&gemm_config(2), &w, &a, &mut c);
        assert_eq!(check(&a, &c, &w64).bad, 0);
        let mut nan = c.clone();
        nan[C_LEN + 5] = f32::NAN;
        let r = check(&a, &nan, &w64);
        assert_eq!((r.bad, r.first_bad), (1, Some((1, 5))), "{r:?}");
        assert!(r.max_err.is_infinite());
        // The second matrix's result in the first one's place (a chunk
        // mix-up) is refused nearly everywhere.
        let mut stale = c.clone();
        stale.copy_within(C_LEN.., 0);
        assert!(check(&a, &stale, &w64).bad > C_LEN / 2);
    }
}
