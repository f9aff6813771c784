//! S11: fan-out. One pinned input (4 GiB of f32; 256 MiB with `--quick`)
//! is uploaded once per chunk and read in place by 2, then 4 branches,
//! each a different elementwise built-in stage ([`BRANCHES`]) with its own
//! pinned output: `input → branch i → output i`, a [`StageGraph`] run with
//! [`PipelineStageManager::run_graph_pinned`], at chunks of 16, 32 and
//! 64 MiB (the spec's range).
//!
//! The bound, measured in the same process just before prism at the same
//! piece size: one upload of the whole input on one stream and every
//! branch's download (`branches` × the input's bytes) on another, issued
//! together, no kernel (CUDA C++, `prism_bench_fanout_bidir`: the
//! `BIDIR` mode of [`crate::bidir_ms`] with several downloads per upload),
//! timed with CUDA events. The kernels (one or two fma steps, a clamp) are
//! not part of the bound: on device-resident data they take a small
//! fraction of the copies' time. Target: prism ≥ 0.95 of the bound with 2
//! and with 4 branches.
//!
//! prism's time is wall time on the host from the call to the end of the
//! last download (the outputs idle). Every output is filled with NaN before
//! each case's warm-up; before each timed repetition a sample of positions
//! (both ends of every chunk and random ones) is poisoned again and checked
//! against the CPU after it; after the last repetition every element of
//! every output is checked against the CPU reference (`fma_chain_cpu`, and
//! `x.max(lo).min(hi)` as the clamp kernel's `fminf(fmaxf(x, lo), hi)`),
//! bit for bit, on all cores.
//!
//! Then the concurrency of branches (not a spec workload): 4 compute-bound
//! branches (fma chains of [`HEAVY_ITERS`] steps) over 64 MiB in 256 KiB
//! chunks, where each branch's grid is 64 blocks (fewer than an H100's
//! 132 SMs), run
//! with the branches of a chunk on lanes of their own (the default) and
//! with [`StageGraph::concurrent_branches`]`(false)` (one lane, node
//! order), in the same process; sampled outputs checked against the CPU.

use std::time::Instant;

use prism_pipeline::{Clamp, Fma, NodeId, PipelineConfig, PipelineStageManager, StageGraph};
use prism_stream::{fma_chain_cpu, Gpu, HostAllocFlags, PinnedBuffer};
use rand::{RngExt, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{baselines, fill_random, median, runs_bar, warm_median, BoxError};

/// Branch counts measured, in this order.
const BRANCH_COUNTS: [usize; 2] = [2, 4];

/// prism's chunk sizes in MiB (both ends and the middle of the spec's
/// 16–64 MiB); the bound's pieces are the same size.
const CHUNK_MIB: [usize; 3] = [16, 32, 64];

/// Random positions per output checked after every timed repetition (on
/// top of both ends of every chunk).
const SAMPLES: usize = 1 << 16;

/// One branch of the graph: an elementwise built-in stage.
#[derive(Debug, Clone, Copy)]
enum Branch {
    Fma(Fma),
    Clamp(Clamp),
}

/// The branches, in output order; a run with `k` branches uses the first `k`.
const BRANCHES: [Branch; 4] = [
    Branch::Fma(Fma {
        a: crate::A,
        b: crate::B,
        iters: 1,
    }),
    Branch::Clamp(Clamp { lo: -0.5, hi: 0.5 }),
    Branch::Fma(Fma {
        a: -0.75,
        b: 0.25,
        iters: 2,
    }),
    Branch::Clamp(Clamp { lo: -0.9, hi: 0.1 }),
];

impl Branch {
    /// The CPU reference of one element.
    fn cpu(self, x: f32) -> f32 {
        match self {
            Branch::Fma(f) => fma_chain_cpu(x, f.a, f.b, f.iters),
            // fminf(fmaxf(x, lo), hi), as the clamp kernel.
            Branch::Clamp(c) => x.max(c.lo).min(c.hi),
        }
    }

    /// Adds the branch's stage to `g`, reading `from`.
    fn add(self, g: &mut StageGraph<f32>, from: NodeId) -> Result<NodeId, BoxError> {
        Ok(match self {
            Branch::Fma(f) => g.stage(from, f)?,
            Branch::Clamp(c) => g.stage(from, c)?,
        })
    }

    fn describe(self) -> String {
        match self {
            Branch::Fma(f) => format!("fma(a {}, b {}, {} steps)", f.a, f.b, f.iters),
            Branch::Clamp(c) => format!("clamp({}, {})", c.lo, c.hi),
        }
    }
}

/// Steps of each compute-bound branch of the concurrency case.
const HEAVY_ITERS: u32 = 20_000;

/// The concurrency case's branches: fma chains converging to distinct
/// values (|a| < 1).
const HEAVY: [Branch; 4] = [
    Branch::Fma(Fma {
        a: 0.5,
        b: 0.25,
        iters: HEAVY_ITERS,
    }),
    Branch::Fma(Fma {
        a: -0.5,
        b: 0.125,
        iters: HEAVY_ITERS,
    }),
    Branch::Fma(Fma {
        a: 0.25,
        b: -0.5,
        iters: HEAVY_ITERS,
    }),
    Branch::Fma(Fma {
        a: 0.75,
        b: 0.0625,
        iters: HEAVY_ITERS,
    }),
];

/// Branches of a chunk on lanes of their own against one lane.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct S11Concurrency {
    pub(crate) mib: usize,
    pub(crate) chunk_kib: usize,
    pub(crate) branches: usize,
    pub(crate) iters: u32,
    /// Medians of the timed repetitions.
    pub(crate) one_lane_ms: f64,
    pub(crate) concurrent_ms: f64,
    /// Sampled elements compared with the CPU.
    pub(crate) checked_elements: u64,
}

/// S11's results: one row per branch count and chunk size.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct S11Result {
    /// Input size; every output is as large.
    pub(crate) mib: usize,
    /// Timed repetitions per figure (after one warm-up).
    pub(crate) reps: usize,
    /// The branches' stages, in output order.
    pub(crate) branches: Vec<String>,
    pub(crate) rows: Vec<S11Row>,
    /// Absent in results saved before it was measured.
    #[serde(default)]
    pub(crate) concurrency: Option<S11Concurrency>,
}

/// One S11 case.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct S11Row {
    pub(crate) branches: usize,
    pub(crate) chunk_mib: usize,
    /// One upload and every branch's download issued together (median).
    pub(crate) bound_ms: f64,
    /// prism's `run_graph_pinned`, median, min and max.
    pub(crate) prism_ms: f64,
    pub(crate) min_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) bound_over_measured: f64,
    /// Bytes over the link (one upload, `branches` downloads) per second
    /// of prism's median, GB/s.
    pub(crate) gbps: f64,
    /// Chunks prism ran (the chunk ramp makes more than input / chunk).
    pub(crate) chunks: u64,
    /// Elements compared with the CPU: samples of every repetition, then
    /// every element of every output once.
    pub(crate) checked_elements: u64,
}

/// Runs S11: for 2 and 4 branches and each chunk size, the bound then
/// prism (one warm-up, then the median of `reps` runs), the outputs
/// checked against the CPU.
pub(crate) fn bench_fanout(
    gpu: &Gpu,
    reps: usize,
    quick: bool,
    prism_timing: bool,
) -> Result<S11Result, BoxError> {
    let reps = reps.max(1);
    let mib = if quick { 256 } else { 4096 };
    let n = mib << 18;
    let max_branches = BRANCH_COUNTS.iter().copied().max().unwrap_or(1);
    // Allocated and filled outside any timing.
    let mut input = PinnedBuffer::<f32>::new(gpu, n, HostAllocFlags::DEFAULT)?;
    fill_random(input.as_mut_slice()?, 0x511);
    let mut outputs = (0..max_branches)
        .map(|_| PinnedBuffer::<f32>::new(gpu, n, HostAllocFlags::DEFAULT))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rows = Vec::new();
    for &branches in &BRANCH_COUNTS {
        for &chunk_mib in &CHUNK_MIB {
            let piece = chunk_mib << 18;
            let outs = &mut outputs[..branches];
            let bound = warm_median(reps, || fanout_bidir_ms(&input, outs, piece))?;
            eprintln!(
                "prism-bench:   S11 {branches} branches, {chunk_mib} MiB: bound {bound:.2} ms"
            );
            let config = PipelineConfig {
                chunk_bytes: chunk_mib << 20,
                timing: prism_timing,
                ..PipelineConfig::default()
            };
            let mut p = PipelineStageManager::<f32>::with_gpu(gpu, config)?;
            let mut g = fanout_graph(branches)?;
            let lens = p.graph_output_lens(&g, n)?;
            if lens.iter().any(|&l| l != n) {
                return Err(
                    format!("S11: graph output lengths {lens:?}, expected {n} each").into(),
                );
            }
            let sample = sample_positions(n, piece, 0x511 + branches as u64);
            for o in outs.iter_mut() {
                poison_all(o)?;
            }
            let mut times = Vec::new();
            let mut checked = 0u64;
            let mut chunks = 0;
            let name = format!("S11 prism, {branches} branches, {chunk_mib} MiB");
            let bar = runs_bar(&name, reps + 1)?;
            for rep in 0..=reps {
                for o in outs.iter_mut() {
                    let o = o.as_mut_slice()?;
                    for &i in &sample {
                        o[i] = f32::NAN;
                    }
                }
                p.reset_stats();
                let t = Instant::now();
                {
                    let mut dsts: Vec<&mut PinnedBuffer<f32>> = outs.iter_mut().collect();
                    p.run_graph_pinned(&mut g, &input, &mut dsts)?;
                }
                for o in outs.iter() {
                    o.wait_idle()?;
                }
                let ms = t.elapsed().as_secs_f64() * 1e3;
                checked += check_sample(&input, outs, &sample, &BRANCHES, &name)?;
                if rep > 0 {
                    times.push(ms);
                }
                chunks = p.get_stats().chunks;
                bar.inc(1);
            }
            bar.finish_and_clear();
            if prism_timing {
                eprintln!("{}", p.get_stats());
            }
            for (b, o) in outs.iter().enumerate() {
                checked += check_all(input.as_slice()?, o.as_slice()?, BRANCHES[b], b, &name)?;
            }
            let (lo, hi) = (
                times.iter().copied().fold(f64::INFINITY, f64::min),
                times.iter().copied().fold(0.0, f64::max),
            );
            let med = median(&mut times);
            let moved = ((1 + branches) * n * 4) as f64;
            eprintln!(
                "prism-bench:   S11 {branches} branches, {chunk_mib} MiB: prism {med:.2} ms ({:.3} of the bound)",
                bound / med
            );
            rows.push(S11Row {
                branches,
                chunk_mib,
                bound_ms: bound,
                prism_ms: med,
                min_ms: lo,
                max_ms: hi,
                bound_over_measured: bound / med,
                gbps: moved / (med * 1e6),
                chunks,
                checked_elements: checked,
            });
        }
    }
    drop((input, outputs));
    let concurrency = Some(bench_concurrency(gpu, reps, quick)?);
    Ok(S11Result {
        mib,
        reps,
        branches: BRANCHES.iter().map(|b| b.describe()).collect(),
        rows,
        concurrency,
    })
}

/// The concurrency case: [`HEAVY`] over small chunks, one lane against
/// lanes of their own (one warm-up and the median of `reps` each).
fn bench_concurrency(gpu: &Gpu, reps: usize, quick: bool) -> Result<S11Concurrency, BoxError> {
    let (mib, chunk_kib) = (if quick { 16 } else { 64 }, 256);
    let n = mib << 18;
    let mut input = PinnedBuffer::<f32>::new(gpu, n, HostAllocFlags::DEFAULT)?;
    fill_random(input.as_mut_slice()?, 0x5C);
    let mut outs = (0..HEAVY.len())
        .map(|_| PinnedBuffer::<f32>::new(gpu, n, HostAllocFlags::DEFAULT))
        .collect::<Result<Vec<_>, _>>()?;
    let config = PipelineConfig {
        chunk_bytes: chunk_kib << 10,
        ..PipelineConfig::default()
    };
    let mut p = PipelineStageManager::<f32>::with_gpu(gpu, config)?;
    let mut g = StageGraph::new();
    let x = g.input();
    for b in HEAVY {
        let node = b.add(&mut g, x)?;
        g.output(node)?;
    }
    let at = sample_positions(n, chunk_kib << 8, 0x5C);
    let at = &at[..at.len().min(4096)];
    let mut checked = 0u64;
    let mut ms = [0.0f64; 2];
    for (k, concurrent) in [false, true].into_iter().enumerate() {
        g.concurrent_branches(concurrent);
        let what = format!("S11 concurrency, concurrent branches {concurrent}");
        let bar = runs_bar(&what, reps + 1)?;
        ms[k] = warm_median(reps, || {
            for o in outs.iter_mut() {
                let o = o.as_mut_slice()?;
                for &i in at {
                    o[i] = f32::NAN;
                }
            }
            let t = Instant::now();
            {
                let mut dsts: Vec<&mut PinnedBuffer<f32>> = outs.iter_mut().collect();
                p.run_graph_pinned(&mut g, &input, &mut dsts)?;
            }
            for o in outs.iter() {
                o.wait_idle()?;
            }
            let ms = t.elapsed().as_secs_f64() * 1e3;
            checked += check_sample(&input, &outs, at, &HEAVY, &what)?;
            bar.inc(1);
            Ok(ms)
        })?;
        bar.finish_and_clear();
    }
    eprintln!(
        "prism-bench:   S11 concurrency: one lane {:.2} ms, concurrent {:.2} ms",
        ms[0], ms[1]
    );
    Ok(S11Concurrency {
        mib,
        chunk_kib,
        branches: HEAVY.len(),
        iters: HEAVY_ITERS,
        one_lane_ms: ms[0],
        concurrent_ms: ms[1],
        checked_elements: checked,
    })
}

/// `input → BRANCHES[i] → output i` for `i < branches`.
fn fanout_graph(branches: usize) -> Result<StageGraph<f32>, BoxError> {
    let mut g = StageGraph::new();
    let x = g.input();
    for (i, b) in BRANCHES.iter().take(branches).enumerate() {
        let node = b.add(&mut g, x)?;
        if g.output(node)? != i {
            return Err("S11: graph outputs out of order".into());
        }
    }
    if g.output_count() != branches {
        return Err(format!("S11: {branches} branches asked, {} built", g.output_count()).into());
    }
    Ok(g)
}

/// The bound once: `input` uploaded once and downloaded into every output,
/// in pieces of `piece` elements, on two streams issued together (CUDA
/// C++, no kernel); GPU time in ms.
fn fanout_bidir_ms(
    input: &PinnedBuffer<f32>,
    outputs: &mut [PinnedBuffer<f32>],
    piece: usize,
) -> Result<f64, BoxError> {
    let src = input.as_slice()?;
    let ins: Vec<*const f32> = src.chunks(piece).map(<[f32]>::as_ptr).collect();
    let lens: Vec<u64> = src.chunks(piece).map(|c| c.len() as u64).collect();
    let mut outs: Vec<*mut f32> = Vec::with_capacity(ins.len() * outputs.len());
    for o in outputs.iter_mut() {
        let o = o.as_mut_slice()?;
        if o.len() != src.len() {
            return Err("S11 bound: an output is not as long as the input".into());
        }
        outs.extend(o.chunks_mut(piece).map(<[f32]>::as_mut_ptr));
    }
    let mut ms = 0f32;
    // SAFETY: `ins[i]` points to `lens[i]` floats of the pinned `input`,
    // `outs[b * count + i]` to as many floats of the pinned `outputs[b]`
    // (the same cut, every output as long as the input); `input` is
    // borrowed and `outputs` borrowed mutably, so nothing else touches
    // them, for the whole call, which is synchronous; no GPU work was
    // pending on them (`as_slice`/`as_mut_slice` check it).
    let code = unsafe {
        baselines::prism_bench_fanout_bidir(
            ins.as_ptr(),
            outs.as_ptr(),
            lens.as_ptr(),
            lens.len() as u64,
            piece as u64,
            outputs.len() as i32,
            &mut ms,
        )
    };
    if code != 0 {
        let msg = baselines::error_message(code);
        return Err(format!("prism_bench_fanout_bidir: {msg}").into());
    }
    Ok(f64::from(ms))
}

/// Both ends of every `piece`-element chunk, and `SAMPLES` random positions below `n`.
fn sample_positions(n: usize, piece: usize, seed: u64) -> Vec<usize> {
    let mut at = Vec::new();
    for start in (0..n).step_by(piece) {
        at.push(start);
        at.push((start + piece).min(n) - 1);
    }
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    at.extend((0..SAMPLES).map(|_| rng.random_range(0..n)));
    at
}

/// Every element of `o` set to NaN (all cores).
fn poison_all(o: &mut PinnedBuffer<f32>) -> Result<(), BoxError> {
    o.as_mut_slice()?
        .par_chunks_mut(1 << 20)
        .for_each(|c| c.fill(f32::NAN));
    Ok(())
}

/// The sampled positions of every output against the CPU; elements checked.
fn check_sample(
    input: &PinnedBuffer<f32>,
    outputs: &[PinnedBuffer<f32>],
    at: &[usize],
    branches: &[Branch],
    what: &str,
) -> Result<u64, BoxError> {
    let x = input.as_slice()?;
    for (b, o) in outputs.iter().enumerate() {
        let y = o.as_slice()?;
        for &i in at {
            let want = branches[b].cpu(x[i]);
            if want.to_bits() != y[i].to_bits() {
                return Err(
                    format!("{what}: output {b}[{i}] = {}, CPU reference {want}", y[i]).into(),
                );
            }
        }
    }
    Ok((at.len() * outputs.len()) as u64)
}

/// Every element of branch `b`'s `output` against the CPU (all cores);
/// elements checked.
fn check_all(
    input: &[f32],
    output: &[f32],
    branch: Branch,
    b: usize,
    what: &str,
) -> Result<u64, BoxError> {
    const BLOCK: usize = 1 << 16;
    if input.len() != output.len() {
        return Err(format!("{what}: output {b} has {} elements", output.len()).into());
    }
    let bad = input
        .par_chunks(BLOCK)
        .zip(output.par_chunks(BLOCK))
        .enumerate()
        .find_map_first(|(k, (x, y))| {
            x.iter()
                .zip(y)
                .position(|(&x, &y)| branch.cpu(x).to_bits() != y.to_bits())
                .map(|p| k * BLOCK + p)
        });
    if let Some(i) = bad {
        return Err(format!(
            "{what}: output {b}[{i}] = {}, CPU reference {}",
            output[i],
            branch.cpu(input[i])
        )
        .into());
    }
    Ok(output.len() as u64)
}

pub(crate) fn print_fanout(s: Option<&S11Result>) {
    let Some(s) = s else { return };
    println!();
    println!(
        "S11: fan-out, {} MiB pinned uploaded once, branch i -> its own output ({}); bound = one upload + every branch's download issued together (two streams, no kernel); median of {} after a warm-up; target >= 0.95",
        s.mib,
        s.branches.join(", "),
        s.reps
    );
    println!("| branches | chunk MiB | chunks | bound ms | prism ms | min..max ms | bound / measured | GB/s moved | outputs checked |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &s.rows {
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2}..{:.2} | {:.3} | {:.1} | {} |",
            r.branches,
            r.chunk_mib,
            r.chunks,
            r.bound_ms,
            r.prism_ms,
            r.min_ms,
            r.max_ms,
            r.bound_over_measured,
            r.gbps,
            r.checked_elements
        );
    }
    if let Some(c) = &s.concurrency {
        println!();
        println!(
            "S11 concurrency: {} compute-bound branches (fma, {} steps) over {} MiB pinned in {} KiB chunks (each branch's grid 64 blocks of 256 threads: fewer blocks than an H100 has SMs); median of {} after a warm-up",
            c.branches, c.iters, c.mib, c.chunk_kib, s.reps
        );
        println!("| branches of a chunk | ms | speed vs one lane | outputs checked (sampled) |");
        println!("| --- | --- | --- | --- |");
        println!("| one lane, node order | {:.2} | 1.00x | |", c.one_lane_ms);
        println!(
            "| lanes of their own (default) | {:.2} | {:.2}x | {} |",
            c.concurrent_ms,
            c.one_lane_ms / c.concurrent_ms,
            c.checked_elements
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_has_one_output_per_branch_and_the_references_differ() {
        for &k in &BRANCH_COUNTS {
            let g = fanout_graph(k).unwrap();
            assert_eq!(g.output_count(), k);
            // The input and every branch alive at once.
            assert_eq!(g.buffers_per_slot().unwrap(), k + 1);
        }
        let x = 0.7f32;
        let ys: Vec<u32> = BRANCHES.iter().map(|b| b.cpu(x).to_bits()).collect();
        for i in 0..ys.len() {
            for j in i + 1..ys.len() {
                assert_ne!(ys[i], ys[j], "branches {i} and {j} agree at {x}");
            }
        }
    }

    #[test]
    fn samples_cover_both_ends_of_every_chunk() {
        let at = sample_positions(10, 4, 1);
        assert_eq!(at[..6], [0, 3, 4, 7, 8, 9]);
        assert!(at.iter().all(|&i| i < 10));
    }

    #[test]
    fn full_check_finds_the_first_wrong_element() {
        let x: Vec<f32> = (0..200_000).map(|i| (i as f32) * 1e-5 - 1.0).collect();
        let b = BRANCHES[1];
        let mut y: Vec<f32> = x.iter().map(|&v| b.cpu(v)).collect();
        assert_eq!(check_all(&x, &y, b, 1, "t").unwrap(), 200_000);
        y[150_001] = f32::NAN;
        y[190_000] = f32::NAN;
        let e = check_all(&x, &y, b, 1, "t").unwrap_err().to_string();
        assert!(e.contains("output 1[150001]"), "{e}");
    }
}
