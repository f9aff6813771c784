//! prism-bench: the workloads of shared/BENCH-SPEC.md, prism against the
//! baselines it lists, all in one process on one GPU.
//!
//! ```text
//! cargo run --release -p prism-bench [-- --quick] [--reps 5] [--out bench-results]
//! ```
//! Prints one table (workload x implementation: median ms, spread, GB/s,
//! bound / measured, speed relative to the hand-written CUDA C++) and writes
//! `results.json` and `chart.svg` under `--out`. Needs a GPU and a build with
//! nvcc; without them it says so and exits non-zero.
//!
//! Timing: the CUDA C++ baselines time themselves with CUDA events around
//! their whole loop (device allocation outside); cudarc and prism are timed
//! on the host from the first call to the end of the last copy, so their
//! figures include host issue latency the C++ ones do not.

mod chart;

use std::ffi::CStr;
use std::sync::Arc;
use std::time::Instant;

use prism_pipeline::{Fma, PipelineConfig, PipelineStageManager};
use prism_stream::cudarc::driver::{CudaContext, CudaSlice, DevicePtr, DevicePtrMut};
use prism_stream::testing::random_f32;
use prism_stream::{fma_chain_cpu, Gpu, HostAllocFlags, PinnedBuffer};
use serde::{Deserialize, Serialize};

const A: f32 = 1.0001;
const B: f32 = 0.5;

#[derive(Debug, Clone)]
struct Workload {
    name: &'static str,
    total: usize,
    piece: usize,
    items: bool,
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

#[derive(Debug, Serialize, Deserialize)]
struct Report {
    device: String,
    driver_cuda_version: String,
    quick: bool,
    reps: usize,
    workloads: Vec<WorkloadResult>,
}

struct Args {
    quick: bool,
    reps: usize,
    out: String,
    only: Option<String>,
    replot: Option<String>,
    /// Diagnostic: run prism with its timing events on and print its stats.
    prism_timing: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        quick: false,
        reps: 5,
        out: "bench-results".into(),
        only: None,
        replot: None,
        prism_timing: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(f) = it.next() {
        match f.as_str() {
            "--quick" => a.quick = true,
            "--reps" => {
                a.reps = it
                    .next()
                    .ok_or("--reps needs a value")?
                    .parse()
                    .map_err(|e| format!("--reps: {e}"))?
            }
            "--out" => a.out = it.next().ok_or("--out needs a value")?,
            "--only" => a.only = Some(it.next().ok_or("--only needs a value")?),
            "--replot" => a.replot = Some(it.next().ok_or("--replot needs a results.json")?),
            "--prism-timing" => a.prism_timing = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.quick {
        a.reps = a.reps.min(3);
    }
    Ok(a)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("prism-bench: FAILED: {e}");
        std::process::exit(1);
    }
}

type BoxError = Box<dyn std::error::Error>;

fn run() -> Result<(), BoxError> {
    let args = parse_args()?;
    if let Some(path) = &args.replot {
        // Table and chart again from a saved results.json (no GPU needed).
        let report: Report = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        print_table(&report.device, &report.workloads);
        std::fs::create_dir_all(&args.out)?;
        write_chart(&report, &args.out)?;
        return Ok(());
    }
    if !prism_cuda_sys::KERNELS_BUILT {
        return Err("this build has no CUDA kernels (no nvcc at build time): run `cargo xtask install-nvcc` and rebuild".into());
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
            iters: 1,
            prism_chunk_bytes: 64 * mib,
            prism_slots: 3,
        },
        Workload {
            name: "S1c",
            total: (4096 / scale) * mib / 4,
            piece: 64 * mib / 4,
            items: false,
            iters: 0,
            prism_chunk_bytes: 64 * mib,
            prism_slots: 3,
        },
        Workload {
            name: "S2",
            total: (1024 / scale) * mib / 4,
            piece: mib / 4,
            items: false,
            iters: 1,
            prism_chunk_bytes: mib,
            prism_slots: 8,
        },
        Workload {
            name: "S3",
            total: (256 / scale) * mib / 4,
            piece: 64 * 1024 / 4,
            items: true,
            iters: 1,
            prism_chunk_bytes: 16 * mib,
            prism_slots: 3,
        },
    ];
    if let Some(only) = &args.only {
        workloads.retain(|w| w.name == only);
    }
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
    print_table(&device, &results);
    std::fs::create_dir_all(&args.out)?;
    let report = Report {
        device,
        driver_cuda_version: driver_version(),
        quick: args.quick,
        reps: args.reps,
        workloads: results,
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

/// Random data in parallel, 1 Mi elements per seed.
fn fill_random(dst: &mut [f32], seed: u64) {
    std::thread::scope(|s| {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = dst.len().div_ceil(threads).div_ceil(1 << 20).max(1) << 20;
        for (t, part) in dst.chunks_mut(per).enumerate() {
            s.spawn(move || {
                for (b, block) in part.chunks_mut(1 << 20).enumerate() {
                    block.copy_from_slice(&random_f32(
                        seed ^ ((t * 4096 + b) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                        block.len(),
                    ));
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
        let mut state = 0x5A17u64;
        for (b, buf) in data.inputs.iter().enumerate() {
            let n = buf.len();
            // Both ends of every piece, plus random positions.
            for start in (0..n).step_by(piece) {
                at.push((b, start));
                at.push((b, (start + piece).min(n) - 1));
            }
            for _ in 0..(4096 / data.inputs.len()).max(2) {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                at.push((b, (state >> 33) as usize % n));
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
    let mut ms = 0f32;
    // SAFETY: ins/outs point into pinned buffers owned by `data` (alive and not
    // otherwise borrowed during the call), each with lens[i] floats; the call is
    // synchronous (it waits for its own work before returning).
    let code = unsafe {
        prism_cuda_sys::prism_bench_pieces(
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
        // SAFETY: returns a static string for any code.
        let msg = unsafe { CStr::from_ptr(prism_cuda_sys::prism_error_string(code)) };
        return Err(format!("prism_bench_pieces(mode {mode}): {}", msg.to_string_lossy()).into());
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
    if w.items {
        let Data { inputs, outputs } = data;
        p.run_items_pinned(inputs.iter().zip(outputs.iter_mut()))?;
    } else {
        let Data { inputs, outputs } = data;
        p.run_pinned(&inputs[0], &mut outputs[0])?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
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
    let mut bidir: Vec<f64> = (0..=reps)
        .map(|_| {
            cxx(
                &mut data,
                w.piece,
                1,
                prism_cuda_sys::PRISM_BENCH_BIDIR as i32,
                2,
            )
        })
        .collect::<Result<_, _>>()?;
    bidir.remove(0);
    let t_bidir = median(&mut bidir);
    if w.iters == 0 {
        // S1c: an fma chain long enough that t_kernel is about 1.5 x t_bidir.
        let k1 = cxx(
            &mut data,
            w.piece,
            1,
            prism_cuda_sys::PRISM_BENCH_KERNEL_ONLY as i32,
            1,
        )?;
        let k2 = cxx(
            &mut data,
            w.piece,
            1,
            prism_cuda_sys::PRISM_BENCH_KERNEL_ONLY as i32,
            1,
        )?
        .min(k1);
        let k64 = cxx(
            &mut data,
            w.piece,
            257,
            prism_cuda_sys::PRISM_BENCH_KERNEL_ONLY as i32,
            1,
        )?;
        let slope = ((k64 - k2) / 256.0).max(1e-6);
        w.iters = (((1.5 * t_bidir - k2) / slope).round() as i64).clamp(2, 1 << 20) as u32;
        eprintln!("prism-bench:   S1c calibration: kernel {k2:.2} ms at 1 step, {k64:.2} ms at 257 steps -> {} steps", w.iters);
    }
    let mut kernel: Vec<f64> = (0..=reps)
        .map(|_| {
            cxx(
                &mut data,
                w.piece,
                w.iters,
                prism_cuda_sys::PRISM_BENCH_KERNEL_ONLY as i32,
                1,
            )
        })
        .collect::<Result<_, _>>()?;
    kernel.remove(0);
    let t_kernel = median(&mut kernel);
    let bound = t_bidir.max(t_kernel);
    eprintln!(
        "prism-bench:   t_bidir {t_bidir:.2} ms, t_kernel {t_kernel:.2} ms, bound {bound:.2} ms"
    );

    let config = PipelineConfig {
        chunk_bytes: w.prism_chunk_bytes,
        slots: w.prism_slots,
        timing: prism_timing,
        ..PipelineConfig::default()
    };
    let mut pipeline = PipelineStageManager::<f32>::with_gpu(gpu, config)?;
    pipeline.add_stage(Fma {
        a: A,
        b: B,
        iters: w.iters,
    });
    let mut cases = Vec::new();
    let mut cxx_ms = None;
    for name in IMPLS {
        let mut times = Vec::new();
        let mut checked = 0;
        for rep in 0..=reps {
            eprint!("\rprism-bench:   {name}: run {rep}/{reps}   ");
            sample.poison(&mut data)?;
            let ms = match name {
                "sequential" => cxx(
                    &mut data,
                    w.piece,
                    w.iters,
                    prism_cuda_sys::PRISM_BENCH_SEQUENTIAL as i32,
                    1,
                )?,
                "CUDA C++ 3 streams" => cxx(
                    &mut data,
                    w.piece,
                    w.iters,
                    prism_cuda_sys::PRISM_BENCH_MULTISTREAM as i32,
                    3,
                )?,
                "cudarc 3 streams" => cudarc_loop(ctx, &mut data, w.piece, w.iters)?,
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
        }
        eprintln!();
        if prism_timing && name == "prism" {
            eprintln!("{}", pipeline.get_stats());
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
