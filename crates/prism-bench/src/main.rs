//! prism-bench: the workloads of shared/BENCH-SPEC.md, prism against the
//! baselines it lists, all in one process on one GPU: S1, S1c, S2, S3 and
//! S5 (the step loop) in the main table, S8 (one small synchronous step),
//! S10 (many small iterations over resident data, `s10.rs`), S11 (one
//! upload fanned out to 2 and 4 branches, `s11.rs`) and S6 (a 64 GiB stream
//! generated and checked on the fly) in their own.
//!
//! ```text
//! cargo run --release -p prism-bench --bin prism-bench [-- --quick] [--reps 5] [--out bench-results]
//! ```
//! Prints one table (workload x implementation: median ms, spread, GB/s,
//! bound / measured, speed relative to the hand-written CUDA C++) and writes
//! `results.json` and `chart.svg` under `--out`. Needs a GPU and a build with
//! nvcc; without them it says so and exits non-zero. `results.json` says
//! where and when it was measured (`provenance.rs`: the card, the driver
//! and its CUDA version, the PCIe link, the UTC start time, the commit);
//! `cargo xtask bench-doc` builds docs/BENCHMARKS.md from such files.
//!
//! Timing: the CUDA C++ baselines time themselves with CUDA events around
//! their whole loop (device allocation outside); cudarc and prism are timed
//! on the host from the first call to the end of the last copy, so their
//! figures include host issue latency the C++ ones do not.

mod baselines;
mod chart;
mod multi;
mod provenance;
mod s10;
mod s11;

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressFinish, ProgressStyle};
use prism_pipeline::{
    fill_with, sink_fn, Clamp, Fma, PinnedItemsCopy, PipelineConfig, PipelineStageManager,
};
use prism_stream::cudarc::driver::{CudaContext, CudaSlice, DevicePtr, DevicePtrMut};
use prism_stream::{copy_streaming, fma_chain_cpu, pattern, Gpu, HostAllocFlags, PinnedBuffer};
use rand::{RngExt, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

const A: f32 = 1.0001;
const B: f32 = 0.5;

/// How prism runs a workload of the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrismMode {
    /// `run_pinned` over one pinned buffer.
    Pinned,
    /// `run_items_pinned` over separate pinned items.
    Items,
    /// One `execute_iteration_pinned` call per chunk, then `flush` (S5).
    Steps,
}

#[derive(Debug, Clone)]
struct Workload {
    name: &'static str,
    total: usize,
    piece: usize,
    items: bool,
    mode: PrismMode,
    iters: u32,
    /// Chunk size prism uses (bytes) and ring depth.
    prism_chunk_bytes: usize,
    prism_slots: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct CaseResult {
    workload: String,
    implementation: String,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    gbps: f64,
    bound_over_measured: f64,
    speed_vs_cxx: Option<f64>,
    checked_outputs: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct WorkloadResult {
    workload: String,
    total_mib: usize,
    piece_kib: usize,
    items: bool,
    fma_iters: u32,
    t_bidir_ms: f64,
    t_kernel_ms: f64,
    bound_ms: f64,
    cases: Vec<CaseResult>,
}

/// S8: µs per synchronous step at one size.
#[derive(Debug, Serialize, Deserialize)]
struct StepResult {
    kib: usize,
    steps: usize,
    cxx_us: f64,
    cxx_graph_us: f64,
    /// `execute_iteration_blocking`: pageable slice in, `Vec` out.
    prism_us: f64,
    prism_over_cxx: f64,
    /// `execute_iteration_blocking_pinned`: pinned in and out, as the C++.
    #[serde(default)]
    prism_pinned_us: f64,
    #[serde(default)]
    prism_pinned_over_cxx: f64,
}

/// S4: pageable `Vec`s in and out, one shot and repeated.
#[derive(Debug, Serialize, Deserialize)]
struct PageableResult {
    mib: usize,
    /// Both-way copies of the same bytes (pinned, 64 MiB pieces).
    t_bidir_ms: f64,
    /// The same bytes copied host to host, in and out through a ring of
    /// three 64 MiB buffers, on the pool's threads, no GPU.
    t_staging_ms: f64,
    /// The same host-alone copies with prism's streaming (non-temporal) copy.
    #[serde(default)]
    t_staging_stream_ms: f64,
    bound_ms: f64,
    /// One-shot `run` with the default configuration.
    prism_ms: f64,
    bound_over_measured: f64,
    threads: usize,
    /// One-shot `run` per configuration (chunk size x ring depth).
    #[serde(default)]
    sweep: Vec<SweepRow>,
    /// Repeated runs over the same vectors, registered in place once.
    #[serde(default)]
    repeated: Option<RepeatedResult>,
}

/// One configuration of the S4 one-shot sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SweepRow {
    chunk_mib: usize,
    slots: usize,
    ms: f64,
    /// Per run: host time in staging copies and blocked on the GPU.
    host_copy_ms: f64,
    host_wait_ms: f64,
}

/// S4 repeated: `PinnedBuffer::register` of the input and output vectors,
/// then `run_pinned` over them again and again, then `into_vec`.
#[derive(Debug, Serialize, Deserialize)]
struct RepeatedResult {
    register_ms: f64,
    first_run_ms: f64,
    /// Median of the runs after the first.
    run_ms: f64,
    unregister_ms: f64,
    /// t_bidir / run_ms.
    run_over_bidir: f64,
}

/// A short run (512 MiB pinned, 16 MiB chunks, two stages) with the chunk
/// ramp off and on.
#[derive(Debug, Serialize, Deserialize)]
struct ShortResult {
    mib: usize,
    chunk_mib: usize,
    t_bidir_ms: f64,
    /// (ramp, median wall ms, chunks per run, stats overlap efficiency)
    runs: Vec<(bool, f64, u64, f64)>,
    /// (ramp, median wall ms) with timing events off (no per-step times).
    #[serde(default)]
    untimed: Vec<(bool, f64)>,
}

/// S6: a generated stream checked on the fly.
#[derive(Debug, Serialize, Deserialize)]
struct StreamResult {
    gib: f64,
    chunk_mib: usize,
    /// Both-way copies of the same bytes, scaled from a 256 MiB measurement.
    t_bidir_ms: f64,
    /// The generator and the checker alone over the same data (host threads).
    t_host_ms: f64,
    bound_ms: f64,
    prism_ms: f64,
    bound_over_measured: f64,
    checked_elements: u64,
    peak_rss_mib: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Report {
    /// GPU 0's name.
    device: String,
    /// The CUDA version the driver supports (`cuDriverGetVersion`).
    driver_cuda_version: String,
    /// The driver's version, the link, the date and the commit (absent in
    /// results saved before they were recorded).
    #[serde(flatten)]
    provenance: provenance::Provenance,
    quick: bool,
    reps: usize,
    workloads: Vec<WorkloadResult>,
    #[serde(default)]
    steps: Vec<StepResult>,
    #[serde(default)]
    stream: Option<StreamResult>,
    #[serde(default)]
    pageable: Vec<PageableResult>,
    #[serde(default)]
    short: Option<ShortResult>,
    #[serde(default)]
    items_sweep: Vec<SweepRow>,
    #[serde(default)]
    auto: Vec<AutoResult>,
    #[serde(default)]
    multi: Option<multi::MultiResult>,
    /// S10: µs per iteration over resident data.
    #[serde(default)]
    iterations: Option<s10::S10Result>,
    /// S11: one upload fanned out to several branches, each downloaded.
    #[serde(default)]
    fanout: Option<s11::S11Result>,
}

/// The names `--only` accepts: the workloads of the main table, then the
/// sections with tables of their own.
const ONLY: [&str; 13] = [
    "S1", "S1c", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "S9", "S10", "S11", "auto",
];

/// prism against hand-written CUDA C++, plain cudarc and the hardware bound
/// (the workloads of shared/BENCH-SPEC.md). Needs a GPU and a build with
/// nvcc, except for --replot.
#[derive(Debug, Parser)]
#[command(name = "prism-bench", version)]
struct Args {
    /// Every size 16x smaller, and at most 3 repetitions
    #[arg(long)]
    quick: bool,
    /// Timed repetitions after a warm-up
    #[arg(long, value_name = "N", default_value_t = 5)]
    reps: usize,
    /// Where results.json and chart.svg go
    #[arg(long, value_name = "DIR", default_value = "bench-results")]
    out: String,
    /// Run only this workload or section
    #[arg(long, value_name = "NAME", value_parser = ONLY)]
    only: Option<String>,
    /// Print the tables and redraw the chart (under --out) from a saved
    /// results.json, without a GPU
    #[arg(long, value_name = "FILE")]
    replot: Option<String>,
    /// Diagnostic: run prism with its timing events on and print its stats
    #[arg(long)]
    prism_timing: bool,
}

fn parse_args() -> Args {
    let mut a = Args::parse();
    if a.quick {
        a.reps = a.reps.min(3);
    }
    a
}

fn main() {
    if let Err(e) = run() {
        eprintln!("prism-bench: FAILED: {e}");
        std::process::exit(1);
    }
}

type BoxError = Box<dyn std::error::Error>;

fn run() -> Result<(), BoxError> {
    let args = parse_args();
    if let Some(path) = &args.replot {
        // Table and chart again from a saved results.json (no GPU needed).
        let report: Report = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        print_table(&report.device, &report.workloads);
        println!(
            "CUDA {}, {}",
            report.driver_cuda_version,
            report.provenance.describe()
        );
        print_pageable(&report.pageable);
        print_short(report.short.as_ref());
        print_items_sweep(&report.items_sweep);
        print_auto(&report.auto);
        print_steps(&report.steps);
        s10::print_iterations(report.iterations.as_ref());
        s11::print_fanout(report.fanout.as_ref());
        print_stream(report.stream.as_ref());
        multi::print_multi(report.multi.as_ref());
        std::fs::create_dir_all(&args.out)?;
        write_chart(&report, &args.out)?;
        return Ok(());
    }
    // The run's start time and the build's commit; the driver and the link
    // are read after the run.
    let mut provenance = provenance::Provenance::start();
    if !prism_cuda_sys::KERNELS_BUILT {
        return Err("prism-bench compares prism with CUDA C++ baselines that nvcc compiles, and this build had no nvcc: run `cargo xtask install-nvcc` and rebuild".into());
    }
    let gpu = Gpu::open(0).map_err(|e| format!("prism-bench needs a GPU: {e}"))?;
    // The plain-cudarc baseline gets a context handle of its own with event
    // tracking off, as a hand-tuned cudarc program would have it (prism's
    // own handle keeps tracking on for its users' `CudaSlice`s).
    let ctx = CudaContext::new(0)?;
    // SAFETY: right after the handle is made, before it allocates; the
    // baseline orders its work per stream and synchronises before it frees.
    unsafe { ctx.disable_event_tracking() };
    let device = gpu.info().name.clone();
    let scale = if args.quick { 16 } else { 1 };
    let mib = 1usize << 20;
    let mut workloads = vec![
        Workload {
            name: "S1",
            total: (4096 / scale) * mib / 4,
            piece: 64 * mib / 4,
            items: false,
            mode: PrismMode::Pinned,
            iters: 1,
            prism_chunk_bytes: 64 * mib,
            prism_slots: 3,
        },
        Workload {
            name: "S1c",
            total: (4096 / scale) * mib / 4,
            piece: 64 * mib / 4,
            items: false,
            mode: PrismMode::Pinned,
            iters: 0,
            prism_chunk_bytes: 64 * mib,
            prism_slots: 3,
        },
        Workload {
            name: "S2",
            total: (1024 / scale) * mib / 4,
            piece: mib / 4,
            items: false,
            mode: PrismMode::Pinned,
            iters: 1,
            prism_chunk_bytes: mib,
            prism_slots: 8,
        },
        Workload {
            name: "S3",
            total: (256 / scale) * mib / 4,
            piece: 64 * 1024 / 4,
            items: true,
            mode: PrismMode::Items,
            iters: 1,
            prism_chunk_bytes: 16 * mib,
            prism_slots: 3,
        },
        Workload {
            name: "S5",
            total: (4096 / scale) * mib / 4,
            piece: 64 * mib / 4,
            items: false,
            mode: PrismMode::Steps,
            iters: 1,
            prism_chunk_bytes: 64 * mib,
            prism_slots: 3,
        },
    ];
    let wants = |name: &str| args.only.as_deref().is_none_or(|o| o == name);
    workloads.retain(|w| wants(w.name));
    // S6 first: its peak RSS is read before the other workloads allocate.
    let stream = if wants("S6") {
        eprintln!("prism-bench: S6 (generated stream) ...");
        Some(bench_stream(&gpu, args.quick)?)
    } else {
        None
    };
    eprintln!(
        "prism-bench: {device}, {} repetitions after a warm-up{}",
        args.reps,
        if args.quick {
            ", --quick (sizes / 16)"
        } else {
            ""
        }
    );
    let mut results = Vec::new();
    let count = workloads.len();
    for (k, w) in workloads.iter_mut().enumerate() {
        eprintln!("prism-bench: [{}/{}] {} ...", k + 1, count, w.name);
        results.push(bench_workload(&gpu, &ctx, w, args.reps, args.prism_timing)?);
    }
    let pageable = if wants("S4") {
        eprintln!("prism-bench: S4 (pageable Vecs) ...");
        let sizes: &[usize] = if args.quick { &[256] } else { &[1024, 4096] };
        sizes
            .iter()
            .map(|&mib| {
                let sweep: &[(usize, usize)] = if mib > 1024 || args.quick {
                    &[(16, 4), (64, 3)]
                } else {
                    &[(4, 3), (8, 3), (16, 3), (16, 4), (32, 3), (64, 3), (64, 4)]
                };
                bench_pageable(&gpu, mib, args.reps, sweep)
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    let items_sweep = if wants("S3") {
        eprintln!("prism-bench: S3 configuration sweep ...");
        bench_items_sweep(&gpu, args.reps, args.quick)?
    } else {
        Vec::new()
    };
    let auto = if wants("auto") {
        eprintln!("prism-bench: adaptive configuration against a sweep ...");
        bench_auto(&gpu, args.reps, args.quick)?
    } else {
        Vec::new()
    };
    let short = if wants("S9") {
        eprintln!("prism-bench: S9 (a short run, chunk ramp off and on) ...");
        Some(bench_short(&gpu, args.reps, &args.out)?)
    } else {
        None
    };
    let multi = if wants("S7") {
        eprintln!("prism-bench: S7 (S1 over every GPU) ...");
        Some(multi::bench_multi(args.reps, args.quick)?)
    } else {
        None
    };
    let steps = if wants("S8") {
        eprintln!("prism-bench: S8 (small synchronous steps) ...");
        bench_steps(&gpu, args.quick)?
    } else {
        Vec::new()
    };
    let iterations = if wants("S10") {
        eprintln!("prism-bench: S10 (small iterations over resident data) ...");
        Some(s10::bench_iterations(&gpu, args.quick)?)
    } else {
        None
    };
    let fanout = if wants("S11") {
        eprintln!("prism-bench: S11 (one upload fanned out to 2 and 4 branches) ...");
        Some(s11::bench_fanout(
            &gpu,
            args.reps,
            args.quick,
            args.prism_timing,
        )?)
    } else {
        None
    };
    provenance.read_device(&ctx);
    let driver_cuda_version = driver_version();
    print_table(&device, &results);
    println!("CUDA {driver_cuda_version}, {}", provenance.describe());
    print_pageable(&pageable);
    print_short(short.as_ref());
    print_items_sweep(&items_sweep);
    print_auto(&auto);
    print_steps(&steps);
    s10::print_iterations(iterations.as_ref());
    s11::print_fanout(fanout.as_ref());
    print_stream(stream.as_ref());
    multi::print_multi(multi.as_ref());
    std::fs::create_dir_all(&args.out)?;
    let report = Report {
        device,
        driver_cuda_version,
        provenance,
        quick: args.quick,
        reps: args.reps,
        workloads: results,
        steps,
        stream,
        pageable,
        short,
        items_sweep,
        auto,
        multi,
        iterations,
        fanout,
    };
    std::fs::write(
        format!("{}/results.json", args.out),
        serde_json::to_string_pretty(&report)?,
    )?;
    write_chart(&report, &args.out)?;
    eprintln!(
        "prism-bench: wrote {0}/results.json and {0}/chart.svg",
        args.out
    );
    Ok(())
}

fn write_chart(report: &Report, out: &str) -> Result<(), BoxError> {
    let names: Vec<String> = report
        .workloads
        .iter()
        .map(|w| w.workload.clone())
        .collect();
    let impls: Vec<String> = IMPLS.iter().map(|s| s.to_string()).collect();
    let eff: Vec<Vec<Option<f64>>> = report
        .workloads
        .iter()
        .map(|w| {
            IMPLS
                .iter()
                .map(|i| {
                    w.cases
                        .iter()
                        .find(|c| c.implementation == *i)
                        .map(|c| c.bound_over_measured)
                })
                .collect()
        })
        .collect();
    chart::write_svg(&format!("{out}/chart.svg"), &names, &impls, &eff)?;
    Ok(())
}

const BATCHED: &str = "CUDA C++ batched copies, 3 streams";

/// S3: prism with its zero-copy gather/scatter kernels instead of batched
/// copies (`set_pinned_items_copy`), measured in the same process.
const PRISM_KERNELS: &str = "prism, zero-copy kernels";

const IMPLS: [&str; 4] = [
    "sequential",
    "CUDA C++ 3 streams",
    "cudarc 3 streams",
    "prism",
];

fn driver_version() -> String {
    let mut v = 0;
    // SAFETY: cuDriverGetVersion writes one int; the driver is loaded (a GPU was opened).
    let ok = unsafe { prism_stream::cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if ok == prism_stream::cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        format!("{}.{}", v / 1000, (v % 1000) / 10)
    } else {
        "?".into()
    }
}

/// Host pointers and lengths of the pieces a baseline copies.
type Pieces = (Vec<*const f32>, Vec<*mut f32>, Vec<u64>);

/// Host input/output of a workload: one contiguous pair, or one pair per item.
struct Data {
    inputs: Vec<PinnedBuffer<f32>>,
    outputs: Vec<PinnedBuffer<f32>>,
}

impl Data {
    /// (in, out, len) of each piece the baselines copy.
    fn pieces(&mut self, piece: usize) -> Result<Pieces, BoxError> {
        let (mut ins, mut outs, mut lens) = (Vec::new(), Vec::new(), Vec::new());
        for (i, o) in self.inputs.iter().zip(self.outputs.iter_mut()) {
            let (i, o) = (i.as_slice()?, o.as_mut_slice()?);
            for (ci, co) in i.chunks(piece).zip(o.chunks_mut(piece)) {
                ins.push(ci.as_ptr());
                outs.push(co.as_mut_ptr());
                lens.push(ci.len() as u64);
            }
        }
        Ok((ins, outs, lens))
    }
}

fn make_data(gpu: &Gpu, w: &Workload) -> Result<Data, BoxError> {
    let sizes: Vec<usize> = if w.items {
        vec![w.piece; w.total / w.piece]
    } else {
        vec![w.total]
    };
    let mut inputs = Vec::new();
    let mut outputs = Vec::new();
    for (k, &n) in sizes.iter().enumerate() {
        let mut input = PinnedBuffer::<f32>::new(gpu, n, HostAllocFlags::DEFAULT)?;
        fill_random(input.as_mut_slice()?, 0xB3 + k as u64 * 7919);
        inputs.push(input);
        outputs.push(PinnedBuffer::<f32>::new(gpu, n, HostAllocFlags::DEFAULT)?);
    }
    Ok(Data { inputs, outputs })
}

/// A bar on stderr over the runs of one implementation. It draws nothing
/// when stderr is not a terminal, so logs get no progress lines, and it
/// clears itself when finished or dropped (an error returned early), so
/// the lines printed after it start on a line of their own.
fn runs_bar(name: &str, runs: usize) -> Result<ProgressBar, BoxError> {
    let style = ProgressStyle::with_template(
        "prism-bench:   {prefix}: run {pos}/{len} (the first a warm-up) {wide_bar} {elapsed}",
    )?;
    Ok(ProgressBar::new(runs as u64)
        .with_style(style)
        .with_prefix(name.to_owned())
        .with_finish(ProgressFinish::AndClear))
}

/// Random f32 in [-1, 1) on every core, as `prism_testing::random_f32`
/// makes them: block b of 1 Mi elements comes from the seed's generator
/// after b jumps (2^128 steps each), so the data does not depend on the
/// number of threads.
fn fill_random(dst: &mut [f32], seed: u64) {
    const BLOCK: usize = 1 << 20;
    std::thread::scope(|s| {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = dst.len().div_ceil(threads).div_ceil(BLOCK).max(1) * BLOCK;
        for (t, part) in dst.chunks_mut(per).enumerate() {
            s.spawn(move || {
                let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
                for _ in 0..t * (per / BLOCK) {
                    rng.jump();
                }
                for block in part.chunks_mut(BLOCK) {
                    let mut r = rng.clone();
                    for v in block {
                        *v = r.random::<f32>() * 2.0 - 1.0;
                    }
                    rng.jump();
                }
            });
        }
    });
}

/// Sampled check: positions poisoned before a run must hold the CPU result after.
struct Sample {
    /// (buffer, index) pairs.
    at: Vec<(usize, usize)>,
}

impl Sample {
    fn new(data: &Data, piece: usize) -> Self {
        let mut at = Vec::new();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(0x5A17);
        for (b, buf) in data.inputs.iter().enumerate() {
            let n = buf.len();
            // Both ends of every piece, plus random positions.
            for start in (0..n).step_by(piece) {
                at.push((b, start));
                at.push((b, (start + piece).min(n) - 1));
            }
            for _ in 0..(4096 / data.inputs.len()).max(2) {
                at.push((b, rng.random_range(0..n)));
            }
        }
        Self { at }
    }

    fn poison(&self, data: &mut Data) -> Result<(), BoxError> {
        for &(b, i) in &self.at {
            data.outputs[b].as_mut_slice()?[i] = f32::NAN;
        }
        Ok(())
    }

    fn check(&self, data: &Data, iters: u32, what: &str) -> Result<usize, BoxError> {
        for &(b, i) in &self.at {
            let x = data.inputs[b].as_slice()?[i];
            let y = data.outputs[b].as_slice()?[i];
            if fma_chain_cpu(x, A, B, iters).to_bits() != y.to_bits() {
                return Err(format!(
                    "{what}: output {b}[{i}] = {y}, CPU reference {}",
                    fma_chain_cpu(x, A, B, iters)
                )
                .into());
            }
        }
        Ok(self.at.len())
    }
}

fn cxx(
    data: &mut Data,
    piece: usize,
    iters: u32,
    mode: i32,
    streams: i32,
) -> Result<f64, BoxError> {
    let (ins, outs, lens) = data.pieces(piece)?;
    // SAFETY: ins/outs point into pinned buffers owned by `data`, borrowed
    // mutably here for the whole (synchronous) call.
    unsafe { cxx_pieces(&ins, &outs, &lens, piece, iters, mode, streams) }
}

/// The CUDA C++ baseline over one input and output slice of pinned memory,
/// cut into pieces (on the GPU whose context is current on this thread).
fn cxx_slices(
    input: &[f32],
    output: &mut [f32],
    piece: usize,
    iters: u32,
    mode: i32,
    streams: i32,
) -> Result<f64, BoxError> {
    let (mut ins, mut outs, mut lens) = (Vec::new(), Vec::new(), Vec::new());
    for (ci, co) in input.chunks(piece).zip(output.chunks_mut(piece)) {
        ins.push(ci.as_ptr());
        outs.push(co.as_mut_ptr());
        lens.push(ci.len() as u64);
    }
    // SAFETY: the pointers come from `input` and `output`, borrowed for the
    // whole (synchronous) call.
    unsafe { cxx_pieces(&ins, &outs, &lens, piece, iters, mode, streams) }
}

/// # Safety
/// `ins[i]` and `outs[i]` point to `lens[i]` floats of page-locked memory,
/// readable and writable (outputs) for the whole call, not used by anything
/// else meanwhile.
unsafe fn cxx_pieces(
    ins: &[*const f32],
    outs: &[*mut f32],
    lens: &[u64],
    piece: usize,
    iters: u32,
    mode: i32,
    streams: i32,
) -> Result<f64, BoxError> {
    let mut ms = 0f32;
    // SAFETY: the caller's contract; the call is synchronous (it waits for
    // its own work before returning).
    let code = unsafe {
        baselines::prism_bench_pieces(
            ins.as_ptr(),
            outs.as_ptr(),
            lens.as_ptr(),
            lens.len() as u64,
            piece as u64,
            A,
            B,
            iters as i32,
            mode,
            streams,
            &mut ms,
        )
    };
    if code != 0 {
        let msg = baselines::error_message(code);
        return Err(format!("prism_bench_pieces(mode {mode}): {msg}").into());
    }
    Ok(f64::from(ms))
}

/// The same loop on cudarc alone: 3 streams, one buffer set per stream,
/// piece i on stream i % 3 (event tracking off on this context handle).
fn cudarc_loop(
    ctx: &Arc<CudaContext>,
    data: &mut Data,
    piece: usize,
    iters: u32,
) -> Result<f64, BoxError> {
    let streams = [ctx.new_stream()?, ctx.new_stream()?, ctx.new_stream()?];
    let mut din: Vec<CudaSlice<f32>> = Vec::new();
    let mut dout: Vec<CudaSlice<f32>> = Vec::new();
    for s in &streams {
        din.push(s.alloc_zeros::<f32>(piece)?);
        dout.push(s.alloc_zeros::<f32>(piece)?);
    }
    ctx.synchronize()?;
    let (ins, outs, lens) = data.pieces(piece)?;
    let t = Instant::now();
    for i in 0..lens.len() {
        let (s, n) = (i % 3, lens[i] as usize);
        // SAFETY: ins[i]/outs[i] point to n floats of pinned memory owned by `data`,
        // which is not otherwise accessed until the synchronize below.
        let (src, dst) = unsafe {
            (
                std::slice::from_raw_parts(ins[i], n),
                std::slice::from_raw_parts_mut(outs[i], n),
            )
        };
        streams[s].memcpy_htod(src, &mut din[s].slice_mut(..n))?;
        let (x, _gx) = din[s].device_ptr(&streams[s]);
        let (y, _gy) = dout[s].device_ptr_mut(&streams[s]);
        // SAFETY: x and y are device buffers of >= n floats on this context.
        let code = unsafe {
            prism_cuda_sys::prism_fma_chain_f32(
                x as *const f32,
                y as *mut f32,
                n as u64,
                A,
                B,
                iters as i32,
                streams[s].cu_stream().cast(),
            )
        };
        if code != 0 {
            return Err(format!("fma launch failed: code {code}").into());
        }
        drop((_gx, _gy));
        streams[s].memcpy_dtoh(&dout[s].slice(..n), dst)?;
    }
    for s in &streams {
        s.synchronize()?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn prism_run(
    w: &Workload,
    data: &mut Data,
    p: &mut PipelineStageManager<f32>,
) -> Result<f64, BoxError> {
    let t = Instant::now();
    let Data { inputs, outputs } = data;
    match w.mode {
        PrismMode::Items => {
            p.run_items_pinned(inputs.iter().zip(outputs.iter_mut()))?;
        }
        PrismMode::Pinned => p.run_pinned(&inputs[0], &mut outputs[0])?,
        PrismMode::Steps => {
            // The design's loop: one call per chunk, then flush.
            let (input, output) = (&inputs[0], &mut outputs[0]);
            let mut back = 0;
            for start in (0..input.len()).step_by(w.piece) {
                let end = (start + w.piece).min(input.len());
                back += p
                    .execute_iteration_pinned(input, start..end, output, start)?
                    .len();
            }
            back += p.flush()?.len();
            if back != input.len().div_ceil(w.piece) {
                return Err(format!("execute_iteration returned {back} chunks").into());
            }
            output.wait_idle()?;
        }
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// S8: µs per synchronous step (upload, one fma kernel, download, wait) at
/// 4, 16 and 64 KiB: hand-written CUDA C++ on one stream (plain and as a
/// CUDA graph) against prism's `execute_iteration_blocking` (pageable slice
/// in, `Vec` out).
fn bench_steps(gpu: &Gpu, quick: bool) -> Result<Vec<StepResult>, BoxError> {
    let steps = if quick { 300 } else { 2000 };
    let mut results = Vec::new();
    for kib in [4usize, 16, 64] {
        let n = kib * 1024 / 4;
        let mut data = Data {
            inputs: Vec::new(),
            outputs: Vec::new(),
        };
        let mut input = PinnedBuffer::<f32>::new(gpu, n * steps, HostAllocFlags::DEFAULT)?;
        fill_random(input.as_mut_slice()?, 0x58 + kib as u64);
        data.inputs.push(input);
        data.outputs.push(PinnedBuffer::<f32>::new(
            gpu,
            n * steps,
            HostAllocFlags::DEFAULT,
        )?);
        let mut p = fma_pipeline(gpu, 64 * 1024, 3, false, 1)?;
        let host_in: Vec<f32> = data.inputs[0].as_slice()?.to_vec();
        let prism = |p: &mut PipelineStageManager<f32>| -> Result<f64, BoxError> {
            let t = Instant::now();
            for k in 0..steps {
                let out = p.execute_iteration_blocking(&host_in[k * n..(k + 1) * n])?;
                if k % 97 == 0 {
                    let x = host_in[k * n + n / 2];
                    if fma_chain_cpu(x, A, B, 1).to_bits() != out[n / 2].to_bits() {
                        return Err(format!("S8 step {k} differs from the CPU").into());
                    }
                }
            }
            Ok(t.elapsed().as_secs_f64() * 1e6 / steps as f64)
        };
        let pinned = |p: &mut PipelineStageManager<f32>,
                      data: &mut Data|
         -> Result<f64, BoxError> {
            let Data { inputs, outputs } = data;
            let t = Instant::now();
            for k in 0..steps {
                p.execute_iteration_blocking_pinned(
                    &inputs[0],
                    k * n..(k + 1) * n,
                    &mut outputs[0],
                    k * n,
                )?;
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / steps as f64;
            let (i, o) = (inputs[0].as_slice()?, outputs[0].as_slice()?);
            for k in (0..n * steps).step_by(4099) {
                if fma_chain_cpu(i[k], A, B, 1).to_bits() != o[k].to_bits() {
                    return Err(format!("S8 prism pinned output {k} differs from the CPU").into());
                }
            }
            Ok(us)
        };
        let step_mode = baselines::STEP;
        let graph_mode = baselines::STEP_GRAPH;
        // Warm-ups, then three interleaved rounds; the median of each.
        prism(&mut p)?;
        pinned(&mut p, &mut data)?;
        cxx(&mut data, n, 1, step_mode, 1)?;
        let (mut c, mut g, mut q, mut r) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            c.push(cxx(&mut data, n, 1, step_mode, 1)? * 1e3 / steps as f64);
            g.push(cxx(&mut data, n, 1, graph_mode, 1)? * 1e3 / steps as f64);
            q.push(prism(&mut p)?);
            r.push(pinned(&mut p, &mut data)?);
        }
        let (cxx_us, cxx_graph_us, prism_us, prism_pinned_us) = (
            median(&mut c),
            median(&mut g),
            median(&mut q),
            median(&mut r),
        );
        // The plain C++ steps write every output (the graph only piece 0's).
        cxx(&mut data, n, 1, step_mode, 1)?;
        // The plain C++ steps wrote every output: check a sample.
        let (i, o) = (data.inputs[0].as_slice()?, data.outputs[0].as_slice()?);
        for k in (0..n * steps).step_by(4099) {
            if fma_chain_cpu(i[k], A, B, 1).to_bits() != o[k].to_bits() {
                return Err(format!("S8 C++ output {k} differs from the CPU").into());
            }
        }
        results.push(StepResult {
            kib,
            steps,
            cxx_us,
            cxx_graph_us,
            prism_us,
            prism_over_cxx: prism_us / cxx_us,
            prism_pinned_us,
            prism_pinned_over_cxx: prism_pinned_us / cxx_us,
        });
    }
    Ok(results)
}

fn print_steps(steps: &[StepResult]) {
    if steps.is_empty() {
        return;
    }
    println!();
    println!("S8: one synchronous step (upload, fma kernel, download, wait), µs per step");
    println!("| size | CUDA C++ (1 stream, pinned) | CUDA C++ graph | prism blocking, pinned | prism pinned / C++ | prism blocking, pageable slice to Vec | prism pageable / C++ |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for s in steps {
        println!(
            "| {} KiB | {:.1} | {:.1} | {:.1} | {:.2}x | {:.1} | {:.2}x |",
            s.kib,
            s.cxx_us,
            s.cxx_graph_us,
            s.prism_pinned_us,
            s.prism_pinned_over_cxx,
            s.prism_us,
            s.prism_over_cxx
        );
    }
}

/// S4 one-shot: `run(&Vec, &mut Vec)` over `mib` MiB, against the staging
/// bound measured in this process: the larger of the link (both directions
/// at once) and the same bytes copied host to host in and out on the
/// pool's threads (as prism's staging does, through three 64 MiB buffers).
fn bench_pageable(
    gpu: &Gpu,
    mib: usize,
    reps: usize,
    sweep: &[(usize, usize)],
) -> Result<PageableResult, BoxError> {
    let n = mib << 18; // f32
    let chunk = 16usize << 20; // 64 MiB of f32
    let mut input = vec![0f32; n];
    fill_random(&mut input, 0x54 + mib as u64);
    let mut output = vec![f32::NAN; n];
    let mut rows = Vec::new();
    let mut threads = 0;
    // (0, 0): PipelineConfig::auto.
    for &(chunk_mib, slots) in sweep.iter().chain(&[(0, 0)]) {
        let mut p = if chunk_mib == 0 {
            fma_manager(
                gpu,
                PipelineConfig {
                    timing: false,
                    ..PipelineConfig::auto()
                },
                1,
            )?
        } else {
            fma_pipeline(gpu, chunk_mib << 20, slots, false, 1)?
        };
        threads = p.config().host_threads;
        let mut times = Vec::new();
        for rep in 0..=reps {
            if rep == 1 {
                p.reset_stats();
            }
            output.fill(f32::NAN);
            let t = Instant::now();
            p.run(&input, &mut output)?;
            if rep > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            check_fma(&input, &output, "S4 one-shot")?;
        }
        let s = p.get_stats();
        rows.push(SweepRow {
            chunk_mib,
            slots,
            ms: median(&mut times),
            host_copy_ms: s.host_copy_ms / reps as f64,
            host_wait_ms: s.host_wait_ms / reps as f64,
        });
    }
    let prism_ms = rows
        .iter()
        .find(|r| r.chunk_mib == 0)
        .map_or(f64::NAN, |r| r.ms);
    // The host alone: the same copies in and out through a ring of three
    // 64 MiB buffers, on as many threads.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let mut ring: Vec<Vec<f32>> = (0..3).map(|_| vec![0f32; chunk]).collect();
    let mut host = Vec::new();
    for rep in 0..=reps {
        let t = Instant::now();
        for (k, (src, dst)) in input
            .chunks(chunk)
            .zip(output.chunks_mut(chunk))
            .enumerate()
        {
            let r = &mut ring[k % 3];
            pool.install(|| {
                r[..src.len()]
                    .par_chunks_mut(1 << 18)
                    .zip(src.par_chunks(1 << 18))
                    .for_each(|(d, s)| d.copy_from_slice(s));
                dst.par_chunks_mut(1 << 18)
                    .zip(r[..src.len()].par_chunks(1 << 18))
                    .for_each(|(d, s)| d.copy_from_slice(s));
            });
        }
        if rep > 0 {
            host.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    std::hint::black_box(&output);
    let t_staging = median(&mut host);
    let mut host = Vec::new();
    for rep in 0..=reps {
        let t = Instant::now();
        for (k, (src, dst)) in input
            .chunks(chunk)
            .zip(output.chunks_mut(chunk))
            .enumerate()
        {
            let r = &mut ring[k % 3];
            pool.install(|| {
                r[..src.len()]
                    .par_chunks_mut(1 << 18)
                    .zip(src.par_chunks(1 << 18))
                    .for_each(|(d, s)| copy_streaming(d, s));
                dst.par_chunks_mut(1 << 18)
                    .zip(r[..src.len()].par_chunks(1 << 18))
                    .for_each(|(d, s)| copy_streaming(d, s));
            });
        }
        if rep > 0 {
            host.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    std::hint::black_box(&output);
    let t_staging_stream = median(&mut host);
    // The link: both directions of the same bytes at once, pinned.
    let pinned = (4 * chunk).min(n);
    let mut data = Data {
        inputs: vec![PinnedBuffer::<f32>::new(
            gpu,
            pinned,
            HostAllocFlags::DEFAULT,
        )?],
        outputs: vec![PinnedBuffer::<f32>::new(
            gpu,
            pinned,
            HostAllocFlags::DEFAULT,
        )?],
    };
    fill_random(data.inputs[0].as_mut_slice()?, 0x55);
    let t_bidir = bidir_ms(&mut data, chunk.min(pinned), 3)? * n as f64 / pinned as f64;
    drop(data);
    let bound = t_bidir.max(t_staging);
    // Repeated runs over the same vectors: register them in place once.
    let repeated = bench_registered(gpu, input, output, reps, t_bidir)?;
    Ok(PageableResult {
        mib,
        t_bidir_ms: t_bidir,
        t_staging_ms: t_staging,
        bound_ms: bound,
        prism_ms,
        bound_over_measured: bound / prism_ms,
        threads,
        t_staging_stream_ms: t_staging_stream,
        sweep: rows,
        repeated: Some(repeated),
    })
}

/// Registers `input` and `output` in place, runs `run_pinned` over them
/// `reps + 1` times, hands them back unregistered; checks the output.
fn bench_registered(
    gpu: &Gpu,
    input: Vec<f32>,
    mut output: Vec<f32>,
    reps: usize,
    t_bidir: f64,
) -> Result<RepeatedResult, BoxError> {
    let mut p = fma_pipeline(gpu, 64 << 20, 3, false, 1)?;
    output.fill(f32::NAN);
    let t = Instant::now();
    let reg_in = PinnedBuffer::register(gpu, input)?;
    let mut reg_out = PinnedBuffer::register(gpu, output)?;
    let register_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut runs = Vec::new();
    for _ in 0..=reps {
        let t = Instant::now();
        p.run_pinned(&reg_in, &mut reg_out)?;
        reg_out.wait_idle()?;
        runs.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let first_run_ms = runs.remove(0);
    let run_ms = median(&mut runs);
    let t = Instant::now();
    let input = reg_in.into_vec()?;
    let output = reg_out.into_vec()?;
    let unregister_ms = t.elapsed().as_secs_f64() * 1e3;
    check_fma(&input, &output, "S4 repeated")?;
    Ok(RepeatedResult {
        register_ms,
        first_run_ms,
        run_ms,
        unregister_ms,
        run_over_bidir: t_bidir / run_ms,
    })
}

/// Samples every 7919th output against the CPU.
fn check_fma(input: &[f32], output: &[f32], what: &str) -> Result<(), BoxError> {
    for k in (0..input.len()).step_by(7919) {
        if fma_chain_cpu(input[k], A, B, 1).to_bits() != output[k].to_bits() {
            return Err(format!("{what}: output {k} differs from the CPU").into());
        }
    }
    Ok(())
}

/// A short run: 512 MiB pinned in 16 MiB chunks through two stages, with
/// the chunk ramp off and on, against the link in the same process.
fn bench_short(gpu: &Gpu, reps: usize, out: &str) -> Result<ShortResult, BoxError> {
    let (mib, chunk_mib) = (512usize, 16usize);
    let n = mib << 18;
    let mut input = PinnedBuffer::<f32>::new(gpu, n, HostAllocFlags::DEFAULT)?;
    fill_random(input.as_mut_slice()?, 0x59);
    let mut output = PinnedBuffer::<f32>::new(gpu, n, HostAllocFlags::DEFAULT)?;
    let (mut runs, mut untimed) = (Vec::new(), Vec::new());
    for (timing, ramp) in [(true, false), (true, true), (false, false), (false, true)] {
        let config = PipelineConfig {
            chunk_bytes: chunk_mib << 20,
            ramp,
            timing,
            trace: timing,
            ..PipelineConfig::default()
        };
        let mut p = PipelineStageManager::<f32>::with_gpu(gpu, config)?;
        p.add_stage(Fma {
            a: A,
            b: B,
            iters: 1,
        });
        p.add_stage(Clamp {
            lo: -1e30,
            hi: 1e30,
        });
        let mut times = Vec::new();
        let mut eff = Vec::new();
        let mut chunks = 0;
        for rep in 0..=reps {
            p.reset_stats();
            let t = Instant::now();
            p.run_pinned(&input, &mut output)?;
            output.wait_idle()?;
            if rep > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
                eff.push(p.get_stats().overlap_efficiency());
                chunks = p.get_stats().chunks;
            }
        }
        let (i, o) = (input.as_slice()?, output.as_slice()?);
        for k in (0..n).step_by(7919) {
            let want = fma_chain_cpu(i[k], A, B, 1).clamp(-1e30, 1e30);
            if want.to_bits() != o[k].to_bits() {
                return Err(format!("short run output {k} differs from the CPU").into());
            }
        }
        if !timing {
            untimed.push((ramp, median(&mut times)));
            continue;
        }
        std::fs::create_dir_all(out)?;
        p.timeline().write_chrome_trace(format!(
            "{out}/s9-ramp-{}.trace.json",
            if ramp { "on" } else { "off" }
        ))?;
        runs.push((ramp, median(&mut times), chunks, median(&mut eff)));
    }
    let chunk = 16usize << 20;
    let mut data = Data {
        inputs: vec![input],
        outputs: vec![output],
    };
    let t_bidir_ms = bidir_ms(&mut data, chunk, 3)?;
    Ok(ShortResult {
        mib,
        chunk_mib,
        t_bidir_ms,
        runs,
        untimed,
    })
}

/// S3's prism run (4096 pinned items of 64 KiB) per configuration.
fn bench_items_sweep(gpu: &Gpu, reps: usize, quick: bool) -> Result<Vec<SweepRow>, BoxError> {
    let (items, len) = (if quick { 256 } else { 4096 }, 16usize << 10);
    let inputs = (0..items)
        .map(|k| {
            let mut b = PinnedBuffer::<f32>::new(gpu, len, HostAllocFlags::DEFAULT)?;
            fill_random(b.as_mut_slice()?, 0x5A + k as u64);
            Ok(b)
        })
        .collect::<Result<Vec<_>, BoxError>>()?;
    let mut outputs = (0..items)
        .map(|_| PinnedBuffer::<f32>::new(gpu, len, HostAllocFlags::DEFAULT))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rows = Vec::new();
    for (chunk_mib, slots) in [(4, 3), (8, 3), (16, 3), (16, 4), (32, 3), (64, 3)] {
        let mut p = fma_pipeline(gpu, chunk_mib << 20, slots, false, 1)?;
        let mut times = Vec::new();
        for rep in 0..=reps {
            let t = Instant::now();
            p.run_items_pinned(inputs.iter().zip(outputs.iter_mut()))?;
            for o in &outputs {
                o.wait_idle()?;
            }
            if rep > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        for (i, o) in inputs.iter().zip(&outputs).step_by(97) {
            check_fma(i.as_slice()?, o.as_slice()?, "S3 sweep")?;
        }
        rows.push(SweepRow {
            chunk_mib,
            slots,
            ms: median(&mut times),
            host_copy_ms: 0.0,
            host_wait_ms: 0.0,
        });
    }
    Ok(rows)
}

/// The adaptive configuration against a sweep of fixed ones, per workload.
#[derive(Debug, Serialize, Deserialize)]
struct AutoResult {
    workload: String,
    /// (chunk MiB, slots, median ms) of each fixed configuration.
    fixed: Vec<(usize, usize, f64)>,
    auto_ms: f64,
    /// What the adaptive configuration chose.
    auto_chunk_mib: f64,
    auto_slots: usize,
    /// best fixed ms / auto ms (1.0: as fast as the best).
    auto_vs_best: f64,
}

/// S1 (4 GiB pinned), S2 (1 GiB pinned), a compute-bound run (1 GiB pinned,
/// 600 fma steps) and S4 (1 GiB pageable), each with `PipelineConfig::auto()`
/// and with every fixed configuration of a sweep.
fn bench_auto(gpu: &Gpu, reps: usize, quick: bool) -> Result<Vec<AutoResult>, BoxError> {
    let scale = if quick { 8 } else { 1 };
    let mut out = Vec::new();
    for (name, mib, iters, pageable) in [
        ("S1", 4096 / scale, 1, false),
        ("S2", 1024 / scale, 1, false),
        ("compute-bound (600 fma steps)", 1024 / scale, 600, false),
        ("S4", 1024 / scale, 1, true),
    ] {
        let n = mib << 18;
        let mut pin_in = PinnedBuffer::<f32>::new(gpu, n, HostAllocFlags::DEFAULT)?;
        fill_random(pin_in.as_mut_slice()?, 0x5B);
        let mut pin_out = PinnedBuffer::<f32>::new(gpu, n, HostAllocFlags::DEFAULT)?;
        let vec_in = pin_in.as_slice()?.to_vec();
        let mut vec_out = vec![0f32; n];
        let mut time =
            |config: PipelineConfig| -> Result<(f64, PipelineStageManager<f32>), BoxError> {
                let mut p = fma_manager(gpu, config, iters)?;
                let mut times = Vec::new();
                for rep in 0..=reps {
                    let t = Instant::now();
                    if pageable {
                        p.run(&vec_in, &mut vec_out)?;
                    } else {
                        p.run_pinned(&pin_in, &mut pin_out)?;
                        pin_out.wait_idle()?;
                    }
                    if rep > 0 {
                        times.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
                let got = if pageable {
                    &vec_out[..]
                } else {
                    pin_out.as_slice()?
                };
                for k in (0..n).step_by(7919) {
                    if fma_chain_cpu(vec_in[k], A, B, iters).to_bits() != got[k].to_bits() {
                        return Err(format!("auto sweep {name}: output {k} differs").into());
                    }
                }
                Ok((median(&mut times), p))
            };
        let mut fixed = Vec::new();
        for (chunk_mib, slots) in [(4, 3), (16, 3), (16, 4), (64, 3), (64, 4)] {
            let config = PipelineConfig {
                chunk_bytes: chunk_mib << 20,
                slots,
                timing: false,
                ..PipelineConfig::default()
            };
            fixed.push((chunk_mib, slots, time(config)?.0));
        }
        let (auto_ms, p) = time(PipelineConfig {
            timing: false,
            ..PipelineConfig::auto()
        })?;
        let best = fixed.iter().map(|f| f.2).fold(f64::INFINITY, f64::min);
        out.push(AutoResult {
            workload: format!(
                "{name}, {mib} MiB{}",
                if pageable { " pageable" } else { " pinned" }
            ),
            fixed,
            auto_ms,
            auto_chunk_mib: p.get_stats().chunk_bytes as f64 / (1 << 20) as f64,
            auto_slots: p.get_stats().slots,
            auto_vs_best: best / auto_ms,
        });
    }
    Ok(out)
}

fn print_auto(rows: &[AutoResult]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!("Adaptive configuration (PipelineConfig::auto) against fixed ones, median ms");
    println!("| workload | 4 MiB x3 | 16 MiB x3 | 16 MiB x4 | 64 MiB x3 | 64 MiB x4 | auto (chose) | best fixed / auto |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        let fixed: Vec<String> = r.fixed.iter().map(|f| format!("{:.2}", f.2)).collect();
        println!(
            "| {} | {} | {:.2} ({:.0} MiB x{}) | {:.3} |",
            r.workload,
            fixed.join(" | "),
            r.auto_ms,
            r.auto_chunk_mib,
            r.auto_slots,
            r.auto_vs_best
        );
    }
}

fn print_items_sweep(rows: &[SweepRow]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!("S3 sweep: prism run_items_pinned over 64 KiB pinned items, per configuration");
    println!("| chunk MiB | slots | median ms |");
    println!("| --- | --- | --- |");
    for r in rows {
        println!("| {} | {} | {:.2} |", r.chunk_mib, r.slots, r.ms);
    }
}

fn print_short(s: Option<&ShortResult>) {
    let Some(s) = s else { return };
    println!();
    println!(
        "S9: short run, {} MiB pinned in {} MiB chunks, fma + clamp; t_bidir {:.2} ms",
        s.mib, s.chunk_mib, s.t_bidir_ms
    );
    println!("| chunk ramp | chunks | median ms | t_bidir / measured | stats overlap efficiency |");
    println!("| --- | --- | --- | --- | --- |");
    for (ramp, ms, chunks, eff) in &s.runs {
        println!(
            "| {} | {chunks} | {ms:.2} | {:.3} | {eff:.3} |",
            if *ramp { "on" } else { "off" },
            s.t_bidir_ms / ms
        );
    }
    for (ramp, ms) in &s.untimed {
        println!(
            "| {} (timing off) | | {ms:.2} | {:.3} | |",
            if *ramp { "on" } else { "off" },
            s.t_bidir_ms / ms
        );
    }
}

fn print_pageable(rows: &[PageableResult]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!(
        "S4: pageable Vecs in and out, one shot (run(&input, &mut output)), PipelineConfig::auto"
    );
    println!("| size | t_bidir ms | host staging alone ms (threads) | staging bound ms | prism ms | bound / measured | host alone, streaming copies ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        println!(
            "| {} MiB | {:.1} | {:.1} ({}) | {:.1} | {:.1} | {:.3} | {:.1} |",
            r.mib,
            r.t_bidir_ms,
            r.t_staging_ms,
            r.threads,
            r.bound_ms,
            r.prism_ms,
            r.bound_over_measured,
            r.t_staging_stream_ms
        );
    }
    println!();
    println!("S4 one-shot sweep (per run: median wall; host time in staging copies and blocked on the GPU)");
    println!(
        "| size | chunk MiB | slots | ms | staging bound / ms | host copies ms | host waits ms |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        for w in &r.sweep {
            let (chunk, slots) = if w.chunk_mib == 0 {
                ("auto".to_owned(), String::new())
            } else {
                (w.chunk_mib.to_string(), w.slots.to_string())
            };
            println!(
                "| {} MiB | {chunk} | {slots} | {:.1} | {:.3} | {:.1} | {:.1} |",
                r.mib,
                w.ms,
                r.bound_ms / w.ms,
                w.host_copy_ms,
                w.host_wait_ms
            );
        }
    }
    println!();
    println!("S4 repeated: the same Vecs registered in place once (PinnedBuffer::register), run_pinned again and again, into_vec");
    println!("| size | t_bidir ms | register ms | first run ms | later runs ms (median) | t_bidir / later | unregister ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        if let Some(x) = &r.repeated {
            println!(
                "| {} MiB | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} | {:.1} |",
                r.mib,
                r.t_bidir_ms,
                x.register_ms,
                x.first_run_ms,
                x.run_ms,
                x.run_over_bidir,
                x.unregister_ms
            );
        }
    }
}

/// prism on the GPU with one fma stage (`iters` steps), as every workload
/// runs it.
fn fma_pipeline(
    gpu: &Gpu,
    chunk_bytes: usize,
    slots: usize,
    timing: bool,
    iters: u32,
) -> Result<PipelineStageManager<f32>, BoxError> {
    let config = PipelineConfig {
        chunk_bytes,
        slots,
        timing,
        ..PipelineConfig::default()
    };
    fma_manager(gpu, config, iters)
}

/// A GPU manager with `config` and one fma stage of `iters` steps.
fn fma_manager(
    gpu: &Gpu,
    config: PipelineConfig,
    iters: u32,
) -> Result<PipelineStageManager<f32>, BoxError> {
    let mut p = PipelineStageManager::<f32>::with_gpu(gpu, config)?;
    p.add_stage(Fma { a: A, b: B, iters });
    Ok(p)
}

/// The generated input of S6: element `i` of the stream.
fn generated(i: u64) -> f32 {
    ((pattern(0x56, i) >> 8) as f32) * (2.0 / (1u32 << 24) as f32) - 1.0
}

/// Fills `dst` with elements `first..` of the generated stream (all threads).
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

/// Counts the elements of `out` (outputs of elements `first..`) that differ
/// from the CPU's fma (all threads).
fn check(out: &[f32], first: u64) -> u64 {
    out.par_chunks(1 << 16)
        .enumerate()
        .map(|(b, block)| {
            let base = first + (b as u64) * (1 << 16);
            block
                .iter()
                .enumerate()
                .filter(|(k, y)| {
                    fma_chain_cpu(generated(base + *k as u64), A, B, 1).to_bits() != y.to_bits()
                })
                .count() as u64
        })
        .sum()
}

/// Peak resident memory of this process (VmHWM), MiB.
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

/// S6: 64 GiB (4 GiB with --quick) generated on the fly straight into the
/// pinned upload slot, through the fma on the GPU, every output checked on
/// the fly straight from the pinned download slot; peak RSS read after it
/// (before the host-alone timing and the link measurement allocate).
fn bench_stream(gpu: &Gpu, quick: bool) -> Result<StreamResult, BoxError> {
    let chunk = 16usize << 20; // elements: 64 MiB
    let total_chunks: u64 = if quick { 64 } else { 1024 };
    let total = total_chunks * chunk as u64;
    let mut p = fma_pipeline(gpu, chunk * 4, 3, false, 1)?;
    let mut next = 0u64;
    let mut checked = 0u64;
    let mut wrong = 0u64;
    let t = Instant::now();
    p.run_stream(
        fill_with(|dst: &mut [f32]| {
            if next == total {
                return Ok::<_, prism_pipeline::BoxError>(0);
            }
            generate(dst, next);
            next += dst.len() as u64;
            Ok(dst.len())
        }),
        sink_fn(|k, out: &[f32]| {
            wrong += check(out, k * chunk as u64);
            checked += out.len() as u64;
            Ok::<_, prism_pipeline::BoxError>(())
        }),
    )?;
    let prism_ms = t.elapsed().as_secs_f64() * 1e3;
    let rss = peak_rss_mib();
    if wrong != 0 || checked != total {
        return Err(format!("S6: {wrong} of {checked} outputs differ from the CPU").into());
    }
    // The host alone: the same generation and checking per chunk, no GPU,
    // on as many buffers as the ring cycles through (so neither finds its
    // data in cache more than in the run). The checker reads correct
    // outputs made before the clock starts, so it passes.
    let mut scratch: Vec<Vec<f32>> = (0..3).map(|_| vec![0f32; chunk]).collect();
    let expected: Vec<Vec<f32>> = (0..3u64)
        .map(|k| {
            let mut e = vec![0f32; chunk];
            generate(&mut e, k * chunk as u64);
            e.par_iter_mut()
                .for_each(|v| *v = fma_chain_cpu(*v, A, B, 1));
            e
        })
        .collect();
    let t = Instant::now();
    let mut bad = 0;
    for c in 0..total_chunks {
        let k = (c % 3) as usize;
        generate(&mut scratch[k], c * chunk as u64);
        bad += check(&expected[k], k as u64 * chunk as u64);
    }
    let t_host = t.elapsed().as_secs_f64() * 1e3;
    std::hint::black_box(&scratch);
    if bad != 0 {
        return Err("S6 host-alone check failed".into());
    }
    drop(expected);
    // The link bound: both directions of 256 MiB at once, scaled.
    let piece = chunk;
    let n = 4 * piece;
    let mut data = Data {
        inputs: vec![PinnedBuffer::<f32>::new(gpu, n, HostAllocFlags::DEFAULT)?],
        outputs: vec![PinnedBuffer::<f32>::new(gpu, n, HostAllocFlags::DEFAULT)?],
    };
    fill_random(data.inputs[0].as_mut_slice()?, 0x66);
    let t_bidir = bidir_ms(&mut data, piece, 3)? * total as f64 / n as f64;
    let bound = t_bidir.max(t_host);
    Ok(StreamResult {
        gib: (total * 4) as f64 / (1u64 << 30) as f64,
        chunk_mib: (chunk * 4) >> 20,
        t_bidir_ms: t_bidir,
        t_host_ms: t_host,
        bound_ms: bound,
        prism_ms,
        bound_over_measured: bound / prism_ms,
        checked_elements: checked,
        peak_rss_mib: rss,
    })
}

fn print_stream(s: Option<&StreamResult>) {
    let Some(s) = s else { return };
    println!();
    println!("S6: {:.0} GiB generated in place, fma on the GPU, every output checked on the fly ({} MiB chunks)", s.gib, s.chunk_mib);
    println!("| t_bidir ms (scaled) | generator + checker alone ms | bound ms | prism ms | bound / measured | outputs checked | peak RSS MiB |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {:.1} | {:.1} | {:.1} | {:.1} | {:.3} | {} | {:.0} |",
        s.t_bidir_ms,
        s.t_host_ms,
        s.bound_ms,
        s.prism_ms,
        s.bound_over_measured,
        s.checked_elements,
        s.peak_rss_mib
    );
}

/// The link alone: every piece of `data` copied both ways at once (CUDA
/// C++, two streams, no kernel): one warm-up, then the median of `timed`
/// repetitions, in ms.
fn bidir_ms(data: &mut Data, piece: usize, timed: usize) -> Result<f64, BoxError> {
    warm_median(timed, || cxx(data, piece, 1, baselines::BIDIR, 2))
}

/// `measure` run once as a warm-up, then `timed` times: the median of the
/// timed runs (at least one).
fn warm_median(
    timed: usize,
    mut measure: impl FnMut() -> Result<f64, BoxError>,
) -> Result<f64, BoxError> {
    measure()?;
    let mut t: Vec<f64> = (0..timed.max(1))
        .map(|_| measure())
        .collect::<Result<_, _>>()?;
    Ok(median(&mut t))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench_workload(
    gpu: &Gpu,
    ctx: &Arc<CudaContext>,
    w: &mut Workload,
    reps: usize,
    prism_timing: bool,
) -> Result<WorkloadResult, BoxError> {
    let mut data = make_data(gpu, w)?;
    let sample = Sample::new(&data, w.piece);
    let bytes = (w.total * 4) as f64;
    // The bound, measured here: copies both ways at once, and kernels alone.
    let t_bidir = bidir_ms(&mut data, w.piece, reps)?;
    if w.iters == 0 {
        // S1c: an fma chain long enough that t_kernel is about 1.5 x t_bidir.
        let k1 = cxx(&mut data, w.piece, 1, baselines::KERNEL_ONLY, 1)?;
        let k2 = cxx(&mut data, w.piece, 1, baselines::KERNEL_ONLY, 1)?.min(k1);
        let k64 = cxx(&mut data, w.piece, 257, baselines::KERNEL_ONLY, 1)?;
        let slope = ((k64 - k2) / 256.0).max(1e-6);
        w.iters = (((1.5 * t_bidir - k2) / slope).round() as i64).clamp(2, 1 << 20) as u32;
        eprintln!("prism-bench:   S1c calibration: kernel {k2:.2} ms at 1 step, {k64:.2} ms at 257 steps -> {} steps", w.iters);
    }
    let t_kernel = warm_median(reps, || {
        cxx(&mut data, w.piece, w.iters, baselines::KERNEL_ONLY, 1)
    })?;
    let bound = t_bidir.max(t_kernel);
    eprintln!(
        "prism-bench:   t_bidir {t_bidir:.2} ms, t_kernel {t_kernel:.2} ms, bound {bound:.2} ms"
    );

    let mut pipeline = fma_pipeline(
        gpu,
        w.prism_chunk_bytes,
        w.prism_slots,
        prism_timing,
        w.iters,
    )?;
    let mut cases = Vec::new();
    let mut cxx_ms = None;
    // Items: also the C++ loop with one batched copy (cudaMemcpyBatchAsync)
    // per direction and group of items, and prism forced onto its zero-copy
    // gather/scatter kernels ("prism" itself takes batched copies where the
    // driver has them).
    let extra: &[&str] = if w.items {
        &[BATCHED, PRISM_KERNELS]
    } else {
        &[]
    };
    for name in IMPLS.iter().chain(extra).copied() {
        let mut times = Vec::new();
        let mut checked = 0;
        // The first run is a warm-up, not counted.
        let bar = runs_bar(name, reps + 1)?;
        for rep in 0..=reps {
            sample.poison(&mut data)?;
            let ms = match name {
                "sequential" => cxx(&mut data, w.piece, w.iters, baselines::SEQUENTIAL, 1)?,
                "CUDA C++ 3 streams" => {
                    cxx(&mut data, w.piece, w.iters, baselines::MULTISTREAM, 3)?
                }
                "cudarc 3 streams" => cudarc_loop(ctx, &mut data, w.piece, w.iters)?,
                BATCHED => cxx(&mut data, w.piece, w.iters, baselines::BATCHED, 3)?,
                PRISM_KERNELS => {
                    pipeline.set_pinned_items_copy(Some(PinnedItemsCopy::Kernels));
                    let ms = prism_run(w, &mut data, &mut pipeline);
                    pipeline.set_pinned_items_copy(None);
                    ms?
                }
                _ => {
                    // With --prism-timing, the stats of the last repetition only.
                    pipeline.reset_stats();
                    prism_run(w, &mut data, &mut pipeline)?
                }
            };
            checked += sample.check(&data, w.iters, name)?;
            if rep > 0 {
                times.push(ms);
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        if prism_timing && name == "prism" {
            eprintln!("{}", pipeline.get_stats());
        }
        if w.items && name.starts_with("prism") {
            // Which way the last repetition moved the items.
            eprintln!("prism-bench:   {name}: {:?}", pipeline.pinned_items_paths());
        }
        let (lo, hi) = (
            times.iter().copied().fold(f64::INFINITY, f64::min),
            times.iter().copied().fold(0.0, f64::max),
        );
        let med = median(&mut times);
        if name == "CUDA C++ 3 streams" {
            cxx_ms = Some(med);
        }
        cases.push(CaseResult {
            workload: w.name.into(),
            implementation: name.into(),
            median_ms: med,
            min_ms: lo,
            max_ms: hi,
            gbps: 2.0 * bytes / (med * 1e6),
            bound_over_measured: bound / med,
            speed_vs_cxx: None,
            checked_outputs: checked,
        });
    }
    for c in &mut cases {
        c.speed_vs_cxx = cxx_ms.map(|x| x / c.median_ms);
    }
    Ok(WorkloadResult {
        workload: w.name.into(),
        total_mib: (w.total * 4) >> 20,
        piece_kib: (w.piece * 4) >> 10,
        items: w.items,
        fma_iters: w.iters,
        t_bidir_ms: t_bidir,
        t_kernel_ms: t_kernel,
        bound_ms: bound,
        cases,
    })
}

fn print_table(device: &str, results: &[WorkloadResult]) {
    println!("prism-bench on {device}");
    if results.is_empty() {
        return;
    }
    println!("| workload | implementation | median ms | min..max ms | GB/s (both ways) | bound / measured | speed vs CUDA C++ |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for w in results {
        println!(
            "| {} ({} MiB, {} KiB {}, {} fma steps) | bound: t_bidir {:.2}, t_kernel {:.2} | {:.2} | | | 1.000 | |",
            w.workload,
            w.total_mib,
            w.piece_kib,
            if w.items { "items" } else { "chunks" },
            w.fma_iters,
            w.t_bidir_ms,
            w.t_kernel_ms,
            w.bound_ms
        );
        for c in &w.cases {
            println!(
                "| {} | {} | {:.2} | {:.2}..{:.2} | {:.1} | {:.3} | {} |",
                c.workload,
                c.implementation,
                c.median_ms,
                c.min_ms,
                c.max_ms,
                c.gbps,
                c.bound_over_measured,
                c.speed_vs_cxx.map_or("-".into(), |s| format!("{s:.2}x"))
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fill_random, provenance::Provenance, Report};
    use prism_testing::random_f32;
    use rand::{RngExt, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    #[test]
    fn fill_random_blocks_are_jumped_streams_of_the_seed() {
        const BLOCK: usize = 1 << 20;
        let mut v = vec![f32::NAN; 2 * BLOCK + 5];
        fill_random(&mut v, 0xB3);
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        // Block 0 is random_f32's data; block 2 starts after two jumps.
        assert_eq!(v[..BLOCK], random_f32(0xB3, BLOCK)[..]);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(0xB3);
        rng.jump();
        rng.jump();
        let tail: Vec<f32> = (0..5).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        assert_eq!(v[2 * BLOCK..], tail[..]);
    }

    #[test]
    fn results_without_provenance_still_load() {
        // The fields of the oldest results.json in docs/bench.
        let old = r#"{"device": "NVIDIA H200", "driver_cuda_version": "13.0",
            "quick": false, "reps": 5, "workloads": []}"#;
        let report: Report = serde_json::from_str(old).expect("old results load");
        assert_eq!(report.provenance, Provenance::default());
        assert!(report.fanout.is_none() && report.iterations.is_none());
    }

    #[test]
    fn provenance_is_written_beside_the_device() {
        let old = r#"{"device": "NVIDIA H200", "driver_cuda_version": "13.0",
            "quick": false, "reps": 5, "workloads": []}"#;
        let mut report: Report = serde_json::from_str(old).expect("old results load");
        report.provenance = Provenance {
            driver_version: Some("580.159.04".into()),
            pcie_link: Some("Gen5 x16".into()),
            date_utc: Some("2026-12-07T16:21:05Z".into()),
            git_commit: Some("1b05136".into()),
        };
        let json: serde_json::Value = serde_json::to_value(&report).expect("report serialises");
        assert_eq!(json["driver_version"], "580.159.04");
        assert_eq!(json["pcie_link"], "Gen5 x16");
        assert_eq!(json["date_utc"], "2026-12-07T16:21:05Z");
        assert_eq!(json["git_commit"], "1b05136");
        let back: Report = serde_json::from_value(json).expect("round trip");
        assert_eq!(back.provenance, report.provenance);
    }
}
