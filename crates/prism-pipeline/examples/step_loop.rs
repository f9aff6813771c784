//! The design's central loop: one `execute_iteration` call per chunk, then
//! `flush`. Each call submits its chunk and returns the outputs of earlier
//! chunks that finished, so uploads, kernels and downloads of neighbouring
//! chunks overlap; outputs come back in submission order and are checked
//! against the CPU as they arrive.
//!
//! `cargo run --release -p prism-pipeline --example step_loop`

use prism_pipeline::{Backend, Fma, PipelineConfig, PipelineStageManager};
use prism_stream::fma_chain_cpu;
use prism_testing::{random_f32, scaled};
use std::io::IsTerminal;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
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
    let chunk = scaled(4 << 20, 1 << 12); // 16 MiB of f32 per call
    let config = PipelineConfig {
        chunk_bytes: chunk * 4,
        ..PipelineConfig::default()
    };
    let mut p = PipelineStageManager::<f32>::new(Backend::Auto, config)?;
    p.add_stage(Fma {
        a: 1.5,
        b: -0.25,
        iters: 2,
    });
    let calls = 24;
    let inputs: Vec<Vec<f32>> = (0..calls)
        .map(|k| random_f32(k as u64, chunk - k * 7)) // lengths may change per call
        .collect();
    let (mut back, mut bad) = (0usize, 0usize);
    let mut take = |outs: Vec<prism_pipeline::ChunkOutput<f32>>| {
        for c in outs {
            let input = &inputs[c.index as usize];
            let out = c.data.unwrap_or_default();
            bad += input
                .iter()
                .zip(&out)
                .filter(|(x, y)| fma_chain_cpu(**x, 1.5, -0.25, 2).to_bits() != y.to_bits())
                .count()
                + input.len().abs_diff(out.len());
            back += 1;
        }
    };
    for (k, input) in inputs.iter().enumerate() {
        let done = p.execute_iteration(input)?;
        if k < 4 {
            println!(
                "prism step_loop: call {k} returned {} chunk(s), {} in flight",
                done.len(),
                p.pending_iterations()
            );
        }
        take(done);
    }
    take(p.flush()?);
    println!("{}", p.get_stats());
    println!("prism step_loop: {back} of {calls} chunks back in order on the {} backend; {bad} outputs differ from the CPU", p.backend());
    if bad != 0 || back != calls {
        return Err("outputs differ from the CPU reference".into());
    }
    Ok(())
}
