//! PageRank by power iteration over a graph kept on the GPU: the design's
//! iteration mode ([`ResidentPipeline`]), with a CUDA graph per iteration.
//!
//! ```text
//! cargo run --release -p prism-pipeline --example pagerank [-- --vertices 1048576 --degree 16]
//! ```
//!
//! A random directed graph (deterministic, `rand_xoshiro` seeded; one
//! vertex in 20 dangling, with no out-edge; the others with 1 to
//! 2·degree − 1 out-edges to uniform random targets) is stored as
//! pull-based CSR of in-edges, so each vertex's new rank is a gather over
//! its in-neighbours. The resident state is the CSR (`row_ptr`,
//! `col_idx`), the inverse out-degrees, `rank`, `next`, the contributions
//! and two scalars (dangling mass, residual). Each iteration is three
//! stages, each one of the kernels in `kernels/pagerank.cu` (committed as
//! PTX):
//! 1. `contributions`: `contrib[u] = rank[u] / outdeg(u)`, and the ranks of
//!    dangling vertices summed (their rank is spread over every vertex);
//! 2. `gather`: `next[v] = (1 − d)/N + d · (Σ contrib[u] over in-edges u → v
//!    + dangling/N)`;
//! 3. `residual`: the L1 norm Σ |next − rank| into one f32, and `rank = next`.
//!
//! Each iteration reads the residual back (`Iteration::wait_value`) and the
//! loop stops below `--tolerance` (1e-6) or after `--max-iterations`
//! (100). It runs twice, with CUDA graphs (one launch per iteration) and
//! without (every kernel queued by its stage, timed stage by stage), and
//! checks both against a CPU reference in f64 on the same graph: the same
//! number of iterations to the tolerance (±1: the GPU's residual is an f32
//! sum, in no fixed order) and, after as many iterations as the GPU ran,
//! every rank within `RANK_TOLERANCE` of the mean rank 1/N. Without a GPU
//! it says so and exits 0.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use prism_pipeline::{ResidentConfig, ResidentPipeline, ResidentStats};
use prism_stream::cudarc::driver::LaunchConfig;
use prism_stream::cudarc::nvrtc::Ptx;
use prism_stream::{DeviceBuffer, Gpu, Lane, Launch};
use rand::{RngExt, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use rayon::prelude::*;
use std::io::IsTerminal;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::prelude::*;

/// `pr_contrib`, `pr_gather` and `pr_residual` (see `kernels/pagerank.cu`).
const PAGERANK_PTX: &str = include_str!("kernels/pagerank.ptx");

/// Threads per block: the kernels' block reductions expect 256.
const BLOCK: u32 = 256;

/// How far a GPU rank may be from the CPU's (f64, same graph, same number
/// of iterations), as a fraction of the mean rank 1/N. The GPU computes in
/// f32: each rank is a sum of about 16 rounded terms plus the dangling
/// mass (an f32 sum in no fixed order), so each iteration adds a relative
/// error of a few 1e-7, which the iteration damps (it contracts errors by
/// the damping factor at least). A CPU model of the kernels in f32 (the
/// same formulas, sums in the kernels' order) ends within 0.7e-6 to
/// 1.4e-6 of 1/N of the f64 ranks on these graphs from 4096 to 3·10⁶
/// vertices, while one iteration more or less moves the ranks by 1.2e-5
/// (4096 vertices) to 1.2e-4 (2²⁰) of 1/N. 1e-5 lies between: about 8
/// times the rounding, and below what a skipped iteration, a lost
/// dangling term or a wrong damping would cost.
const RANK_TOLERANCE: f64 = 1e-5;

/// PageRank by power iteration on a random graph kept on the GPU, with and
/// without CUDA graphs, checked against the CPU.
#[derive(Debug, Parser)]
#[command(name = "pagerank", version)]
struct Args {
    /// Vertices of the graph
    #[arg(long, value_name = "N", default_value_t = 1 << 20)]
    vertices: u32,
    /// Mean out-degree of a vertex that has out-edges
    #[arg(long, value_name = "D", default_value_t = 16)]
    degree: u32,
    /// Damping factor
    #[arg(long, default_value_t = 0.85)]
    damping: f32,
    /// Stop once the L1 change of the ranks is below this
    #[arg(long, default_value_t = 1e-6)]
    tolerance: f32,
    /// Stop after this many iterations in any case
    #[arg(long, value_name = "N", default_value_t = 100)]
    max_iterations: usize,
    /// Seed of the graph
    #[arg(long, default_value_t = 21)]
    seed: u64,
}

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
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("prism pagerank: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.vertices == 0
        || args.degree == 0
        || args.max_iterations == 0
        || !(0.0..1.0).contains(&args.damping)
    {
        return Err(
            "--vertices, --degree and --max-iterations must be positive, --damping in [0, 1)"
                .into(),
        );
    }
    let gpu = match Gpu::open(0) {
        Ok(g) => g,
        Err(e @ (prism_stream::Error::DriverNotFound | prism_stream::Error::NoDevice)) => {
            println!("prism pagerank: no GPU here ({e}); this example keeps its graph on one.");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let t = Instant::now();
    let g = Graph::generate(args.vertices, args.degree, args.seed)?;
    println!(
        "prism pagerank: {} vertices, {} edges ({:.2} per vertex), {} dangling; generated in {:.0} ms",
        g.n,
        g.col_idx.len(),
        g.col_idx.len() as f64 / g.n as f64,
        g.out_deg.iter().filter(|&&d| d == 0).count(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut runs = Vec::new();
    for graphs in [true, false] {
        let r = gpu_pagerank(&gpu, &g, args, graphs)?;
        let s = &r.stats;
        println!(
            "prism pagerank ({}): {} iterations, residual {:.3e}; per iteration: host {:.1} us to \
             issue, GPU {:.1} us, {:.1} us wall with the wait for the residual; {} replayed from \
             the graph, {} captured",
            if graphs { "CUDA graphs" } else { "no graphs" },
            r.residuals.len(),
            r.residuals.last().copied().unwrap_or(f32::NAN),
            s.host_us_per_iteration(),
            s.gpu_us_per_iteration().unwrap_or(f64::NAN),
            r.wall_s * 1e6 / r.residuals.len().max(1) as f64,
            s.replayed,
            s.captures
        );
        let trail: Vec<String> = r.residuals.iter().map(|x| format!("{x:.1e}")).collect();
        println!("  residuals: {}", trail.join(" "));
        print!("{}", indent(&s.to_string()));
        runs.push((graphs, r));
    }
    for (graphs, r) in &runs {
        if *graphs && r.stats.replayed + 1 != r.residuals.len() as u64 {
            return Err(format!(
                "{} iterations but {} replayed from the graph",
                r.residuals.len(),
                r.stats.replayed
            )
            .into());
        }
    }

    let t = Instant::now();
    let at: Vec<usize> = runs.iter().map(|(_, r)| r.residuals.len()).collect();
    let cpu = cpu_pagerank(&g, args, &at);
    println!(
        "prism pagerank: CPU reference (f64): {} iterations to {:.0e} ({:.0} ms)",
        cpu.converged.map_or_else(
            || format!("no convergence in {}", args.max_iterations),
            |k| k.to_string()
        ),
        args.tolerance,
        t.elapsed().as_secs_f64() * 1e3
    );
    let n = g.n as f64;
    let mut ok = true;
    for ((graphs, r), want) in runs.iter().zip(&cpu.snapshots) {
        let k = r.residuals.len();
        let max_diff = r
            .rank
            .iter()
            .zip(want)
            .map(|(&a, &b)| (f64::from(a) - b).abs())
            .fold(0.0, f64::max);
        let sum: f64 = r.rank.iter().map(|&x| f64::from(x)).sum();
        let count_ok = cpu.converged.is_some_and(|c| c.abs_diff(k) <= 1);
        let rank_ok = want.len() == r.rank.len() && max_diff * n <= RANK_TOLERANCE;
        let sum_ok = (sum - 1.0).abs() <= 1e-4;
        println!(
            "prism pagerank ({}): {k} iterations (CPU {}): {}; max |rank − CPU| = {:.2e} of 1/N \
             (tolerance {RANK_TOLERANCE:.0e}): {}; ranks sum to 1 {:+.2e}: {}",
            if *graphs { "CUDA graphs" } else { "no graphs" },
            cpu.converged.map_or("-".into(), |c| c.to_string()),
            verdict(count_ok),
            max_diff * n,
            verdict(rank_ok),
            sum - 1.0,
            verdict(sum_ok),
        );
        ok &= count_ok && rank_ok && sum_ok;
    }
    if !ok {
        return Err("the GPU's PageRank differs from the CPU's".into());
    }
    println!("prism pagerank: OK");
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "WRONG"
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// A directed graph as CSR of in-edges: the in-neighbours of `v` are
/// `col_idx[row_ptr[v]..row_ptr[v + 1]]`, in increasing order.
struct Graph {
    n: u32,
    row_ptr: Vec<u32>,
    col_idx: Vec<u32>,
    out_deg: Vec<u32>,
}

impl Graph {
    /// One vertex in 20 dangling; the others with 1 to `2 * degree - 1`
    /// out-edges (mean `degree`) to uniform random targets (self-loops and
    /// repeated edges included, as a multigraph). Deterministic for a seed.
    fn generate(n: u32, degree: u32, seed: u64) -> Result<Self, Box<dyn std::error::Error>> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let out_deg: Vec<u32> = (0..n)
            .map(|_| {
                if rng.random_range(0..20u32) == 0 {
                    0
                } else {
                    rng.random_range(1..2 * degree)
                }
            })
            .collect();
        let edges: u64 = out_deg.iter().map(|&d| u64::from(d)).sum();
        if edges > u64::from(u32::MAX) {
            return Err("more than 2^32 - 1 edges: use fewer vertices or a smaller degree".into());
        }
        // The targets, drawn twice from one seed: once to count each
        // vertex's in-edges, once to place them.
        let each_edge = |f: &mut dyn FnMut(u32, u32)| {
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x5eed_ed9e);
            for (u, &d) in out_deg.iter().enumerate() {
                for _ in 0..d {
                    f(u as u32, rng.random_range(0..n));
                }
            }
        };
        let mut row_ptr = vec![0u32; n as usize + 1];
        each_edge(&mut |_, v| row_ptr[v as usize + 1] += 1);
        for v in 0..n as usize {
            row_ptr[v + 1] += row_ptr[v];
        }
        let mut cursor = row_ptr.clone();
        let mut col_idx = vec![0u32; edges as usize];
        each_edge(&mut |u, v| {
            col_idx[cursor[v as usize] as usize] = u;
            cursor[v as usize] += 1;
        });
        Ok(Self {
            n,
            row_ptr,
            col_idx,
            out_deg,
        })
    }

    /// 1 / out-degree, 0 for a dangling vertex.
    fn inv_deg(&self) -> Vec<f32> {
        self.out_deg
            .iter()
            .map(|&d| if d == 0 { 0.0 } else { 1.0 / d as f32 })
            .collect()
    }
}

/// The resident state on the GPU.
struct PageRank {
    row_ptr: DeviceBuffer<u32>,
    col_idx: DeviceBuffer<u32>,
    inv_deg: DeviceBuffer<f32>,
    rank: DeviceBuffer<f32>,
    next: DeviceBuffer<f32>,
    contrib: DeviceBuffer<f32>,
    /// The dangling vertices' rank, summed (one value).
    dangling: DeviceBuffer<f32>,
    /// Σ |next − rank| (one value, read back every iteration).
    residual: DeviceBuffer<f32>,
}

/// What one GPU run gives.
struct GpuRun {
    residuals: Vec<f32>,
    rank: Vec<f32>,
    stats: ResidentStats,
    wall_s: f64,
}

fn gpu_pagerank(
    gpu: &Gpu,
    g: &Graph,
    args: &Args,
    graphs: bool,
) -> Result<GpuRun, Box<dyn std::error::Error>> {
    let n = g.n;
    let module = gpu.load_module(Ptx::from_src(PAGERANK_PTX))?;
    let (contrib_k, gather_k, residual_k) = (
        module.kernel("pr_contrib")?,
        module.kernel("pr_gather")?,
        module.kernel("pr_residual")?,
    );
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let config = ResidentConfig {
        graphs,
        timing: true,
    };
    let mut p = ResidentPipeline::new(gpu, config, |lane: &mut Lane| {
        Ok(PageRank {
            row_ptr: DeviceBuffer::from_slice(lane, &g.row_ptr)?,
            col_idx: DeviceBuffer::from_slice(lane, &g.col_idx)?,
            inv_deg: DeviceBuffer::from_slice(lane, &g.inv_deg())?,
            rank: DeviceBuffer::from_slice(lane, &vec![1.0 / n as f32; n as usize])?,
            next: DeviceBuffer::zeroed(lane, n as usize)?,
            contrib: DeviceBuffer::zeroed(lane, n as usize)?,
            dangling: DeviceBuffer::zeroed(lane, 1)?,
            residual: DeviceBuffer::zeroed(lane, 1)?,
        })
    })?;
    p.add_stage(
        "contributions",
        move |l: &mut Launch<'_>, s: &mut PageRank| {
            l.fill(&mut s.dangling, 0, 1, 0.0f32)?;
            // SAFETY: the arguments match pr_contrib(const float *rank, const
            // float *inv_deg, float *contrib, float *dangling, unsigned n);
            // rank, inv_deg and contrib hold n elements and dangling one; the
            // grid covers n in blocks of 256, as the kernel's reduction needs,
            // and the kernel touches only v < n.
            unsafe {
                l.kernel(&contrib_k)
                    .arg(&s.rank)
                    .arg(&s.inv_deg)
                    .arg_mut(&mut s.contrib)
                    .arg_mut(&mut s.dangling)
                    .value(n)
                    .launch(cfg)
            }?;
            Ok(())
        },
    );
    let damping = args.damping;
    p.add_stage("gather", move |l: &mut Launch<'_>, s: &mut PageRank| {
        // SAFETY: the arguments match pr_gather(const unsigned *row_ptr,
        // const unsigned *col_idx, const float *contrib, const float
        // *dangling, float *next, unsigned n, float damping); row_ptr holds
        // n + 1 non-decreasing offsets ending at col_idx's length and every
        // col_idx entry is below n (Graph::generate builds them so), contrib
        // and next hold n elements, dangling one; the kernel touches only
        // v < n.
        unsafe {
            l.kernel(&gather_k)
                .arg(&s.row_ptr)
                .arg(&s.col_idx)
                .arg(&s.contrib)
                .arg(&s.dangling)
                .arg_mut(&mut s.next)
                .value(n)
                .value(damping)
                .launch(cfg)
        }?;
        Ok(())
    });
    p.add_stage("residual", move |l: &mut Launch<'_>, s: &mut PageRank| {
        l.fill(&mut s.residual, 0, 1, 0.0f32)?;
        // SAFETY: the arguments match pr_residual(const float *next, float
        // *rank, float *residual, unsigned n); next and rank hold n
        // elements, residual one; the grid covers n in blocks of 256, as
        // the kernel's reduction needs, and the kernel touches only v < n.
        unsafe {
            l.kernel(&residual_k)
                .arg(&s.next)
                .arg_mut(&mut s.rank)
                .arg_mut(&mut s.residual)
                .value(n)
                .launch(cfg)
        }?;
        Ok(())
    });
    p.set_readback(|s: &PageRank| (&s.residual, 0..1));

    let started = Instant::now();
    let mut residuals = Vec::new();
    for _ in 0..args.max_iterations {
        let residual = p.execute_iteration()?.wait_value()?;
        residuals.push(residual);
        if residual < args.tolerance {
            break;
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    p.synchronize()?;
    let stats = p.get_stats().clone();
    let state = p.into_state()?;
    let mut lane = Lane::new(gpu)?;
    let rank = lane.read_async(&state.rank, 0, n as usize)?.wait()?;
    Ok(GpuRun {
        residuals,
        rank,
        stats,
        wall_s,
    })
}

/// The CPU reference: iterations to the tolerance, and the ranks after
/// each number of iterations asked for.
struct CpuRun {
    converged: Option<usize>,
    snapshots: Vec<Vec<f64>>,
}

/// Power iteration in f64 with the same formula as the kernels, until the
/// tolerance is met and every snapshot is taken (or `max_iterations`).
fn cpu_pagerank(g: &Graph, args: &Args, at: &[usize]) -> CpuRun {
    let n = g.n as usize;
    let d = f64::from(args.damping);
    let inv_deg: Vec<f64> = g
        .out_deg
        .iter()
        .map(|&k| if k == 0 { 0.0 } else { 1.0 / f64::from(k) })
        .collect();
    let mut rank = vec![1.0 / n as f64; n];
    let mut next = vec![0.0f64; n];
    let mut contrib = vec![0.0f64; n];
    let mut snapshots = vec![Vec::new(); at.len()];
    let mut converged = None;
    let last = at.iter().copied().max().unwrap_or(0);
    for k in 1..=args.max_iterations {
        contrib
            .par_iter_mut()
            .zip(&rank)
            .zip(&inv_deg)
            .for_each(|((c, r), w)| *c = r * w);
        let dangling: f64 = rank
            .iter()
            .zip(&g.out_deg)
            .filter(|(_, &deg)| deg == 0)
            .map(|(r, _)| r)
            .sum();
        let base = (1.0 - d) / n as f64;
        next.par_iter_mut().enumerate().for_each(|(v, x)| {
            let edges = g.row_ptr[v] as usize..g.row_ptr[v + 1] as usize;
            let s: f64 = g.col_idx[edges].iter().map(|&u| contrib[u as usize]).sum();
            *x = base + d * (s + dangling / n as f64);
        });
        let residual: f64 = next.iter().zip(&rank).map(|(a, b)| (a - b).abs()).sum();
        std::mem::swap(&mut rank, &mut next);
        for (snap, &a) in snapshots.iter_mut().zip(at) {
            if a == k {
                snap.clone_from(&rank);
            }
        }
        if converged.is_none() && residual < f64::from(args.tolerance) {
            converged = Some(k);
        }
        if converged.is_some() && k >= last {
            break;
        }
    }
    CpuRun {
        converged,
        snapshots,
    }
}
