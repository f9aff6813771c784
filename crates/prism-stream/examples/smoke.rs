//! GPU smoke run: prints the device, launches prism's fma kernel through the
//! bindgen'd launcher on a lane of its own, and checks every output element
//! against the CPU on random input.
//!
//! `cargo run --release -p prism-stream --example smoke`

use std::io::IsTerminal;
use std::process::ExitCode;

use prism_stream::{fma_chain_cpu, Error, Gpu, HostAllocFlags, Lane, PinnedBuffer};
use prism_testing::{gpu_required, random_f32, scaled};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::prelude::*;

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
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ (Error::DriverNotFound | Error::NoDevice)) if !gpu_required() => {
            println!("prism smoke: no GPU here ({e}); nothing to check. Run it on a machine with an NVIDIA GPU.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("prism smoke: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Error> {
    let gpu = Gpu::open(0)?;
    let info = gpu.info();
    println!(
        "prism smoke: GPU 0 = {} (sm_{}{}, {:.1} GiB, {} SMs, {} copy engines), kernels built: {}",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.total_memory as f64 / (1u64 << 30) as f64,
        info.multiprocessors,
        info.copy_engines,
        prism_cuda_sys::KERNELS_BUILT
    );
    let n = scaled(1 << 24, 1 << 14); // 64 MiB of f32 (64 KiB under compute-sanitizer)
    let (a, b, iters) = (1.0001f32, 0.5f32, 8);
    let input = random_f32(0x5EED, n);
    let host_in = PinnedBuffer::from_slice(&gpu, &input, HostAllocFlags::DEFAULT)?;
    let mut host_out = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT)?;
    let mut coord = prism_stream::AsyncCoordinator::new(&gpu)?;
    let mut x = coord.zeroed::<f32>(n)?;
    let mut y = coord.zeroed::<f32>(n)?;
    coord.queue_upload(&host_in, &mut x, &[])?;
    // A lane of our own: its kernel waits (on the GPU) for the upload into x,
    // and the download below waits for the kernel, through the buffers alone.
    let mut lane = Lane::new(&gpu)?;
    lane.launch().fma_chain(&x, &mut y, n, a, b, iters)?;
    let down = coord.queue_download(&y, &mut host_out, &[])?;
    coord.wait(down)?;
    let out = host_out.as_slice()?;
    let bad = input
        .iter()
        .zip(out)
        .filter(|(x, y)| fma_chain_cpu(**x, a, b, iters).to_bits() != y.to_bits())
        .count();
    println!("prism smoke: fma_chain over {n} random f32 on a lane of its own: {bad} of {n} elements differ from the CPU reference");
    if bad == 0 {
        println!("prism smoke: OK");
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            what: "elements equal to the CPU reference",
            expected: n,
            actual: n - bad,
        })
    }
}
