//! Triple buffering alone: 256 MiB of random f32 through a 3-slot GPU ring,
//! one kernel per chunk, upload / kernel / download on three streams, slot
//! states printed as they change. Needs a GPU; without one it says so.
//!
//! `cargo run --release -p prism-buffer --example triple_buffer`

use prism_buffer::{GpuTripleBufferExt, TripleBuffer};
use prism_stream::{fma_chain_cpu, Error, ManagedGpuContext};
use prism_testing::{gpu_required, random_f32, scaled};
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
    let ctx = match ManagedGpuContext::new(0, true) {
        Ok(ctx) => ctx,
        Err(e @ (Error::DriverNotFound | Error::NoDevice)) if !gpu_required() => {
            println!("prism triple_buffer: no GPU here ({e}); this example needs one.");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let chunk = scaled(4 << 20, 1 << 12); // 16 MiB slots (16 KiB under compute-sanitizer)
    let input = random_f32(3, scaled(64 << 20, 1 << 14));
    let mut tb: TripleBuffer<f32> = ctx.create_triple_buffer(chunk)?;
    let chunks: Vec<&[f32]> = input.chunks(chunk).collect();
    let (mut up, mut out, mut bad) = (0, 0, 0);
    while out < chunks.len() {
        // Issue whatever the ring allows; the GPU orders the steps with events.
        if up < chunks.len() && tb.get_upload_buffer().is_some() {
            tb.upload(chunks[up])?;
            up += 1;
        }
        if tb.get_process_buffer().is_some() {
            tb.process(|launch, buf, n| launch.fma_chain_in_place(buf, n, 2.0, 1.0, 1))?;
        }
        if tb.get_download_buffer().is_some() {
            tb.download()?;
        }
        if out < 2 {
            let states: Vec<String> = tb
                .get_states()
                .iter()
                .map(|s| format!("{}:{}", s.slot, s.state))
                .collect();
            println!("prism triple_buffer: slots {}", states.join(" "));
        }
        let blocked = up == chunks.len() || tb.get_upload_buffer().is_none();
        let take = |id: prism_buffer::ChunkId, o: &[f32]| {
            chunks[id.0 as usize]
                .iter()
                .zip(o)
                .filter(|(x, y)| fma_chain_cpu(**x, 2.0, 1.0, 1) != **y)
                .count()
        };
        let done = if blocked {
            tb.wait_output(take)?
        } else {
            tb.take_output(take)?
        };
        if let Some(b) = done {
            bad += b;
            out += 1;
        }
    }
    println!("prism triple_buffer: {} chunks of {} MiB streamed in order; {bad} outputs differ from the CPU", chunks.len(), (chunk * 4) >> 20);
    if bad != 0 {
        return Err("outputs differ from the CPU reference".into());
    }
    Ok(())
}
