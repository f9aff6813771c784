//! Adversarial review of the host backend's public API: each test pins a
//! promise of the docs (docs/guide.md, the rustdoc) that the code broke
//! when the test was written (each failed then; the fixes are in the same
//! history), so each guards against that bug coming back. Anything that
//! might hang runs in a thread under a timeout, so a hang is a failure.

use std::sync::mpsc;
use std::time::Duration;

use prism_buffer::broadcast::{Broadcast, Config, Mode, ReaderKind};
use prism_pipeline::{
    fill_with, from_broadcast, sink_fn, to_broadcast, Backend, BoxError, Error, Fma, HostFn,
    PipelineConfig, PipelineStageManager, Stage, StageError, StageGraph,
};

/// A host manager with chunks of `chunk` f32, `slots` slots, 2 threads.
fn host(chunk: usize, slots: usize) -> PipelineStageManager<f32> {
    PipelineStageManager::new(
        Backend::Host,
        PipelineConfig {
            chunk_bytes: chunk * 4,
            slots,
            host_threads: 2,
            ..PipelineConfig::default()
        },
    )
    .unwrap()
}

const FMA: Fma = Fma {
    a: 2.0,
    b: 1.0,
    iters: 1,
};

/// Runs `f` on a thread; `None` if it did not finish within `secs`
/// (the thread is left behind: the test fails instead of hanging).
fn within<R: Send + 'static>(secs: u64, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).ok()
}

// ---------------------------------------------------------------------------
// Finding 1: a run_items that fails on a bad item adds to the stats.

/// host_misuse.rs pins "a failed run adds nothing to the stats" for `run`.
/// `run_items` whose third item is refused (`ItemTooLong`) returns `Err`
/// and counts no run, but the two items before it already added their
/// stage times, busy time and output bytes: the stats now show output
/// bytes and stage time for zero runs and zero input bytes.
/// (host.rs `run_pull` merges the tally whenever `outcome.is_ok()`, and a
/// pull error comes back as `Ok((n, Some(e)))`; runs.rs `run_items` then
/// returns the error without `finish_run`.)
#[test]
fn a_run_items_refused_at_a_later_item_adds_nothing_to_the_stats() {
    let mut p = host(16, 3);
    p.add_stage(FMA);
    let before = p.get_stats().clone();
    let (a, b, long) = (vec![1.0f32; 8], vec![2.0f32; 8], vec![3.0f32; 17]);
    let (mut oa, mut ob, mut ol) = (vec![0.0f32; 8], vec![0.0f32; 8], vec![0.0f32; 17]);
    let r = p.run_items([
        (&a[..], &mut oa[..]),
        (&b[..], &mut ob[..]),
        (&long[..], &mut ol[..]),
    ]);
    assert!(
        matches!(r, Err(Error::ItemTooLong { item: 2, .. })),
        "{r:?}"
    );
    let after = p.get_stats();
    assert_eq!(after.runs, before.runs, "a failed run is not a run");
    assert_eq!(after.bytes_in, before.bytes_in, "bytes in of a failed run");
    assert_eq!(
        after.bytes_out, before.bytes_out,
        "bytes out of a failed run"
    );
    assert_eq!(after.stages, before.stages, "stage times of a failed run");
    assert_eq!(after.compute_busy_ms, before.compute_busy_ms);
}

// ---------------------------------------------------------------------------
// Finding 2: a chain stage whose output_len panics unwinds into `run`.

/// An elementwise stage whose `output_len` panics on lengths that are not
/// a multiple of 4 (the graph tests' `Picky`).
struct Picky;

impl Stage<f32> for Picky {
    fn name(&self) -> &str {
        "picky"
    }
    fn elementwise(&self) -> bool {
        true
    }
    fn output_len(&self, n: usize) -> usize {
        assert!(n.is_multiple_of(4), "picky: {n} not a multiple of 4");
        n
    }
    fn has_host(&self) -> bool {
        true
    }
    fn host(&self, i: &[f32], o: &mut [f32]) -> Result<(), StageError> {
        o.copy_from_slice(i);
        Ok(())
    }
}

/// guard.rs: "User code (stages, sources, sinks) called under
/// `catch_unwind`: its error or panic becomes a typed error that names the
/// chunk"; graph_edges.rs pins it for graphs (`StagePanicked` from
/// `graph_output_lens`). The same stage in a chain: `run` over 10 elements
/// in chunks of 16 asks `output_len(10)` in `begin_run` →
/// `total_output_len` → `output_len` (lib.rs), outside any guard, and the
/// panic unwinds into the caller.
#[test]
fn a_chain_stage_whose_output_len_panics_is_a_typed_error_not_an_unwind() {
    let mut p = host(16, 3);
    p.add_stage(Picky);
    let input = vec![1.0f32; 10];
    let mut out = vec![0.0f32; 10];
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.run(&input, &mut out)));
    let r = r.expect("run unwound a stage's output_len panic into the caller");
    assert!(matches!(r, Err(Error::StagePanicked { .. })), "{r:?}");
}

// ---------------------------------------------------------------------------
// Finding 3: a huge (accepted) chunk_bytes makes run_stream panic.

/// `PipelineConfig::check` accepts any `chunk_bytes` that is a whole
/// number of elements, however large. On the host backend `run_stream`
/// then sizes every source slot to the full chunk (`buf.resize(chunk,
/// zero)` in runs.rs): with `chunk_bytes` near `usize::MAX` that is a
/// "capacity overflow" panic out of `run_stream`, for a 3-element stream.
/// Either `new` refuses the configuration (`Error::Config`, as
/// `Broadcast::new` refuses buffers past isize::MAX bytes) or the run works.
#[test]
fn a_huge_chunk_size_is_refused_or_streams_not_a_panic() {
    let config = PipelineConfig {
        chunk_bytes: usize::MAX & !3,
        host_threads: 2,
        ..PipelineConfig::default()
    };
    let mut p = match PipelineStageManager::<f32>::new(Backend::Host, config) {
        Err(Error::Config(_)) => return, // refused: fine
        Err(e) => panic!("unexpected error {e:?}"),
        Ok(p) => p,
    };
    p.add_stage(FMA);
    let mut sent = false;
    let mut got = Vec::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        p.run_stream(
            fill_with(|slot: &mut [f32]| {
                if sent {
                    return Ok::<_, BoxError>(0);
                }
                sent = true;
                slot[..3].copy_from_slice(&[1.0, 2.0, 3.0]);
                Ok(3)
            }),
            sink_fn(|_, out: &[f32]| {
                got.extend_from_slice(out);
                Ok::<_, BoxError>(())
            }),
        )
    }));
    let r = r.expect("run_stream panicked on a chunk size new() accepted");
    match r {
        Ok(_) => assert_eq!(got, vec![3.0, 5.0, 7.0]),
        Err(e) => assert!(matches!(e, Error::Config(_)), "{e:?}"),
    }
}

/// The largest chunk `new` accepts (isize::MAX bytes): a stream's host
/// slot that the allocator refuses is `OutOfMemory`, not an abort, and the
/// manager stays usable.
#[test]
fn the_largest_chunk_size_streams_or_is_out_of_memory() {
    let config = PipelineConfig {
        chunk_bytes: isize::MAX as usize & !3,
        host_threads: 2,
        ..PipelineConfig::default()
    };
    let mut p = PipelineStageManager::<f32>::new(Backend::Host, config).unwrap();
    p.add_stage(FMA);
    let r = p.run_stream(
        fill_with(|_: &mut [f32]| Ok::<_, BoxError>(0)),
        sink_fn(|_, _: &[f32]| Ok::<_, BoxError>(())),
    );
    assert!(
        matches!(
            r,
            Err(Error::Stream(prism_stream::Error::OutOfMemory { .. }))
        ),
        "{r:?}"
    );
    // Still usable with a sane chunk.
    p.set_config(PipelineConfig {
        chunk_bytes: 64,
        host_threads: 2,
        ..PipelineConfig::default()
    })
    .unwrap();
    let input: Vec<f32> = (0..40).map(|i| i as f32 - 7.5).collect();
    let mut out = vec![f32::NAN; 40];
    p.run(&input, &mut out).unwrap();
    let want: Vec<f32> = input.iter().map(|&x| x.mul_add(2.0, 1.0)).collect();
    assert_eq!(out, want);
}

// ---------------------------------------------------------------------------
// Finding 4: a broadcast sink kept over two tagged runs keeps the first
// ring's header.

/// broadcast_io.rs: `to_broadcast` — "pass `&mut sink` to keep it over
/// several runs"; its `TaggedSink` impl: "the first chunk of each incoming
/// sequence begins a sequence of this ring with the same header". Two
/// input rings, each in its sequence 0 with its own header ("A", "B"),
/// streamed one after the other through one graph into the same output
/// ring. The sink remembers only the incoming sequence *number*
/// (`passing: Option<u64>`), and both are 0: the second run begins no
/// sequence, and ring B's chunks come out under header "A" (silently wrong
/// metadata).
#[test]
fn a_broadcast_sink_kept_over_two_runs_passes_on_the_second_rings_header() {
    let config = Config {
        buffers: 8,
        chunk_capacity: 16,
        mode: Mode::Block,
    };
    let out: Broadcast<f32, String> = Broadcast::new(config).unwrap();
    let mut store = out.reader(ReaderKind::Guaranteed).unwrap();
    let mut sinks = [to_broadcast(out.writer().unwrap())];
    let mut g = StageGraph::<f32>::new();
    let x = g.input();
    let f = g.stage(x, FMA).unwrap();
    g.output(f).unwrap();
    let mut m = host(16, 3);
    for header in ["A", "B"] {
        let ring: Broadcast<f32, String> =
            Broadcast::with_header(config, header.to_owned()).unwrap();
        let feed = from_broadcast(ring.reader(ReaderKind::Guaranteed).unwrap());
        let mut w = ring.writer().unwrap();
        w.write(&[1.0; 4]).unwrap();
        w.write(&[2.0; 4]).unwrap();
        drop(w); // closes the ring: the source ends after the two chunks
        m.run_graph_stream(&mut g, feed, &mut sinks).unwrap();
    }
    drop(sinks); // closes the output ring
    let mut headers = Vec::new();
    while let Some(c) = store.read() {
        headers.push((*c.meta().header).clone());
    }
    assert_eq!(
        headers,
        ["A", "A", "B", "B"],
        "headers of the output chunks"
    );
}

// ---------------------------------------------------------------------------
// Finding 5: an execute_iteration session in which every call failed
// counts as a run.

/// A session whose only chunk failed in its stage, then `flush`: nothing
/// ran to completion, yet the stats count one run (and the failed call's
/// wall time). "A failed run adds nothing to the stats." (iterate.rs
/// `host_iteration` bumps `submitted` before running the chunk; `flush`
/// counts a run for any `submitted > 0`; `iteration` adds `wall_ms` even
/// when the call failed.)
#[test]
fn a_session_whose_only_iteration_failed_adds_no_run() {
    let mut p = host(16, 3);
    p.add_stage(HostFn::new("fails", true, |_: &[f32], _: &mut [f32]| {
        Err("no".into())
    }));
    let r = p.execute_iteration(&[1.0; 8]);
    assert!(matches!(r, Err(Error::Stage { chunk: 0, .. })), "{r:?}");
    assert!(p.flush().unwrap().is_empty());
    let s = p.get_stats();
    assert_eq!((s.runs, s.chunks, s.bytes_in, s.bytes_out), (0, 0, 0, 0));
    assert_eq!(s.wall_ms, 0.0, "wall time of a failed call");
}

// ---------------------------------------------------------------------------
// Finding 6: size arithmetic on huge lengths.

/// A stage that doubles the data (output_len saturates: the stage itself
/// is careful).
struct Upsample;

impl Stage<f32> for Upsample {
    fn name(&self) -> &str {
        "upsample"
    }
    fn output_len(&self, n: usize) -> usize {
        n.saturating_mul(2)
    }
    fn has_host(&self) -> bool {
        true
    }
    fn host(&self, i: &[f32], o: &mut [f32]) -> Result<(), StageError> {
        for (k, v) in i.iter().enumerate() {
            o[2 * k] = *v;
            o[2 * k + 1] = *v;
        }
        Ok(())
    }
}

/// `total_output_len(n)` (lib.rs) computes `full * self.output_len(c)`
/// unchecked: for a huge `n` and a stage that grows the data it overflows
/// (a panic in debug builds, a wrapped, wrong length in release).
#[test]
fn total_output_len_of_a_huge_input_does_not_overflow() {
    let mut p = host(16, 3);
    p.add_stage(Upsample);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        p.total_output_len(usize::MAX - 1)
    }));
    let n = r.expect("total_output_len overflowed");
    assert!(n >= usize::MAX / 2, "a wrapped length {n}");
}

/// `graph_output_lens(&g, n)` walks the chunk plan chunk by chunk
/// (dag.rs `planned_output_lens`), so a huge `n` is a loop of `n / chunk`
/// iterations: with 16-element chunks and n = 2^60 it never returns.
/// (A chain's `total_output_len` answers the same question in O(1).)
#[test]
fn graph_output_lens_of_a_huge_length_returns() {
    let r = within(5, || {
        let m = host(16, 3);
        let mut g = StageGraph::<f32>::new();
        let x = g.input();
        let f = g.stage(x, FMA).unwrap();
        g.output(f).unwrap();
        m.graph_output_lens(&g, 1 << 60).map_err(|e| e.to_string())
    });
    let r = r.expect("graph_output_lens(2^60) did not return within 5 s");
    assert_eq!(r.unwrap(), vec![1usize << 60]);
}

// ---------------------------------------------------------------------------
// Finding 7: a chain stops at an empty intermediate, a graph does not.

/// Drops the first 8 elements of a chunk (a per-chunk header).
struct SkipHeader;

impl Stage<f32> for SkipHeader {
    fn name(&self) -> &str {
        "skip header"
    }
    fn output_len(&self, n: usize) -> usize {
        n.saturating_sub(8)
    }
    fn has_host(&self) -> bool {
        true
    }
    fn host(&self, i: &[f32], o: &mut [f32]) -> Result<(), StageError> {
        o.copy_from_slice(&i[8.min(i.len())..]);
        Ok(())
    }
}

/// One value per chunk: the sum of the chunk (0 for an empty one).
struct Total;

impl Stage<f32> for Total {
    fn name(&self) -> &str {
        "total"
    }
    fn output_len(&self, _: usize) -> usize {
        1
    }
    fn has_host(&self) -> bool {
        true
    }
    fn host(&self, i: &[f32], o: &mut [f32]) -> Result<(), StageError> {
        o[0] = i.iter().sum();
        Ok(())
    }
}

/// A chain's chunk that a stage empties skips the later stages and comes
/// back empty, on both backends (`gpu_streams.rs`'s
/// `chunks_a_stage_empties_come_back_empty`; a stage is never called with
/// no elements). `total_output_len` used to fold `output_len` over every
/// stage anyway (`Total` of the emptied chunk: 1), promising 2 outputs for
/// 20 elements in chunks of 16, and `run` then refused the caller's
/// 2-element output (`OutputLength { expected: 1, actual: 0 }`). The
/// promise and the run now agree: 1 output. (A `StageGraph` differs by
/// design: every live node runs, even on an empty input.)
#[test]
fn a_chain_through_an_empty_intermediate_promises_what_it_delivers() {
    let input: Vec<f32> = (0..20).map(|i| i as f32).collect();
    let first = (8..16).map(|i| i as f32).sum::<f32>();

    // The graph runs `Total` on the emptied chunk too.
    let mut g = StageGraph::<f32>::new();
    let x = g.input();
    let s = g.stage(x, SkipHeader).unwrap();
    let t = g.stage(s, Total).unwrap();
    g.output(t).unwrap();
    let mut m = host(16, 3);
    let lens = m.graph_output_lens(&g, input.len()).unwrap();
    assert_eq!(lens, vec![2]);
    let mut via_graph = vec![f32::NAN; 2];
    m.run_graph(&mut g, &input, &mut [&mut via_graph[..]])
        .unwrap();
    assert_eq!(via_graph, vec![first, 0.0]);

    // The chain skips it, and says so before the run.
    let mut p = host(16, 3);
    p.add_stage(SkipHeader);
    p.add_stage(Total);
    assert_eq!(p.output_len(4), 0);
    assert_eq!(p.total_output_len(input.len()), 1);
    let mut out = vec![f32::NAN; 1];
    p.run(&input, &mut out).unwrap();
    assert_eq!(out, vec![first]);
    let mut two = vec![f32::NAN; 2];
    assert!(matches!(
        p.run(&input, &mut two),
        Err(Error::OutputLength {
            expected: 1,
            actual: 2
        })
    ));
}

/// The same chain streamed: the second chunk (4 elements, all header)
/// comes to the sink empty, as documented (the later stage is skipped).
#[test]
fn a_streamed_chain_through_an_empty_intermediate_delivers_an_empty_chunk() {
    let input: Vec<f32> = (0..20).map(|i| i as f32).collect();
    let mut p = host(16, 3);
    p.add_stage(SkipHeader);
    p.add_stage(Total);
    let mut got: Vec<Vec<f32>> = Vec::new();
    p.run_stream(
        prism_pipeline::from_iter(input.chunks(16)),
        sink_fn(|_, out: &[f32]| {
            got.push(out.to_vec());
            Ok::<_, BoxError>(())
        }),
    )
    .unwrap();
    let first: f32 = (8..16).map(|i| i as f32).sum();
    assert_eq!(got, vec![vec![first], vec![]]);
}
