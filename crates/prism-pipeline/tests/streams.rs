//! Streams and iterations on the host backend (runs everywhere, CI
//! included): sources and sinks of every kind with uneven and empty chunks
//! against a sequential reference, failing and panicking sources, sinks and
//! stages, `execute_iteration` and `flush`.

use std::cell::Cell;
use std::rc::Rc;

use proptest::prelude::*;

use prism_pipeline::{
    fill_with, from_iter, from_read, sink_fn, to_write, BoxError, Error, Fma, HostFn,
    PipelineConfig, PipelineStageManager, Stage,
};
use prism_testing::random_f32;

mod common;
use common::{host, host_threads, reference_chunk, same_bits, stage_from, BoxedStage};

/// The stages over each chunk, one after another.
fn reference(chunks: &[Vec<f32>], codes: &[(u8, f32)]) -> Vec<Vec<f32>> {
    let stages: Vec<Box<dyn Stage<f32>>> = codes.iter().map(|&(c, a)| stage_from(c, a)).collect();
    chunks.iter().map(|c| reference_chunk(&stages, c)).collect()
}

/// Which source a case uses.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `from_iter` over `Vec`s of uneven lengths (empty ones too): packed
    /// into full chunks.
    Iter,
    /// `fill_with` writing uneven lengths in place: one chunk per call.
    Fill,
    /// `from_read` over the raw bytes: packed into full chunks.
    Read,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn streams_of_uneven_chunks_match_the_sequential_reference(
        lens in prop::collection::vec(0usize..300, 0..25),
        chunk in 1usize..200,
        slots in 2usize..=8,
        codes in prop::collection::vec((any::<u8>(), 0.1f32..2.0), 1..4),
        kind in prop_oneof![Just(Kind::Iter), Just(Kind::Fill), Just(Kind::Read)],
        threads in 1usize..=6,
        seed in any::<u64>(),
    ) {
        let items: Vec<Vec<f32>> = lens.iter().enumerate().map(|(k, &n)| random_f32(seed ^ k as u64, n)).collect();
        let all: Vec<f32> = items.concat();
        // The chunks the source makes: packed sources cut the concatenation
        // at the chunk size; fill_with gives each call's length (capped).
        let chunks: Vec<Vec<f32>> = match kind {
            Kind::Iter | Kind::Read => all.chunks(chunk).map(|c| c.to_vec()).collect(),
            Kind::Fill => items.iter().filter(|i| !i.is_empty()).flat_map(|i| i.chunks(chunk).map(|c| c.to_vec())).collect(),
        };
        let want = reference(&chunks, &codes);
        let mut p = host_threads(chunk, slots, threads);
        for &(c, a) in &codes {
            p.add_stage(BoxedStage(stage_from(c, a)));
        }
        let mut got: Vec<(u64, Vec<f32>)> = Vec::new();
        let sink = sink_fn(|k, out: &[f32]| {
            got.push((k, out.to_vec()));
            Ok::<_, BoxError>(())
        });
        let counts = match kind {
            Kind::Iter => p.run_stream(from_iter(items.clone()), sink),
            Kind::Read => {
                let bytes: Vec<u8> = all.iter().flat_map(|v| v.to_ne_bytes()).collect();
                p.run_stream(from_read(&bytes[..]), sink)
            }
            Kind::Fill => {
                // Each non-empty item, cut at the chunk size, one call each.
                let mut pieces = chunks.clone().into_iter();
                p.run_stream(fill_with(move |dst: &mut [f32]| {
                    Ok::<_, BoxError>(match pieces.next() {
                        Some(c) => { dst[..c.len()].copy_from_slice(&c); c.len() }
                        None => 0,
                    })
                }), sink)
            }
        }.unwrap();
        prop_assert_eq!(counts.chunks as usize, want.len());
        prop_assert_eq!(counts.elements_in as usize, all.len());
        prop_assert_eq!(got.len(), want.len());
        for (k, ((index, out), w)) in got.iter().zip(&want).enumerate() {
            prop_assert_eq!(*index, k as u64, "chunks out of order");
            prop_assert!(same_bits(out, w), "chunk {} differs ({:?}, chunk {}, threads {}, stages {:?})", k, kind, chunk, threads, codes);
        }
    }
}

fn doubling(p: &mut PipelineStageManager<f32>) {
    p.add_stage(Fma {
        a: 2.0,
        b: 0.0,
        iters: 1,
    });
}

#[test]
fn a_failing_source_names_its_chunk_and_nothing_after_it_is_delivered() {
    let mut p = host(4, 3);
    doubling(&mut p);
    let mut calls = 0;
    let source = fill_with(move |dst: &mut [f32]| {
        calls += 1;
        if calls == 4 {
            return Err::<usize, BoxError>("disk on fire".into());
        }
        dst.fill(calls as f32);
        Ok(dst.len())
    });
    let mut seen = Vec::new();
    let err = p
        .run_stream(
            source,
            sink_fn(|k, out: &[f32]| {
                seen.push((k, out[0]));
                Ok::<_, BoxError>(())
            }),
        )
        .unwrap_err();
    match err {
        Error::Source {
            chunk: 3,
            ref source,
        } => assert!(source.to_string().contains("fire")),
        other => panic!("expected a source error at chunk 3, got {other}"),
    }
    assert_eq!(
        seen,
        vec![(0, 2.0), (1, 4.0), (2, 6.0)],
        "chunks before the failure are delivered, in order"
    );
}

#[test]
fn a_failing_sink_stops_the_run() {
    let mut p = host(4, 2);
    doubling(&mut p);
    let input = random_f32(3, 400);
    let mut seen = 0;
    let err = p
        .run_stream(
            from_iter([&input[..]]),
            sink_fn(|k, _: &[f32]| {
                seen += 1;
                if k == 5 {
                    Err::<(), BoxError>("full".into())
                } else {
                    Ok(())
                }
            }),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Sink { chunk: 5, .. }), "{err}");
    assert_eq!(seen, 6, "the sink was called after it failed");
    // The manager is usable afterwards.
    let mut out = vec![0.0; input.len()];
    p.run(&input, &mut out).unwrap();
}

#[test]
fn panics_in_stages_sources_and_sinks_come_back_as_errors() {
    let mut p = host(8, 3);
    p.add_stage(HostFn::new("explodes", true, |i: &[f32], o: &mut [f32]| {
        if i[0] > 100.0 {
            panic!("value {} too large", i[0]);
        }
        o.copy_from_slice(i);
        Ok(())
    }));
    let input: Vec<f32> = (0..64).map(|i| i as f32 * 4.0).collect();
    let err = p
        .run_stream(
            from_iter([&input[..]]),
            sink_fn(|_, _: &[f32]| Ok::<_, BoxError>(())),
        )
        .unwrap_err();
    match &err {
        Error::StagePanicked {
            stage,
            chunk,
            message,
        } => {
            assert_eq!(stage, "explodes");
            assert_eq!(
                *chunk, 4,
                "the first chunk starting above 100 (chunks of 8, values 4i)"
            );
            assert!(message.contains("too large"), "{message}");
        }
        other => panic!("expected StagePanicked, got {other}"),
    }
    // Still usable, and through run() too.
    let small: Vec<f32> = (0..32).map(|i| i as f32).collect();
    let mut out = vec![0.0; 32];
    p.run(&small, &mut out).unwrap();
    assert_eq!(out, small);
    let err = p
        .run_stream(
            from_iter([&small[..]]),
            sink_fn(|k, _: &[f32]| {
                if k == 2 {
                    panic!("sink gave up");
                }
                Ok::<_, BoxError>(())
            }),
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::SinkPanicked { chunk: 2, message } if message.contains("gave up")),
        "{err}"
    );
    let err = p
        .run_stream(
            fill_with(|_: &mut [f32]| -> Result<usize, BoxError> { panic!("no input today") }),
            sink_fn(|_, _: &[f32]| Ok::<_, BoxError>(())),
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::SourcePanicked { chunk: 0, message } if message.contains("no input")),
        "{err}"
    );
}

#[test]
fn read_and_write_round_trip_through_the_stages() {
    let mut p = host(100, 3);
    doubling(&mut p);
    let input = random_f32(4, 1234);
    let bytes: Vec<u8> = input.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let mut sink = to_write(Vec::new());
    let counts = p.run_stream(from_read(&bytes[..]), &mut sink).unwrap();
    assert_eq!(counts.chunks, 13);
    let out: Vec<f32> = sink
        .into_inner()
        .chunks(4)
        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert!(same_bits(
        &out,
        &input.iter().map(|v| v * 2.0).collect::<Vec<_>>()
    ));
    // A byte count that is not a whole number of elements is a source error.
    let err = p
        .run_stream(
            from_read(&bytes[..5]),
            sink_fn(|_, _: &[f32]| Ok::<_, BoxError>(())),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Source { chunk: 0, .. }), "{err}");
}

#[test]
fn a_long_stream_reuses_a_bounded_set_of_buffers() {
    // 20,000 chunks through a 3-slot ring: the sink sees each chunk's data
    // at one of a few addresses (the recycled buffers), not 20,000.
    let mut p = host(64, 3);
    doubling(&mut p);
    let produced = Rc::new(Cell::new(0u64));
    let pc = Rc::clone(&produced);
    let source = fill_with(move |dst: &mut [f32]| {
        if pc.get() == 20_000 {
            return Ok::<_, BoxError>(0);
        }
        pc.set(pc.get() + 1);
        dst.fill(1.0);
        Ok(dst.len())
    });
    let mut addresses = std::collections::HashSet::new();
    let counts = p
        .run_stream(
            source,
            sink_fn(|_, out: &[f32]| {
                addresses.insert(out.as_ptr() as usize);
                assert!(out.iter().all(|v| *v == 2.0));
                Ok::<_, BoxError>(())
            }),
        )
        .unwrap();
    assert_eq!(counts.chunks, 20_000);
    assert!(
        addresses.len() <= 8,
        "{} distinct output buffers",
        addresses.len()
    );
}

#[test]
fn execute_iteration_on_the_host_returns_each_chunk_at_once() {
    let mut p = host(16, 3);
    doubling(&mut p);
    assert!(
        p.flush().unwrap().is_empty(),
        "flush with nothing submitted"
    );
    for (k, len) in [16usize, 3, 9, 1].into_iter().enumerate() {
        let chunk: Vec<f32> = (0..len).map(|i| i as f32).collect();
        let out = p.execute_iteration(&chunk).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].index, k as u64);
        let want: Vec<f32> = chunk.iter().map(|v| v * 2.0).collect();
        assert_eq!(out[0].data.as_deref(), Some(&want[..]));
    }
    assert!(p.flush().unwrap().is_empty());
    assert!(matches!(
        p.execute_iteration(&[0.0; 17]),
        Err(Error::Config(_))
    ));
    assert_eq!(
        p.execute_iteration_blocking(&[1.0, 2.0]).unwrap(),
        vec![2.0, 4.0]
    );
}

#[test]
fn an_idle_iteration_session_ends_quietly_and_indices_restart() {
    let mut p = host(8, 3);
    doubling(&mut p);
    let out = p.execute_iteration(&[1.0, 2.0]).unwrap();
    assert_eq!(out[0].index, 0);
    // A new configuration or a whole run ends the idle session (nothing is
    // pending on the host); the next session counts from 0 again.
    p.set_config(PipelineConfig {
        chunk_bytes: 16 * 4,
        slots: 4,
        ..PipelineConfig::default()
    })
    .unwrap();
    assert_eq!(p.execute_iteration(&[3.0; 16]).unwrap()[0].index, 0);
    assert_eq!(p.execute_iteration(&[3.0; 5]).unwrap()[0].index, 1);
    let mut out = vec![0.0; 40];
    p.run(&[1.5; 40], &mut out).unwrap();
    assert!(out.iter().all(|v| *v == 3.0));
    let again = p.execute_iteration(&[4.0]).unwrap();
    assert_eq!(again[0].index, 0);
    assert_eq!(again[0].data.as_deref(), Some(&[8.0][..]));
    assert!(p.flush().unwrap().is_empty());
    assert_eq!(p.pending_iterations(), 0);
}
