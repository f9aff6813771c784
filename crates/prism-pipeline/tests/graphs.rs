//! Stage graphs: fan-out, a join, a tap and several outputs, checked
//! element by element against a CPU reference on random data, on the host
//! backend (CI) and on the GPU (pageable and pinned), each scenario written
//! once for both (`host_*` runs everywhere, `gpu_*` prints SKIPPED without
//! a GPU); and the misuses a graph run must refuse with a typed error.

use prism_pipeline::{
    Backend, Clamp, Error, Fma, GpuFn, GpuJoinFn, GroupSum, HostFn, HostJoinFn, Join, NodeId,
    PipelineConfig, PipelineStageManager, Stage, StageError, StageGraph,
};
use prism_stream::cudarc::driver::LaunchConfig;
use prism_stream::cudarc::nvrtc::Ptx;
use prism_stream::{fma_chain_cpu, DeviceBuffer, Gpu, HostAllocFlags, Launch, PinnedBuffer};
use prism_testing::{gpu_or_skip, random_f32, scaled, under_sanitizer};

mod common;
use common::TestBackend;

const FMA: Fma = Fma {
    a: 1.25,
    b: -0.5,
    iters: 3,
};
const CLAMP: Clamp = Clamp { lo: -0.5, hi: 0.5 };
const GROUP: u32 = 4;
/// The join: `out = A * x + B * y`.
const A: f32 = 0.75;
const B: f32 = -2.0;

fn combine_cpu(x: f32, y: f32) -> f32 {
    A.mul_add(x, B * y)
}

/// The join on the GPU: the user kernel `combine` (examples/kernels).
fn gpu_join(gpu: &Gpu) -> impl Join<f32> {
    let kernel = gpu
        .load_module(Ptx::from_src(include_str!(
            "../examples/kernels/combine.ptx"
        )))
        .and_then(|m| m.kernel("combine"))
        .expect("the example PTX loads");
    GpuJoinFn::new(
        "combine",
        true,
        move |l: &mut Launch<'_>,
              ins: &[&DeviceBuffer<f32>],
              lens: &[usize],
              out: &mut DeviceBuffer<f32>| {
            let n = lens[0];
            let call = l.kernel(&kernel).arg(ins[0]).arg(ins[1]).arg_mut(out);
            let call = call.value(n as u64).value(A).value(B);
            // SAFETY: the arguments match combine(const float*, const
            // float*, float*, unsigned long long, float, float); every
            // buffer holds >= n elements and the kernel checks its index.
            unsafe { call.launch(LaunchConfig::for_num_elems(n as u32)) }?;
            Ok::<(), StageError>(())
        },
    )
}

fn host_join() -> impl Join<f32> {
    HostJoinFn::new("combine", true, |ins: &[&[f32]], out: &mut [f32]| {
        for (i, o) in out.iter_mut().enumerate() {
            *o = combine_cpu(ins[0][i], ins[1][i]);
        }
        Ok(())
    })
}

/// input ─┬─ fma ──┬──────────── output 0 (a tap: also read below)
///        │        ├─ group sum ─ output 2
///        └─ clamp ┴─ combine ─── output 1
fn graph(join: impl Join<f32> + 'static) -> (StageGraph<f32>, [NodeId; 4]) {
    let mut g = StageGraph::new();
    let x = g.input();
    let a = g.stage(x, FMA).unwrap();
    let b = g.stage(x, CLAMP).unwrap();
    let j = g.join(&[a, b], join).unwrap();
    let s = g.stage(a, GroupSum { group: GROUP }).unwrap();
    assert_eq!(g.output(a).unwrap(), 0);
    assert_eq!(g.output(j).unwrap(), 1);
    assert_eq!(g.output(s).unwrap(), 2);
    (g, [a, b, j, s])
}

/// The CPU reference of `graph` over `input` cut into `chunk`-element chunks.
fn reference(input: &[f32], chunk: usize) -> [Vec<f32>; 3] {
    let (mut a, mut j, mut s) = (Vec::new(), Vec::new(), Vec::new());
    for c in input.chunks(chunk) {
        let fa: Vec<f32> = c.iter().map(|&x| fma_chain_cpu(x, 1.25, -0.5, 3)).collect();
        let fb: Vec<f32> = c.iter().map(|&x| x.clamp(-0.5, 0.5)).collect();
        j.extend(fa.iter().zip(&fb).map(|(&x, &y)| combine_cpu(x, y)));
        // GroupSum: sums of `GROUP` consecutive elements, the last group short.
        s.extend(fa.chunks(GROUP as usize).map(|g| g.iter().sum::<f32>()));
        a.extend(fa);
    }
    [a, j, s]
}

fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got
        .iter()
        .zip(want)
        .position(|(x, y)| x.to_bits() != y.to_bits())
    {
        panic!(
            "{what}: element {i} is {} where the CPU reference has {}",
            got[i], want[i]
        );
    }
}

fn config(chunk: usize) -> PipelineConfig {
    PipelineConfig {
        chunk_bytes: chunk * 4,
        ..PipelineConfig::default()
    }
}

fn run_and_check(
    m: &mut PipelineStageManager<f32>,
    g: &mut StageGraph<f32>,
    n: usize,
    chunk: usize,
) {
    let input = random_f32(n as u64, n);
    let lens = m.graph_output_lens(g, n).unwrap();
    let want = reference(&input, chunk);
    assert_eq!(lens, want.iter().map(Vec::len).collect::<Vec<_>>());
    let mut outs: Vec<Vec<f32>> = lens.iter().map(|&l| vec![f32::NAN; l]).collect();
    {
        let mut dsts: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
        m.run_graph(g, &input, &mut dsts).unwrap();
    }
    for (k, (got, want)) in outs.iter().zip(&want).enumerate() {
        assert_bits(&format!("output {k} (pageable, n = {n})"), got, want);
    }
}

/// `graph` with the join of `b`'s backend: the user kernel on the GPU, the
/// same sum in a `HostJoinFn` on the host.
fn graph_on(b: &TestBackend) -> (StageGraph<f32>, [NodeId; 4]) {
    match b.gpu() {
        Some(gpu) => graph(gpu_join(gpu)),
        None => graph(host_join()),
    }
}

/// The fan-out, join and tap graph over inputs of `sizes` elements in
/// chunks of `chunk`, pageable (and pinned on the GPU), against the CPU;
/// its nodes found by name and type, its buffers per slot counted, every
/// node in the stats (with GPU time on the GPU).
fn graph_with_fanout_join_and_tap_matches_cpu(b: &TestBackend, chunk: usize, sizes: &[usize]) {
    let mut m = b.manager(config(chunk));
    let (mut g, [a, _, j, _]) = graph_on(b);
    assert_eq!(g.name(a).unwrap(), "fma");
    assert!(g.node::<Fma>(a).is_some() && g.node::<Fma>(j).is_none());
    // On one lane, by liveness: input, fma (an output: to the end), clamp;
    // the join reuses the input's buffer (the clamp was its last reader),
    // the sum the clamp's (the join was its last reader). Three, not five.
    g.concurrent_branches(false);
    assert_eq!(g.buffers_per_slot().unwrap(), 3);
    // Concurrent (the default): the sum runs on a branch lane of its own;
    // the clamp's buffer would make it wait for the join (which reads the
    // clamp on another track), so it gets a fourth.
    g.concurrent_branches(true);
    assert_eq!(g.buffers_per_slot().unwrap(), 4);
    for &n in sizes {
        run_and_check(&mut m, &mut g, n, chunk);
    }

    // Pinned in, pinned out: the same bits.
    let pinned = b.gpu().map(|gpu| {
        let n = scaled(24 << 20, 1 << 15) + 5;
        let input = random_f32(77, n);
        let want = reference(&input, chunk);
        let pin_in = PinnedBuffer::from_slice(gpu, &input, HostAllocFlags::default()).unwrap();
        let lens = m.graph_output_lens(&g, n).unwrap();
        let mut outs: Vec<PinnedBuffer<f32>> = lens
            .iter()
            .map(|&l| PinnedBuffer::new(gpu, l, HostAllocFlags::default()).unwrap())
            .collect();
        {
            let mut dsts: Vec<&mut PinnedBuffer<f32>> = outs.iter_mut().collect();
            m.run_graph_pinned(&mut g, &pin_in, &mut dsts).unwrap();
        }
        for (k, (got, want)) in outs.iter().zip(&want).enumerate() {
            assert_bits(
                &format!("output {k} (pinned)"),
                got.as_slice().unwrap(),
                want,
            );
        }
        (pin_in, outs)
    });
    let stats = m.get_stats();
    for name in ["fma", "clamp", "combine", "group_sum"] {
        assert!(
            stats
                .stages
                .iter()
                .any(|s| s.name == name && (!b.is_gpu() || s.ms > 0.0)),
            "no stats (or no GPU time) for node {name}: {:?}",
            stats.stages
        );
    }

    // A pinned run is refused on the host backend.
    if let Some((pin_in, mut outs)) = pinned {
        let mut h = PipelineStageManager::<f32>::new(Backend::Host, config(chunk)).unwrap();
        let mut dsts: Vec<&mut PinnedBuffer<f32>> = outs.iter_mut().collect();
        assert!(matches!(
            h.run_graph_pinned(&mut g, &pin_in, &mut dsts),
            Err(Error::Unsupported { .. })
        ));
    }
}

#[test]
fn host_graph_with_fanout_join_and_tap_matches_cpu() {
    let chunk = 1000; // not a multiple of the group: each chunk's last group is short
    let sizes = [0, 1, 999, 1000, 1001, 12_345];
    graph_with_fanout_join_and_tap_matches_cpu(&TestBackend::Host, chunk, &sizes);
}

#[test]
fn graph_misuse_is_refused_with_typed_errors() {
    let mut m = PipelineStageManager::<f32>::new(Backend::Host, config(256)).unwrap();
    let input = vec![1.0f32; 1000];

    // No output at all.
    let mut g = StageGraph::<f32>::new();
    let x = g.input();
    g.stage(x, FMA).unwrap();
    assert!(matches!(
        m.run_graph(&mut g, &input, &mut []),
        Err(Error::NoOutputs)
    ));

    // A node of another graph.
    let other = StageGraph::<f32>::new();
    let mut g2 = StageGraph::<f32>::new();
    let foreign = {
        let mut o = other;
        let y = o.input();
        o.stage(y, FMA).unwrap()
    };
    assert!(matches!(
        g2.stage(foreign, FMA),
        Err(Error::UnknownNode { .. })
    ));
    assert!(matches!(g2.output(foreign), Err(Error::UnknownNode { .. })));
    assert!(matches!(g2.join(&[], host_join()), Err(Error::Config(_))));

    // Wrong number of destinations, and a wrong length.
    let (mut g, _) = graph(host_join());
    let lens = m.graph_output_lens(&g, input.len()).unwrap();
    let mut o: Vec<Vec<f32>> = lens.iter().map(|&l| vec![0.0; l]).collect();
    {
        let (first, _) = o.split_at_mut(1);
        let mut two: Vec<&mut [f32]> = first.iter_mut().map(|v| &mut v[..]).collect();
        assert!(matches!(
            m.run_graph(&mut g, &input, &mut two),
            Err(Error::OutputCount {
                expected: 3,
                actual: 1
            })
        ));
    }
    o[2].push(0.0);
    {
        let mut dsts: Vec<&mut [f32]> = o.iter_mut().map(|v| &mut v[..]).collect();
        let e = m.run_graph(&mut g, &input, &mut dsts).unwrap_err();
        assert!(
            matches!(e, Error::GraphOutputLength { output: 2, .. }),
            "{e}"
        );
    }

    // A join of inputs of different lengths fails naming the join.
    let mut g = StageGraph::<f32>::new();
    let x = g.input();
    let s = g.stage(x, GroupSum { group: 2 }).unwrap();
    let j = g.join(&[x, s], host_join()).unwrap();
    g.output(j).unwrap();
    let e = m.graph_output_lens(&g, 1000).unwrap_err();
    assert!(
        matches!(&e, Error::Stage { stage, .. } if stage == "combine"),
        "{e}"
    );

    // Too many values alive at once for a slot.
    let mut g = StageGraph::<f32>::new();
    let x = g.input();
    for i in 0..16 {
        let b = g
            .stage(
                x,
                Fma {
                    a: i as f32,
                    b: 0.0,
                    iters: 1,
                },
            )
            .unwrap();
        g.output(b).unwrap();
    }
    assert!(matches!(
        g.buffers_per_slot(),
        Err(Error::GraphTooWide {
            buffers: 17,
            max: 16
        })
    ));

    // A chain needs two buffers per slot however long it is.
    let long = StageGraph::chain(vec![FMA; 12]).unwrap();
    assert_eq!(long.buffers_per_slot().unwrap(), 2);
}

#[test]
fn gpu_graph_of_a_host_only_stage_is_refused() {
    let Some(ctx) = gpu_or_skip("gpu_graph_of_a_host_only_stage_is_refused") else {
        return;
    };
    let mut m = PipelineStageManager::<f32>::with_gpu(ctx.gpu(), config(256)).unwrap();
    let mut g = StageGraph::<f32>::new();
    let x = g.input();
    let h = g
        .stage(
            x,
            HostFn::new("host only", true, |i: &[f32], o: &mut [f32]| {
                o.copy_from_slice(i);
                Ok(())
            }),
        )
        .unwrap();
    g.output(h).unwrap();
    let input = vec![0.0f32; 10];
    let mut out = [0.0f32; 10];
    let e = m
        .run_graph(&mut g, &input, &mut [&mut out[..]])
        .unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported { stage, .. } if stage == "host only"),
        "{e}"
    );
}

#[test]
fn gpu_graph_with_fanout_join_and_tap_matches_cpu() {
    let Some(b) = TestBackend::gpu_or_skip("gpu_graph_with_fanout_join_and_tap_matches_cpu") else {
        return;
    };
    let chunk = scaled(1 << 20, 1 << 12) + 6; // not a multiple of the group
    let sizes = [
        1,
        chunk - 1,
        chunk,
        3 * chunk + 17,
        scaled(40 << 20, 1 << 16) + 3,
    ];
    graph_with_fanout_join_and_tap_matches_cpu(&b, chunk, &sizes);
}

#[test]
fn gpu_chain_and_graph_share_one_ring() {
    let Some(ctx) = gpu_or_skip("gpu_chain_and_graph_share_one_ring") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let chunk = scaled(1 << 18, 1 << 10);
    let mut m = PipelineStageManager::<f32>::with_gpu(&gpu, config(chunk)).unwrap();
    m.add_stage(FMA);
    m.add_stage(CLAMP);
    let n = 5 * chunk + 3;
    let input = random_f32(5, n);
    let want: Vec<f32> = input
        .iter()
        .map(|&x| fma_chain_cpu(x, 1.25, -0.5, 3).clamp(-0.5, 0.5))
        .collect();
    // The chain, the same chain as a graph, then the chain again (on a
    // ring the graph widened).
    let mut out = vec![0.0f32; n];
    m.run(&input, &mut out).unwrap();
    assert_bits("chain", &out, &want);
    let (mut g, _) = graph(gpu_join(&gpu));
    run_and_check(&mut m, &mut g, n, chunk);
    let mut out2 = vec![0.0f32; n];
    m.run(&input, &mut out2).unwrap();
    assert_bits("chain after a graph", &out2, &want);
}

/// A chunk's metadata in the tagged-stream tests: which observation
/// (sequence), the chunk's place in it, and the observation's header.
#[derive(Debug, Clone, PartialEq)]
struct Tag {
    sequence: u32,
    index: u32,
    header: std::sync::Arc<String>,
}

/// Streams `chunks` chunks (lengths vary, two sequences) through the join
/// graph with a tagged source; every output's sink must see every chunk,
/// in order, with its metadata, and the CPU reference's data. With
/// `fail_at`, the source fails there: the chunks before it still arrive.
/// Where a tagged run goes: one manager and its graph, or every GPU and
/// one graph per GPU.
enum Target<'a> {
    One(&'a mut PipelineStageManager<f32>, &'a mut StageGraph<f32>),
    Every(
        &'a mut prism_pipeline::MultiGpuPipeline<f32>,
        &'a mut [StageGraph<f32>],
    ),
}

fn tagged_run(target: Target<'_>, chunk: usize, fail_at: Option<u32>) {
    use prism_pipeline::{tagged_sink, tagged_source, BoxError};
    let chunks = 23u32;
    let lens: Vec<usize> = (0..chunks as usize)
        .map(|i| 1 + (i * 7919) % chunk)
        .collect();
    let data: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| random_f32(1000 + i as u64, l))
        .collect();
    let tags: Vec<Tag> = (0..chunks)
        .map(|i| {
            let sequence = u32::from(i >= 10);
            Tag {
                sequence,
                index: if sequence == 0 { i } else { i - 10 },
                header: std::sync::Arc::new(format!("observation {sequence}")),
            }
        })
        .collect();
    let mut next = 0usize;
    let source = tagged_source(
        |dst: &mut [f32]| -> Result<Option<(usize, Tag)>, BoxError> {
            if next == data.len() {
                return Ok(None);
            }
            if fail_at == Some(next as u32) {
                return Err("the instrument went away".into());
            }
            let d = &data[next];
            dst[..d.len()].copy_from_slice(d);
            next += 1;
            Ok(Some((d.len(), tags[next - 1].clone())))
        },
    );
    let mut got: Vec<Vec<(Tag, Vec<f32>)>> = vec![Vec::new(); 3];
    let result = {
        let mut sinks: Vec<_> = got
            .iter_mut()
            .map(|v| {
                tagged_sink(move |t: &Tag, d: &[f32]| -> Result<(), BoxError> {
                    v.push((t.clone(), d.to_vec()));
                    Ok(())
                })
            })
            .collect();
        match target {
            Target::One(m, g) => m.run_graph_stream(g, source, &mut sinks),
            Target::Every(p, graphs) => p.run_graph_stream(graphs, source, &mut sinks),
        }
    };
    let delivered = fail_at.unwrap_or(chunks) as usize;
    match (fail_at, result) {
        (None, Ok(c)) => assert_eq!(c.chunks, chunks as u64),
        (Some(at), Err(Error::Source { chunk, .. })) => assert_eq!(chunk, at as u64),
        (f, r) => panic!("fail_at {f:?}: {r:?}"),
    }
    for (k, out) in got.iter().enumerate() {
        assert_eq!(out.len(), delivered, "output {k}: chunks delivered");
        for (i, (tag, d)) in out.iter().enumerate() {
            assert_eq!(tag, &tags[i], "output {k}, chunk {i}: metadata");
            let want = &reference(&data[i], chunk)[k];
            assert_bits(&format!("output {k}, chunk {i}"), d, want);
        }
    }
}

/// `tagged_run` on one manager of `b`'s backend: a whole stream, one whose
/// source fails at chunk 13 and one whose source fails at once.
fn tagged_stream_carries_metadata_to_every_output(b: &TestBackend, chunk: usize) {
    let mut m = b.manager(config(chunk));
    for fail_at in [None, Some(13), Some(0)] {
        let (mut g, _) = graph_on(b);
        tagged_run(Target::One(&mut m, &mut g), chunk, fail_at);
    }
}

#[test]
fn host_tagged_stream_carries_metadata_to_every_output() {
    tagged_stream_carries_metadata_to_every_output(&TestBackend::Host, 1000);
}

#[test]
fn gpu_tagged_stream_carries_metadata_to_every_output() {
    let Some(b) = TestBackend::gpu_or_skip("gpu_tagged_stream_carries_metadata_to_every_output")
    else {
        return;
    };
    tagged_stream_carries_metadata_to_every_output(&b, scaled(1 << 18, 1 << 10));
}

#[test]
fn gpu_graph_over_every_gpu_matches_cpu() {
    use prism_pipeline::MultiGpuPipeline;
    let Some(_ctx) = gpu_or_skip("gpu_graph_over_every_gpu_matches_cpu") else {
        return;
    };
    let gpus: Vec<Gpu> = (0..prism_stream::device_count().unwrap())
        .map(|o| Gpu::open(o).unwrap())
        .collect();
    let chunk = scaled(1 << 18, 1 << 10) + 2;
    let mut p = MultiGpuPipeline::<f32>::with_gpus(&gpus, config(chunk)).unwrap();
    // One graph per GPU, each with its own join kernel module.
    let mut graphs: Vec<StageGraph<f32>> = gpus.iter().map(|g| graph(gpu_join(g)).0).collect();
    let n = 9 * chunk + 11;
    let input = random_f32(99, n);
    let want = reference(&input, chunk);
    let flags = HostAllocFlags {
        portable: true,
        ..HostAllocFlags::default()
    };
    let pin_in = PinnedBuffer::from_slice(&gpus[0], &input, flags).unwrap();
    let mut outs: Vec<PinnedBuffer<f32>> = want
        .iter()
        .map(|w| PinnedBuffer::new(&gpus[0], w.len(), flags).unwrap())
        .collect();
    {
        let mut dsts: Vec<&mut PinnedBuffer<f32>> = outs.iter_mut().collect();
        p.run_graph_pinned(&mut graphs, &pin_in, &mut dsts).unwrap();
        // One graph per GPU, no more, no less.
        let mut one = graphs.split_off(0);
        one.push(graph(gpu_join(&gpus[0])).0);
        assert!(matches!(
            p.run_graph_pinned(&mut one, &pin_in, &mut dsts),
            Err(Error::GraphsPerGpu { .. })
        ));
    }
    for (k, (got, want)) in outs.iter().zip(&want).enumerate() {
        assert_bits(
            &format!("output {k} (every GPU)"),
            got.as_slice().unwrap(),
            want,
        );
    }
    assert_eq!(p.get_stats().chunks, 10);

    // Pageable, over every GPU: the same bits.
    let mut graphs: Vec<StageGraph<f32>> = gpus.iter().map(|g| graph(gpu_join(g)).0).collect();
    let mut pageable: Vec<Vec<f32>> = want.iter().map(|w| vec![f32::NAN; w.len()]).collect();
    {
        let mut dsts: Vec<&mut [f32]> = pageable.iter_mut().map(|o| &mut o[..]).collect();
        p.run_graph(&mut graphs, &input, &mut dsts).unwrap();
    }
    for (k, (got, want)) in pageable.iter().zip(&want).enumerate() {
        assert_bits(&format!("output {k} (pageable, every GPU)"), got, want);
    }

    // A tagged stream over every GPU: every sink gets every chunk in input
    // order with its metadata; a source failure still delivers the chunks
    // before it.
    for fail_at in [None, Some(13), Some(0)] {
        let mut graphs: Vec<StageGraph<f32>> = gpus.iter().map(|g| graph(gpu_join(g)).0).collect();
        tagged_run(Target::Every(&mut p, &mut graphs), chunk, fail_at);
    }
}

/// A stage that holds its lane for `ns` (one block, no buffer) and then
/// computes `a * x + 0.5`: long enough that branches on one lane wait for
/// each other, small enough that branches on several run side by side.
fn slow(ns: u64, a: f32) -> impl Stage<f32> {
    GpuFn::new(
        format!("slow {a}"),
        true,
        move |l: &mut Launch<'_>, x: &DeviceBuffer<f32>, y: &mut DeviceBuffer<f32>, n| {
            l.spin(ns)?;
            Fma {
                a,
                b: 0.5,
                iters: 1,
            }
            .gpu(l, x, y, n)
        },
    )
}

/// Whether spans `p` and `q` overlap in time.
fn overlap(p: &prism_pipeline::Span, q: &prism_pipeline::Span) -> bool {
    p.start_ms < q.end_ms && q.start_ms < p.end_ms
}

#[test]
fn gpu_independent_branches_of_a_chunk_run_concurrently() {
    let Some(ctx) = gpu_or_skip("gpu_independent_branches_of_a_chunk_run_concurrently") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let chunk = scaled(1 << 20, 1 << 12);
    let chunks = 8;
    let config = PipelineConfig {
        timing: true,
        trace: true,
        // Exactly `chunks` chunks of `chunk` elements (no ramp at the ends).
        ramp: false,
        ..config(chunk)
    };
    let mut m = PipelineStageManager::<f32>::with_gpu(&gpu, config).unwrap();
    // input ─┬─ slow 1 ─ output 0
    //        ├─ slow 2 ─ output 1
    //        └─ slow 3 ─ output 2
    let mut g = StageGraph::new();
    let x = g.input();
    let scales = [1.0f32, 2.0, 3.0];
    for &a in &scales {
        let b = g.stage(x, slow(2_000_000, a)).unwrap();
        g.output(b).unwrap();
    }
    let n = chunks * chunk;
    let input = random_f32(5150, n);
    let mut wall = [0.0f64; 2];
    for (k, concurrent) in [true, false].into_iter().enumerate() {
        g.concurrent_branches(concurrent);
        let mut outs = vec![vec![f32::NAN; n]; 3];
        let started = std::time::Instant::now();
        {
            let mut dsts: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
            m.run_graph(&mut g, &input, &mut dsts).unwrap();
        }
        wall[k] = started.elapsed().as_secs_f64() * 1e3;
        for (o, &a) in outs.iter().zip(&scales) {
            let want: Vec<f32> = input.iter().map(|&v| fma_chain_cpu(v, a, 0.5, 1)).collect();
            assert_bits(&format!("slow {a} (concurrent: {concurrent})"), o, &want);
        }
        let spans = &m.timeline().spans;
        let on_branches = spans.iter().filter(|s| s.stream >= 6).count();
        // Chunks whose three branches all overlap one another.
        let mut together = 0;
        for c in 0..chunks as u64 {
            let mine: Vec<_> = spans
                .iter()
                .filter(|s| s.chunk == c && s.name.starts_with("slow"))
                .collect();
            assert_eq!(mine.len(), 3, "chunk {c}: {mine:?}");
            let all = (0..3).all(|i| (i + 1..3).all(|j| overlap(mine[i], mine[j])));
            let any = (0..3).any(|i| (i + 1..3).any(|j| overlap(mine[i], mine[j])));
            if concurrent {
                together += usize::from(all);
            } else {
                assert!(!any, "chunk {c} on one lane overlapped: {mine:?}");
            }
        }
        println!(
            "concurrent {concurrent}: {:.1} ms, {together} of {chunks} chunks with all three branches at once, {on_branches} spans on branch lanes",
            wall[k]
        );
        if concurrent {
            assert_eq!(
                on_branches,
                2 * chunks,
                "two of three branches on lanes of their own"
            );
            // A sanitizer runs kernels one at a time.
            if !under_sanitizer() {
                assert!(
                    together >= chunks / 2,
                    "only {together} of {chunks} chunks ran their branches at once"
                );
            }
        } else {
            assert_eq!(on_branches, 0);
        }
        assert_eq!(m.get_stats().stages.len(), 3, "{:?}", m.get_stats().stages);
    }
    // How much faster is S11's concurrency case (prism-bench), not a test.

    // A branch that fails on chunk 2 while the others spin on their lanes:
    // the run names the stage and chunk, and the manager (its branch lanes
    // kept) runs the good graph again, bit for bit.
    let mut bad = StageGraph::new();
    let x = bad.input();
    let a = bad.stage(x, slow(2_000_000, 1.0)).unwrap();
    bad.output(a).unwrap();
    let mut calls = 0u32;
    let failing = GpuFn::new(
        "fails on its third chunk",
        true,
        move |l: &mut Launch<'_>, x: &DeviceBuffer<f32>, y: &mut DeviceBuffer<f32>, n| {
            calls += 1;
            if calls == 3 {
                return Err("the branch gave up".into());
            }
            let mut f = FMA;
            f.gpu(l, x, y, n)
        },
    );
    let b = bad.stage(x, failing).unwrap();
    bad.output(b).unwrap();
    let mut outs = vec![vec![f32::NAN; n]; 2];
    {
        let mut dsts: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
        match m.run_graph(&mut bad, &input, &mut dsts) {
            Err(Error::Stage { stage, chunk, .. }) => {
                assert_eq!((stage.as_str(), chunk), ("fails on its third chunk", 2));
            }
            r => panic!("a failing branch: {r:?}"),
        }
    }
    g.concurrent_branches(true);
    let mut outs = vec![vec![f32::NAN; n]; 3];
    {
        let mut dsts: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
        m.run_graph(&mut g, &input, &mut dsts).unwrap();
    }
    for (o, &a) in outs.iter().zip(&scales) {
        let want: Vec<f32> = input.iter().map(|&v| fma_chain_cpu(v, a, 0.5, 1)).collect();
        assert_bits(&format!("slow {a} after a failed run"), o, &want);
    }
}
