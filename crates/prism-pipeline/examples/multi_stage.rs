//! A multi-stage pipeline in the style of graph processing: preprocess
//! (clamp outliers) → compute (an FMA chain) → repair/reduce (sum groups of
//! 16, which shrinks the data 16x). Runs on the GPU if there is one, else on
//! the host backend, and checks the result against a CPU computation.
//!
//! `cargo run --release -p prism-pipeline --example multi_stage`

use prism_pipeline::{Backend, Clamp, Fma, GroupSum, PipelineConfig, PipelineStageManager};
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
    let config = PipelineConfig {
        chunk_bytes: scaled(4 << 20, 16 << 10),
        ..PipelineConfig::default()
    };
    let mut p = PipelineStageManager::<f32>::new(Backend::Auto, config)?;
    let preprocess = p.add_stage(Clamp { lo: -0.9, hi: 0.9 });
    let compute = p.add_stage(Fma {
        a: 1.5,
        b: 0.25,
        iters: 4,
    });
    let reduce = p.add_stage(GroupSum { group: 16 });
    p.set_order(&[preprocess, compute, reduce])?;
    let input = random_f32(7, scaled(8 << 20, 1 << 14));
    let mut out = vec![0.0; p.total_output_len(input.len())];
    p.run(&input, &mut out)?;
    // CPU reference, chunk by chunk as the pipeline cuts it.
    let mut want = Vec::with_capacity(out.len());
    for chunk in input.chunks(p.config().chunk_bytes / 4) {
        for g in chunk.chunks(16) {
            want.push(g.iter().fold(0.0f32, |acc, v| {
                acc + prism_stream::fma_chain_cpu(v.clamp(-0.9, 0.9), 1.5, 0.25, 4)
            }));
        }
    }
    let bad = out
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    println!("{}", p.get_stats());
    println!(
        "prism multi_stage: {} inputs -> {} sums on the {} backend; {bad} differ from the CPU",
        input.len(),
        out.len(),
        p.backend()
    );
    if bad != 0 {
        return Err("outputs differ from the CPU reference".into());
    }
    Ok(())
}
