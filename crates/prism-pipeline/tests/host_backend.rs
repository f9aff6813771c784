//! The host backend: ordering, back-pressure, failing stages, empty input,
//! bad configuration, and random pipelines against a sequential reference.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use proptest::prelude::*;

use prism_pipeline::{
    AsyncPipelineCoordinator, Backend, BackendKind, Clamp, Error, Fma, GroupSum, HostFn,
    PipelineConfig, PipelineStageManager, PipelineStats, Stage,
};
use prism_stream::testing::random_f32;

mod common;
use common::{host, reference_chunk, same_bits, stage_from, BoxedStage};

/// Sequential reference: chunk the input, run each stage over each chunk in turn.
fn reference(input: &[f32], chunk: usize, stages: &mut [Box<dyn Stage<f32>>]) -> Vec<f32> {
    input
        .chunks(chunk)
        .flat_map(|c| reference_chunk(stages, c))
        .collect()
}

#[test]
fn output_order_equals_input_order() {
    let input = random_f32(1, 100_003);
    let mut p = host(1000, 3);
    p.add_stage(Fma {
        a: 1.5,
        b: -0.5,
        iters: 2,
    });
    p.add_stage(Clamp { lo: -1.0, hi: 1.0 });
    let mut out = vec![f32::NAN; p.total_output_len(input.len())];
    p.run(&input, &mut out).unwrap();
    let mut stages: Vec<Box<dyn Stage<f32>>> = vec![
        Box::new(Fma {
            a: 1.5,
            b: -0.5,
            iters: 2,
        }),
        Box::new(Clamp { lo: -1.0, hi: 1.0 }),
    ];
    assert!(same_bits(&out, &reference(&input, 1000, &mut stages)));
    let s = p.get_stats();
    assert_eq!(
        (s.backend, s.runs, s.chunks),
        (Some(BackendKind::Host), 1, 101)
    );
    assert_eq!(s.stages.len(), 2);
    assert!(s.to_string().contains("bound"), "{s}");
}

#[test]
fn back_pressure_bounds_chunks_ahead_of_a_slow_consumer() {
    let produced = Arc::new(AtomicUsize::new(0));
    let p2 = Arc::clone(&produced);
    let counting = HostFn::new("count", true, move |i: &[f32], o: &mut [f32]| {
        p2.fetch_add(1, Ordering::SeqCst);
        o.copy_from_slice(i);
        Ok(())
    });
    let mut stages: Vec<Box<dyn Stage<f32>>> = vec![Box::new(counting)];
    let input = random_f32(2, 64 * 100);
    let slots = 2;
    let coordinator = AsyncPipelineCoordinator::new(slots).unwrap();
    let mut max_ahead = 0;
    let mut stats = PipelineStats::default();
    let n = coordinator
        .run(
            &mut stages,
            &[0],
            input.chunks(64),
            |k, out| {
                std::thread::sleep(std::time::Duration::from_millis(2));
                let ahead = produced.load(Ordering::SeqCst) - k as usize;
                max_ahead = max_ahead.max(ahead);
                assert_eq!(
                    out,
                    &input[k as usize * 64..(k as usize + 1) * 64],
                    "chunk {k} out of order"
                );
                Ok(())
            },
            &mut stats,
        )
        .unwrap();
    assert_eq!(n, 100);
    // In the channel (slots), in the worker's hands (1), being consumed (1).
    assert!(
        max_ahead <= slots + 2,
        "producer ran {max_ahead} chunks ahead with {slots} slots"
    );
    assert!(
        max_ahead >= 2,
        "the producer never ran ahead: no overlap at all"
    );
}

#[test]
fn failing_stage_stops_the_run_names_stage_and_chunk_and_pipeline_is_reusable() {
    let mut p = host(10, 3);
    let fma = p.add_stage(Fma {
        a: 2.0,
        b: 0.0,
        iters: 1,
    });
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = Arc::clone(&seen);
    p.add_stage(HostFn::new(
        "flaky",
        true,
        move |i: &[f32], o: &mut [f32]| {
            if s2.fetch_add(1, Ordering::SeqCst) == 3 {
                return Err("boom".into());
            }
            o.copy_from_slice(i);
            Ok(())
        },
    ));
    let input = random_f32(3, 100);
    let mut out = vec![0.0; 100];
    match p.run(&input, &mut out) {
        Err(Error::Stage {
            stage,
            chunk,
            source,
        }) => {
            assert_eq!((stage.as_str(), chunk), ("flaky", 3));
            assert_eq!(source.to_string(), "boom");
        }
        other => panic!("expected a stage error, got {other:?}"),
    }
    p.set_order(&[fma]).unwrap();
    p.run(&input, &mut out).unwrap();
    assert!(out.iter().zip(&input).all(|(o, i)| *o == i * 2.0));
}

#[test]
fn empty_input_is_a_valid_run_of_zero_chunks() {
    let mut p = host(16, 3);
    p.add_stage(Fma {
        a: 1.0,
        b: 1.0,
        iters: 1,
    });
    p.run(&[], &mut []).unwrap();
    assert_eq!((p.get_stats().runs, p.get_stats().chunks), (1, 0));
    assert!(p.execute_iteration(&[]).unwrap().is_empty());
    assert!(
        p.flush().unwrap().is_empty(),
        "flush with nothing submitted"
    );
}

#[test]
fn bad_input_gets_typed_errors() {
    let mut p = host(16, 3);
    assert!(matches!(p.run(&[1.0], &mut [0.0]), Err(Error::NoStages)));
    p.add_stage(GroupSum { group: 4 });
    let mut short = vec![0.0; 1];
    assert!(matches!(
        p.run(&[1.0; 16], &mut short),
        Err(Error::OutputLength {
            expected: 4,
            actual: 1
        })
    ));
    assert!(matches!(p.set_order(&[]), Err(Error::NoStages)));
    assert!(matches!(
        p.set_order(&[1]),
        Err(Error::UnknownStage { index: 1, count: 1 })
    ));
    p.add_stage(Clamp { lo: 0.0, hi: 1.0 });
    assert!(matches!(
        p.set_order(&[1, 1]),
        Err(Error::RepeatedStage { index: 1 })
    ));
    let bad = PipelineConfig {
        slots: 9,
        ..PipelineConfig::default()
    };
    assert!(matches!(
        PipelineStageManager::<f32>::new(Backend::Host, bad),
        Err(Error::Config(_))
    ));
    let mut items_out = [0.0; 3];
    let err = p
        .run_items(vec![(&[1.0f32, 2.0, 3.0][..], &mut items_out[..])])
        .unwrap_err();
    assert!(
        matches!(err, Error::Unsupported { .. }),
        "group_sum is not elementwise: {err}"
    );
}

#[test]
fn items_come_back_into_their_own_outputs() {
    let mut p = host(1000, 2);
    p.add_stage(Fma {
        a: 0.5,
        b: 2.0,
        iters: 3,
    });
    let inputs: Vec<Vec<f32>> = (0..50)
        .map(|k| random_f32(k, (k as usize * 37) % 300 + 1))
        .collect();
    let mut outputs: Vec<Vec<f32>> = inputs.iter().map(|i| vec![f32::NAN; i.len()]).collect();
    let n = p
        .run_items(
            inputs
                .iter()
                .map(|v| v.as_slice())
                .zip(outputs.iter_mut().map(|v| v.as_mut_slice())),
        )
        .unwrap();
    assert_eq!(n, 50);
    for (i, o) in inputs.iter().zip(&outputs) {
        assert!(i
            .iter()
            .zip(o)
            .all(|(x, y)| prism_stream::fma_chain_cpu(*x, 0.5, 2.0, 3).to_bits() == y.to_bits()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn random_pipelines_match_the_sequential_reference(
        n in 0usize..3000,
        chunk in 1usize..700,
        slots in 2usize..=8,
        codes in prop::collection::vec((any::<u8>(), 0.1f32..2.0), 1..5),
        seed in any::<u64>(),
    ) {
        let input = random_f32(seed, n);
        let mut p = host(chunk, slots);
        for &(c, a) in &codes {
            p.add_stage(BoxedStage(stage_from(c, a)));
        }
        let mut out = vec![f32::NAN; p.total_output_len(n)];
        p.run(&input, &mut out).unwrap();
        let mut reference_stages: Vec<Box<dyn Stage<f32>>> = codes.iter().map(|&(c, a)| stage_from(c, a)).collect();
        let want = reference(&input, chunk, &mut reference_stages);
        prop_assert!(same_bits(&out, &want), "n={} chunk={} slots={} stages={:?}", n, chunk, slots, codes);
    }
}
