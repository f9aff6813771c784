//! `run_stream` into a broadcast ring read by two readers
//! ([`to_broadcast`], [`from_broadcast`]): one reader collects the chunks,
//! the other feeds a second pipeline; both are compared with a CPU
//! reference, bit for bit. Each scenario is written once and runs on the
//! host backend (`host_*`, runs everywhere) and on the GPU (`gpu_*`,
//! skipped without one).

use std::thread;

use prism_buffer::broadcast::{Broadcast, Config, Mode, Reader, ReaderKind};
use prism_pipeline::{
    from_broadcast, from_iter, sink_fn, to_broadcast, BoxError, Clamp, Fma, PipelineConfig,
};
use prism_stream::fma_chain_cpu;
use prism_testing::{random_f32, scaled};

mod common;
use common::{host, same_bits, TestBackend};

const FMA: Fma = Fma {
    a: 1.25,
    b: -0.5,
    iters: 3,
};

fn first(x: f32) -> f32 {
    fma_chain_cpu(x, FMA.a, FMA.b, FMA.iters)
}

fn second(x: f32) -> f32 {
    x.clamp(-1.0, 1.0)
}

/// Reads every chunk of `r` with its number and sequence.
fn collect(mut r: Reader<f32>) -> (Vec<(u64, Vec<f32>)>, Reader<f32>) {
    let mut got = Vec::new();
    while let Some(g) = r.read() {
        got.push((g.meta().number, g.to_vec()));
    }
    (got, r)
}

/// Runs `first` over `input` in chunks of `chunk` (a manager on `backend`,
/// 3 slots) into a Block-mode ring read by a collecting reader and by a
/// second host pipeline (`second`), then checks both against the CPU.
fn run_and_check(backend: &TestBackend, input: &[f32], chunk: usize) {
    let ring: Broadcast<f32> = Broadcast::new(Config {
        buffers: 5,
        chunk_capacity: chunk,
        mode: Mode::Block,
    })
    .unwrap();
    let direct = ring.reader(ReaderKind::Guaranteed).unwrap();
    let piped = ring.reader(ReaderKind::Guaranteed).unwrap();
    let writer = ring.writer().unwrap();
    let ((got, direct), (second_out, piped), counts) = thread::scope(|s| {
        let a = s.spawn(|| collect(direct));
        let b = s.spawn(|| {
            // The second pipeline's chunks are the ring's chunks.
            let mut p = host(chunk, 3);
            p.add_stage(Clamp { lo: -1.0, hi: 1.0 });
            let mut out: Vec<(u64, Vec<f32>)> = Vec::new();
            let mut source = from_broadcast(piped);
            p.run_stream(
                &mut source,
                sink_fn(|k, o: &[f32]| {
                    out.push((k, o.to_vec()));
                    Ok::<_, BoxError>(())
                }),
            )
            .unwrap();
            (out, source.into_reader())
        });
        let mut p = backend.manager(PipelineConfig {
            chunk_bytes: chunk * 4,
            slots: 3,
            ..PipelineConfig::default()
        });
        p.add_stage(FMA);
        let counts = p
            .run_stream(from_iter([input.to_vec()]), to_broadcast(writer))
            .unwrap();
        (a.join().unwrap(), b.join().unwrap(), counts)
    });

    let want_first: Vec<Vec<f32>> = input
        .chunks(chunk)
        .map(|c| c.iter().map(|&x| first(x)).collect())
        .collect();
    assert_eq!(counts.chunks, want_first.len() as u64);
    assert_eq!(got.len(), want_first.len());
    for (k, ((n, data), want)) in got.iter().zip(&want_first).enumerate() {
        assert_eq!(*n, k as u64, "chunks in order");
        assert!(same_bits(data, want), "chunk {k} differs from the CPU");
    }
    assert_eq!(second_out.len(), want_first.len());
    for (k, ((n, data), want)) in second_out.iter().zip(&want_first).enumerate() {
        let want: Vec<f32> = want.iter().map(|&x| second(x)).collect();
        assert_eq!(*n, k as u64);
        assert!(same_bits(data, &want), "second pipeline, chunk {k}");
    }
    let stats = ring.stats();
    assert_eq!(stats.committed_chunks, want_first.len() as u64);
    assert_eq!(stats.committed_bytes, input.len() as u64 * 4);
    assert_eq!(stats.dropped_chunks, 0);
    assert!(stats.buffers_allocated <= 5);
    for r in [direct, piped] {
        let s = r.reader_stats();
        assert_eq!((s.delivered, s.missed), (want_first.len() as u64, 0));
    }
}

#[test]
fn host_stream_into_a_broadcast_ring_reaches_two_readers_bit_exact() {
    let chunk = 1000;
    let input = random_f32(7, 37 * chunk + 123);
    run_and_check(&TestBackend::Host, &input, chunk);
}

#[test]
fn an_output_chunk_longer_than_the_ring_buffers_fails_the_run() {
    let ring: Broadcast<f32> = Broadcast::new(Config {
        buffers: 3,
        chunk_capacity: 10,
        mode: Mode::RealTime,
    })
    .unwrap();
    let mut p = host(100, 3);
    p.add_stage(Clamp { lo: -1.0, hi: 1.0 });
    let err = p
        .run_stream(
            from_iter([random_f32(1, 250)]),
            to_broadcast(ring.writer().unwrap()),
        )
        .unwrap_err();
    assert!(err.to_string().contains("cannot commit 100"), "{err}");
    assert_eq!(ring.stats().committed_chunks, 0);
}

#[test]
fn gpu_stream_into_a_broadcast_ring_reaches_two_readers_bit_exact() {
    let Some(b) =
        TestBackend::gpu_or_skip("gpu_stream_into_a_broadcast_ring_reaches_two_readers_bit_exact")
    else {
        return;
    };
    let chunk = scaled(1 << 16, 1 << 10);
    let input = random_f32(11, 24 * chunk + 77);
    run_and_check(&b, &input, chunk);
}

/// The input of chunk `index` of observation `obs`: a function of both, so
/// a reader can check any chunk it gets on its own.
fn observed(obs: &str, index: u64, len: usize) -> Vec<f32> {
    let seed = index * 131 + obs.len() as u64 * 7 + u64::from(obs.as_bytes()[obs.len() - 1]);
    random_f32(seed, len)
}

/// A tagged graph between rings: a Block-mode ring of two observations
/// (sequences with headers) feeds a graph with two branches whose outputs
/// go to two real-time rings; each output ring has a slow guaranteed
/// reader (far slower than the pipeline) and a lossy one. Every chunk a
/// reader gets is checked bit for bit against the CPU from its own
/// metadata (the observation's header and the chunk's index in it);
/// `delivered + missed == committed` for every reader; the ring's dropped
/// count is exactly what its guaranteed reader missed; buffers never
/// exceed the configuration. The graph runs on a manager on `backend` with
/// chunks of `chunk` elements.
fn ring_graph_ring(backend: &TestBackend, chunk: usize) {
    use prism_pipeline::StageGraph;
    use std::time::Duration;

    let per_obs = 40u64;
    let input: Broadcast<f32, String> = Broadcast::new(Config {
        buffers: 6,
        chunk_capacity: chunk,
        mode: Mode::Block,
    })
    .unwrap();
    let feed = input.reader(ReaderKind::Guaranteed).unwrap();
    let mut writer = input.writer().unwrap();
    let outs: Vec<Broadcast<f32, String>> = (0..2)
        .map(|_| {
            Broadcast::new(Config {
                buffers: 4,
                chunk_capacity: chunk,
                mode: Mode::RealTime,
            })
            .unwrap()
        })
        .collect();
    let readers: Vec<(Reader<f32, String>, Reader<f32, String>)> = outs
        .iter()
        .map(|r| {
            (
                r.reader(ReaderKind::Guaranteed).unwrap(),
                r.reader(ReaderKind::Lossy).unwrap(),
            )
        })
        .collect();
    let mut sinks: Vec<_> = outs
        .iter()
        .map(|r| to_broadcast(r.writer().unwrap()))
        .collect();
    let mut g = StageGraph::<f32>::new();
    let x = g.input();
    let a = g.stage(x, FMA).unwrap();
    let b = g.stage(x, Clamp { lo: -1.0, hi: 1.0 }).unwrap();
    g.output(a).unwrap();
    g.output(b).unwrap();
    let branch = [first as fn(f32) -> f32, second];
    let mut m = backend.manager(PipelineConfig {
        chunk_bytes: chunk * 4,
        ..PipelineConfig::default()
    });

    thread::scope(|s| {
        s.spawn(move || {
            for obs in ["observation A", "observation B"] {
                writer.begin_sequence(obs.to_owned());
                for i in 0..per_obs {
                    let len = 1 + (i as usize * 7919) % chunk;
                    writer.write(&observed(obs, i, len)).unwrap();
                }
            }
        });
        let mut checkers = Vec::new();
        for (k, (slow, lossy)) in readers.into_iter().enumerate() {
            for (reader, pause) in [(slow, Duration::from_millis(2)), (lossy, Duration::ZERO)] {
                let f = branch[k];
                checkers.push(s.spawn(move || {
                    let mut r = reader;
                    let mut seen = 0u64;
                    while let Some(c) = r.read() {
                        let meta = c.meta();
                        let header: &String = &meta.header;
                        let want: Vec<f32> = observed(header, meta.index, c.len())
                            .into_iter()
                            .map(f)
                            .collect();
                        assert!(
                            same_bits(&c, &want),
                            "output {k}: chunk {} of {header} differs",
                            meta.index
                        );
                        seen += 1;
                        drop(c);
                        thread::sleep(pause);
                    }
                    let st = r.reader_stats();
                    assert_eq!(st.delivered, seen);
                    (k, r.kind(), st)
                }));
            }
        }
        let counts = m.run_graph_stream(&mut g, from_broadcast(feed), &mut sinks);
        // Close the output rings first, whatever happened: the readers'
        // threads end, so a failure is reported instead of a hang.
        drop(std::mem::take(&mut sinks));
        assert_eq!(counts.unwrap().chunks, 2 * per_obs);
        for c in checkers {
            let (k, kind, st) = c.join().unwrap();
            let ring = outs[k].stats();
            assert_eq!(ring.committed_chunks, 2 * per_obs, "output {k}");
            assert_eq!(st.delivered + st.missed, 2 * per_obs, "output {k} {kind:?}");
            if kind == ReaderKind::Guaranteed {
                assert_eq!(ring.dropped_chunks, st.missed, "output {k}: dropped");
                assert_eq!(
                    ring.dropped_bytes, st.missed_bytes,
                    "output {k}: dropped bytes"
                );
            }
            assert!(ring.buffers_allocated <= 4, "output {k}: memory flat");
            // Sequences passed on: the ring began one per observation.
            assert_eq!(ring.sequence, 2, "output {k}");
        }
    });
}

#[test]
fn host_tagged_graph_between_rings_passes_sequences_and_drops_exactly() {
    ring_graph_ring(&TestBackend::Host, 4096);
}

#[test]
fn gpu_tagged_graph_between_rings_passes_sequences_and_drops_exactly() {
    let Some(b) = TestBackend::gpu_or_skip(
        "gpu_tagged_graph_between_rings_passes_sequences_and_drops_exactly",
    ) else {
        return;
    };
    ring_graph_ring(&b, scaled(1 << 16, 1 << 10));
}
