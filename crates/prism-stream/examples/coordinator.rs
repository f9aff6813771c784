//! The coordinator with dependencies: two independent uploads, a kernel that
//! depends on the first, a kernel on the second, and downloads that depend
//! on each kernel; `poll` reports completions as they happen. Needs a GPU.
//!
//! `cargo run --release -p prism-stream --example coordinator`

use prism_stream::{fma_chain_cpu, Error, HostAllocFlags, ManagedGpuContext, PinnedBuffer};
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
    let mut ctx = match ManagedGpuContext::new(0, true) {
        Ok(ctx) => ctx,
        Err(e @ (Error::DriverNotFound | Error::NoDevice)) if !gpu_required() => {
            println!("prism coordinator: no GPU here ({e}); this example needs one.");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let gpu = ctx.gpu().clone();
    let n = scaled(1 << 22, 1 << 12);
    let (a_in, b_in) = (random_f32(1, n), random_f32(2, n));
    let ha = PinnedBuffer::from_slice(&gpu, &a_in, HostAllocFlags::DEFAULT)?;
    let hb = PinnedBuffer::from_slice(&gpu, &b_in, HostAllocFlags::DEFAULT)?;
    let (mut oa, mut ob) = (
        PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT)?,
        PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT)?,
    );
    let c = ctx.async_coordinator_mut()?;
    let (mut da, mut db) = (c.zeroed::<f32>(n)?, c.zeroed::<f32>(n)?);
    let up_a = c.queue_upload(&ha, &mut da, &[])?;
    let up_b = c.queue_upload(&hb, &mut db, &[])?;
    // Each kernel waits (on the GPU) for its own upload only.
    let k_a = c.queue_compute("scale a", &[up_a], |l| {
        l.fma_chain_in_place(&mut da, n, 2.0, 0.0, 1)
    })?;
    let k_b = c.queue_compute("shift b", &[up_b], |l| {
        l.fma_chain_in_place(&mut db, n, 1.0, 1.0, 1)
    })?;
    let d_a = c.queue_download(&da, &mut oa, &[k_a])?;
    let d_b = c.queue_download(&db, &mut ob, &[k_b])?;
    // Two memsets (zeroed buffers) and six ops; poll reports the six.
    let mut left = 6;
    while left > 0 {
        for done in c.poll() {
            println!(
                "prism coordinator: {} ({}) finished: {:?}",
                done.op, done.name, done.result
            );
            left -= 1;
        }
        std::thread::yield_now();
    }
    c.wait(d_a)?;
    c.wait(d_b)?;
    let bad_a = a_in
        .iter()
        .zip(oa.as_slice()?)
        .filter(|(x, y)| fma_chain_cpu(**x, 2.0, 0.0, 1) != **y)
        .count();
    let bad_b = b_in
        .iter()
        .zip(ob.as_slice()?)
        .filter(|(x, y)| fma_chain_cpu(**x, 1.0, 1.0, 1) != **y)
        .count();
    println!("prism coordinator: {bad_a} + {bad_b} outputs differ from the CPU");
    if bad_a + bad_b != 0 {
        return Err("outputs differ from the CPU reference".into());
    }
    Ok(())
}
