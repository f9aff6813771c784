//! Randomized differential runs of stage graphs: random DAGs (1-12 nodes,
//! each a stage reading any earlier node, the input included, or a join of
//! 2-3 earlier nodes; 1-6 outputs, taps on inner nodes, the input itself,
//! duplicates), random chunk sizes that divide nothing, ring depths 2-8,
//! timing and trace on or off, ramps on or off, inputs of 0, 1, a few and
//! many elements with ragged tails. Each configuration is compared bit for
//! bit with a plain sequential CPU evaluation of its graph over the same
//! chunks (`fma_chain_cpu`, `f32::clamp`, an in-order group sum, `mul_add`:
//! never the stages' own host forms), and `graph_output_lens` and
//! `StageGraph::buffers_per_slot` are checked against an independent count
//! of the values alive at once.
//!
//! Stages: `Fma`, `Clamp`, `GroupSum` (shrinks, so chunk boundaries show),
//! the user PTX `scale_add` (GPU) or a host closure (host). Joins: the user
//! PTX `combine` (`out = a * x + b * y`, folded over a third input through
//! a scratch buffer) through `GpuJoinFn` on the GPU and the same sum
//! through `HostJoinFn` on the host, over inputs of one length (the
//! generator tracks each node's length as `ceil(len / P)`, `P` the product
//! of the group sizes above it, and joins only nodes of equal `P`); and a
//! join of inputs of any lengths that combines their first `min(lens)`
//! elements (an `output_len` of its own, not elementwise).
//!
//! Graphs the pipeline must refuse fail with their typed error instead: a
//! node of the other backend (`Unsupported`, naming the node), more than 16
//! values alive at once on the GPU (`GraphTooWide`, from rarer wide graphs of up to 24
//! nodes), a one-length join over inputs whose lengths differ (`Stage`,
//! naming the join and the chunk). Nodes no output depends on never run and
//! are never refused.
//!
//! Every configuration comes from one seed. A failure prints it; replay one
//! with `PRISM_GRAPH_SEED=<seed>` (and the same test name). Set the count
//! with `PRISM_GRAPH_CONFIGS=<n>`, the first seed with
//! `PRISM_GRAPH_BASE=<seed>`.
//!
//! `host_graph_differential` runs on the host backend (CI; 300
//! configurations in a debug build, 1,000 in a release one);
//! `gpu_graph_differential` on the GPU, `run_graph` then `run_graph_pinned`
//! on the same manager (300 configurations; 40 with `PRISM_TEST_SCALE=small`,
//! as under compute-sanitizer). Over a full default range, each run also
//! checks that every kind of graph and refusal above came up at least once.

use std::collections::BTreeMap;

mod common;
use common::draws::{log_size, rng, Draw};
use prism_pipeline::{
    Backend, Clamp, Error, Fma, GpuFn, GpuJoinFn, GroupSum, HostFn, HostJoinFn, Join, NodeId,
    PipelineConfig, PipelineStageManager, StageError, StageGraph,
};
use prism_stream::cudarc::driver::LaunchConfig;
use prism_stream::cudarc::nvrtc::Ptx;
use prism_stream::{
    fma_chain_cpu, DeviceBuffer, Gpu, HostAllocFlags, Kernel, Lane, Launch, PinnedBuffer,
};
use prism_testing::{gpu_or_skip, random_f32, scaled};
use proptest::test_runner::TestRng;

/// The most device buffers a ring slot holds (prism-buffer's
/// `MAX_BUFFERS_PER_SLOT`, as `GraphTooWide` reports it).
const MAX_BUFFERS: usize = 16;

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
    /// The example user PTX `scale_add` (`y = fmaf(a, x, b)`): GPU only (on
    /// the host a `GpuFn` stand-in that must be refused).
    UserPtx {
        a: f32,
        b: f32,
    },
    /// A host closure (`y = x * x - 0.5`): host only (refused on the GPU).
    HostSquare,
}

impl StageSpec {
    /// Whether the stage runs on this backend.
    fn runs_on(self, gpu: bool) -> bool {
        match self {
            StageSpec::UserPtx { .. } => gpu,
            StageSpec::HostSquare => !gpu,
            _ => true,
        }
    }

    /// Elementwise and as long as its input: cannot tell where chunks begin.
    fn boundary_free(self) -> bool {
        !matches!(self, StageSpec::GroupSum { .. })
    }

    fn name(self) -> &'static str {
        match self {
            StageSpec::Fma { .. } => "fma",
            StageSpec::Clamp { .. } => "clamp",
            StageSpec::GroupSum { .. } => "group_sum",
            StageSpec::UserPtx { .. } => "user scale_add",
            StageSpec::HostSquare => "square",
        }
    }

    /// The reference: a sequential CPU loop (not the stage's host form).
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
enum JoinKind {
    /// `combine` folded over the inputs, which must have one length (the
    /// default `output_len`); elementwise. Through `GpuJoinFn` on the GPU,
    /// `HostJoinFn` on the host.
    Combine,
    /// The same over the first `min(lens)` elements of inputs of any
    /// lengths: an `output_len` of its own, not elementwise.
    CombineMin,
}

#[derive(Debug, Clone, PartialEq)]
enum NodeSpec {
    Stage {
        from: usize,
        stage: StageSpec,
    },
    Join {
        from: Vec<usize>,
        kind: JoinKind,
        a: f32,
        b: f32,
        /// A `Combine` of the other backend only (`HostJoinFn` on the GPU,
        /// a `GpuJoinFn` stand-in on the host): must be refused.
        foreign: bool,
    },
}

impl NodeSpec {
    fn inputs(&self) -> &[usize] {
        match self {
            NodeSpec::Stage { from, .. } => std::slice::from_ref(from),
            NodeSpec::Join { from, .. } => from,
        }
    }

    fn base_name(&self) -> &'static str {
        match self {
            NodeSpec::Stage { stage, .. } => stage.name(),
            NodeSpec::Join {
                kind: JoinKind::Combine,
                ..
            } => "combine",
            NodeSpec::Join {
                kind: JoinKind::CombineMin,
                ..
            } => "combine_min",
        }
    }
}

/// The join's element: `a * x + b * y` with one rounding of the sum, as the
/// `combine` kernel's `fmaf(a, x, b * y)`.
fn combine_cpu(a: f32, b: f32, x: f32, y: f32) -> f32 {
    a.mul_add(x, b * y)
}

/// How a configuration must end: refused with a typed error, or run.
#[derive(Debug)]
enum Expect {
    /// `Error::Unsupported` naming the first live node of the other backend.
    Unsupported(String),
    /// `Error::GraphTooWide` with this many buffers.
    TooWide(usize),
    /// `Error::Stage` from a one-length join over differing lengths, in
    /// `chunk`; `in_lens`: `graph_output_lens` fails too (a chunk of the
    /// run), else only the run: a run also sizes its buffers from a full
    /// chunk's lengths, so a graph whose join gets differing lengths only
    /// at a full chunk is refused (as chunk 0) even when the input is
    /// shorter than a chunk or empty, while `graph_output_lens` answers.
    JoinLengths {
        stage: String,
        chunk: u64,
        in_lens: bool,
    },
    Run,
}

#[derive(Debug, Clone)]
struct Config {
    seed: u64,
    gpu: bool,
    n: usize,
    chunk_elems: usize,
    slots: usize,
    ramp: bool,
    timing: bool,
    trace: bool,
    host_threads: usize,
    adaptive: bool,
    cuda_graphs: bool,
    /// `concurrent_branches(false)`: every node on the chunk's lane, the
    /// fewest buffers.
    one_lane: bool,
    /// Node `i + 1` of the graph (node 0 is the input).
    nodes: Vec<NodeSpec>,
    outputs: Vec<usize>,
}

impl Config {
    fn random(seed: u64, gpu: bool, small: bool) -> Config {
        let r = &mut rng(seed, 0x6B);
        // Rarely, a wide graph: many nodes, many outputs (GraphTooWide).
        let wide = r.chance(0.08);
        // Sometimes only nodes that cannot see chunk boundaries (ramps).
        let elementwise = r.chance(0.15);
        let max_n = if small { 1 << 14 } else { 1 << 20 };
        let (n, chunk_elems) = match r.below(if elementwise { 5 } else { 10 }) {
            // Long enough for ramps (chunks of >= 4 x 4096, >= 4 chunks).
            0 => {
                let chunk = log_size(r, 1 << 14, if small { 20_000 } else { 1 << 18 });
                let n = chunk * 4 + r.below(chunk as u64 * if small { 2 } else { 8 }) as usize;
                (n, chunk)
            }
            // Whole chunks, one more or one less.
            1 => {
                let chunk = log_size(r, 1, 4096);
                let k = 1 + r.below(5) as usize;
                let n = (chunk * k + r.below(3) as usize).saturating_sub(1);
                (n, chunk)
            }
            k => {
                let n = match k {
                    2 => 0,
                    3 => 1 + r.below(16) as usize,
                    _ => log_size(r, 1, max_n),
                };
                // Chunk sizes that divide nothing in particular, but not so
                // small that a run needs more than a few thousand chunks.
                let chunk = log_size(r, (n / 2000).max(1), (n.max(2) * 2).min(1 << 18));
                (n, chunk)
            }
        };
        let count = if wide {
            14 + r.below(11) as usize
        } else {
            1 + r.below(12) as usize
        };
        // Each node's length over a chunk of L elements is ceil(L / P[i]).
        let mut per: Vec<u64> = vec![1];
        let mut nodes = Vec::new();
        let pick = |r: &mut TestRng, i: usize| -> usize {
            if !wide && r.chance(0.45) {
                i - 1
            } else {
                r.below(i as u64) as usize
            }
        };
        for i in 1..=count {
            let foreign = r.chance(0.02);
            if r.chance(if wide { 0.15 } else { 0.3 }) {
                let arity = 2 + r.below(2) as usize;
                let (a, b) = (r.float(-1.5, 1.5), r.float(-1.5, 1.5));
                let first = pick(r, i);
                let (kind, from) = if !elementwise && r.chance(0.2) {
                    let from: Vec<usize> = (0..arity)
                        .map(|k| if k == 0 { first } else { pick(r, i) })
                        .collect();
                    (JoinKind::CombineMin, from)
                } else if r.chance(0.05) {
                    // Any inputs: differing lengths must be refused.
                    let from = (0..arity)
                        .map(|k| if k == 0 { first } else { pick(r, i) })
                        .collect();
                    (JoinKind::Combine, from)
                } else {
                    // Only nodes of the first one's length (itself included).
                    let same: Vec<usize> = (0..i).filter(|&p| per[p] == per[first]).collect();
                    let from = (0..arity)
                        .map(|k| {
                            if k == 0 {
                                first
                            } else {
                                same[r.below(same.len() as u64) as usize]
                            }
                        })
                        .collect();
                    (JoinKind::Combine, from)
                };
                per.push(match kind {
                    JoinKind::Combine => per[first],
                    JoinKind::CombineMin => from.iter().map(|&p| per[p]).max().unwrap_or(1),
                });
                nodes.push(NodeSpec::Join {
                    from,
                    kind,
                    a,
                    b,
                    foreign: foreign && kind == JoinKind::Combine,
                });
            } else {
                let from = pick(r, i);
                let stage = if foreign {
                    if gpu {
                        StageSpec::HostSquare
                    } else {
                        StageSpec::UserPtx {
                            a: r.float(-2.0, 2.0),
                            b: r.float(-1.0, 1.0),
                        }
                    }
                } else {
                    match r.below(10) {
                        0..=2 => StageSpec::Fma {
                            a: r.float(-1.5, 1.5),
                            b: r.float(-1.0, 1.0),
                            iters: r.below(9) as u32,
                        },
                        3 | 4 => {
                            let lo = r.float(-1.0, 0.5);
                            StageSpec::Clamp {
                                lo,
                                hi: lo + r.float(0.01, 1.0),
                            }
                        }
                        5 | 6 if !elementwise => StageSpec::GroupSum {
                            group: if r.chance(0.1) {
                                1 + r.below(5000) as u32
                            } else {
                                1 + r.below(64) as u32
                            },
                        },
                        5 | 6 => StageSpec::Fma {
                            a: r.float(-1.5, 1.5),
                            b: r.float(-1.0, 1.0),
                            iters: 1 + r.below(3) as u32,
                        },
                        _ if gpu => StageSpec::UserPtx {
                            a: r.float(-2.0, 2.0),
                            b: r.float(-1.0, 1.0),
                        },
                        _ => StageSpec::HostSquare,
                    }
                };
                per.push(match stage {
                    StageSpec::GroupSum { group } => per[from].saturating_mul(group as u64),
                    _ => per[from],
                });
                nodes.push(NodeSpec::Stage { from, stage });
            }
        }
        let outputs = if wide {
            // Most nodes an output: often more values than a slot holds.
            (0..=count)
                .filter(|&i| r.chance(if i == 0 { 0.3 } else { 0.8 }))
                .collect::<Vec<_>>()
        } else {
            Vec::new()
        };
        let outputs = if outputs.is_empty() {
            (0..1 + r.below(6))
                .map(|_| match r.below(20) {
                    0..=2 => 0,
                    3..=9 => count,
                    _ => r.below(count as u64 + 1) as usize,
                })
                .collect()
        } else {
            outputs
        };
        let timing = r.chance(0.7);
        let slots = 2 + r.below(7) as usize;
        let ramp = r.chance(0.5);
        let trace = timing && r.chance(0.3);
        let host_threads = 1 + r.below(3) as usize;
        let adaptive = r.chance(0.2);
        let cuda_graphs = r.chance(0.2);
        // Drawn last, so that the draws above are those of earlier trees.
        let one_lane = r.chance(0.3);
        Config {
            seed,
            gpu,
            n,
            chunk_elems,
            slots,
            ramp,
            timing,
            trace,
            host_threads,
            // Neither applies to graph runs: they must change nothing.
            adaptive,
            cuda_graphs,
            one_lane,
            nodes,
            outputs,
        }
    }

    fn pipeline_config(&self) -> PipelineConfig {
        PipelineConfig {
            chunk_bytes: self.chunk_elems * 4,
            slots: self.slots,
            ramp: self.ramp,
            timing: self.timing,
            trace: self.trace,
            host_threads: self.host_threads,
            adaptive: self.adaptive,
            graphs: self.cuda_graphs,
        }
    }

    /// Node `i`'s spec (`None` for the input).
    fn node(&self, i: usize) -> Option<&NodeSpec> {
        i.checked_sub(1).map(|k| &self.nodes[k])
    }

    /// Which nodes an output depends on.
    fn live(&self) -> Vec<bool> {
        let mut live = vec![false; self.nodes.len() + 1];
        for &o in &self.outputs {
            live[o] = true;
        }
        for i in (1..live.len()).rev() {
            if live[i] {
                for &p in self.nodes[i - 1].inputs() {
                    live[p] = true;
                }
            }
        }
        live
    }

    /// The names the graph gives its nodes: a name already taken gets
    /// " (node i)".
    fn names(&self) -> Vec<String> {
        let mut names = vec!["input".to_owned()];
        for (k, n) in self.nodes.iter().enumerate() {
            let base = n.base_name();
            if names.iter().any(|x| x == base) {
                names.push(format!("{base} (node {})", k + 1));
            } else {
                names.push(base.to_owned());
            }
        }
        names
    }

    /// The most values alive at once, counted directly: while node `i`
    /// runs, its own and every earlier live value that is an output or is
    /// still to be read by node `i` or a later live node. (Each value lives
    /// over an interval of node order, and intervals that all meet one
    /// point can share no buffer, so no plan needs fewer; handing buffers
    /// out in node order needs no more, the interval graph's clique size.)
    fn max_alive(&self, live: &[bool]) -> usize {
        let total = self.nodes.len() + 1;
        let mut last_read: Vec<Option<usize>> = vec![None; total];
        for (k, node) in self.nodes.iter().enumerate() {
            if live[k + 1] {
                for &p in node.inputs() {
                    last_read[p] = Some(k + 1);
                }
            }
        }
        (0..total)
            .filter(|&i| live[i])
            .map(|i| {
                (0..=i)
                    .filter(|&v| {
                        live[v]
                            && (v == i
                                || self.outputs.contains(&v)
                                || last_read[v].is_some_and(|l| l >= i))
                    })
                    .count()
            })
            .max()
            .unwrap_or(1)
    }

    /// True when no live node can tell where chunks begin.
    fn boundary_free(&self, live: &[bool]) -> bool {
        (1..live.len())
            .filter(|&i| live[i])
            .all(|i| match self.node(i) {
                Some(NodeSpec::Stage { stage, .. }) => stage.boundary_free(),
                Some(NodeSpec::Join { kind, .. }) => *kind == JoinKind::Combine,
                None => true,
            })
    }

    /// Every live node's length over a chunk of `len` elements; `Err(i)`
    /// when one-length join `i` (the first, in node order) gets differing
    /// lengths.
    fn lengths(&self, live: &[bool], len: usize) -> Result<Vec<usize>, usize> {
        let mut lens = vec![0usize; self.nodes.len() + 1];
        lens[0] = len;
        for i in 1..lens.len() {
            if !live[i] {
                continue;
            }
            lens[i] = match &self.nodes[i - 1] {
                NodeSpec::Stage {
                    from,
                    stage: StageSpec::GroupSum { group },
                } => lens[*from].div_ceil(*group as usize),
                NodeSpec::Stage { from, .. } => lens[*from],
                NodeSpec::Join { from, kind, .. } => {
                    let ls: Vec<usize> = from.iter().map(|&p| lens[p]).collect();
                    let min = ls.iter().copied().min().unwrap_or(0);
                    if *kind == JoinKind::Combine && ls.iter().any(|&l| l != min) {
                        return Err(i);
                    }
                    min
                }
            };
        }
        Ok(lens)
    }

    /// The reference: the graph evaluated node by node over one chunk;
    /// each output's values.
    fn evaluate(&self, live: &[bool], x: &[f32]) -> Vec<Vec<f32>> {
        let mut vals: Vec<Vec<f32>> = vec![x.to_vec()];
        for (k, node) in self.nodes.iter().enumerate() {
            if !live[k + 1] {
                vals.push(Vec::new());
                continue;
            }
            let v = match node {
                NodeSpec::Stage { from, stage } => stage.apply(&vals[*from]),
                NodeSpec::Join { from, a, b, .. } => {
                    let len = from.iter().map(|&p| vals[p].len()).min().unwrap_or(0);
                    (0..len)
                        .map(|j| {
                            let first = combine_cpu(*a, *b, vals[from[0]][j], vals[from[1]][j]);
                            from[2..]
                                .iter()
                                .fold(first, |acc, &p| combine_cpu(*a, *b, acc, vals[p][j]))
                        })
                        .collect()
                }
            };
            vals.push(v);
        }
        self.outputs.iter().map(|&o| vals[o].clone()).collect()
    }

    /// How the pipeline cuts `n` elements for the reference: one piece when
    /// no live node sees boundaries (ramps may cut it any way), else flat
    /// chunks.
    fn pieces(&self, live: &[bool]) -> Vec<std::ops::Range<usize>> {
        if self.boundary_free(live) {
            return if self.n == 0 {
                Vec::new()
            } else {
                std::iter::once(0..self.n).collect()
            };
        }
        (0..self.n)
            .step_by(self.chunk_elems)
            .map(|s| s..(s + self.chunk_elems).min(self.n))
            .collect()
    }

    /// What a run must do, and (for `Expect::Run`, and for a refusal that
    /// `graph_output_lens` does not see) each output's reference lengths.
    fn expect(&self) -> (Expect, Option<Vec<usize>>) {
        let live = self.live();
        let names = self.names();
        for i in 1..live.len() {
            let runs = match &self.nodes[i - 1] {
                NodeSpec::Stage { stage, .. } => stage.runs_on(self.gpu),
                NodeSpec::Join { foreign, .. } => !foreign,
            };
            if live[i] && !runs {
                return (Expect::Unsupported(names[i].clone()), None);
            }
        }
        // Only a GPU slot has a limit; the host backend runs wide graphs.
        let wide = self.max_alive(&live);
        if self.gpu && wide > MAX_BUFFERS {
            return (Expect::TooWide(wide), None);
        }
        let mut totals = vec![0usize; self.outputs.len()];
        for (c, piece) in self.pieces(&live).into_iter().enumerate() {
            match self.lengths(&live, piece.len()) {
                Ok(lens) => {
                    for (t, &o) in totals.iter_mut().zip(&self.outputs) {
                        *t += lens[o];
                    }
                }
                Err(j) => {
                    let e = Expect::JoinLengths {
                        stage: names[j].clone(),
                        chunk: c as u64,
                        in_lens: true,
                    };
                    return (e, None);
                }
            }
        }
        // A run also sizes its buffers from a full chunk's lengths.
        if let Err(j) = self.lengths(&live, self.chunk_elems) {
            let e = Expect::JoinLengths {
                stage: names[j].clone(),
                chunk: 0,
                in_lens: false,
            };
            return (e, Some(totals));
        }
        (Expect::Run, Some(totals))
    }

    /// The reference outputs over the whole input (`Expect::Run` only).
    fn reference(&self, input: &[f32]) -> Vec<Vec<f32>> {
        let live = self.live();
        let mut outs = vec![Vec::new(); self.outputs.len()];
        for piece in self.pieces(&live) {
            for (o, v) in outs.iter_mut().zip(self.evaluate(&live, &input[piece])) {
                o.extend(v);
            }
        }
        outs
    }

    /// Whether a run of this configuration ramps its chunk sizes.
    fn ramps(&self) -> bool {
        // The ramp's rule (a run of at least four chunks, chunks of at
        // least four 4096-element groups): its first chunk is a quarter.
        self.ramp
            && self.boundary_free(&self.live())
            && self.chunk_elems / 4 >= 4096
            && self.n / 4 >= self.chunk_elems
    }
}

/// The example kernels, loaded once per GPU test.
struct Kernels {
    gpu: Gpu,
    scale_add: Kernel,
    combine: Kernel,
}

impl Kernels {
    fn load(gpu: &Gpu) -> Kernels {
        let load = |src: &str, name: &str| {
            gpu.load_module(Ptx::from_src(src))
                .and_then(|m| m.kernel(name))
                .expect("the example PTX loads")
        };
        Kernels {
            gpu: gpu.clone(),
            scale_add: load(
                include_str!("../examples/kernels/scale_add.ptx"),
                "scale_add",
            ),
            combine: load(include_str!("../examples/kernels/combine.ptx"), "combine"),
        }
    }
}

/// `out[..n] = a * x[..n] + b * y[..n]` by the user kernel `combine`.
#[allow(clippy::too_many_arguments)]
fn launch_combine(
    l: &mut Launch<'_>,
    kernel: &Kernel,
    x: &DeviceBuffer<f32>,
    y: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<f32>,
    n: usize,
    a: f32,
    b: f32,
) -> Result<(), StageError> {
    let call = l.kernel(kernel).arg(x).arg(y).arg_mut(out);
    let call = call.value(n as u64).value(a).value(b);
    // SAFETY: the arguments match combine(const float*, const float*,
    // float*, unsigned long long, float, float); every buffer holds >= n
    // elements (the pipeline's and the scratch hold a chunk, and no node is
    // longer) and the kernel checks its index against n.
    unsafe { call.launch(LaunchConfig::for_num_elems(n as u32)) }?;
    Ok(())
}

/// `combine` folded over 2 or 3 inputs on the GPU: a third input goes
/// through a scratch buffer of the join's own (ordered like the chunk's
/// buffers, across the two compute lanes).
struct GpuCombine {
    kernel: Kernel,
    a: f32,
    b: f32,
    scratch: Option<DeviceBuffer<f32>>,
}

impl GpuCombine {
    fn new(k: &Kernels, arity: usize, a: f32, b: f32, chunk: usize) -> GpuCombine {
        let scratch = (arity > 2).then(|| {
            let mut lane = Lane::new(&k.gpu).expect("a lane");
            DeviceBuffer::zeroed(&mut lane, chunk.max(1)).expect("a scratch buffer")
        });
        GpuCombine {
            kernel: k.combine.clone(),
            a,
            b,
            scratch,
        }
    }

    fn run(
        &mut self,
        l: &mut Launch<'_>,
        ins: &[&DeviceBuffer<f32>],
        n: usize,
        out: &mut DeviceBuffer<f32>,
    ) -> Result<(), StageError> {
        let (k, a, b) = (&self.kernel, self.a, self.b);
        match (ins, self.scratch.as_mut()) {
            ([x, y], _) => launch_combine(l, k, x, y, out, n, a, b),
            ([x, y, z], Some(s)) => {
                launch_combine(l, k, x, y, s, n, a, b)?;
                launch_combine(l, k, s, z, out, n, a, b)
            }
            _ => Err(format!("combine of {} inputs", ins.len()).into()),
        }
    }
}

/// `combine` folded over the inputs on the host.
fn host_combine(a: f32, b: f32, ins: &[&[f32]], out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        let mut acc = a.mul_add(ins[0][j], b * ins[1][j]);
        for x in &ins[2..] {
            acc = a.mul_add(acc, b * x[j]);
        }
        *o = acc;
    }
}

/// The join over inputs of any lengths: their first `min(lens)` elements.
struct CombineMin {
    a: f32,
    b: f32,
    gpu: Option<GpuCombine>,
}

impl Join<f32> for CombineMin {
    fn name(&self) -> &str {
        "combine_min"
    }
    fn output_len(&self, lens: &[usize]) -> Result<usize, StageError> {
        lens.iter().copied().min().ok_or_else(|| "no inputs".into())
    }
    fn has_gpu(&self) -> bool {
        self.gpu.is_some()
    }
    fn has_host(&self) -> bool {
        true
    }
    fn gpu(
        &mut self,
        launch: &mut Launch<'_>,
        inputs: &[&DeviceBuffer<f32>],
        lens: &[usize],
        output: &mut DeviceBuffer<f32>,
    ) -> Result<(), StageError> {
        let n = self.output_len(lens)?;
        match &mut self.gpu {
            Some(g) => g.run(launch, inputs, n, output),
            None => Err("combine_min: no kernel".into()),
        }
    }
    fn host(&self, inputs: &[&[f32]], output: &mut [f32]) -> Result<(), StageError> {
        host_combine(self.a, self.b, inputs, output);
        Ok(())
    }
}

/// A GPU form that must never run (a GPU-only node on the host backend).
fn never(what: &str) -> StageError {
    format!("{what} ran on the host backend").into()
}

/// Builds the configuration's graph (`kernels` on the GPU).
fn build(c: &Config, kernels: Option<&Kernels>) -> Result<StageGraph<f32>, String> {
    let mut g = StageGraph::<f32>::new();
    g.concurrent_branches(!c.one_lane);
    let mut ids: Vec<NodeId> = vec![g.input()];
    let e = |e: Error| format!("building the graph failed: {e}");
    for spec in &c.nodes {
        let id = match spec {
            NodeSpec::Stage { from, stage } => {
                let from = ids[*from];
                match *stage {
                    StageSpec::Fma { a, b, iters } => g.stage(from, Fma { a, b, iters }),
                    StageSpec::Clamp { lo, hi } => g.stage(from, Clamp { lo, hi }),
                    StageSpec::GroupSum { group } => g.stage(from, GroupSum { group }),
                    StageSpec::UserPtx { a, b } => match kernels {
                        Some(k) => {
                            let kernel = k.scale_add.clone();
                            g.stage(
                                from,
                                GpuFn::new(
                                    "user scale_add",
                                    true,
                                    move |l: &mut Launch<'_>,
                                          x: &DeviceBuffer<f32>,
                                          y: &mut DeviceBuffer<f32>,
                                          n| {
                                        let call = l.kernel(&kernel).arg(x).arg_mut(y);
                                        let call = call.value(n as u64).value(a).value(b);
                                        // SAFETY: the arguments match
                                        // scale_add(const float*, float*,
                                        // unsigned long long, float, float);
                                        // both buffers hold >= n elements and
                                        // the kernel checks its index.
                                        unsafe {
                                            call.launch(LaunchConfig::for_num_elems(n as u32))
                                        }?;
                                        Ok(())
                                    },
                                ),
                            )
                        }
                        None => g.stage(
                            from,
                            GpuFn::new(
                                "user scale_add",
                                true,
                                |_: &mut Launch<'_>,
                                 _: &DeviceBuffer<f32>,
                                 _: &mut DeviceBuffer<f32>,
                                 _| Err(never("user scale_add")),
                            ),
                        ),
                    },
                    StageSpec::HostSquare => g.stage(
                        from,
                        HostFn::new("square", true, |x: &[f32], y: &mut [f32]| {
                            for (o, v) in y.iter_mut().zip(x) {
                                *o = v * v - 0.5;
                            }
                            Ok(())
                        }),
                    ),
                }
            }
            NodeSpec::Join {
                from,
                kind,
                a,
                b,
                foreign,
            } => {
                let from: Vec<NodeId> = from.iter().map(|&p| ids[p]).collect();
                let (a, b) = (*a, *b);
                let on_gpu = kernels.is_some() != *foreign;
                match (kind, on_gpu, kernels) {
                    (JoinKind::CombineMin, _, k) => g.join(
                        &from,
                        CombineMin {
                            a,
                            b,
                            gpu: k.map(|k| GpuCombine::new(k, from.len(), a, b, c.chunk_elems)),
                        },
                    ),
                    (JoinKind::Combine, true, Some(k)) => {
                        let mut gc = GpuCombine::new(k, from.len(), a, b, c.chunk_elems);
                        g.join(
                            &from,
                            GpuJoinFn::new(
                                "combine",
                                true,
                                move |l: &mut Launch<'_>,
                                      ins: &[&DeviceBuffer<f32>],
                                      lens: &[usize],
                                      out: &mut DeviceBuffer<f32>| {
                                    gc.run(l, ins, lens[0], out)
                                },
                            ),
                        )
                    }
                    (JoinKind::Combine, true, None) => g.join(
                        &from,
                        GpuJoinFn::new(
                            "combine",
                            true,
                            |_: &mut Launch<'_>,
                             _: &[&DeviceBuffer<f32>],
                             _: &[usize],
                             _: &mut DeviceBuffer<f32>| {
                                Err(never("combine"))
                            },
                        ),
                    ),
                    (JoinKind::Combine, false, _) => g.join(
                        &from,
                        HostJoinFn::new("combine", true, move |ins: &[&[f32]], out: &mut [f32]| {
                            host_combine(a, b, ins, out);
                            Ok(())
                        }),
                    ),
                }
            }
        }
        .map_err(e)?;
        ids.push(id);
    }
    for (k, &o) in c.outputs.iter().enumerate() {
        let at = g.output(ids[o]).map_err(e)?;
        if at != k {
            return Err(format!("output {k} was given index {at}"));
        }
    }
    let names = c.names();
    for (i, id) in ids.iter().enumerate() {
        let got = g.name(*id).map_err(e)?;
        if got != names[i] {
            return Err(format!(
                "node {i} is named {got:?}, expected {:?}",
                names[i]
            ));
        }
    }
    Ok(g)
}

fn compare(what: &str, got: &[f32], want: &[f32]) -> Result<(), String> {
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
}

/// Whether `e` is the refusal `expect` asks for.
fn refused_as(e: &Error, expect: &Expect, gpu: bool) -> bool {
    match (expect, e) {
        (Expect::Unsupported(name), Error::Unsupported { stage, backend }) => {
            stage == name && *backend == if gpu { "GPU" } else { "host" }
        }
        (Expect::TooWide(n), Error::GraphTooWide { buffers, max }) => {
            buffers == n && *max == MAX_BUFFERS
        }
        (
            Expect::JoinLengths { stage, chunk, .. },
            Error::Stage {
                stage: s, chunk: c, ..
            },
        ) => s == stage && c == chunk,
        _ => false,
    }
}

/// Runs one configuration; `Err` says how it differed from the reference.
fn check(c: &Config, kernels: Option<&Kernels>) -> Result<(), String> {
    let input = random_f32(c.seed ^ 0x6EA9, c.n);
    let live = c.live();
    let alive = c.max_alive(&live);
    let (expect, lens) = c.expect();
    let mut g = build(c, kernels)?;

    // Buffers per slot: on one lane exactly the values alive at once;
    // with concurrent branches at least that and at most a slot's worth
    // (extra buffers only while they fit); too wide exactly when the values
    // alive at once do not fit.
    let fits = |b: usize| match c.one_lane {
        true => b == alive,
        false => alive <= b && b <= MAX_BUFFERS,
    };
    let too_wide = |b: usize| match c.one_lane {
        true => b == alive,
        false => b >= alive,
    };
    match g.buffers_per_slot() {
        Ok(b) if alive <= MAX_BUFFERS && fits(b) => {}
        Err(Error::GraphTooWide { buffers, max })
            if alive > MAX_BUFFERS && too_wide(buffers) && max == MAX_BUFFERS => {}
        r => {
            return Err(format!(
                "buffers_per_slot: {r:?}, but {alive} values are alive at once (at most {MAX_BUFFERS} fit; one lane: {})",
                c.one_lane
            ))
        }
    }

    let config = c.pipeline_config();
    let mut m = match kernels {
        Some(k) => PipelineStageManager::with_gpu(&k.gpu, config),
        None => PipelineStageManager::new(Backend::Host, config),
    }
    .map_err(|e| format!("making the manager failed: {e}"))?;

    // graph_output_lens: the reference's lengths, or the refusal.
    let in_lens_refused = match &expect {
        Expect::Run => false,
        Expect::JoinLengths { in_lens, .. } => *in_lens,
        _ => true,
    };
    match (m.graph_output_lens(&g, c.n), in_lens_refused) {
        (Ok(got), false) => {
            let want = lens.clone().unwrap_or_default();
            if got != want {
                return Err(format!(
                    "graph_output_lens: {got:?}, the reference {want:?}"
                ));
            }
        }
        (Err(e), true) if refused_as(&e, &expect, c.gpu) => {}
        (r, _) => return Err(format!("graph_output_lens: {r:?}, expected {expect:?}")),
    }

    let out_lens = lens.unwrap_or_else(|| vec![0; c.outputs.len()]);
    let want = match expect {
        Expect::Run => Some(c.reference(&input)),
        _ => None,
    };
    let check_outputs = |what: &str, got: &[&[f32]]| -> Result<(), String> {
        let want = want.as_ref().expect("a run expected");
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            let node = c.outputs[k];
            compare(&format!("{what}: output {k} (node {node})"), g, w)?;
        }
        Ok(())
    };

    // run_graph (pageable).
    let mut outs: Vec<Vec<f32>> = out_lens.iter().map(|&l| vec![f32::NAN; l]).collect();
    let r = {
        let mut dsts: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
        m.run_graph(&mut g, &input, &mut dsts)
    };
    match (r, &expect) {
        (Ok(()), Expect::Run) => {
            let got: Vec<&[f32]> = outs.iter().map(|o| &o[..]).collect();
            check_outputs("run_graph", &got)?;
        }
        (Err(e), Expect::Run) => return Err(format!("run_graph failed: {e}")),
        (Err(e), _) if refused_as(&e, &expect, c.gpu) => {}
        (r, _) => return Err(format!("run_graph: {r:?}, expected {expect:?}")),
    }

    // run_graph_pinned on the same manager (pinned buffers are never empty).
    if let Some(k) = kernels.filter(|_| c.n > 0) {
        let pin = |e: prism_stream::Error| format!("pinned buffer: {e}");
        let src =
            PinnedBuffer::from_slice(&k.gpu, &input, HostAllocFlags::PORTABLE).map_err(pin)?;
        let mut outs: Vec<PinnedBuffer<f32>> = out_lens
            .iter()
            .map(|&l| PinnedBuffer::new(&k.gpu, l.max(1), HostAllocFlags::PORTABLE))
            .collect::<Result<_, _>>()
            .map_err(pin)?;
        let r = {
            let mut dsts: Vec<&mut PinnedBuffer<f32>> = outs.iter_mut().collect();
            m.run_graph_pinned(&mut g, &src, &mut dsts)
        };
        match (r, &expect) {
            (Ok(()), Expect::Run) => {
                let got: Vec<&[f32]> = outs
                    .iter()
                    .map(|o| o.wait_slice())
                    .collect::<Result<_, _>>()
                    .map_err(pin)?;
                check_outputs("run_graph_pinned", &got)?;
            }
            (Err(e), Expect::Run) => return Err(format!("run_graph_pinned failed: {e}")),
            (Err(e), _) if refused_as(&e, &expect, true) => {}
            (r, _) => return Err(format!("run_graph_pinned: {r:?}, expected {expect:?}")),
        }
    }
    Ok(())
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// What the configurations covered, by kind (printed, and checked over a
/// full default range).
fn tally(c: &Config, counts: &mut BTreeMap<&'static str, u32>) {
    let mut add = |k: &'static str, on: bool| {
        if on {
            *counts.entry(k).or_insert(0) += 1;
        }
    };
    let live = c.live();
    let (expect, _) = c.expect();
    let joins = |pred: &dyn Fn(&JoinKind, usize) -> bool| {
        c.nodes
            .iter()
            .enumerate()
            .any(|(k, n)| matches!(n, NodeSpec::Join { kind, from, .. } if live[k + 1] && pred(kind, from.len())))
    };
    add("run", matches!(expect, Expect::Run));
    add(
        "refused: unsupported",
        matches!(expect, Expect::Unsupported(_)),
    );
    add("refused: too wide", matches!(expect, Expect::TooWide(_)));
    add(
        "wider than a GPU slot, run on the host",
        !c.gpu && c.max_alive(&live) > MAX_BUFFERS && matches!(expect, Expect::Run),
    );
    add(
        "refused: join lengths",
        matches!(expect, Expect::JoinLengths { .. }),
    );
    add(
        "refused: join lengths (a full chunk only)",
        matches!(expect, Expect::JoinLengths { in_lens: false, .. }),
    );
    add(
        "dead node of the other backend",
        c.nodes.iter().enumerate().any(|(k, n)| {
            !live[k + 1]
                && match n {
                    NodeSpec::Stage { stage, .. } => !stage.runs_on(c.gpu),
                    NodeSpec::Join { foreign, .. } => *foreign,
                }
        }),
    );
    add(
        "only the input is output",
        c.outputs.iter().all(|&o| o == 0),
    );
    add("n = 0", c.n == 0);
    add("n = 1", c.n == 1);
    add(
        "ragged tail",
        !c.n.is_multiple_of(c.chunk_elems) && c.n > c.chunk_elems,
    );
    add("ramped", c.ramps());
    add("boundaries matter", !c.boundary_free(&live));
    add(
        "join of 2",
        joins(&|k, a| *k == JoinKind::Combine && a == 2),
    );
    add(
        "join of 3",
        joins(&|k, a| *k == JoinKind::Combine && a == 3),
    );
    add("min join", joins(&|k, _| *k == JoinKind::CombineMin));
    add(
        "join reads a node twice",
        c.nodes.iter().enumerate().any(|(k, n)| {
            live[k + 1]
                && matches!(n, NodeSpec::Join { from, .. } if (1..from.len()).any(|j| from[..j].contains(&from[j])))
        }),
    );
    add(
        "fan-out",
        (0..live.len()).any(|p| {
            c.nodes
                .iter()
                .enumerate()
                .filter(|(k, n)| live[k + 1] && n.inputs().contains(&p))
                .count()
                > 1
        }),
    );
    add(
        "tap",
        c.outputs.iter().any(|&o| {
            o > 0
                && c.nodes
                    .iter()
                    .enumerate()
                    .any(|(k, n)| live[k + 1] && n.inputs().contains(&o))
        }),
    );
    add("input as output", c.outputs.contains(&0));
    add(
        "duplicate output",
        (1..c.outputs.len()).any(|j| c.outputs[..j].contains(&c.outputs[j])),
    );
    add("dead node", live.iter().any(|&l| !l));
    add("several outputs", c.outputs.len() > 1);
}

/// Runs `count` configurations from `base` (or the one `PRISM_GRAPH_SEED`);
/// panics with every failing seed.
fn graph_differential(test: &str, kernels: Option<&Kernels>, count: u64, small: bool) {
    let single = env_u64("PRISM_GRAPH_SEED");
    let seeds: Vec<u64> = match single {
        Some(s) => vec![s],
        None => {
            let base = env_u64("PRISM_GRAPH_BASE").unwrap_or(1);
            let n = env_u64("PRISM_GRAPH_CONFIGS").unwrap_or(count);
            (base..base + n).collect()
        }
    };
    let started = std::time::Instant::now();
    let mut report = Vec::new();
    let mut counts = BTreeMap::new();
    for &seed in &seeds {
        let c = Config::random(seed, kernels.is_some(), small);
        tally(&c, &mut counts);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&c, kernels)));
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
            report.push(format!(
                "seed {seed}: {e}\n  config: {c:?}\n  replay: PRISM_GRAPH_SEED={seed} cargo test -p prism-pipeline --test graph_differential {test}"
            ));
        }
    }
    println!(
        "{test}: {} configurations in {:.1} s, {} mismatches; covered: {counts:?}",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        report.len()
    );
    assert!(report.is_empty(), "{}", report.join("\n"));
    // The default range must reach every kind of graph and refusal.
    if single.is_none() && seeds.len() as u64 >= count && count >= 200 {
        let wide = if kernels.is_some() {
            "refused: too wide"
        } else {
            "wider than a GPU slot, run on the host"
        };
        for kind in [
            wide,
            "run",
            "refused: unsupported",
            "refused: join lengths",
            "n = 0",
            "n = 1",
            "ragged tail",
            "ramped",
            "boundaries matter",
            "join of 2",
            "join of 3",
            "min join",
            "join reads a node twice",
            "fan-out",
            "tap",
            "input as output",
            "duplicate output",
            "dead node",
            "dead node of the other backend",
            "only the input is output",
        ] {
            assert!(
                counts.get(kind).copied().unwrap_or(0) > 0,
                "{test}: no configuration covered {kind:?}: {counts:?}"
            );
        }
    }
}

#[test]
fn host_graph_differential() {
    let count = if cfg!(debug_assertions) { 300 } else { 1000 };
    graph_differential("host_graph_differential", None, count, true);
}

#[test]
fn gpu_graph_differential() {
    let Some(ctx) = gpu_or_skip("gpu_graph_differential") else {
        return;
    };
    let kernels = Kernels::load(ctx.gpu());
    let count = scaled(300, 40) as u64;
    let small = scaled(0, 1) == 1;
    graph_differential("gpu_graph_differential", Some(&kernels), count, small);
}

#[test]
fn graph_configurations_replay_from_their_seed() {
    for gpu in [false, true] {
        let a = Config::random(42, gpu, false);
        let b = Config::random(42, gpu, false);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
    assert_eq!(random_f32(42 ^ 0x6EA9, 100), random_f32(42 ^ 0x6EA9, 100));
}
