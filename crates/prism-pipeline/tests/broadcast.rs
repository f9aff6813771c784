//! `run_stream` into a broadcast ring read by two readers
//! ([`to_broadcast`], [`from_broadcast`]): one reader collects the chunks,
//! the other feeds a second pipeline; both are compared with a CPU
//! reference, bit for bit. On the host backend (runs everywhere) and on the
//! GPU (`gpu_*`, skipped without one).

use std::thread;

use prism_buffer::broadcast::{Broadcast, Config, Mode, Reader, ReaderKind};
use prism_pipeline::{
    from_broadcast, from_iter, sink_fn, to_broadcast, BoxError, Clamp, Fma, GpuPipelineExt,
    PipelineStageManager,
};
use prism_stream::fma_chain_cpu;
use prism_stream::testing::{gpu_or_skip, random_f32, scaled};

mod common;
use common::{host, same_bits};

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

/// Runs `first` over `input` in chunks of `chunk` (with `make`'s manager)
/// into a Block-mode ring read by a collecting reader and by a second host
/// pipeline (`second`), then checks both against the CPU.
fn run_and_check(input: &[f32], chunk: usize, make: impl FnOnce() -> PipelineStageManager<f32>) {
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
        let mut p = make();
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
    run_and_check(&input, chunk, || host(chunk, 3));
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
    let Some(ctx) = gpu_or_skip("gpu_stream_into_a_broadcast_ring_reaches_two_readers_bit_exact")
    else {
        return;
    };
    let chunk = scaled(1 << 16, 1 << 10);
    let input = random_f32(11, 24 * chunk + 77);
    run_and_check(&input, chunk, || {
        let config = prism_pipeline::PipelineConfig {
            chunk_bytes: chunk * 4,
            slots: 3,
            ..prism_pipeline::PipelineConfig::default()
        };
        ctx.create_pipeline_manager::<f32>(config).unwrap()
    });
}
