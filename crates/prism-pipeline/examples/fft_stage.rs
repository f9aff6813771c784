//! A pipeline stage that calls cuFFT: the stream is complex f32 signals of
//! 4096 points, interleaved (re, im), 8192 floats (32 KiB) each; the stage
//! runs one batched C2C forward FFT over every signal of a chunk while the
//! ring uploads the next chunk and downloads the last one. Every output
//! signal is checked against an f64 FFT computed on the CPU (rustfft).
//!
//! ```text
//! cargo run --release -p prism-pipeline --features cufft --example fft_stage [-- --mib 256 --chunk-mib 16 --slots 4]
//! ```
//!
//! How the stage calls cuFFT:
//! - A cuFFT plan is made for one batch size, and the last chunk of a run
//!   may be shorter than the others, so the stage keeps its plans by batch
//!   size (`FftPlan::plan_1d(&lane, 4096, CUFFT_C2C, batch)`), made on a
//!   lane of its own the first time a size comes; a run over one input
//!   needs at most two.
//! - cudarc's `exec_c2c` takes the *source* as `&mut` (`DevicePtrMut`):
//!   cuFFT's exec functions take a non-const input pointer, and NVIDIA
//!   documents out-of-place transforms that overwrite their input (C2R
//!   always may), so nothing promises a source is left as it was. A
//!   stage's input is shared (`&DeviceBuffer`, named with `read` in
//!   outside work, which promises prism the work only reads it), so it
//!   must not be handed to cuFFT as a source. The stage therefore copies
//!   the input into the output first (`launch.copy_dtod`, ordered by prism
//!   like any op), then transforms the output in place, which cuFFT
//!   supports for C2C: one `write` argument, no scratch buffer. cudarc's safe
//!   `exec_c2c` wants two distinct `&mut` views, which one buffer cannot
//!   give, so the in-place call is cudarc's `cufft::result::exec_c2c` on
//!   the plan's handle with the buffer's address (`w.ptr_mut`), inside the
//!   same (only) `unsafe` block. The extra device copy costs ~2 × 16 MiB of
//!   device-memory traffic per 16 MiB chunk, some 10 µs on an H100, against
//!   ~300 µs to move the chunk over PCIe.
//!
//! Without a GPU, or without libcufft, it says what it needs and exits 0
//! (with `PRISM_REQUIRE_GPU=1`, as on the GPU test machine, it fails).
//! The first run pays cuFFT's planning and the ring's set-up; the second,
//! warm run is the one measured against the bound.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use prism_pipeline::{PipelineConfig, PipelineStageManager, PipelineStats, Stage, StageError};
use prism_stream::cudarc::cufft::result::CufftError;
use prism_stream::cudarc::cufft::sys::{cufftComplex, cufftType};
use prism_stream::cudarc::cufft::FftDirection;
use prism_stream::{DeviceBuffer, FftPlan, Gpu, HostAllocFlags, Lane, Launch, PinnedBuffer};
use prism_testing::{gpu_required, random_f32};
use rayon::prelude::*;
use rustfft::num_complex::Complex;
use rustfft::FftPlanner;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::prelude::*;

/// Points per signal.
const POINTS: usize = 4096;
/// Floats per signal (re, im interleaved): a chunk must hold a whole number.
const SIGNAL: usize = 2 * POINTS;

/// Largest accepted ‖X_gpu − X_ref‖₂ / ‖X_ref‖₂ per signal.
///
/// Normwise, per signal, because that is what an FFT's error bound is
/// about: single bins can be near 0 and carry no meaningful relative
/// error. For a radix-2 Cooley–Tukey FFT of N = 2^t points with accurate
/// twiddle factors, ‖X̂ − X‖/‖X‖ ≤ t·η/(1 − t·η) with η ≈ 4u (Higham,
/// Accuracy and Stability of Numerical Algorithms, Thm 24.2): about
/// 12 × 2.4e-7 ≈ 3e-6 in FP32 for N = 4096, worst case; observed errors
/// are typically ~1e-7 (cuFFT's radix-4/8/16 kernels have bounds of the
/// same order). The reference is an f64 FFT of the same f32 inputs (its
/// error ~1e-15). 1e-4 leaves a factor of 30 over that worst case, while a
/// wrong direction, layout, batch or stale chunk gives errors of order 1.
const TOLERANCE: f64 = 1e-4;

/// Streams random complex f32 signals of 4096 points through a cuFFT
/// forward-FFT stage, twice, checks every output signal against an f64 CPU
/// FFT and reports the warm run against the link bound.
#[derive(Debug, Parser)]
#[command(name = "fft_stage", version)]
struct Args {
    /// MiB of signals to stream (32 KiB each)
    #[arg(long, value_name = "N", default_value_t = 256)]
    mib: usize,
    /// Chunk size in MiB (a whole number of signals: any whole MiB is)
    #[arg(long, value_name = "N", default_value_t = 16)]
    chunk_mib: usize,
    /// Ring slots (chunks in flight), 2 to 8
    #[arg(long, value_name = "N", default_value_t = 4)]
    slots: usize,
}

/// What the stage refuses or what failed in it.
#[derive(Debug, thiserror::Error)]
enum FftStageError {
    /// The chunk does not hold a whole number of signals.
    #[error("a chunk of {len} floats is not a whole number of {POINTS}-point complex signals ({SIGNAL} floats each): make chunk_bytes and the total a multiple of {} bytes", SIGNAL * 4)]
    PartialSignal { len: usize },
    /// More signals than one cuFFT plan takes (its batch count is an i32).
    #[error("a chunk of {signals} signals is more than one cuFFT batch holds (i32::MAX)")]
    BatchTooLarge { signals: usize },
    /// A buffer shorter than the chunk (prism's ring never hands one over;
    /// checked because the unsafe block relies on it).
    #[error("the {what} buffer holds {have} floats, the chunk needs {need}")]
    ShortBuffer {
        what: &'static str,
        have: usize,
        need: usize,
    },
    /// From prism (the copy, outside work, planning).
    #[error(transparent)]
    Prism(#[from] prism_stream::Error),
    /// From cuFFT itself.
    #[error("cufftExecC2C failed: {0}")]
    Cufft(#[from] CufftError),
}

/// The stage: a lane of the pipeline's context to make plans on, and the
/// plans made so far, by batch size.
#[derive(Debug)]
struct FftStage {
    lane: Lane,
    /// (signals per transform batch, its plan). A run over one input needs
    /// at most two (full chunks and the last one); they live as long as the
    /// stage. Each is named in its transforms' blocks (`o.fft`), so prism
    /// orders its work area between transforms (the pipeline alternates
    /// chunks between two compute streams), and a plan dropped waits for
    /// its last transform before freeing its work area.
    plans: Vec<(usize, FftPlan)>,
}

impl FftStage {
    fn new(gpu: &Gpu) -> Result<Self, prism_stream::Error> {
        let lane = Lane::new(gpu)?;
        Ok(Self {
            lane,
            plans: Vec::new(),
        })
    }

    /// Where the plan for `batch` signals is in `plans`, made the first
    /// time it is asked for.
    fn plan(&mut self, batch: usize) -> Result<usize, FftStageError> {
        Ok(match self.plans.iter().position(|(b, _)| *b == batch) {
            Some(at) => at,
            None => {
                let n = i32::try_from(batch)
                    .map_err(|_| FftStageError::BatchTooLarge { signals: batch })?;
                let plan = FftPlan::plan_1d(&self.lane, POINTS as i32, cufftType::CUFFT_C2C, n)?;
                self.plans.push((batch, plan));
                self.plans.len() - 1
            }
        })
    }
}

impl Stage<f32> for FftStage {
    fn name(&self) -> &str {
        "fft c2c (cuFFT)"
    }
    /// Every output point depends on its whole signal: not elementwise
    /// (chunks must not split a signal, and the pipeline then neither ramps
    /// chunk sizes nor chooses its own).
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
        if !len.is_multiple_of(SIGNAL) {
            return Err(FftStageError::PartialSignal { len }.into());
        }
        for (what, have) in [("input", input.len()), ("output", output.len())] {
            if have < len {
                return Err(FftStageError::ShortBuffer {
                    what,
                    have,
                    need: len,
                }
                .into());
            }
        }
        let at = self.plan(len / SIGNAL)?;
        let plan = &mut self.plans[at].1;
        // The input stays untouched: the transform runs in place on a copy.
        launch.copy_dtod(input, 0, output, 0, len)?;
        let mut o = launch.outside();
        let x = o.write(output);
        o.fft(plan);
        // SAFETY: the work touches prism's memory only through `output`,
        // named with `write`, and stays within it: the plan transforms `len / SIGNAL` signals of
        // POINTS complex f32 (2 floats each), exactly the first `len`
        // floats, which were checked above to fit the buffer; input and
        // output are the same address, an in-place transform, which cuFFT
        // allows for C2C. The plan is bound to the block's stream by
        // `work.fft`, so the transform is enqueued there only; the address
        // is used for this one call and kept nowhere; nothing here
        // synchronises or records events on the stream. cuFFT's work area
        // is the plan's own memory, ordered between blocks by `o.fft`.
        unsafe {
            o.run(|work| -> Result<(), FftStageError> {
                let fft = work.fft()?;
                let (at, _) = work.ptr_mut(&x)?;
                let data = at as *mut cufftComplex;
                prism_stream::cudarc::cufft::result::exec_c2c(
                    fft.handle(),
                    data,
                    data,
                    FftDirection::Forward as i32,
                )?;
                Ok(())
            })
        }??;
        Ok(())
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
            eprintln!("prism fft_stage: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Why the example cannot run here, said once: Ok(()) (exit 0) normally,
/// an error when the GPU run requires it (`PRISM_REQUIRE_GPU=1`).
fn cannot_run(why: String) -> Result<(), Box<dyn std::error::Error>> {
    let what = "this example runs cuFFT on an NVIDIA GPU: it needs a CUDA driver \
                (R580+ for the default CUDA 13 build), a GPU, and libcufft (CUDA toolkit, \
                or the nvidia-cufft wheel) on the loader's path";
    if gpu_required() {
        return Err(format!("{why}; {what}").into());
    }
    println!("prism fft_stage: {why}; {what}. Nothing to do here.");
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
    if !FftPlan::available() {
        return cannot_run("libcufft could not be loaded".into());
    }
    // Whole MiB chunks hold whole signals (1 MiB is 32); no ramp (the
    // stage is not elementwise, so the pipeline would not ramp it anyway).
    let config = PipelineConfig {
        chunk_bytes: args.chunk_mib << 20,
        slots: args.slots,
        ramp: false,
        adaptive: false,
        ..PipelineConfig::default()
    };
    let mut p = PipelineStageManager::<f32>::with_gpu(&gpu, config)?;
    p.add_stage(FftStage::new(&gpu)?);

    let n = (args.mib << 20) / 4;
    let signals = n / SIGNAL;
    println!(
        "prism fft_stage: {} MiB = {signals} complex f32 signals of {POINTS} points, forward C2C FFT \
         by cuFFT (in place, on a copy), {} MiB chunks ({} signals each), {} slots, on {}",
        args.mib,
        args.chunk_mib,
        (args.chunk_mib << 20) / (SIGNAL * 4),
        args.slots,
        gpu.info().name
    );
    let src = PinnedBuffer::from_slice(&gpu, &random_f32(0x5EED_0FF7, n), HostAllocFlags::DEFAULT)?;
    let mut dst = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT)?;

    let mut failed = false;
    for (k, label) in [
        "first (cold: pays cuFFT planning and ring set-up)",
        "second (warm)",
    ]
    .into_iter()
    .enumerate()
    {
        p.reset_stats();
        p.run_pinned(&src, &mut dst)?;
        let stats = p.get_stats().clone();
        let check = check(src.as_slice()?, dst.wait_slice()?);
        report(label, &stats);
        println!(
            "prism fft_stage:   checked all {signals} output signals against an f64 CPU FFT (rustfft): \
             max error {:.3e} (||X_gpu - X_ref|| / ||X_ref|| per signal; tolerance \
             {TOLERANCE:.0e}), {} over{}",
            check.max_err,
            check.bad,
            check
                .first_bad
                .map(|s| format!(" (first: signal {s})"))
                .unwrap_or_default()
        );
        failed |= check.bad != 0;
        if k == 1 {
            println!("{stats}");
            println!(
                "prism fft_stage: warm run at {:.3} of the bound",
                stats.overlap_efficiency()
            );
        }
    }
    if failed {
        return Err("outputs differ from the CPU reference beyond the tolerance".into());
    }
    println!("prism fft_stage: OK");
    Ok(())
}

/// One run's line: wall time, the bound and what set it.
fn report(label: &str, s: &PipelineStats) {
    println!(
        "prism fft_stage: {label} run: wall {:.1} ms ({:.1} GB/s both ways), bound {:.1} ms \
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

/// The outcome of checking every output signal.
#[derive(Debug, Default)]
struct Check {
    max_err: f64,
    bad: usize,
    /// The first signal over the tolerance.
    first_bad: Option<usize>,
}

/// Compares every output signal with rustfft's forward FFT (unnormalised,
/// e^(-2πi jk/N), as cuFFT's) of its input in f64, on all cores, error as
/// `TOLERANCE` defines it. NaN counts as over.
fn check(input: &[f32], output: &[f32]) -> Check {
    let fft = FftPlanner::<f64>::new().plan_fft_forward(POINTS);
    input
        .par_chunks_exact(SIGNAL)
        .zip(output.par_chunks_exact(SIGNAL))
        .enumerate()
        .map_init(
            || vec![Complex::<f64>::default(); POINTS],
            |x, (s, (i, o))| {
                for (c, v) in x.iter_mut().zip(i.chunks_exact(2)) {
                    *c = Complex::new(f64::from(v[0]), f64::from(v[1]));
                }
                fft.process(x);
                let (mut diff, mut norm) = (0.0f64, 0.0f64);
                for (c, v) in x.iter().zip(o.chunks_exact(2)) {
                    let got = Complex::new(f64::from(v[0]), f64::from(v[1]));
                    diff += (got - c).norm_sqr();
                    norm += c.norm_sqr();
                }
                let err = (diff / norm.max(f64::MIN_POSITIVE)).sqrt();
                // A NaN output is over the tolerance, and shows as inf.
                let err = if err.is_nan() { f64::INFINITY } else { err };
                Check {
                    max_err: err,
                    bad: usize::from(err > TOLERANCE),
                    first_bad: (err > TOLERANCE).then_some(s),
                }
            },
        )
        .reduce(Check::default, |x, y| Check {
            max_err: x.max_err.max(y.max_err),
            bad: x.bad + y.bad,
            first_bad: match (x.first_bad, y.first_bad) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        })
}

/// CPU checks of `check`: it accepts an FP32 FFT of the inputs and refuses
/// the wrong direction, a signal mix-up and NaN.
/// `cargo test -p prism-pipeline --features cufft --example fft_stage`
#[cfg(test)]
mod tests {
    use super::*;
    use rustfft::FftDirection as Dir;

    /// FFTs of each signal of `input` in f32, in the given direction.
    fn fft_f32(input: &[f32], dir: Dir) -> Vec<f32> {
        let fft = FftPlanner::<f32>::new().plan_fft(POINTS, dir);
        let mut out = Vec::with_capacity(input.len());
        for s in input.chunks_exact(SIGNAL) {
            let mut x: Vec<Complex<f32>> = s
                .chunks_exact(2)
                .map(|v| Complex::new(v[0], v[1]))
                .collect();
            fft.process(&mut x);
            out.extend(x.iter().flat_map(|c| [c.re, c.im]));
        }
        out
    }

    #[test]
    fn check_accepts_an_f32_fft_and_refuses_wrong_ones() {
        let input = random_f32(5, 3 * SIGNAL);
        let good = check(&input, &fft_f32(&input, Dir::Forward));
        assert_eq!(good.bad, 0, "{good:?}");
        assert!(good.max_err < 1e-5, "{good:?}");
        let inverse = check(&input, &fft_f32(&input, Dir::Inverse));
        assert_eq!(
            (inverse.bad, inverse.first_bad),
            (3, Some(0)),
            "{inverse:?}"
        );
        let mut mixed = fft_f32(&input, Dir::Forward);
        mixed.copy_within(SIGNAL.., 0);
        let r = check(&input, &mixed);
        assert_eq!((r.bad, r.first_bad), (2, Some(0)), "{r:?}");
        let mut nan = fft_f32(&input, Dir::Forward);
        nan[2 * SIGNAL + 7] = f32::NAN;
        let r = check(&input, &nan);
        assert_eq!((r.bad, r.first_bad), (1, Some(2)), "{r:?}");
        assert!(r.max_err.is_infinite());
    }
}
