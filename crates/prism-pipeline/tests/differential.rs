//! Randomized differential runs: random configurations (chunk sizes that
//! divide nothing, ring depths 2-8, stage chains of built-in,
//! length-changing, user-PTX and host-only stages, every input mode, the
//! adaptive configuration, ramps, timing, one GPU or several), each
//! compared bit for bit with a sequential CPU reference. A configuration
//! the pipeline must refuse (items through a stage that is not
//! elementwise, a GPU-only mode on the host) must fail with its typed
//! error instead.
//!
//! Every configuration comes from one seed. A failure prints it; replay
//! one with `PRISM_DIFF_SEED=<seed>` (and the same test name). Set the
//! count with `PRISM_DIFF_CONFIGS=<n>`, the first seed with
//! `PRISM_DIFF_BASE=<seed>`.
//!
//! `host_differential` runs on the host backend (CI); `gpu_differential`
//! on the GPU (1,000 configurations; 60 under compute-sanitizer).

use std::sync::atomic::{AtomicU64, Ordering};

mod common;
use common::draws::{log_size, rng, Draw};
use prism_pipeline::{
    fill_with, sink_fn, Backend, Clamp, Error, Fma, GpuFn, GroupSum, HostFn, MultiGpuPipeline,
    PipelineConfig, PipelineStageManager,
};
use prism_stream::cudarc::driver::LaunchConfig;
use prism_stream::cudarc::nvrtc::Ptx;
use prism_stream::{fma_chain_cpu, DeviceBuffer, Gpu, HostAllocFlags, Launch, PinnedBuffer};
use prism_testing::{gpu_or_skip, random_f32, scaled};

#[derive(Debug, Clone, Copy, PartialEq)]
enum StageSpec {
    Fma {
        a: f32,
        b: f32,
        iters: u32,
    },
    Clamp {
        lo: f32,
        hi: f32,
    },
    GroupSum {
        group: u32,
    },
    /// The example user PTX (`y = fmaf(a, x, b)`), GPU only.
    UserPtx {
        a: f32,
        b: f32,
    },
    /// A closure on the host (`y = x * x - 0.5`), host only.
    HostSquare,
}

impl StageSpec {
    fn elementwise(self) -> bool {
        !matches!(self, StageSpec::GroupSum { .. })
    }

    fn apply(self, x: &[f32]) -> Vec<f32> {
        match self {
            StageSpec::Fma { a, b, iters } => {
                x.iter().map(|&v| fma_chain_cpu(v, a, b, iters)).collect()
            }
            StageSpec::Clamp { lo, hi } => x.iter().map(|&v| v.clamp(lo, hi)).collect(),
            StageSpec::GroupSum { group } => x
                .chunks(group as usize)
                .map(|g| g.iter().fold(0.0f32, |s, v| s + v))
                .collect(),
            StageSpec::UserPtx { a, b } => x.iter().map(|&v| a.mul_add(v, b)).collect(),
            StageSpec::HostSquare => x.iter().map(|&v| v * v - 0.5).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Slice,
    Pinned,
    Items,
    ItemsPinned,
    Stream,
    Iterate,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Host,
    Gpu,
    /// `MultiGpuPipeline` over every GPU of the machine.
    AllGpus,
}

#[derive(Debug, Clone)]
struct Config {
    seed: u64,
    target: Target,
    mode: Mode,
    n: usize,
    chunk_elems: usize,
    slots: usize,
    ramp: bool,
    adaptive: bool,
    timing: bool,
    stages: Vec<StageSpec>,
}

impl Config {
    fn random(seed: u64, gpu: bool, user_ptx: bool, small: bool) -> Config {
        let r = &mut rng(seed, 0x9D);
        let target = if !gpu {
            Target::Host
        } else if r.chance(0.2) {
            Target::AllGpus
        } else {
            Target::Gpu
        };
        let modes: &[Mode] = match target {
            Target::Host => &[Mode::Slice, Mode::Items, Mode::Stream, Mode::Iterate],
            Target::Gpu => &[
                Mode::Slice,
                Mode::Pinned,
                Mode::Items,
                Mode::ItemsPinned,
                Mode::Stream,
                Mode::Iterate,
            ],
            Target::AllGpus => &[Mode::Slice, Mode::Pinned, Mode::Items, Mode::Stream],
        };
        let mode = modes[r.below(modes.len() as u64) as usize];
        let max_n = if small { 1 << 14 } else { 1 << 20 };
        let n = match r.below(10) {
            0 => 0,
            1 => 1 + r.below(16) as usize,
            _ => log_size(r, 1, max_n),
        };
        // Chunk sizes that divide nothing in particular, but not so small
        // that a run needs more than a few thousand chunks.
        let chunk_elems = log_size(r, (n / 2000).max(1), (n.max(2) * 2).min(1 << 18));
        let mut stages = Vec::new();
        for _ in 0..1 + r.below(4) {
            let s = match r.below(if target == Target::Host { 4 } else { 5 }) {
                0 | 1 => StageSpec::Fma {
                    a: r.float(-1.5, 1.5),
                    b: r.float(-1.0, 1.0),
                    iters: r.below(9) as u32,
                },
                2 => {
                    let lo = r.float(-1.0, 0.5);
                    StageSpec::Clamp {
                        lo,
                        hi: lo + r.float(0.01, 1.0),
                    }
                }
                3 if target == Target::Host && r.chance(0.5) => StageSpec::HostSquare,
                3 => StageSpec::GroupSum {
                    group: 1 + r.below(64) as u32,
                },
                _ if user_ptx => StageSpec::UserPtx {
                    a: r.float(-2.0, 2.0),
                    b: r.float(-1.0, 1.0),
                },
                _ => StageSpec::GroupSum {
                    group: 1 + r.below(64) as u32,
                },
            };
            stages.push(s);
        }
        Config {
            seed,
            target,
            mode,
            n,
            chunk_elems,
            slots: 2 + r.below(7) as usize,
            ramp: r.chance(0.5),
            adaptive: r.chance(0.3),
            timing: r.chance(0.7),
            stages,
        }
    }

    fn elementwise(&self) -> bool {
        self.stages.iter().all(|s| s.elementwise())
    }

    fn pipeline_config(&self) -> PipelineConfig {
        PipelineConfig {
            chunk_bytes: self.chunk_elems * 4,
            slots: self.slots,
            ramp: self.ramp,
            adaptive: self.adaptive,
            timing: self.timing,
            host_threads: 2,
            ..PipelineConfig::default()
        }
    }

    /// The CPU reference of one chunk (or item).
    fn reference(&self, x: &[f32]) -> Vec<f32> {
        let mut v = x.to_vec();
        for s in &self.stages {
            if v.is_empty() {
                break;
            }
            v = s.apply(&v);
        }
        v
    }

    /// The reference of a whole input cut into pieces of `chunk` elements
    /// (elementwise chains do not care how it is cut).
    fn reference_chunked(&self, x: &[f32], chunk: usize) -> Vec<f32> {
        if self.elementwise() {
            return self.reference(x);
        }
        x.chunks(chunk.max(1))
            .flat_map(|c| self.reference(c))
            .collect()
    }
}

/// Either pipeline, with what a configuration needs of it.
enum Pipe {
    One(Box<PipelineStageManager<f32>>),
    Multi(MultiGpuPipeline<f32>),
}

fn user_ptx_stage(gpu: &Gpu, a: f32, b: f32) -> impl prism_pipeline::Stage<f32> {
    let kernel = gpu
        .load_module(Ptx::from_src(include_str!(
            "../examples/kernels/scale_add.ptx"
        )))
        .and_then(|m| m.kernel("scale_add"))
        .expect("the example PTX loads");
    GpuFn::new(
        "user scale_add",
        true,
        move |l: &mut Launch<'_>, x: &DeviceBuffer<f32>, y: &mut DeviceBuffer<f32>, n| {
            let call = l.kernel(&kernel).arg(x).arg_mut(y);
            let call = call.value(n as u64).value(a).value(b);
            // SAFETY: the arguments match scale_add(const float*, float*,
            // unsigned long long, float, float); both buffers hold >= n
            // elements and the kernel checks its index against n.
            unsafe { call.launch(LaunchConfig::for_num_elems(n as u32)) }?;
            Ok(())
        },
    )
}

fn build(c: &Config, gpus: &[Gpu]) -> prism_pipeline::Result<Pipe> {
    let config = c.pipeline_config();
    let mut pipe = match c.target {
        Target::Host => Pipe::One(Box::new(PipelineStageManager::new(Backend::Host, config)?)),
        Target::Gpu => Pipe::One(Box::new(PipelineStageManager::with_gpu(&gpus[0], config)?)),
        Target::AllGpus => Pipe::Multi(MultiGpuPipeline::with_gpus(gpus, config)?),
    };
    for &s in &c.stages {
        match (&mut pipe, s) {
            (Pipe::One(p), StageSpec::Fma { a, b, iters }) => {
                p.add_stage(Fma { a, b, iters });
            }
            (Pipe::One(p), StageSpec::Clamp { lo, hi }) => {
                p.add_stage(Clamp { lo, hi });
            }
            (Pipe::One(p), StageSpec::GroupSum { group }) => {
                p.add_stage(GroupSum { group });
            }
            (Pipe::One(p), StageSpec::UserPtx { a, b }) => {
                let gpu = p.gpu().cloned().expect("a GPU manager");
                p.add_stage(user_ptx_stage(&gpu, a, b));
            }
            (Pipe::One(p), StageSpec::HostSquare) => {
                p.add_stage(HostFn::new("square", true, |x: &[f32], y: &mut [f32]| {
                    for (o, v) in y.iter_mut().zip(x) {
                        *o = v * v - 0.5;
                    }
                    Ok(())
                }));
            }
            (Pipe::Multi(p), StageSpec::Fma { a, b, iters }) => {
                p.add_stage(Fma { a, b, iters });
            }
            (Pipe::Multi(p), StageSpec::Clamp { lo, hi }) => {
                p.add_stage(Clamp { lo, hi });
            }
            (Pipe::Multi(p), StageSpec::GroupSum { group }) => {
                p.add_stage(GroupSum { group });
            }
            (Pipe::Multi(p), StageSpec::UserPtx { a, b }) => {
                p.add_stage_with(|gpu| user_ptx_stage(gpu, a, b));
            }
            (Pipe::Multi(_), StageSpec::HostSquare) => unreachable!("host-only stage on a GPU"),
        }
    }
    Ok(pipe)
}

/// Runs one configuration; `Err` says how it differed from the reference.
fn check(c: &Config, gpus: &[Gpu]) -> Result<(), String> {
    let input = random_f32(c.seed ^ 0xD1FF, c.n);
    let mut pipe = build(c, gpus).map_err(|e| format!("building the pipeline failed: {e}"))?;
    let compare = |what: &str, got: &[f32], want: &[f32]| -> Result<(), String> {
        if got.len() != want.len() {
            return Err(format!(
                "{what}: {} elements, the reference has {}",
                got.len(),
                want.len()
            ));
        }
        match got
            .iter()
            .zip(want)
            .position(|(a, b)| a.to_bits() != b.to_bits())
        {
            None => Ok(()),
            Some(i) => Err(format!(
                "{what}: element {i} is {}, the reference {}",
                got[i], want[i]
            )),
        }
    };
    let rs = &mut rng(c.seed ^ 0x5EED, 0x9D);
    match c.mode {
        Mode::Slice => {
            let (total, chunk) = match &pipe {
                Pipe::One(p) => (p.total_output_len(c.n), c.chunk_elems),
                Pipe::Multi(p) => (p.total_output_len(c.n), c.chunk_elems),
            };
            let mut out = vec![f32::NAN; total];
            let r = match &mut pipe {
                Pipe::One(p) => p.run(&input, &mut out),
                Pipe::Multi(p) => p.run(&input, &mut out),
            };
            r.map_err(|e| format!("run failed: {e}"))?;
            compare("run", &out, &c.reference_chunked(&input, chunk))
        }
        Mode::Pinned => {
            let gpu = &gpus[0];
            let total = match &pipe {
                Pipe::One(p) => p.total_output_len(c.n),
                Pipe::Multi(p) => p.total_output_len(c.n),
            };
            if c.n == 0 {
                // Pinned buffers cannot be empty (ZeroLength): nothing to run.
                return Ok(());
            }
            let src = PinnedBuffer::from_slice(gpu, &input, HostAllocFlags::PORTABLE)
                .map_err(|e| e.to_string())?;
            let mut dst = PinnedBuffer::<f32>::new(gpu, total.max(1), HostAllocFlags::PORTABLE)
                .map_err(|e| e.to_string())?;
            if total == 0 {
                return Ok(());
            }
            let r = match &mut pipe {
                Pipe::One(p) => p.run_pinned(&src, &mut dst),
                Pipe::Multi(p) => p.run_pinned(&src, &mut dst),
            };
            r.map_err(|e| format!("run_pinned failed: {e}"))?;
            let got = dst.wait_slice().map_err(|e| e.to_string())?;
            compare(
                "run_pinned",
                got,
                &c.reference_chunked(&input, c.chunk_elems),
            )
        }
        Mode::Items | Mode::ItemsPinned => {
            // Items of random lengths (some empty), each at most a chunk.
            let chunk = c.chunk_elems;
            let mut lens = Vec::new();
            let mut at = 0;
            while at < c.n {
                let len = (rs.below(chunk as u64 + 1) as usize).min(c.n - at);
                lens.push(len);
                at += len;
            }
            let want: Vec<Vec<f32>> = {
                let mut at = 0;
                lens.iter()
                    .map(|&l| {
                        let w = c.reference(&input[at..at + l]);
                        at += l;
                        w
                    })
                    .collect()
            };
            let refused = !c.elementwise();
            let result: Result<Vec<Vec<f32>>, prism_pipeline::Error> = if c.mode == Mode::Items {
                let mut outs: Vec<Vec<f32>> = lens.iter().map(|&l| vec![f32::NAN; l]).collect();
                let mut ins = Vec::new();
                let mut at = 0;
                for &l in &lens {
                    ins.push(&input[at..at + l]);
                    at += l;
                }
                let items = ins
                    .iter()
                    .copied()
                    .zip(outs.iter_mut().map(|o| o.as_mut_slice()));
                let r = match &mut pipe {
                    Pipe::One(p) => p.run_items(items),
                    Pipe::Multi(p) => p.run_items(items),
                };
                r.map(|_| outs)
            } else {
                let Pipe::One(p) = &mut pipe else {
                    unreachable!()
                };
                let gpu = &gpus[0];
                let mut ins = Vec::new();
                let mut outs = Vec::new();
                let mut at = 0;
                for &l in lens.iter().filter(|&&l| l > 0) {
                    ins.push(
                        PinnedBuffer::from_slice(gpu, &input[at..at + l], HostAllocFlags::DEFAULT)
                            .map_err(|e| e.to_string())?,
                    );
                    outs.push(
                        PinnedBuffer::<f32>::new(gpu, l, HostAllocFlags::DEFAULT)
                            .map_err(|e| e.to_string())?,
                    );
                    at += l;
                }
                // (empty items cannot be pinned buffers: they are left out,
                // and their references are empty too)
                let r = p.run_items_pinned(ins.iter().zip(outs.iter_mut()));
                r.and_then(|_| {
                    let mut got = Vec::new();
                    let mut k = 0;
                    for &l in &lens {
                        if l == 0 {
                            got.push(Vec::new());
                        } else {
                            got.push(outs[k].wait_slice()?.to_vec());
                            k += 1;
                        }
                    }
                    Ok(got)
                })
            };
            match (result, refused) {
                (Err(Error::Unsupported { .. }), true) => Ok(()),
                (Err(e), true) if matches!(&e, Error::Device { source, .. } if matches!(**source, Error::Unsupported { .. })) => {
                    Ok(())
                }
                (Ok(_), true) => Err(
                    "items through a stage that is not elementwise ran instead of being refused"
                        .into(),
                ),
                (Err(e), _) => Err(format!("items failed: {e}")),
                (Ok(got), false) => {
                    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                        compare(&format!("item {k}"), g, w)?;
                    }
                    Ok(())
                }
            }
        }
        Mode::Stream => {
            // The source hands out pieces of random sizes (1 ..= the slot).
            let mut fed = 0usize;
            let mut pieces = Vec::new();
            let mut src_rng = rng(c.seed ^ 0x50_0CE, 0x9D);
            let source = fill_with(|dst: &mut [f32]| {
                let room = dst.len().min(c.n - fed);
                if room == 0 {
                    return Ok::<_, std::convert::Infallible>(0);
                }
                let len = 1 + src_rng.below(room as u64) as usize;
                dst[..len].copy_from_slice(&input[fed..fed + len]);
                pieces.push(fed..fed + len);
                fed += len;
                Ok(len)
            });
            let mut got = Vec::new();
            let mut next = 0u64;
            let mut order_ok = true;
            let sink = sink_fn(|index: u64, data: &[f32]| {
                order_ok &= index == next;
                next += 1;
                got.push(data.to_vec());
                Ok::<_, std::convert::Infallible>(())
            });
            let r = match &mut pipe {
                Pipe::One(p) => p.run_stream(source, sink).map(|_| ()),
                Pipe::Multi(p) => p.run_stream(source, sink).map(|_| ()),
            };
            r.map_err(|e| format!("run_stream failed: {e}"))?;
            if !order_ok {
                return Err("the sink saw chunks out of order".into());
            }
            if got.len() != pieces.len() {
                return Err(format!(
                    "{} chunks delivered, {} filled",
                    got.len(),
                    pieces.len()
                ));
            }
            for (k, (g, p)) in got.iter().zip(&pieces).enumerate() {
                compare(
                    &format!("stream chunk {k}"),
                    g,
                    &c.reference(&input[p.clone()]),
                )?;
            }
            Ok(())
        }
        Mode::Iterate => {
            let Pipe::One(p) = &mut pipe else {
                unreachable!()
            };
            let mut outs = Vec::new();
            let mut pieces = Vec::new();
            let mut at = 0;
            while at < c.n {
                let len = (1 + rs.below(c.chunk_elems as u64) as usize).min(c.n - at);
                pieces.push(at..at + len);
                outs.extend(
                    p.execute_iteration(&input[at..at + len])
                        .map_err(|e| format!("execute_iteration failed: {e}"))?,
                );
                at += len;
            }
            outs.extend(p.flush().map_err(|e| format!("flush failed: {e}"))?);
            if outs.len() != pieces.len() {
                return Err(format!(
                    "{} outputs for {} chunks",
                    outs.len(),
                    pieces.len()
                ));
            }
            for (k, (o, piece)) in outs.iter().zip(&pieces).enumerate() {
                if o.index != k as u64 {
                    return Err(format!("output {k} came back as chunk {}", o.index));
                }
                let data = o.data.as_deref().unwrap_or(&[]);
                compare(
                    &format!("iteration {k}"),
                    data,
                    &c.reference(&input[piece.clone()]),
                )?;
            }
            Ok(())
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs `count` configurations from `base` (or the one `PRISM_DIFF_SEED`);
/// returns how many ran, and panics with every failing seed.
fn differential(test: &str, gpus: &[Gpu], count: u64, small: bool) -> u64 {
    let user_ptx = !gpus.is_empty();
    let seeds: Vec<u64> = match env_u64("PRISM_DIFF_SEED") {
        Some(s) => vec![s],
        None => {
            let base = env_u64("PRISM_DIFF_BASE").unwrap_or(1);
            let n = env_u64("PRISM_DIFF_CONFIGS").unwrap_or(count);
            (base..base + n).collect()
        }
    };
    let failures = AtomicU64::new(0);
    let mut report = Vec::new();
    let mut modes = std::collections::BTreeMap::new();
    for &seed in &seeds {
        let c = Config::random(seed, !gpus.is_empty(), user_ptx, small);
        *modes
            .entry(format!("{:?}/{:?}", c.target, c.mode))
            .or_insert(0u32) += 1;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&c, gpus)));
        let failed = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(p) => Some(format!(
                "panicked: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default()
            )),
        };
        if let Some(e) = failed {
            failures.fetch_add(1, Ordering::Relaxed);
            report.push(format!(
                "seed {seed}: {e}\n  config: {c:?}\n  replay: PRISM_DIFF_SEED={seed} cargo test --release -p prism-pipeline --test differential {test}"
            ));
        }
    }
    println!(
        "{test}: {} configurations, {} mismatches; by target/mode: {modes:?}",
        seeds.len(),
        failures.load(Ordering::Relaxed)
    );
    assert!(report.is_empty(), "{}", report.join("\n"));
    seeds.len() as u64
}

#[test]
fn host_differential() {
    let count = if cfg!(debug_assertions) { 150 } else { 1000 };
    differential("host_differential", &[], count, true);
}

#[test]
fn gpu_differential() {
    let Some(_ctx) = gpu_or_skip("gpu_differential") else {
        return;
    };
    let gpus: Vec<Gpu> = (0..prism_stream::device_count().unwrap())
        .map(|o| Gpu::open(o).unwrap())
        .collect();
    let count = scaled(1000, 60) as u64;
    let small = scaled(0, 1) == 1;
    let ran = differential("gpu_differential", &gpus, count, small);
    assert!(ran >= count.min(1) || std::env::var("PRISM_DIFF_SEED").is_ok());
}

#[test]
fn configurations_replay_from_their_seed() {
    let a = Config::random(42, true, true, false);
    let b = Config::random(42, true, true, false);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    assert_eq!(random_f32(42 ^ 0xD1FF, 100), random_f32(42 ^ 0xD1FF, 100));
}
