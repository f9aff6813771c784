//! The host backend: ordering, back-pressure, failing stages, empty input,
//! bad configuration, and random pipelines against a sequential reference.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use proptest::prelude::*;

use prism_pipeline::{
    AsyncPipelineCoordinator, Backend, BackendKind, Clamp, Error, Fma, GroupSum, HostFn,
    PipelineConfig, PipelineStageManager, PipelineStats, Stage,
};
use prism_testing::random_f32;

mod common;
use common::{host, host_threads, reference_chunk, same_bits, stage_from, BoxedStage};

/// Sequential reference: chunk the input, run each stage over each chunk in turn.
fn reference(input: &[f32], chunk: usize, stages: &[Box<dyn Stage<f32>>]) -> Vec<f32> {
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
    let stages: Vec<Box<dyn Stage<f32>>> = vec![
        Box::new(Fma {
            a: 1.5,
            b: -0.5,
            iters: 2,
        }),
        Box::new(Clamp { lo: -1.0, hi: 1.0 }),
    ];
    assert!(same_bits(&out, &reference(&input, 1000, &stages)));
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
    let stages: Vec<Box<dyn Stage<f32>>> = vec![Box::new(counting)];
    let input = random_f32(2, 64 * 100);
    let slots = 2;
    let coordinator = AsyncPipelineCoordinator::new(slots).unwrap();
    let mut max_ahead = 0;
    let mut stats = PipelineStats::default();
    let n = coordinator
        .run(
            &stages,
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
    // At most `slots` chunks pulled and not yet delivered (the one being
    // consumed included); the old single worker allowed two more.
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn random_pipelines_match_the_sequential_reference(
        n in 0usize..3000,
        chunk in 1usize..700,
        slots in 2usize..=8,
        codes in prop::collection::vec((any::<u8>(), 0.1f32..2.0), 1..5),
        threads in 1usize..=8,
        seed in any::<u64>(),
    ) {
        let input = random_f32(seed, n);
        let mut p = host_threads(chunk, slots, threads);
        for &(c, a) in &codes {
            p.add_stage(BoxedStage(stage_from(c, a)));
        }
        let mut out = vec![f32::NAN; p.total_output_len(n)];
        p.run(&input, &mut out).unwrap();
        let reference_stages: Vec<Box<dyn Stage<f32>>> = codes.iter().map(|&(c, a)| stage_from(c, a)).collect();
        let want = reference(&input, chunk, &reference_stages);
        prop_assert!(same_bits(&out, &want), "n={} chunk={} slots={} threads={} stages={:?}", n, chunk, slots, threads, codes);
        let s = p.get_stats();
        prop_assert_eq!(s.chunks as usize, n.div_ceil(chunk));
        prop_assert_eq!(s.bytes_out as usize, want.len() * 4);
    }
}

/// Runs `f` on its own thread and fails the test if it has not returned
/// within a minute (a hang), instead of hanging the test run.
fn no_hang<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("the run hung (or panicked)")
}

/// Chunk `k` of `chunks` chunks of `len`: values `k * 1000 + i`, so a
/// stage can tell the chunk from its first element.
fn numbered(chunks: usize, len: usize) -> Vec<f32> {
    (0..chunks)
        .flat_map(|k| (0..len).map(move |i| (k * 1000 + i) as f32))
        .collect()
}

/// Counts the chunks inside a stage at once, and the most ever.
#[derive(Default)]
struct Concurrency {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Concurrency {
    fn enter(&self) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
    }
    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

#[test]
fn many_threads_with_uneven_work_deliver_in_order() {
    let (chunks, len, slots) = (64usize, 100usize, 8usize);
    let input = numbered(chunks, len);
    let load = Arc::new(Concurrency::default());
    let mut p = host_threads(len, slots, 8);
    let l2 = Arc::clone(&load);
    p.add_stage(HostFn::new(
        "uneven",
        true,
        move |i: &[f32], o: &mut [f32]| {
            l2.enter();
            // 0 to 4 ms, in no order: later chunks often finish first.
            let k = i[0] as u64 / 1000;
            std::thread::sleep(std::time::Duration::from_millis(k * 7919 % 5));
            o.copy_from_slice(i);
            l2.leave();
            Ok(())
        },
    ));
    p.add_stage(Fma {
        a: 0.75,
        b: 1.0,
        iters: 3,
    });
    let want: Vec<f32> = input
        .iter()
        .map(|x| prism_stream::fma_chain_cpu(*x, 0.75, 1.0, 3))
        .collect();
    let mut got: Vec<(u64, Vec<f32>)> = Vec::new();
    let counts = p
        .run_stream(
            prism_pipeline::from_iter([&input[..]]),
            prism_pipeline::sink_fn(|k, out: &[f32]| {
                got.push((k, out.to_vec()));
                Ok::<_, prism_pipeline::BoxError>(())
            }),
        )
        .unwrap();
    assert_eq!(counts.chunks, chunks as u64);
    for (k, (index, out)) in got.iter().enumerate() {
        assert_eq!(*index, k as u64, "chunks out of order");
        assert!(same_bits(out, &want[k * len..(k + 1) * len]), "chunk {k}");
    }
    // The same through run(), which writes straight into the output.
    let mut out = vec![f32::NAN; input.len()];
    p.run(&input, &mut out).unwrap();
    assert!(same_bits(&out, &want));
    let peak = load.peak.load(Ordering::SeqCst);
    assert!(peak > 1, "the chunks never ran at once");
    assert!(
        peak <= slots,
        "{peak} chunks in the stage with {slots} slots"
    );
    let s = p.get_stats();
    assert_eq!((s.runs, s.chunks), (2, 2 * chunks as u64));
    assert_eq!(s.bytes_out, 2 * 4 * input.len() as u64);
    let names: Vec<&str> = s.stages.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["uneven", "fma"]);
    // The union of the stage spans: no more than the wall time.
    assert!(s.compute_busy_ms <= s.wall_ms + 1.0, "{s}");
}

/// A stage that fails (or panics) on chunk 7, after a while, while the
/// chunks after it run on other threads; it counts those that finished.
fn fails_on_seven(panics: bool, later: Arc<AtomicUsize>) -> impl Stage<f32> {
    HostFn::new("flaky", true, move |i: &[f32], o: &mut [f32]| {
        let k = i[0] as usize / 1000;
        if k == 7 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            if panics {
                panic!("chunk seven panicked");
            }
            return Err("chunk seven failed".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        o.copy_from_slice(i);
        if k > 7 {
            later.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    })
}

#[test]
fn a_stage_failing_mid_run_names_its_chunk_after_delivering_the_ones_before() {
    for panics in [false, true] {
        let (len, chunks) = (10usize, 40usize);
        let input = numbered(chunks, len);
        let later = Arc::new(AtomicUsize::new(0));
        let mut p = host_threads(len, 6, 6);
        p.add_stage(fails_on_seven(panics, Arc::clone(&later)));
        let (p, seen, err) = no_hang(move || {
            let mut seen = Vec::new();
            let err = p
                .run_stream(
                    prism_pipeline::from_iter([&input[..]]),
                    prism_pipeline::sink_fn(|k, out: &[f32]| {
                        assert_eq!(out[0], (k * 1000) as f32);
                        seen.push(k);
                        Ok::<_, prism_pipeline::BoxError>(())
                    }),
                )
                .unwrap_err();
            (p, seen, err)
        });
        match (&err, panics) {
            (
                Error::Stage {
                    stage,
                    chunk,
                    source,
                },
                false,
            ) => {
                assert_eq!((stage.as_str(), *chunk), ("flaky", 7));
                assert_eq!(source.to_string(), "chunk seven failed");
            }
            (
                Error::StagePanicked {
                    stage,
                    chunk,
                    message,
                },
                true,
            ) => {
                assert_eq!((stage.as_str(), *chunk), ("flaky", 7));
                assert!(message.contains("seven"), "{message}");
            }
            (other, _) => panic!("expected chunk 7 to fail, got {other}"),
        }
        assert_eq!(seen, (0..7).collect::<Vec<u64>>(), "panics: {panics}");
        assert!(
            later.load(Ordering::SeqCst) > 0,
            "no chunk after 7 ran while it was in its stage"
        );
        // The same through run(): the chunks before 7 are in the output.
        let mut p = p;
        let input = numbered(chunks, len);
        let mut out = vec![f32::NAN; input.len()];
        let (p, out, err) = no_hang(move || {
            let err = p.run(&input, &mut out).unwrap_err();
            (p, out, err)
        });
        assert!(
            matches!(
                &err,
                Error::Stage { chunk: 7, .. } | Error::StagePanicked { chunk: 7, .. }
            ),
            "{err}"
        );
        assert!(same_bits(&out[..7 * len], &numbered(7, len)));
        // The manager is usable afterwards.
        let mut p = p;
        let short = numbered(7, len);
        let mut out = vec![0.0; short.len()];
        p.run(&short, &mut out).unwrap();
        assert!(same_bits(&out, &short));
    }
}

#[test]
fn a_coordinator_called_from_a_pool_thread_runs_there_instead_of_waiting_on_it() {
    // On a pool's only thread, waiting for the pool would never end: the
    // coordinator runs the stages on the calling thread instead.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let n = no_hang(move || {
        pool.install(|| {
            let stages: Vec<Box<dyn Stage<f32>>> = vec![Box::new(Fma {
                a: 2.0,
                b: 0.0,
                iters: 1,
            })];
            let input = random_f32(9, 1000);
            let mut next = 0;
            AsyncPipelineCoordinator::new(3)
                .unwrap()
                .run(
                    &stages,
                    &[0],
                    input.chunks(64),
                    |k, out| {
                        assert_eq!(k, next);
                        let want: Vec<f32> = input[k as usize * 64..][..out.len()]
                            .iter()
                            .map(|v| v * 2.0)
                            .collect();
                        assert!(same_bits(out, &want));
                        next += 1;
                        Ok(())
                    },
                    &mut PipelineStats::default(),
                )
                .unwrap()
        })
    });
    assert_eq!(n, 16);
}

/// A stage that keeps state across chunks and runs: the chunks it saw.
struct Counting {
    seen: AtomicUsize,
}

impl Stage<f32> for Counting {
    fn name(&self) -> &str {
        "counting"
    }
    fn has_host(&self) -> bool {
        true
    }
    fn host(&self, input: &[f32], output: &mut [f32]) -> Result<(), prism_pipeline::StageError> {
        self.seen.fetch_add(1, Ordering::Relaxed);
        output.copy_from_slice(input);
        Ok(())
    }
}

#[test]
fn stages_are_found_again_by_index_and_type() {
    let mut p = host(100, 3);
    let fma = p.add_stage(Fma {
        a: 2.0,
        b: 0.0,
        iters: 1,
    });
    let counting = p.add_stage(Counting {
        seen: AtomicUsize::new(0),
    });
    // The right type at the right index, nothing else.
    assert_eq!(p.stage::<Fma>(fma).map(|s| s.a), Some(2.0));
    assert!(p.stage::<Clamp>(fma).is_none(), "another type");
    assert!(p.stage::<Fma>(counting).is_none(), "another stage");
    assert!(p.stage::<Fma>(7).is_none(), "an unknown index");
    // State kept by a stage persists across chunks and runs.
    let input = random_f32(3, 1000);
    let mut out = vec![0.0; 1000];
    p.run(&input, &mut out).unwrap();
    p.run(&input, &mut out).unwrap();
    let seen = p
        .stage::<Counting>(counting)
        .unwrap()
        .seen
        .load(Ordering::Relaxed);
    assert_eq!(seen, 20, "10 chunks per run, two runs");
    // A change through stage_mut is what the next run uses.
    p.stage_mut::<Fma>(fma).unwrap().a = 3.0;
    p.run(&input, &mut out).unwrap();
    let want: Vec<f32> = input.iter().map(|x| x.mul_add(3.0, 0.0)).collect();
    assert!(same_bits(&out, &want));
    assert!(p.stage_mut::<Counting>(fma).is_none());
}
