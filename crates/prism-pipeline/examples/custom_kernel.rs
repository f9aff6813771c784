//! A stage running the user's own kernel, loaded from PTX at run time, next
//! to one of prism's kernels. The PTX here, `kernels/scale_add.ptx` beside
//! this file, is `kernels/scale_add.cu` compiled by `cargo xtask
//! build-kernels` (committed, so the example needs no nvcc), a stand-in for
//! "your kernel"; with your own, use `Ptx::from_file("my.ptx")` or
//! `Ptx::from_src(text)`. The buffers are
//! passed as arguments, so prism orders the kernel after their earlier uses
//! and keeps them alive until it has run; only the launch itself is unsafe.
//!
//! `cargo run --release -p prism-pipeline --example custom_kernel`

use prism_pipeline::{Backend, BackendKind, Fma, GpuFn, PipelineConfig, PipelineStageManager};
use prism_stream::cudarc::driver::LaunchConfig;
use prism_stream::cudarc::nvrtc::Ptx;
use prism_stream::{fma_chain_cpu, DeviceBuffer, Launch};
use prism_testing::{random_f32, scaled};
use std::io::IsTerminal;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::prelude::*;

/// `extern "C" scale_add(const float *x, float *y, u64 n, float a, float b)`:
/// `y[i] = fmaf(a, x[i], b)`.
const SCALE_ADD_PTX: &str = include_str!("kernels/scale_add.ptx");

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
    let mut p = PipelineStageManager::<f32>::new(
        Backend::Auto,
        PipelineConfig {
            chunk_bytes: scaled(4 << 20, 16 << 10),
            ..PipelineConfig::default()
        },
    )?;
    let Some(gpu) = p.gpu().cloned().filter(|_| p.backend() == BackendKind::Gpu) else {
        println!("prism custom_kernel: no GPU here; this example loads a kernel onto one.");
        return Ok(());
    };
    // Your kernel, loaded into the pipeline's GPU context.
    let scale_add = gpu
        .load_module(Ptx::from_src(SCALE_ADD_PTX))?
        .kernel("scale_add")?;
    p.add_stage(GpuFn::new(
        "user scale_add",
        true,
        move |l: &mut Launch<'_>, input: &DeviceBuffer<f32>, output: &mut DeviceBuffer<f32>, n| {
            // SAFETY: the arguments match the kernel's signature
            // (const float*, float*, unsigned long long n, float a, float b),
            // both buffers hold >= n elements, and the grid covers n with the
            // kernel's bounds check.
            unsafe {
                l.kernel(&scale_add)
                    .arg(input)
                    .arg_mut(output)
                    .value(n as u64)
                    .value(2.0f32)
                    .value(-1.0f32)
                    .launch(LaunchConfig::for_num_elems(n as u32))
            }?;
            Ok(())
        },
    ));
    p.add_stage(Fma {
        a: 0.5,
        b: 0.25,
        iters: 2,
    }); // and one of prism's own kernels
    let input = random_f32(21, scaled(8 << 20, 1 << 14));
    let mut out = vec![0.0; input.len()];
    p.run(&input, &mut out)?;
    let bad = input
        .iter()
        .zip(&out)
        .filter(|(x, y)| {
            fma_chain_cpu(2.0f32.mul_add(**x, -1.0), 0.5, 0.25, 2).to_bits() != y.to_bits()
        })
        .count();
    println!("{}", p.get_stats());
    println!("prism custom_kernel: user PTX stage + prism stage over {} elements: {bad} differ from the CPU", input.len());
    if bad != 0 {
        return Err("outputs differ from the CPU reference".into());
    }
    Ok(())
}
