//! A soak run: many iterations mixing prism's API, sampling the process's
//! resources as it goes, failing if any of them drifts.
//!
//! Each iteration does one of: a pipeline run of a random size in one of
//! the input modes (pageable, pinned, items, stream, `execute_iteration`),
//! a coordinator op chain (upload, kernel, download) settled with `poll`
//! or with `wait`, or a `TripleBuffer` step. Every output's first and last
//! element are checked against the CPU. Every `--sample-every` iterations
//! it samples the process's resident memory, the device's used memory,
//! prism's page-locked bytes, the CUDA events held by fences, and the
//! coordinator's op table (after a `poll`, which hands out the completions
//! `wait` kept for it). None may end (the peak of the last fifth of the
//! samples) more than `--max-drift` (1 %) above its peak in the warm-up
//! (the first half). The samples go to `soak.csv`; `soak.svg` plots them,
//! and `soak.png` draws the same lines without text (`--plot CSV` redraws
//! both from a saved CSV).
//!
//! `cargo xtask soak` runs it; on the GPU machine:
//! `./bundle/bin/soak --iterations 100000 --out DIR`. Without a GPU it
//! soaks the host backend (pipeline runs only).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use plotters::prelude::*;
use prism_buffer::{GpuTripleBufferExt, TripleBuffer};
use prism_pipeline::{
    fill_with, sink_fn, Backend, BackendKind, Fma, PipelineConfig, PipelineStageManager,
};
use prism_stream::{fma_chain_cpu, HostAllocFlags, ManagedGpuContext, OpId, PinnedBuffer};
use prism_testing::random_f32;
use proptest::prelude::Rng as _;
use proptest::test_runner::{RngAlgorithm, TestRng};

/// Soak prism: many mixed iterations, resources sampled, drift fails.
#[derive(Debug, Parser)]
#[command(name = "soak", version)]
struct Args {
    /// Iterations
    #[arg(long, default_value_t = 100_000)]
    iterations: u64,
    /// Sample the resources every N iterations (default: iterations / 250)
    #[arg(long)]
    sample_every: Option<u64>,
    /// Largest input of one iteration, in elements
    #[arg(long, default_value_t = 1 << 16)]
    max_elems: usize,
    /// Where soak.csv, soak.svg and soak.png go
    #[arg(long, default_value = "soak-results")]
    out: PathBuf,
    /// Largest allowed rise after the warm-up (0.01 = 1 %)
    #[arg(long, default_value_t = 0.01)]
    max_drift: f64,
    /// Random seed
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Redraw soak.svg and soak.png (next to it) from a saved soak.csv and exit
    #[arg(long, value_name = "CSV")]
    plot: Option<PathBuf>,
}

const A: f32 = 1.0001;
const B: f32 = 0.5;
const COLUMNS: [&str; 5] = [
    "rss_bytes",
    "device_used_bytes",
    "pinned_bytes",
    "cuda_events_held",
    "op_table",
];

#[derive(Debug, Clone, Copy)]
struct Sample {
    iteration: u64,
    seconds: f64,
    values: [f64; 5],
}

fn rss_bytes() -> f64 {
    // /proc/self/statm: size resident shared ... (pages)
    let page = 4096.0;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |p| p * page)
}

/// What a GPU soak holds besides the pipeline.
struct GpuParts {
    ctx: ManagedGpuContext,
    tb: TripleBuffer<f32>,
    host_in: PinnedBuffer<f32>,
    host_out: PinnedBuffer<f32>,
    /// Pinned inputs and outputs of the `run_pinned` iterations, by size.
    pinned: Vec<(PinnedBuffer<f32>, PinnedBuffer<f32>)>,
}

fn check(input: &[f32], output: &[f32], what: &str) -> Result<(), String> {
    let want = |x: f32| fma_chain_cpu(x, A, B, 1);
    let ok = |i: usize| output[i].to_bits() == want(input[i]).to_bits();
    if input.len() != output.len() || !(input.is_empty() || ok(0) && ok(input.len() - 1)) {
        return Err(format!("{what}: output differs from the CPU"));
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(csv) = &args.plot {
        let samples = read_csv(csv)?;
        let png = csv.with_extension("png");
        plot(&samples, &png)?;
        println!(
            "soak: drew {} and {}",
            png.display(),
            png.with_extension("svg").display()
        );
        return Ok(());
    }
    std::fs::create_dir_all(&args.out)?;
    let every = args.sample_every.unwrap_or((args.iterations / 250).max(1));
    let config = PipelineConfig {
        chunk_bytes: 16 << 10,
        slots: 3,
        timing: false,
        host_threads: 4,
        ..PipelineConfig::default()
    };
    let mut p = PipelineStageManager::<f32>::new(Backend::Auto, config)?;
    p.add_stage(Fma {
        a: A,
        b: B,
        iters: 1,
    });
    let mut gpu = if p.backend() == BackendKind::Gpu {
        let ctx = ManagedGpuContext::new(0, true)?;
        let tb = ctx.create_triple_buffer::<f32>(1 << 12)?;
        let gpu = ctx.gpu().clone();
        let pinned = [1usize << 10, 1 << 13, 1 << 16]
            .iter()
            .map(|&n| {
                let i = PinnedBuffer::from_slice(
                    &gpu,
                    &random_f32(n as u64, n),
                    HostAllocFlags::DEFAULT,
                )?;
                let o = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT)?;
                Ok((i, o))
            })
            .collect::<prism_stream::Result<Vec<_>>>()?;
        Some(GpuParts {
            host_in: PinnedBuffer::from_slice(
                &gpu,
                &random_f32(9, 1 << 12),
                HostAllocFlags::DEFAULT,
            )?,
            host_out: PinnedBuffer::<f32>::new(&gpu, 1 << 12, HostAllocFlags::DEFAULT)?,
            ctx,
            tb,
            pinned,
        })
    } else {
        None
    };
    println!(
        "soak: {} iterations on the {} backend, sampling every {every}",
        args.iterations,
        if gpu.is_some() { "GPU" } else { "host" }
    );
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&args.seed.to_le_bytes());
    let mut r = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let data = random_f32(args.seed, args.max_elems);
    let mut out = vec![0f32; args.max_elems];
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut counts = [0u64; 8];
    let mut pending: Vec<OpId> = Vec::new();
    let mut created_events = 0usize;
    for it in 0..args.iterations {
        let n = 1 + (r.next_u64() % args.max_elems as u64) as usize;
        let kinds = if gpu.is_some() { 8 } else { 4 };
        let kind = (r.next_u64() % kinds) as usize;
        counts[kind] += 1;
        let input = &data[..n];
        match kind {
            0 => {
                p.run(input, &mut out[..n])?;
                check(input, &out[..n], "run")?;
            }
            1 => {
                // Items of up to a chunk each.
                let chunk = 4096;
                let ins: Vec<&[f32]> = input.chunks(chunk).collect();
                let mut outs: Vec<&mut [f32]> = out[..n].chunks_mut(chunk).collect();
                p.run_items(ins.iter().copied().zip(outs.iter_mut().map(|o| &mut **o)))?;
                check(input, &out[..n], "run_items")?;
            }
            2 => {
                let mut at = 0;
                let mut got = Vec::with_capacity(n);
                p.run_stream(
                    fill_with(|dst: &mut [f32]| {
                        let k = dst.len().min(n - at);
                        dst[..k].copy_from_slice(&input[at..at + k]);
                        at += k;
                        Ok::<_, std::convert::Infallible>(k)
                    }),
                    sink_fn(|_, d: &[f32]| {
                        got.extend_from_slice(d);
                        Ok::<_, std::convert::Infallible>(())
                    }),
                )?;
                check(input, &got, "run_stream")?;
            }
            3 => {
                let mut got = Vec::with_capacity(n);
                for c in input.chunks(4096) {
                    for o in p.execute_iteration(c)? {
                        got.extend(o.data.unwrap_or_default());
                    }
                }
                for o in p.flush()? {
                    got.extend(o.data.unwrap_or_default());
                }
                check(input, &got, "execute_iteration")?;
            }
            4 => {
                let g = gpu.as_mut().ok_or("no GPU")?;
                let k = (r.next_u64() % 3) as usize;
                let (i, o) = &mut g.pinned[k];
                p.run_pinned(i, o)?;
                check(i.as_slice()?, o.wait_slice()?, "run_pinned")?;
            }
            5 | 6 => {
                // A coordinator chain; settled by `poll` (5) or `wait` (6).
                let g = gpu.as_mut().ok_or("no GPU")?;
                let len = g.host_in.len();
                let c = g.ctx.async_coordinator_mut()?;
                let mut dev = c.zeroed::<f32>(len)?;
                let up = c.queue_upload(&g.host_in, &mut dev, &[])?;
                let k = c.queue_compute("fma", &[up], |l| {
                    l.fma_chain_in_place(&mut dev, len, A, B, 1)
                })?;
                let down = c.queue_download(&dev, &mut g.host_out, &[k])?;
                if kind == 5 {
                    pending.push(down);
                    while c.pending() > 0 {
                        c.poll();
                        std::thread::yield_now();
                    }
                    pending.clear();
                } else {
                    c.wait(down)?;
                }
                check(
                    g.host_in.as_slice()?,
                    g.host_out.wait_slice()?,
                    "coordinator",
                )?;
            }
            _ => {
                // A triple-buffer round trip.
                let g = gpu.as_mut().ok_or("no GPU")?;
                let m = n.min(g.tb.capacity());
                g.tb.upload(&input[..m])?;
                g.tb.process(|l, buf, len| l.fma_chain_in_place(buf, len, A, B, 1))?;
                g.tb.download()?;
                let mut ok = true;
                while let Some(bad) =
                    g.tb.wait_output(|_, o: &[f32]| check(&input[..m], o, "triple buffer"))?
                {
                    ok &= bad.is_ok();
                    if g.tb.in_flight() == 0 {
                        break;
                    }
                }
                if !ok {
                    return Err("triple buffer: output differs from the CPU".into());
                }
            }
        }
        if it % every == 0 || it + 1 == args.iterations {
            let (device_used, events, ops) = match &mut gpu {
                Some(g) => {
                    let (free, total) = g.ctx.gpu().memory_info()?;
                    // After a poll (which hands out the completions `wait`
                    // kept for it), the table holds only what was never
                    // settled: in a steady state, nothing.
                    let ops = g.ctx.async_coordinator_mut().map_or(0, |c| {
                        c.poll();
                        c.pending() + c.retained_ops()
                    });
                    // Events held by fences (created, less those idle in
                    // the pool): what a leak of fences would grow. The
                    // number created is the pool's high-water mark, which
                    // rare peaks of work in flight raise now and then.
                    let gpu = g.ctx.gpu();
                    let held = gpu.events_created().saturating_sub(gpu.pooled_events());
                    created_events = gpu.events_created();
                    ((total - free) as f64, held as f64, ops as f64)
                }
                None => (0.0, 0.0, 0.0),
            };
            samples.push(Sample {
                iteration: it + 1,
                seconds: started.elapsed().as_secs_f64(),
                values: [
                    rss_bytes(),
                    device_used,
                    prism_stream::pinned_bytes() as f64,
                    events,
                    ops,
                ],
            });
        }
    }
    let csv = args.out.join("soak.csv");
    write_csv(&samples, &csv)?;
    println!(
        "soak: {} iterations in {:.1} s (run {}, items {}, stream {}, execute_iteration {}, run_pinned {}, coordinator poll {} / wait {}, triple buffer {}); {} samples in {}",
        args.iterations,
        started.elapsed().as_secs_f64(),
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        counts[4],
        counts[5],
        counts[6],
        counts[7],
        samples.len(),
        csv.display()
    );
    if gpu.is_some() {
        println!("soak: CUDA events created in all (the pool's high-water mark): {created_events}");
    }
    match plot(&samples, &args.out.join("soak.png")) {
        Ok(()) => println!(
            "soak: plotted {} and soak.svg",
            args.out.join("soak.png").display()
        ),
        Err(e) => println!(
            "soak: no plot here ({e}); redraw with --plot {}",
            csv.display()
        ),
    }
    let drifted = drift_report(&samples, args.max_drift);
    if !drifted.is_empty() {
        return Err(format!(
            "soak: drift over {}: {}",
            args.max_drift,
            drifted.join("; ")
        )
        .into());
    }
    println!(
        "soak: OK (no resource rose more than {:.1} % after the warm-up)",
        args.max_drift * 100.0
    );
    Ok(())
}

/// Each resource's rise after the warm-up: the peak of the last fifth of
/// the samples over the peak of the first half (the warm-up: the
/// allocator's and the pools' high-water marks settle in it). Prints every
/// one; returns those over `max`.
fn drift_report(samples: &[Sample], max: f64) -> Vec<String> {
    let n = samples.len();
    let warm = (n / 2).max(1);
    let last = (n / 5).max(1);
    let mut over = Vec::new();
    for (k, name) in COLUMNS.iter().enumerate() {
        let peak = |s: &[Sample]| s.iter().map(|x| x.values[k]).fold(0.0, f64::max);
        let base = peak(&samples[..warm.min(n)]);
        let end = peak(&samples[n.saturating_sub(last)..]);
        let drift = if base > 0.0 {
            (end - base) / base
        } else if end > 0.0 {
            f64::INFINITY
        } else {
            0.0
        };
        println!(
            "soak: {name}: warm-up peak {base:.0}, final peak {end:.0}, drift {:+.3} %",
            drift * 100.0
        );
        if drift > max {
            over.push(format!("{name} {:+.2} %", drift * 100.0));
        }
    }
    over
}

fn write_csv(samples: &[Sample], path: &Path) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(f, "iteration,seconds,{}", COLUMNS.join(","))?;
    for s in samples {
        let v: Vec<String> = s.values.iter().map(|x| format!("{x:.0}")).collect();
        writeln!(f, "{},{:.3},{}", s.iteration, s.seconds, v.join(","))?;
    }
    f.flush()
}

fn read_csv(path: &Path) -> Result<Vec<Sample>, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(path)?;
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<f64> = line
            .split(',')
            .map(|x| x.parse())
            .collect::<Result<_, _>>()?;
        if f.len() != 2 + COLUMNS.len() {
            return Err(format!("{}: a line with {} fields", path.display(), f.len()).into());
        }
        let mut values = [0.0; 5];
        values.copy_from_slice(&f[2..]);
        out.push(Sample {
            iteration: f[0] as u64,
            seconds: f[1],
            values,
        });
    }
    Ok(out)
}

/// The samples as `soak.svg` (labelled) and `soak.png` (the same lines
/// without text: plotters draws text into bitmaps only with a font
/// backend, and the GPU machine has no fonts), each resource relative to
/// its warm-up peak.
fn plot(samples: &[Sample], png: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let svg = png.with_extension("svg");
    draw(
        SVGBackend::new(&svg, (1200, 700)).into_drawing_area(),
        samples,
        true,
    )?;
    draw(
        BitMapBackend::new(png, (1200, 700)).into_drawing_area(),
        samples,
        false,
    )?;
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    samples: &[Sample],
    text: bool,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let last = samples.last().map_or(1, |s| s.iteration).max(1);
    let warm = (samples.len() / 2).max(1).min(samples.len());
    let mut builder = ChartBuilder::on(&root);
    builder.margin(16);
    if text {
        builder
            .caption(
                "prism soak: each resource / its warm-up peak (clamped to 0.9..1.1)",
                ("sans-serif", 22),
            )
            .x_label_area_size(40)
            .y_label_area_size(60);
    }
    let mut chart = builder.build_cartesian_2d(0u64..last, 0.9f64..1.1f64)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("iteration")
            .y_desc("value / warm-up peak")
            .draw()?;
    } else {
        // No mesh (its labels are text): the 1.0 line and the 1 % band.
        for (y, c) in [
            (1.0, BLACK),
            (1.01, RGBColor(180, 180, 180)),
            (0.99, RGBColor(180, 180, 180)),
        ] {
            chart.draw_series(LineSeries::new([(0u64, y), (last, y)], c))?;
        }
    }
    let colours = [RED, BLUE, GREEN, MAGENTA, BLACK];
    for (k, name) in COLUMNS.iter().enumerate() {
        let base = samples[..warm]
            .iter()
            .map(|s| s.values[k])
            .fold(0.0, f64::max);
        if base <= 0.0 {
            continue;
        }
        let c = colours[k];
        let series = chart.draw_series(LineSeries::new(
            samples
                .iter()
                .map(|s| (s.iteration, (s.values[k] / base).clamp(0.9, 1.1))),
            c.stroke_width(2),
        ))?;
        if text {
            series.label(*name).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
