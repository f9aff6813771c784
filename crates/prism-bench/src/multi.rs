//! S7: S1 (pinned, one fma step) over every GPU of the host, against the
//! joint bound measured in the same process: every GPU's bidirectional
//! copies of its share issued at once (CUDA C++, no kernel). Beside it: the
//! same on GPU 0 alone (its own bound and prism's single-GPU run), and the
//! CUDA C++ 3-stream pipeline on every GPU at once.

use std::sync::Barrier;

use prism_pipeline::{Fma, MultiGpuPipeline, PipelineConfig, PipelineStageManager};
use prism_stream::{Gpu, HostAllocFlags, PinnedBuffer};
use serde::{Deserialize, Serialize};

use crate::{baselines, check_fma, cxx_slices, fill_random, median, BoxError, A, B};

/// One line of the S7 table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MultiRow {
    pub(crate) what: String,
    pub(crate) gpus: usize,
    pub(crate) median_ms: f64,
    pub(crate) min_ms: f64,
    pub(crate) max_ms: f64,
    /// Both directions, GB/s.
    pub(crate) gbps: f64,
    /// The bound for this many GPUs (joint, or GPU 0's alone) / median.
    pub(crate) bound_over_measured: f64,
    /// prism on GPU 0 alone / this (how much faster than one GPU).
    pub(crate) speedup_over_one_gpu: f64,
    /// Chunks each GPU took (prism rows; the last repetition).
    pub(crate) chunks_per_gpu: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MultiResult {
    pub(crate) devices: Vec<String>,
    pub(crate) total_mib: usize,
    /// Every GPU's copies of its share both ways, all at once: the slowest
    /// GPU's time (median over repetitions).
    pub(crate) joint_bidir_ms: f64,
    /// Each GPU's time in those joint runs (median).
    pub(crate) joint_per_gpu_ms: Vec<f64>,
    /// GPU 0 alone, the whole input both ways.
    pub(crate) single_bidir_ms: f64,
    pub(crate) rows: Vec<MultiRow>,
}

const PIECE: usize = 64 << 18; // 64 MiB of f32

/// The CUDA C++ baseline `mode` on every GPU at once, each over its share
/// of `input`/`output`: (slowest GPU's ms, each GPU's ms).
fn cxx_all(
    gpus: &[Gpu],
    input: &[f32],
    output: &mut [f32],
    iters: u32,
    mode: i32,
    streams: i32,
) -> Result<(f64, Vec<f64>), BoxError> {
    let share = input.len().div_ceil(gpus.len());
    let start = Barrier::new(gpus.len());
    let times: Vec<Result<f64, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = gpus
            .iter()
            .zip(input.chunks(share).zip(output.chunks_mut(share)))
            .map(|(g, (i, o))| {
                let start = &start;
                s.spawn(move || {
                    g.bind().map_err(|e| e.to_string())?;
                    start.wait();
                    cxx_slices(i, o, PIECE, iters, mode, streams).map_err(|e| e.to_string())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a baseline thread panicked".into()))
            })
            .collect()
    });
    let times = times.into_iter().collect::<Result<Vec<f64>, String>>()?;
    Ok((times.iter().copied().fold(0.0, f64::max), times))
}

fn spread(times: &mut [f64]) -> (f64, f64, f64) {
    let lo = times.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = times.iter().copied().fold(0.0, f64::max);
    (median(times), lo, hi)
}

pub(crate) fn bench_multi(reps: usize, quick: bool) -> Result<MultiResult, BoxError> {
    let count = prism_stream::device_count()?;
    let gpus: Vec<Gpu> = (0..count).map(Gpu::open).collect::<Result<_, _>>()?;
    let devices: Vec<String> = gpus
        .iter()
        .map(|g| {
            let i = g.info();
            format!(
                "GPU {} {} (host NUMA node {})",
                i.ordinal,
                i.name,
                i.host_numa_node.map_or("-".into(), |n| n.to_string())
            )
        })
        .collect();
    for d in &devices {
        eprintln!("prism-bench:   {d}");
    }
    let total_mib = if quick { 256 } else { 4096 };
    let n = total_mib << 18;
    let mut input = PinnedBuffer::<f32>::new(&gpus[0], n, HostAllocFlags::PORTABLE)?;
    fill_random(input.as_mut_slice()?, 0x57);
    let mut output = PinnedBuffer::<f32>::new(&gpus[0], n, HostAllocFlags::PORTABLE)?;
    let bidir = baselines::BIDIR;

    // The bounds: GPU 0 alone, then every GPU at once (a warm-up each).
    let mut single = Vec::new();
    let mut joint = Vec::new();
    let mut per_gpu: Vec<Vec<f64>> = vec![Vec::new(); count];
    for rep in 0..=reps {
        let (one, _) = cxx_all(
            &gpus[..1],
            input.as_slice()?,
            output.as_mut_slice()?,
            1,
            bidir,
            2,
        )?;
        let (all, each) = cxx_all(
            &gpus,
            input.as_slice()?,
            output.as_mut_slice()?,
            1,
            bidir,
            2,
        )?;
        if rep > 0 {
            single.push(one);
            joint.push(all);
            for (v, t) in per_gpu.iter_mut().zip(each) {
                v.push(t);
            }
        }
    }
    let single_bidir_ms = median(&mut single);
    let joint_bidir_ms = median(&mut joint);
    let joint_per_gpu_ms: Vec<f64> = per_gpu.iter_mut().map(|v| median(v)).collect();
    eprintln!(
        "prism-bench:   t_bidir GPU 0 alone {single_bidir_ms:.2} ms; all {count} at once {joint_bidir_ms:.2} ms (per GPU {joint_per_gpu_ms:.2?})"
    );
    let bytes = 2.0 * (n * 4) as f64;
    let mut rows = Vec::new();
    let mut one_gpu_ms = None;
    let mut row = |what: String, gpus_used: usize, times: &mut [f64], chunks: Vec<u64>| {
        let bound = if gpus_used == 1 {
            single_bidir_ms
        } else {
            joint_bidir_ms
        };
        let (med, lo, hi) = spread(times);
        if what.starts_with("prism") && gpus_used == 1 {
            one_gpu_ms = Some(med);
        }
        let r = MultiRow {
            what,
            gpus: gpus_used,
            median_ms: med,
            min_ms: lo,
            max_ms: hi,
            gbps: bytes / (med * 1e6),
            bound_over_measured: bound / med,
            speedup_over_one_gpu: one_gpu_ms.map_or(f64::NAN, |o| o / med),
            chunks_per_gpu: chunks,
        };
        eprintln!(
            "prism-bench:   {}: {:.2} ms, bound/measured {:.3}",
            r.what, r.median_ms, r.bound_over_measured
        );
        rows.push(r);
    };

    // prism on GPU 0 alone, as S1 runs it (64 MiB chunks, 3 slots).
    let fixed = PipelineConfig {
        chunk_bytes: PIECE * 4,
        slots: 3,
        timing: false,
        ..PipelineConfig::default()
    };
    let mut single_p = PipelineStageManager::<f32>::with_gpu(&gpus[0], fixed.clone())?;
    single_p.add_stage(Fma {
        a: A,
        b: B,
        iters: 1,
    });
    let mut t = Vec::new();
    for rep in 0..=reps {
        let started = std::time::Instant::now();
        single_p.run_pinned(&input, &mut output)?;
        output.wait_idle()?;
        if rep > 0 {
            t.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    check_fma(input.as_slice()?, output.as_slice()?, "S7 prism on GPU 0")?;
    row("prism, GPU 0 alone (64 MiB x 3)".into(), 1, &mut t, vec![]);
    drop(single_p);

    // The CUDA C++ pipeline (3 streams) on every GPU at once, each over its share.
    let mut t = Vec::new();
    for rep in 0..=reps {
        let (ms, _) = cxx_all(
            &gpus,
            input.as_slice()?,
            output.as_mut_slice()?,
            1,
            baselines::MULTISTREAM,
            3,
        )?;
        if rep > 0 {
            t.push(ms);
        }
    }
    check_fma(input.as_slice()?, output.as_slice()?, "S7 C++ on every GPU")?;
    row(
        format!("CUDA C++ 3 streams, {count} GPU(s) at once, a share each"),
        count,
        &mut t,
        vec![],
    );

    // prism over every GPU: as S1 (64 MiB x 3), and with the adaptive configuration.
    for (name, config) in [
        ("64 MiB x 3", fixed),
        (
            "auto",
            PipelineConfig {
                timing: false,
                ..PipelineConfig::auto()
            },
        ),
    ] {
        let mut p = MultiGpuPipeline::<f32>::with_gpus(&gpus, config)?;
        p.add_stage(Fma {
            a: A,
            b: B,
            iters: 1,
        });
        let mut t = Vec::new();
        for rep in 0..=reps {
            output.as_mut_slice()?.fill(f32::NAN);
            p.reset_stats();
            let started = std::time::Instant::now();
            p.run_pinned(&input, &mut output)?;
            output.wait_idle()?;
            if rep > 0 {
                t.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        check_fma(
            input.as_slice()?,
            output.as_slice()?,
            "S7 prism on every GPU",
        )?;
        let chunks = p.get_stats().chunks_per_gpu();
        row(
            format!("prism, {count} GPU(s) ({name})"),
            count,
            &mut t,
            chunks,
        );
    }
    Ok(MultiResult {
        devices,
        total_mib,
        joint_bidir_ms,
        joint_per_gpu_ms,
        single_bidir_ms,
        rows,
    })
}

pub(crate) fn print_multi(m: Option<&MultiResult>) {
    let Some(m) = m else { return };
    println!();
    println!(
        "S7: {} MiB pinned, fma 1 step, over {} GPU(s)",
        m.total_mib,
        m.devices.len()
    );
    for d in &m.devices {
        println!("  {d}");
    }
    println!(
        "  bound: GPU 0 alone t_bidir {:.2} ms; every GPU at once (its share each) {:.2} ms, per GPU {:.2?} ms",
        m.single_bidir_ms, m.joint_bidir_ms, m.joint_per_gpu_ms
    );
    println!(
        "  {:<50} {:>4} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7}  chunks/GPU",
        "implementation", "GPUs", "median", "min", "max", "GB/s", "bound/", "vs 1"
    );
    for r in &m.rows {
        println!(
            "  {:<50} {:>4} {:>9.2} {:>9.2} {:>9.2} {:>7.1} {:>7.3} {:>7.2}  {:?}",
            r.what,
            r.gpus,
            r.median_ms,
            r.min_ms,
            r.max_ms,
            r.gbps,
            r.bound_over_measured,
            r.speedup_over_one_gpu,
            r.chunks_per_gpu
        );
    }
}
