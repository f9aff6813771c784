//! A stage graph, then the same graph between broadcast rings.
//!
//! Part 1: one upload feeds two branches; a join combines them; a tap
//! keeps one branch's values; a reduction reads the tap:
//!
//! ```text
//! input ─┬─ fma ───┬─────────────── output 0 (a tap)
//!        │         ├─ group sum ──── output 2
//!        └─ clamp ─┴─ combine ────── output 1
//! ```
//!
//! 256 MiB through it (GPU if there is one, else the host backend), every
//! output checked against the CPU, stats per node.
//!
//! Part 2: the graph between rings, as a sensor pipeline would run: a
//! producer writes two observations (sequences with a header) into a ring;
//! the graph reads it; each output goes to a real-time ring with a slow
//! guaranteed reader (it never holds the pipeline back: what it cannot
//! keep up with is dropped, and counted) and a lossy one.
//!
//! `cargo run --release -p prism-pipeline --example stage_graph`

use std::time::{Duration, Instant};

use prism_buffer::broadcast::{Broadcast, Config, Mode, ReaderKind};
use prism_pipeline::{
    from_broadcast, to_broadcast, Backend, BackendKind, Clamp, Fma, GroupSum, Join, PipelineConfig,
    PipelineStageManager, StageError, StageGraph,
};
use prism_stream::cudarc::driver::LaunchConfig;
use prism_stream::cudarc::nvrtc::Ptx;
use prism_stream::{fma_chain_cpu, DeviceBuffer, Gpu, Kernel, Launch};
use prism_testing::{random_f32, scaled};

const FMA: Fma = Fma {
    a: 1.25,
    b: -0.5,
    iters: 3,
};
const CLAMP: Clamp = Clamp { lo: -0.5, hi: 0.5 };
const GROUP: u32 = 64;

/// `out = 0.75 x - 2 y`, on the GPU through the user kernel `combine`
/// (kernels/combine.cu, compiled to the committed combine.ptx) and on the
/// host as a loop: a join with both forms runs on either backend.
struct Combine {
    kernel: Option<Kernel>,
}

impl Combine {
    fn new(gpu: Option<&Gpu>) -> Result<Self, prism_stream::Error> {
        let kernel = match gpu {
            Some(g) => Some(
                g.load_module(Ptx::from_src(include_str!("kernels/combine.ptx")))?
                    .kernel("combine")?,
            ),
            None => None,
        };
        Ok(Self { kernel })
    }
}

fn combine(x: f32, y: f32) -> f32 {
    0.75f32.mul_add(x, -2.0 * y)
}

impl Join<f32> for Combine {
    fn name(&self) -> &str {
        "combine"
    }
    fn elementwise(&self) -> bool {
        true
    }
    fn has_gpu(&self) -> bool {
        self.kernel.is_some()
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
        let kernel = self.kernel.as_ref().ok_or("no kernel loaded")?;
        let n = lens[0];
        let call = launch
            .kernel(kernel)
            .arg(inputs[0])
            .arg(inputs[1])
            .arg_mut(output);
        let call = call.value(n as u64).value(0.75f32).value(-2.0f32);
        // SAFETY: the arguments match combine(const float*, const float*,
        // float*, unsigned long long, float, float); every buffer holds at
        // least n elements and the kernel checks its index against n.
        unsafe { call.launch(LaunchConfig::for_num_elems(n as u32)) }?;
        Ok(())
    }
    fn host(&self, inputs: &[&[f32]], output: &mut [f32]) -> Result<(), StageError> {
        for (i, o) in output.iter_mut().enumerate() {
            *o = combine(inputs[0][i], inputs[1][i]);
        }
        Ok(())
    }
}

fn graph(gpu: Option<&Gpu>) -> Result<StageGraph<f32>, Box<dyn std::error::Error>> {
    let mut g = StageGraph::new();
    let x = g.input();
    let a = g.stage(x, FMA)?;
    let b = g.stage(x, CLAMP)?;
    let j = g.join(&[a, b], Combine::new(gpu)?)?;
    let s = g.stage(a, GroupSum { group: GROUP })?;
    g.output(a)?;
    g.output(j)?;
    g.output(s)?;
    Ok(g)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let chunk = scaled(16 << 20, 64 << 10) / 4;
    let config = PipelineConfig {
        chunk_bytes: chunk * 4,
        ..PipelineConfig::default()
    };
    let mut m = PipelineStageManager::<f32>::new(Backend::Auto, config)?;
    let gpu = m.gpu().cloned().filter(|_| m.backend() == BackendKind::Gpu);
    println!(
        "prism stage_graph on {}",
        gpu.as_ref()
            .map_or("the host backend (no GPU found)".to_owned(), |g| g
                .info()
                .name
                .clone())
    );

    // Part 1: a whole buffer through the graph.
    let mut g = graph(gpu.as_ref())?;
    println!(
        "graph: {} nodes, {} outputs, {} device buffers per ring slot (by liveness)",
        g.node_count(),
        g.output_count(),
        g.buffers_per_slot()?
    );
    let n = scaled(64 << 20, 1 << 18);
    let input = random_f32(1, n);
    let lens = m.graph_output_lens(&g, n)?;
    let mut outs: Vec<Vec<f32>> = lens.iter().map(|&l| vec![0.0; l]).collect();
    let t = Instant::now();
    {
        let mut dsts: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
        m.run_graph(&mut g, &input, &mut dsts)?;
    }
    let s = t.elapsed().as_secs_f64();
    let moved = (n + lens.iter().sum::<usize>()) * 4;
    println!(
        "{} MiB in, {} MiB out over 3 outputs: {:.1} ms, {:.2} GB/s moved",
        (n * 4) >> 20,
        (lens.iter().sum::<usize>() * 4) >> 20,
        s * 1e3,
        moved as f64 / s / 1e9
    );
    // Every output against the CPU, chunk by chunk (the group sums restart
    // at each chunk).
    let (mut at, mut at_s) = (0usize, 0usize);
    for c in input.chunks(chunk) {
        for (i, &x) in c.iter().enumerate() {
            let fa = fma_chain_cpu(x, FMA.a, FMA.b, FMA.iters);
            let j = combine(fa, x.clamp(CLAMP.lo, CLAMP.hi));
            if outs[0][at + i].to_bits() != fa.to_bits() || outs[1][at + i].to_bits() != j.to_bits()
            {
                return Err(format!("element {} differs from the CPU", at + i).into());
            }
        }
        for (k, grp) in c.chunks(GROUP as usize).enumerate() {
            let sum: f32 = grp
                .iter()
                .map(|&x| fma_chain_cpu(x, FMA.a, FMA.b, FMA.iters))
                .sum();
            if outs[2][at_s + k].to_bits() != sum.to_bits() {
                return Err(format!("group sum {} differs from the CPU", at_s + k).into());
            }
        }
        at += c.len();
        at_s += c.len().div_ceil(GROUP as usize);
    }
    println!("every output matches the CPU reference\n{}", m.get_stats());

    // Part 2: the graph between rings.
    let per_obs = 64u64;
    let ring_in: Broadcast<f32, String> = Broadcast::new(Config {
        buffers: 6,
        chunk_capacity: chunk,
        mode: Mode::Block,
    })?;
    let feed = from_broadcast(ring_in.reader(ReaderKind::Guaranteed)?);
    let mut producer = ring_in.writer()?;
    let rings: Vec<Broadcast<f32, String>> = (0..3)
        .map(|_| {
            Broadcast::new(Config {
                buffers: 4,
                chunk_capacity: chunk,
                mode: Mode::RealTime,
            })
        })
        .collect::<Result<_, _>>()?;
    let mut readers = Vec::new();
    for r in &rings {
        readers.push((
            r.reader(ReaderKind::Guaranteed)?,
            r.reader(ReaderKind::Lossy)?,
        ));
    }
    let mut sinks: Vec<_> = rings
        .iter()
        .map(|r| r.writer().map(to_broadcast))
        .collect::<Result<_, _>>()?;
    let mut g = graph(gpu.as_ref())?;
    std::thread::scope(|s| -> Result<(), Box<dyn std::error::Error>> {
        s.spawn(move || {
            for obs in ["observation 1", "observation 2"] {
                producer.begin_sequence(obs.to_owned());
                for i in 0..per_obs {
                    let data = random_f32(i, chunk);
                    if producer.write(&data).is_err() {
                        return;
                    }
                }
            }
        });
        let consumers: Vec<_> = readers
            .into_iter()
            .flat_map(|(slow, lossy)| [(slow, Duration::from_millis(1)), (lossy, Duration::ZERO)])
            .map(|(mut r, pause)| {
                s.spawn(move || {
                    let mut sequences = std::collections::BTreeSet::new();
                    while let Some(c) = r.read() {
                        sequences.insert((*c.meta().header).clone());
                        drop(c);
                        std::thread::sleep(pause);
                    }
                    (r.reader_stats(), sequences)
                })
            })
            .collect();
        let counts = m.run_graph_stream(&mut g, feed, &mut sinks);
        // Close the output rings whatever happened, so the readers end.
        drop(std::mem::take(&mut sinks));
        let counts = counts?;
        println!(
            "\nring → graph → 3 real-time rings: {} chunks in, {} elements out",
            counts.chunks, counts.elements_out
        );
        for (k, c) in consumers.into_iter().enumerate() {
            let (st, seqs) = c.join().map_err(|_| "a reader panicked")?;
            let ring = rings[k / 2].stats();
            println!(
                "output {} {:?} reader: {} delivered, {} missed; ring: {} dropped ({} MiB), {} buffers; sequences seen: {:?}",
                k / 2,
                st.kind,
                st.delivered,
                st.missed,
                ring.dropped_chunks,
                ring.dropped_bytes >> 20,
                ring.buffers_allocated,
                seqs
            );
        }
        Ok(())
    })?;
    Ok(())
}
