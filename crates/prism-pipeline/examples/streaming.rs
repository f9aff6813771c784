//! The main job: stream a large buffer through an FMA stage and back, with
//! copies and kernels overlapping, every output checked against the CPU, the
//! stats table printed and a Chrome trace written.
//!
//! ```text
//! cargo run --release -p prism-pipeline --example streaming [-- --mib 4096 --chunk-mib 16 --pageable --trace prism.trace.json]
//! ```
//! On a GPU the default is 4 GiB from pinned memory (`--pageable`: from an
//! ordinary Vec, staged by host threads), chunk size and ring depth chosen
//! by `PipelineConfig::auto`. Without a GPU it says so and runs the host
//! backend over 64 MiB in 4 MiB chunks (`--mib`, `--chunk-mib` change that).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use prism_pipeline::{Backend, BackendKind, Fma, PipelineConfig, PipelineStageManager};
use prism_stream::{fma_chain_cpu, HostAllocFlags, PinnedBuffer};
use prism_testing::random_f32;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::prelude::*;

const STAGE: Fma = Fma {
    a: 1.0001,
    b: 0.5,
    iters: 1,
};

/// Streams random f32 through an FMA stage with copies and kernels
/// overlapping, checks every output against the CPU, prints the stats and
/// writes a Chrome trace of the measured run.
#[derive(Debug, Parser)]
#[command(name = "streaming", version)]
struct Args {
    /// MiB of f32 to stream [default: 4096 on a GPU, 64 on the host backend]
    #[arg(long, value_name = "N")]
    mib: Option<usize>,
    /// Chunk size in MiB [default: chosen per run by PipelineConfig::auto on
    /// a GPU, 4 on the host backend]
    #[arg(long, value_name = "N")]
    chunk_mib: Option<usize>,
    /// Input from an ordinary Vec, staged by host threads, instead of pinned
    /// memory (GPU only)
    #[arg(long)]
    pageable: bool,
    /// Where the Chrome trace of the measured run is written (GPU only)
    #[arg(long, value_name = "PATH", default_value = "prism.trace.json")]
    trace: String,
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
            eprintln!("prism streaming: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let config = PipelineConfig {
        trace: true,
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
        println!("prism streaming: no usable GPU (no CUDA driver or device), so this runs the host backend on CPU threads. On a machine with an NVIDIA GPU it streams 4 GiB through the GPU.");
    }
    let mib = args.mib.unwrap_or(if on_gpu { 4096 } else { 64 });
    // On the GPU the adaptive configuration picks chunk size and ring depth
    // per run (unless --chunk-mib says); on the host, 4 MiB chunks, so that
    // several are in flight.
    let chunks = match args.chunk_mib {
        None if on_gpu => {
            p.set_config(PipelineConfig::auto().with_trace(true))?;
            "chosen per run (PipelineConfig::auto)".to_owned()
        }
        chunk_mib => {
            let chunk_mib = chunk_mib.unwrap_or(4);
            p.set_config(PipelineConfig {
                chunk_bytes: chunk_mib << 20,
                ..p.config().clone()
            })?;
            format!("of {chunk_mib} MiB")
        }
    };
    let n = (mib << 20) / 4;
    println!(
        "prism streaming: {mib} MiB of random f32 ({n} elements), chunks {chunks}, backend {}",
        p.backend()
    );
    let input = random_f32(0xC0FFEE, n);
    let output: Vec<f32> = if on_gpu && !args.pageable {
        let gpu = prism_stream::Gpu::open(0)?;
        let src = PinnedBuffer::from_slice(&gpu, &input, HostAllocFlags::DEFAULT)?;
        let mut dst = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT)?;
        p.run_pinned(&src, &mut dst)?; // warm-up: first-touch and module load stay out of the stats
        p.reset_stats();
        p.run_pinned(&src, &mut dst)?;
        dst.wait_slice()?.to_vec()
    } else {
        let mut out = vec![0.0; n];
        p.run(&input, &mut out)?; // warm-up: staging allocation and first touch of `out`
        p.reset_stats();
        p.run(&input, &mut out)?;
        out
    };
    println!("{}", p.get_stats());
    let bad = check(&input, &output);
    println!("prism streaming: checked all {n} outputs against the CPU reference: {bad} differ");
    if !p.timeline().spans.is_empty() {
        p.timeline().write_chrome_trace(&args.trace)?;
        println!("prism streaming: Chrome trace of the last run ({} spans) written to {} (open in https://ui.perfetto.dev)", p.timeline().spans.len(), args.trace);
    }
    if bad != 0 {
        return Err(format!("{bad} outputs differ from the CPU reference").into());
    }
    println!("prism streaming: OK");
    Ok(())
}

/// Counts outputs that differ from the CPU reference, on all cores.
fn check(input: &[f32], output: &[f32]) -> usize {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = input.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = input
            .chunks(per)
            .zip(output.chunks(per))
            .map(|(i, o)| {
                s.spawn(move || {
                    i.iter()
                        .zip(o)
                        .filter(|(x, y)| {
                            fma_chain_cpu(**x, STAGE.a, STAGE.b, STAGE.iters).to_bits()
                                != y.to_bits()
                        })
                        .count()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(usize::MAX))
            .sum()
    })
}
