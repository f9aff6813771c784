//! A stream far larger than memory: 64 GiB of f32 generated on the fly,
//! straight into the pinned upload slot, through an FMA on the GPU, and
//! every output checked on the fly straight from the pinned download slot,
//! generator and checker each on all cores. Host memory stays bounded by
//! the ring; the peak resident set is printed at the end.
//!
//! ```text
//! cargo run --release -p prism-pipeline --example stream_check [-- --gib 64 --chunk-mib 64]
//! ```
//! Without a GPU it says so and streams 256 MiB through the host backend.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use prism_pipeline::{
    fill_with, sink_fn, Backend, BackendKind, BoxError, Fma, PipelineConfig, PipelineStageManager,
};
use prism_stream::{fma_chain_cpu, pattern};
use rayon::prelude::*;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::prelude::*;

const STAGE: Fma = Fma {
    a: 1.0001,
    b: 0.5,
    iters: 1,
};

/// Element `i` of the generated stream, in [-1, 1).
fn generated(i: u64) -> f32 {
    ((pattern(0x5EED, i) >> 8) as f32) * (2.0 / (1u32 << 24) as f32) - 1.0
}

fn generate(dst: &mut [f32], first: u64) {
    dst.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(b, block)| {
            let base = first + (b as u64) * (1 << 16);
            for (k, v) in block.iter_mut().enumerate() {
                *v = generated(base + k as u64);
            }
        });
}

/// Outputs of elements `first..` that differ from the CPU.
fn check(out: &[f32], first: u64) -> u64 {
    out.par_chunks(1 << 16)
        .enumerate()
        .map(|(b, block)| {
            let base = first + (b as u64) * (1 << 16);
            block
                .iter()
                .enumerate()
                .filter(|(k, y)| {
                    let want = fma_chain_cpu(generated(base + *k as u64), STAGE.a, STAGE.b, 1);
                    want.to_bits() != y.to_bits()
                })
                .count() as u64
        })
        .sum()
}

/// Peak resident memory of this process (VmHWM), MiB; NaN where unknown.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Streams f32 generated on the fly through an FMA stage, checking every
/// output on the fly, with host memory bounded by the ring.
#[derive(Debug, Parser)]
#[command(name = "stream_check", version)]
struct Args {
    /// GiB of f32 to stream (fractions allowed) [default: 64 on a GPU, 0.25
    /// on the host backend]
    #[arg(long, value_name = "GIB")]
    gib: Option<f64>,
    /// Chunk size in MiB
    #[arg(long, value_name = "N", default_value_t = 64)]
    chunk_mib: usize,
}

fn main() -> ExitCode {
    // Logs to stderr, warnings only unless RUST_LOG says (`RUST_LOG=prism=debug`
    // shows prism's spans as they close, with their busy and idle time).
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
            eprintln!("prism stream_check: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let (gib, chunk_mib) = (args.gib, args.chunk_mib);
    let config = PipelineConfig {
        chunk_bytes: chunk_mib << 20,
        timing: false,
        ..PipelineConfig::default()
    };
    let backend = if prism_testing::gpu_required() {
        Backend::Gpu
    } else {
        Backend::Auto
    };
    let mut p = PipelineStageManager::<f32>::new(backend, config)?;
    p.add_stage(STAGE);
    let on_gpu = p.backend() == BackendKind::Gpu;
    if !on_gpu {
        println!("prism stream_check: no usable GPU, so this streams 256 MiB through the host backend. On a GPU it streams 64 GiB.");
    }
    let gib = gib.unwrap_or(if on_gpu { 64.0 } else { 0.25 });
    let total = (gib * (1u64 << 30) as f64 / 4.0) as u64;
    let chunk = (chunk_mib << 20) / 4;
    println!(
        "prism stream_check: {gib} GiB generated on the fly in {chunk_mib} MiB chunks, backend {}",
        p.backend()
    );
    let (mut next, mut checked, mut wrong) = (0u64, 0u64, 0u64);
    // Bytes checked so far, on stderr; nothing is drawn when stderr is not
    // a terminal, and the bar is cleared before the results are printed.
    let bar = ProgressBar::new(total * 4).with_style(ProgressStyle::with_template(
        "prism stream_check: {binary_bytes}/{binary_total_bytes} checked {wide_bar} {binary_bytes_per_sec}, {eta} left",
    )?);
    let t = Instant::now();
    let counts = p.run_stream(
        fill_with(|dst: &mut [f32]| {
            let n = (total - next).min(dst.len() as u64) as usize;
            generate(&mut dst[..n], next);
            next += n as u64;
            Ok::<_, BoxError>(n)
        }),
        sink_fn(|k, out: &[f32]| {
            wrong += check(out, k * chunk as u64);
            checked += out.len() as u64;
            bar.inc(out.len() as u64 * 4);
            Ok::<_, BoxError>(())
        }),
    );
    bar.finish_and_clear();
    let counts = counts?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "prism stream_check: {} chunks, {checked} outputs checked, {wrong} differ from the CPU; {secs:.2} s, {:.2} GB/s each way; peak RSS {:.0} MiB",
        counts.chunks,
        (checked * 4) as f64 / secs / 1e9,
        peak_rss_mib()
    );
    if wrong != 0 || checked != total {
        return Err("outputs differ from the CPU reference".into());
    }
    println!("prism stream_check: OK");
    Ok(())
}
