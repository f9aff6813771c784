//! S10: many small iterations over resident data. Each iteration runs three
//! small kernels over a fixed window of a device array (k1 `fmaf`, k2 a
//! relu and a wrap into [0, 1), k3 a one-block sum into a 4-byte
//! accumulator; `cuda/s10.cu`, contract in `cuda/baselines.h`), copies the
//! 4 bytes to the host and waits for them. Measured: wall time per
//! iteration, for the hand-written CUDA C++ on one stream, the same
//! captured once as a CUDA graph and replayed, and prism with and without
//! graph replay ([`s10_prism`]). Target: prism with graph replay at most
//! the CUDA C++ graph replay's time.
//!
//! Check: every variant starts from the same initial data
//! (`prism_s10_initial`) and runs warm-up plus timed iterations over the
//! same window; the CPU replays them ([`reference()`]). The elementwise steps
//! are exact IEEE operations on both sides (fmaf and `f32::mul_add` round
//! once; one rounded add; `floor` and `y - floor(y)` are exact), so the
//! final window must match bit for bit. The final accumulator is compared
//! with the CPU's sum in k3's own order (expected bit for bit as well)
//! within a relative tolerance, [`acc_tolerance`], the worst-case gap
//! between two summation orders of the same height, so that a GPU-side sum
//! in another order of the same shape would still pass while a wrong
//! window or a wrong iteration count (which moves the sum by a large
//! fraction, see the tests) does not.

use std::time::Instant;

use prism_stream::{CapturedGraph, DeviceBuffer, Gpu, Lane, Launch, ReadbackKey};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::baselines::{self, S10_A, S10_B, S10_C, S10_SUM_THREADS};
use crate::BoxError;

/// One S10 run's shape: the device array, the window the kernels work on,
/// and the iteration counts. The same for every variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct S10Config {
    /// Floats of resident device data.
    pub(crate) n: usize,
    /// The window: `x[off .. off + w)`.
    pub(crate) off: usize,
    pub(crate) w: usize,
    /// Untimed iterations before the timed ones (they change the data too).
    pub(crate) warmup: usize,
    /// Timed iterations.
    pub(crate) iters: usize,
}

impl S10Config {
    /// 64 MiB resident (4 MiB with `--quick`), a 65,536-float window in the
    /// middle, 200 warm-up and 10,000 timed iterations (1,000 with `--quick`).
    pub(crate) fn new(quick: bool) -> Self {
        let n = if quick { 4 << 18 } else { 64 << 18 };
        let w = 65_536;
        S10Config {
            n,
            off: n / 2,
            w,
            warmup: 200,
            iters: if quick { 1_000 } else { 10_000 },
        }
    }

    /// Iterations the data goes through in one run: warm-up and timed.
    pub(crate) fn total_iterations(&self) -> usize {
        self.warmup + self.iters
    }
}

/// What one run of a variant gives back.
#[derive(Debug, Clone)]
pub(crate) struct S10Run {
    /// Wall time per timed iteration, µs.
    pub(crate) us_per_iter: f64,
    /// The value read back after the last iteration.
    pub(crate) final_acc: f32,
    /// The final window, `x[off .. off + w)`.
    pub(crate) window: Vec<f32>,
}

/// One row of the S10 table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct S10Case {
    pub(crate) implementation: String,
    /// The fastest of the rounds, µs per iteration.
    pub(crate) best_us: f64,
    /// Every round, µs per iteration, in order.
    pub(crate) runs_us: Vec<f64>,
    /// best_us / the CUDA C++ graph replay's best_us.
    pub(crate) over_cxx_graph: f64,
    /// The final accumulator equalled the CPU's bit for bit (every round).
    pub(crate) acc_bit_exact: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct S10Result {
    pub(crate) resident_mib: f64,
    pub(crate) window: usize,
    pub(crate) offset: usize,
    pub(crate) warmup: usize,
    pub(crate) iters: usize,
    pub(crate) rounds: usize,
    /// The CPU's final accumulator, and the relative tolerance it was held to.
    pub(crate) reference_acc: f32,
    pub(crate) acc_tolerance: f64,
    pub(crate) cases: Vec<S10Case>,
}

pub(crate) const CXX_STREAMS: &str = "CUDA C++ streams";
pub(crate) const CXX_GRAPH: &str = "CUDA C++ graph replay";
pub(crate) const PRISM: &str = "prism";
pub(crate) const PRISM_GRAPH: &str = "prism graph replay";

/// Rounds per variant; each variant's best round is reported.
const ROUNDS: usize = 3;

/// A variant and its rounds so far.
#[derive(Debug)]
struct Entry {
    name: &'static str,
    variant: Variant,
    runs_us: Vec<f64>,
    acc_bit_exact: bool,
}

#[derive(Debug, Clone, Copy)]
enum Variant {
    /// `prism_bench_s10` in this mode.
    Cxx(i32),
    /// [`s10_prism`], with or without graph replay.
    Prism { graph: bool },
}

/// The prism side of S10: the same iterations (k1, k2, k3 through the
/// launchers `baselines::prism_s10_k1`/`k2`/`k3` on data filled by
/// `baselines::prism_s10_fill`, then the 4-byte read-back and a wait) run
/// through prism, plainly or replayed as a graph (`graph`), timed on the
/// host per timed iteration as the C++ is.
///
/// PRISM SIDE PENDING: it lands with prism's "outside work" API (work of the
/// caller's own, enqueued on prism's streams); until then there is nothing
/// to measure, and this returns `Ok(None)`, which leaves the "prism" and
/// "prism graph replay" rows out of the table and of results.json. No
/// figure is made up here.
pub(crate) fn s10_prism(
    gpu: &Gpu,
    cfg: &S10Config,
    graph: bool,
) -> Result<Option<S10Run>, BoxError> {
    let mut lane = Lane::new(gpu)?;
    // SAFETY: the buffer is written whole by `prism_s10_fill` (below, in an
    // outside-work block that names it) before anything reads it.
    let mut x = unsafe { DeviceBuffer::<f32>::uninit(gpu, cfg.n)? };
    let mut acc = DeviceBuffer::<f32>::zeroed(&mut lane, 1)?;
    {
        let mut o = lane.outside();
        let xi = o.write(&mut x);
        // SAFETY: the launcher writes x[..n] (named, n floats) on the
        // block's stream and only enqueues.
        let code = unsafe {
            o.run(|w| -> prism_stream::Result<i32> {
                let (p, n) = w.ptr_mut(&xi)?;
                Ok(baselines::prism_s10_fill(
                    p as *mut f32,
                    n as u64,
                    w.stream().cu_stream().cast(),
                ))
            })
        }??;
        launched("prism_s10_fill", code)?;
    }
    let (off, w) = (cfg.off as u64, cfg.w as u64);
    let run = |lane: &mut Lane,
               graph: &mut Option<(CapturedGraph, ReadbackKey<f32>)>,
               x: &mut DeviceBuffer<f32>,
               acc: &mut DeviceBuffer<f32>|
     -> Result<f32, BoxError> {
        match graph {
            Some((g, key)) => Ok(g.launch(lane)?.read_back(*key)?.wait_value()?),
            None => {
                let mut l = lane.launch();
                iteration(&mut l, x, acc, off, w)?;
                drop(l);
                Ok(lane.read_value(acc, 0)?)
            }
        }
    };
    let mut captured = if graph {
        let (g, key) = lane.capture(|c| {
            iteration(c, &mut x, &mut acc, off, w)?;
            c.read_back(&acc, 0, 1)
        })?;
        Some((g, key))
    } else {
        None
    };
    for _ in 0..cfg.warmup {
        run(&mut lane, &mut captured, &mut x, &mut acc)?;
    }
    let t = Instant::now();
    let mut last = f32::NAN;
    for _ in 0..cfg.iters {
        last = std::hint::black_box(run(&mut lane, &mut captured, &mut x, &mut acc)?);
    }
    let us_per_iter = t.elapsed().as_secs_f64() * 1e6 / cfg.iters as f64;
    drop(captured);
    let window = lane.read_async(&x, cfg.off, cfg.w)?.wait()?;
    Ok(Some(S10Run {
        us_per_iter,
        final_acc: last,
        window,
    }))
}

/// One S10 iteration as a user with three stages writes it: each kernel
/// an outside-work block naming what it reads and writes, on `l`'s lane.
fn iteration(
    l: &mut Launch<'_>,
    x: &mut DeviceBuffer<f32>,
    acc: &mut DeviceBuffer<f32>,
    off: u64,
    w: u64,
) -> prism_stream::Result<()> {
    {
        let mut o = l.outside();
        let xi = o.write(&mut *x);
        // SAFETY: k1 reads and writes x[off..off + w], inside x (the
        // harness's configuration), on the block's stream.
        let code = unsafe {
            o.run(|wk| -> prism_stream::Result<i32> {
                let (p, _) = wk.ptr_mut(&xi)?;
                Ok(baselines::prism_s10_k1(
                    p as *mut f32,
                    off,
                    w,
                    S10_A,
                    S10_B,
                    wk.stream().cu_stream().cast(),
                ))
            })
        }??;
        launched_stream("prism_s10_k1", code)?;
    }
    {
        let mut o = l.outside();
        let xi = o.write(&mut *x);
        // SAFETY: k2 reads and writes x[off..off + w] on the block's stream.
        let code = unsafe {
            o.run(|wk| -> prism_stream::Result<i32> {
                let (p, _) = wk.ptr_mut(&xi)?;
                Ok(baselines::prism_s10_k2(
                    p as *mut f32,
                    off,
                    w,
                    S10_C,
                    wk.stream().cu_stream().cast(),
                ))
            })
        }??;
        launched_stream("prism_s10_k2", code)?;
    }
    let mut o = l.outside();
    let (xi, ai) = (o.read(&*x), o.write(&mut *acc));
    // SAFETY: k3 reads x[off..off + w] and writes acc[0] (one float), on the
    // block's stream.
    let code = unsafe {
        o.run(|wk| -> prism_stream::Result<i32> {
            let (p, _) = wk.ptr(xi)?;
            let (a, _) = wk.ptr_mut(&ai)?;
            Ok(baselines::prism_s10_k3(
                p as *const f32,
                off,
                w,
                a as *mut f32,
                wk.stream().cu_stream().cast(),
            ))
        })
    }??;
    launched_stream("prism_s10_k3", code)
}

/// A launcher's status as the benchmark's error.
fn launched(what: &str, code: i32) -> Result<(), BoxError> {
    launched_stream(what, code).map_err(Into::into)
}

/// A launcher's status as prism's error (a user error inside outside work).
fn launched_stream(what: &str, code: i32) -> prism_stream::Result<()> {
    if code == 0 {
        return Ok(());
    }
    let message = baselines::error_message(code);
    Err(prism_stream::Error::user(format!(
        "{what}: {message} (code {code})"
    )))
}

/// The CUDA C++ baseline in `mode` (one run: allocation, fill, warm-up,
/// timed iterations, free) on the current device.
fn cxx(cfg: &S10Config, mode: i32) -> Result<S10Run, BoxError> {
    let mut window = vec![f32::NAN; cfg.w];
    let (mut us, mut acc) = (f64::NAN, f32::NAN);
    // SAFETY: `window` holds `cfg.w` floats of host memory and the two
    // outputs are live locals, all borrowed for the whole call, which is
    // synchronous (it waits for its own work and frees what it made).
    let code = unsafe {
        baselines::prism_bench_s10(
            mode,
            cfg.n as u64,
            cfg.off as u64,
            cfg.w as u64,
            cfg.warmup as u64,
            cfg.iters as u64,
            window.as_mut_ptr(),
            &mut us,
            &mut acc,
        )
    };
    if code != 0 {
        let msg = baselines::error_message(code);
        return Err(format!("prism_bench_s10(mode {mode}): {msg}").into());
    }
    Ok(S10Run {
        us_per_iter: us,
        final_acc: acc,
        window,
    })
}

/// S10's initial value at index `i` (`prism_s10_initial_value` in
/// `cuda/baselines.h`): a hash of `i`, in [-1, 1), exact in f32.
pub(crate) fn initial(i: u64) -> f32 {
    let mut h = (i as u32).wrapping_mul(0x9E37_79B9) ^ ((i >> 32) as u32);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^= h >> 16;
    (h >> 8) as f32 * (1.0 / 8_388_608.0) - 1.0
}

/// k1 then k2 on one element, as the kernels compute it.
fn step(x: f32) -> f32 {
    let x = x.mul_add(S10_A, S10_B);
    let y = x.max(0.0) + S10_C;
    y - y.floor()
}

/// k3's sum in k3's order: thread t adds `window[t]`, `window[t + T]`, ...
/// from 0.0, then a tree over the T partial sums, `p[t] += p[t + s]` for
/// s = T/2, ..., 1.
pub(crate) fn k3_sum(window: &[f32]) -> f32 {
    let t_count = S10_SUM_THREADS;
    let mut p: Vec<f32> = (0..t_count)
        .map(|t| {
            window
                .iter()
                .skip(t)
                .step_by(t_count)
                .fold(0.0f32, |s, &x| s + x)
        })
        .collect();
    let mut s = t_count / 2;
    while s > 0 {
        for t in 0..s {
            p[t] += p[t + s];
        }
        s /= 2;
    }
    p[0]
}

/// The relative tolerance for the final accumulator. The window's values
/// are in [0, 1) (no cancellation), and k3's order has height
/// k = ceil(w / T) + log2(T) (T = 1024 threads): a sum of nonnegative terms
/// in any order of height k is within γ_k ≈ k·u of the exact sum (u =
/// 2^-24, Higham), so two such orders differ by at most 2·k·u = k·ε
/// (ε = f32::EPSILON) of the sum: 8.8e-6 for w = 65,536. The CPU replays
/// k3's own order, so the expected gap is zero.
pub(crate) fn acc_tolerance(w: usize) -> f64 {
    let k = w.div_ceil(S10_SUM_THREADS) + S10_SUM_THREADS.trailing_zeros() as usize;
    k as f64 * f64::from(f32::EPSILON)
}

/// The CPU's final window and accumulator after `iterations` iterations
/// of `cfg`'s window (each element on its own: k1 and k2 are elementwise,
/// and k3 only reads).
pub(crate) fn reference(cfg: &S10Config, iterations: usize) -> (Vec<f32>, f32) {
    let window: Vec<f32> = (cfg.off..cfg.off + cfg.w)
        .into_par_iter()
        .map(|i| (0..iterations).fold(initial(i as u64), |x, _| step(x)))
        .collect();
    let acc = k3_sum(&window);
    (window, acc)
}

/// Checks one run against the CPU: the window bit for bit, the accumulator
/// within [`acc_tolerance`]. Ok(true) when the accumulator matched exactly.
fn check(
    run: &S10Run,
    window: &[f32],
    acc: f32,
    tolerance: f64,
    what: &str,
) -> Result<bool, BoxError> {
    if run.window.len() != window.len() {
        return Err(format!(
            "S10 {what}: {} floats of window came back, expected {}",
            run.window.len(),
            window.len()
        )
        .into());
    }
    let bad = run
        .window
        .iter()
        .zip(window)
        .filter(|(g, c)| g.to_bits() != c.to_bits())
        .count();
    if let Some(j) = (0..window.len()).find(|&j| run.window[j].to_bits() != window[j].to_bits()) {
        return Err(format!(
            "S10 {what}: {bad} of {} window values differ from the CPU, the first at {j}: {} (GPU) != {} (CPU)",
            window.len(),
            run.window[j],
            window[j]
        )
        .into());
    }
    let rel = (f64::from(run.final_acc) - f64::from(acc)).abs() / f64::from(acc).abs();
    if rel.is_nan() || rel > tolerance {
        return Err(format!(
            "S10 {what}: final accumulator {} differs from the CPU's {acc} by {rel:.3e} (relative; tolerance {tolerance:.3e})",
            run.final_acc
        )
        .into());
    }
    Ok(run.final_acc.to_bits() == acc.to_bits())
}

/// Runs S10: every variant `ROUNDS` times, interleaved, each round checked
/// against the CPU; a variant whose side is not there yet (a prism variant
/// returning `None`) is left out.
pub(crate) fn bench_iterations(gpu: &Gpu, quick: bool) -> Result<S10Result, BoxError> {
    let cfg = S10Config::new(quick);
    let (window, acc) = reference(&cfg, cfg.total_iterations());
    let tolerance = acc_tolerance(cfg.w);
    let entry = |name, variant| Entry {
        name,
        variant,
        runs_us: Vec::new(),
        acc_bit_exact: true,
    };
    let mut entries = vec![
        entry(CXX_STREAMS, Variant::Cxx(baselines::S10_STREAMS)),
        entry(CXX_GRAPH, Variant::Cxx(baselines::S10_GRAPH)),
        entry(PRISM, Variant::Prism { graph: false }),
        entry(PRISM_GRAPH, Variant::Prism { graph: true }),
    ];
    for _ in 0..ROUNDS {
        let mut k = 0;
        while k < entries.len() {
            let e = &mut entries[k];
            let run = match e.variant {
                Variant::Cxx(mode) => Some(cxx(&cfg, mode)?),
                Variant::Prism { graph } => s10_prism(gpu, &cfg, graph)?,
            };
            let Some(run) = run else {
                entries.remove(k);
                continue;
            };
            e.acc_bit_exact &= check(&run, &window, acc, tolerance, e.name)?;
            e.runs_us.push(run.us_per_iter);
            k += 1;
        }
    }
    let best = |runs: &[f64]| runs.iter().copied().fold(f64::INFINITY, f64::min);
    let graph_best = entries
        .iter()
        .find(|e| e.name == CXX_GRAPH)
        .map_or(f64::NAN, |e| best(&e.runs_us));
    let cases = entries
        .into_iter()
        .map(|e| S10Case {
            implementation: e.name.to_owned(),
            best_us: best(&e.runs_us),
            over_cxx_graph: best(&e.runs_us) / graph_best,
            runs_us: e.runs_us,
            acc_bit_exact: e.acc_bit_exact,
        })
        .collect();
    Ok(S10Result {
        resident_mib: (cfg.n * 4) as f64 / f64::from(1u32 << 20),
        window: cfg.w,
        offset: cfg.off,
        warmup: cfg.warmup,
        iters: cfg.iters,
        rounds: ROUNDS,
        reference_acc: acc,
        acc_tolerance: tolerance,
        cases,
    })
}

pub(crate) fn print_iterations(r: Option<&S10Result>) {
    let Some(r) = r else {
        return;
    };
    println!();
    println!(
        "S10: µs per iteration (3 small kernels over a {} KiB window of {} MiB resident data, 4-byte read-back and wait; {} iterations after {} warm-up, best of {})",
        r.window * 4 / 1024,
        r.resident_mib,
        r.iters,
        r.warmup,
        r.rounds
    );
    println!("| implementation | µs per iteration | / CUDA C++ graph replay | rounds (µs) | accumulator vs CPU |");
    println!("| --- | --- | --- | --- | --- |");
    for c in &r.cases {
        let runs: Vec<String> = c.runs_us.iter().map(|u| format!("{u:.2}")).collect();
        println!(
            "| {} | {:.2} | {:.2}x | {} | {} |",
            c.implementation,
            c.best_us,
            c.over_cxx_graph,
            runs.join(" / "),
            if c.acc_bit_exact {
                "bit for bit".to_owned()
            } else {
                format!("within {:.1e}", r.acc_tolerance)
            }
        );
    }
    let find = |name: &str| r.cases.iter().find(|c| c.implementation == name);
    match (find(PRISM_GRAPH), find(CXX_GRAPH)) {
        (Some(p), Some(g)) => println!(
            "S10 target (prism graph replay <= CUDA C++ graph replay): {:.2} vs {:.2} µs, {}",
            p.best_us,
            g.best_us,
            if p.best_us <= g.best_us {
                "met"
            } else {
                "not met"
            }
        ),
        _ => println!("S10 target (prism graph replay <= CUDA C++ graph replay): no prism graph replay figure in this run (s10_prism pending)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_matches_the_c_formula() {
        for i in (0..100_000u64).chain([1 << 32, (1 << 32) + 7, u64::MAX - 3, 0x1234_5678_9ABC]) {
            // SAFETY: host arithmetic only, compiled in every build.
            let c = unsafe { baselines::prism_s10_initial(i) };
            assert_eq!(initial(i).to_bits(), c.to_bits(), "index {i}");
            assert!((-1.0..1.0).contains(&c));
        }
    }

    #[test]
    fn step_stays_in_the_unit_interval() {
        for i in 0..10_000u64 {
            let x = step(initial(i));
            assert!((0.0..1.0).contains(&x), "{x}");
        }
    }

    #[test]
    fn k3_order_is_the_tree_over_strided_partials() {
        // Integers: every order gives the exact sum.
        let w: Vec<f32> = (0..5000).map(|i| (i % 17) as f32).collect();
        let exact: f32 = w.iter().sum();
        assert_eq!(k3_sum(&w), exact);
        // Fewer elements than threads, and none.
        assert_eq!(k3_sum(&[1.0, 2.0, 3.0]), 6.0);
        assert_eq!(k3_sum(&[]), 0.0);
    }

    #[test]
    fn k3_sum_is_within_the_tolerance_of_the_exact_sum() {
        let cfg = S10Config {
            n: 1 << 20,
            off: 12_345,
            w: 65_536,
            warmup: 0,
            iters: 3,
        };
        let (window, acc) = reference(&cfg, 3);
        let exact: f64 = window.iter().map(|&x| f64::from(x)).sum();
        let rel = (f64::from(acc) - exact).abs() / exact;
        // Half the tolerance: one order against the exact sum.
        assert!(rel <= acc_tolerance(cfg.w) / 2.0, "{rel:e}");
    }

    #[test]
    fn one_iteration_more_or_less_fails_the_check() {
        let cfg = S10Config {
            n: 1 << 16,
            off: 512,
            w: 4096,
            warmup: 200,
            iters: 2_800,
        };
        let (_, acc) = reference(&cfg, cfg.total_iterations());
        for wrong in [cfg.total_iterations() - 1, cfg.total_iterations() + 1] {
            let (_, other) = reference(&cfg, wrong);
            let rel = (f64::from(other) - f64::from(acc)).abs() / f64::from(acc);
            assert!(rel > 1000.0 * acc_tolerance(cfg.w), "{wrong}: {rel:e}");
        }
    }
}
