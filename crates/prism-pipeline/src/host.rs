//! The host backend: the same stages and ordering on CPU threads, for
//! machines without a GPU. The calling thread pulls input chunks (from a
//! slice, items or a stream source) and hands each to a thread pool
//! (rayon: the manager's host threads) that runs the stages; several chunks
//! are processed at once, at most `slots` chunks are in flight
//! (back-pressure), and the calling thread delivers outputs in input order.
//! Slices and items are read in place and written straight into their
//! outputs; stream chunks circulate in buffers that are reused, so memory
//! stays bounded by the ring whatever the input's length.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use prism_stream::Element;

use crate::error::{Error, Result};
use crate::guard;
use crate::stage::Stage;
use crate::stats::PipelineStats;

/// Runs stages over chunks on a thread pool, several chunks at once, with
/// at most `slots` chunks in flight and outputs in input order.
#[derive(Debug, Clone, Copy)]
pub struct AsyncPipelineCoordinator {
    slots: usize,
}

/// The calling thread's input callback: `pull(buf, index)`.
pub(crate) type PullFn<'f, 'a, T> = &'f mut dyn FnMut(&mut Vec<T>, u64) -> Result<Pull<'a, T>>;

/// What the calling thread's input callback says.
pub(crate) enum Pull<'a, T> {
    /// The buffer holds the next chunk.
    Chunk,
    /// The next chunk is `input`, read in place. With `output` (exactly the
    /// chunk's output length), the output goes straight there.
    Borrowed {
        input: &'a [T],
        output: Option<&'a mut [T]>,
    },
    /// No more input.
    End,
}

/// A chunk's input: a pulled buffer (recycled after delivery) or the caller's slice.
enum Input<'a, T> {
    Owned(Vec<T>),
    Borrowed(&'a [T]),
}

/// Where a chunk's output is: a buffer (recycled after delivery) or the
/// caller's output slice.
enum Output<'a, T> {
    Buf(Vec<T>),
    Dst(&'a mut [T]),
}

/// A processed chunk: its output, each stage's host time (ms), its input.
struct Done<'a, T> {
    output: Output<'a, T>,
    times: Vec<f64>,
    input: Input<'a, T>,
}

/// What a pool thread sends back for chunk `.0`.
type Message<'a, T> = (u64, Result<Done<'a, T>>);

/// Buffers shared by the calling thread and the pool threads. Only buffers
/// of chunks in flight are ever taken, so the pool holds at most a few per
/// slot.
struct Spares<T>(Mutex<Vec<Vec<T>>>);

impl<T> Spares<T> {
    fn new() -> Self {
        Self(Mutex::new(Vec::new()))
    }
    fn lock(&self) -> MutexGuard<'_, Vec<Vec<T>>> {
        // No user code runs under the lock: a poisoned pool is still whole.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn take(&self) -> Vec<T> {
        self.lock().pop().unwrap_or_default()
    }
    fn give(&self, buf: Vec<T>) {
        if buf.capacity() > 0 {
            self.lock().push(buf);
        }
    }
}

/// The time at least one pool thread was running stages (the union of the
/// chunks' stage spans; with several threads, less than their sum).
#[derive(Default)]
struct Busy(Mutex<(usize, Option<Instant>, Duration)>);

impl Busy {
    fn lock(&self) -> MutexGuard<'_, (usize, Option<Instant>, Duration)> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
    /// Marks one chunk's stages running until the guard drops.
    fn enter(&self) -> BusyGuard<'_> {
        let mut s = self.lock();
        if s.0 == 0 {
            s.1 = Some(Instant::now());
        }
        s.0 += 1;
        BusyGuard(self)
    }
    fn total_ms(&self) -> f64 {
        self.lock().2.as_secs_f64() * 1e3
    }
}

struct BusyGuard<'b>(&'b Busy);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.0 -= 1;
        if s.0 == 0 {
            if let Some(since) = s.1.take() {
                s.2 += since.elapsed();
            }
        }
    }
}

/// What every chunk of one run shares.
struct Shared<'s, T: Element> {
    stages: &'s [&'s dyn Stage<T>],
    order: &'s [usize],
    spares: Spares<T>,
    busy: Busy,
    /// Chunks from this index on are skipped: a chunk failed before them,
    /// or the run stopped.
    stop_from: AtomicU64,
}

impl<T: Element> Shared<'_, T> {
    /// One chunk's job on a pool thread: runs the stages (unless an earlier
    /// chunk failed) and always sends one message back, panic or not.
    fn job<'a>(
        &self,
        index: u64,
        input: Input<'a, T>,
        dst: Option<&'a mut [T]>,
        done: &mpsc::Sender<Message<'a, T>>,
    ) {
        let result = if index >= self.stop_from.load(Ordering::Acquire) {
            Err(Error::Config("a chunk was skipped after the run stopped"))
        } else {
            catch_unwind(AssertUnwindSafe(|| self.process(index, input, dst)))
                .unwrap_or(Err(Error::WorkerPanicked))
        };
        if result.is_err() {
            self.stop_from.fetch_min(index + 1, Ordering::AcqRel);
        }
        // The receiver is gone only once the run has stopped: nothing to tell.
        let _ = done.send((index, result));
    }

    fn process<'a>(
        &self,
        index: u64,
        input: Input<'a, T>,
        dst: Option<&'a mut [T]>,
    ) -> Result<Done<'a, T>> {
        let _busy = self.busy.enter();
        let data: &[T] = match &input {
            Input::Owned(v) => v,
            Input::Borrowed(s) => s,
        };
        let (output, times) = run_stages(self.stages, self.order, index, data, dst, &self.spares)?;
        Ok(Done {
            output,
            times,
            input,
        })
    }
}

impl AsyncPipelineCoordinator {
    /// `slots` chunks may be processed ahead of the consumer (2..=8).
    pub fn new(slots: usize) -> Result<Self> {
        if !(prism_buffer::MIN_SLOTS..=prism_buffer::MAX_SLOTS).contains(&slots) {
            return Err(Error::Config("slots must be between 2 and 8"));
        }
        Ok(Self { slots })
    }

    /// Runs `order`'s stages over each chunk and calls `sink(chunk index,
    /// output)` in chunk order, on the calling thread. The stages run on
    /// rayon's pool (the global one, or the pool the calling thread belongs
    /// to, where they run on the calling thread itself), several chunks at
    /// once. A failing or panicking stage stops the run: the chunks before
    /// it are delivered, the ones after it are dropped, and the error names
    /// the stage and chunk.
    pub fn run<'a, T: Element, C>(
        &self,
        stages: &[Box<dyn Stage<T>>],
        order: &[usize],
        chunks: C,
        mut sink: impl FnMut(u64, &[T]) -> Result<()>,
        stats: &mut PipelineStats,
    ) -> Result<u64>
    where
        C: Iterator<Item = &'a [T]>,
    {
        if order.is_empty() {
            return Err(Error::NoStages);
        }
        if let Some(&index) = order.iter().find(|&&i| i >= stages.len()) {
            return Err(Error::UnknownStage {
                index,
                count: stages.len(),
            });
        }
        let mut chunks = chunks;
        let stages: Vec<&dyn Stage<T>> = stages.iter().map(|s| &**s).collect();
        self.run_pull(
            None,
            &stages,
            order,
            &mut |_, _| {
                Ok(match chunks.next() {
                    Some(input) => Pull::Borrowed {
                        input,
                        output: None,
                    },
                    None => Pull::End,
                })
            },
            &mut sink,
        )
        .map(|(n, failed, tally)| {
            debug_assert!(failed.is_none());
            stats.add_host_run(&tally);
            n
        })
    }

    /// The core: `pull(buf, index)` gives input chunk `index` (on the
    /// calling thread); the stages run on `pool` (`None`: rayon's current
    /// pool), or on the calling thread when it is one of the pool's own;
    /// `sink` gets outputs in order on the calling thread. A pull error
    /// stops the input: the chunks before it are still delivered, then it
    /// is returned as the second value (`Ok` overall). A stage error is
    /// returned as `Err` once the chunks before it are delivered; a sink
    /// error stops the run at once. Either way chunks still running finish
    /// (those not started are skipped) before this returns: nothing
    /// outlives the run. The third value holds the run's stage times,
    /// busy time and output bytes, for the caller to add to its stats
    /// ([`PipelineStats::add_host_run`]) if the run counts.
    pub(crate) fn run_pull<'a, T: Element>(
        &self,
        pool: Option<&rayon::ThreadPool>,
        stages: &[&dyn Stage<T>],
        order: &[usize],
        pull: PullFn<'_, 'a, T>,
        sink: &mut dyn FnMut(u64, &[T]) -> Result<()>,
    ) -> Result<(u64, Option<Error>, PipelineStats)> {
        let shared = Shared {
            stages,
            order,
            spares: Spares::new(),
            busy: Busy::default(),
            stop_from: AtomicU64::new(u64::MAX),
        };
        let names: Vec<String> = order.iter().map(|&i| stages[i].name().to_owned()).collect();
        let slots = self.slots;
        // A thread of the pool must not block on its own pool's work.
        let inline = match pool {
            Some(p) => p.current_thread_index().is_some(),
            None => rayon::current_thread_index().is_some(),
        };
        // This run's stage times and bytes: the caller adds them to its
        // stats only if the run counts (as on the GPU, a failed run adds
        // nothing; a source failure ends a run that counts).
        let mut tally = PipelineStats::default();
        let t = &mut tally;
        let outcome = match (inline, pool) {
            (true, _) => drive(None, slots, &shared, pull, sink, &names, t),
            (false, Some(p)) => {
                p.in_place_scope(|s| drive(Some(s), slots, &shared, pull, sink, &names, t))
            }
            (false, None) => {
                rayon::in_place_scope(|s| drive(Some(s), slots, &shared, pull, sink, &names, t))
            }
        };
        tally.compute_busy_ms = shared.busy.total_ms();
        outcome.map(|(n, failed)| (n, failed, tally))
    }
}

/// Makes `buf` `len` elements long (new ones `zero`) for a source to fill
/// on the host: a length the allocator refuses is `OutOfMemory`, not an
/// abort of the process.
pub(crate) fn size_slot<T: Element>(buf: &mut Vec<T>, len: usize, zero: T) -> crate::Result<()> {
    if let Some(more) = len.checked_sub(buf.len()) {
        buf.try_reserve_exact(more)
            .map_err(|_| prism_stream::Error::OutOfMemory {
                memory: "host",
                bytes: len.saturating_mul(std::mem::size_of::<T>()),
                what: "a stream's input chunk",
            })?;
    }
    buf.resize(len, zero);
    Ok(())
}

/// One run inside `scope` (`None`: every job runs on the calling thread).
/// Returns when the run is over (everything delivered, or stopped by an
/// error); then chunks not started are skipped, and the scope waits for
/// the jobs still running.
fn drive<'scope, 'a: 'scope, 's: 'scope, T: Element>(
    scope: Option<&rayon::Scope<'scope>>,
    slots: usize,
    shared: &'scope Shared<'s, T>,
    pull: PullFn<'_, 'a, T>,
    sink: &mut dyn FnMut(u64, &[T]) -> Result<()>,
    names: &[String],
    stats: &mut PipelineStats,
) -> Result<(u64, Option<Error>)> {
    let (tx, rx) = mpsc::channel::<Message<'a, T>>();
    let spawn = |index: u64, input: Input<'a, T>, dst: Option<&'a mut [T]>| {
        let tx = tx.clone();
        match scope {
            Some(s) => s.spawn(move |_| shared.job(index, input, dst, &tx)),
            None => shared.job(index, input, dst, &tx),
        }
    };
    let r = feed_and_deliver(slots, shared, spawn, &rx, pull, sink, names, stats);
    // Chunks not started yet are skipped; the scope waits for the running
    // ones.
    shared.stop_from.store(0, Ordering::Release);
    r
}

/// The calling thread's side of `run_pull`: pulls while fewer than `slots`
/// chunks are in flight, spawns each chunk's job, and delivers finished
/// chunks in order.
#[allow(clippy::too_many_arguments)]
fn feed_and_deliver<'a, T: Element>(
    slots: usize,
    shared: &Shared<'_, T>,
    spawn: impl Fn(u64, Input<'a, T>, Option<&'a mut [T]>),
    done: &mpsc::Receiver<Message<'a, T>>,
    pull: PullFn<'_, 'a, T>,
    sink: &mut dyn FnMut(u64, &[T]) -> Result<()>,
    names: &[String],
    stats: &mut PipelineStats,
) -> Result<(u64, Option<Error>)> {
    let (mut sent, mut delivered) = (0u64, 0u64);
    let mut ended = false;
    let mut failed: Option<Error> = None;
    // Results of chunks `delivered..sent`, as they come back.
    let mut ready: VecDeque<Option<Result<Done<'a, T>>>> = VecDeque::with_capacity(slots);
    let mut buf: Vec<T> = Vec::new();
    loop {
        // Once a chunk failed, pull nothing more: the run ends at it.
        while failed.is_none()
            && !ended
            && (sent - delivered) < slots as u64
            && shared.stop_from.load(Ordering::Acquire) == u64::MAX
        {
            if buf.capacity() == 0 {
                buf = shared.spares.take();
            }
            match pull(&mut buf, sent) {
                Ok(Pull::Chunk) => {
                    spawn(sent, Input::Owned(std::mem::take(&mut buf)), None);
                }
                Ok(Pull::Borrowed { input, output }) => {
                    spawn(sent, Input::Borrowed(input), output);
                }
                Ok(Pull::End) => {
                    ended = true;
                    continue;
                }
                Err(e) => {
                    failed = Some(e);
                    continue;
                }
            }
            sent += 1;
            ready.push_back(None);
        }
        if sent == delivered {
            shared.spares.give(buf);
            return Ok((delivered, failed));
        }
        while ready.front().is_some_and(Option::is_none) {
            // Every job sends exactly one message and `spawn` keeps a
            // sender alive, so this cannot fail; if it did, stop.
            let (index, result) = done.recv().map_err(|_| Error::WorkerPanicked)?;
            let slot = ready
                .get_mut((index - delivered) as usize)
                .ok_or(Error::Config("a host chunk came back out of range"))?;
            *slot = Some(result);
        }
        let Some(Some(result)) = ready.pop_front() else {
            return Err(Error::Config("a host chunk came back out of range"));
        };
        let Done {
            output,
            times,
            input,
        } = result?;
        for (name, ms) in names.iter().zip(times) {
            stats.add_stage_time(name, ms);
        }
        let index = delivered;
        let data: &[T] = match &output {
            Output::Buf(v) => v,
            Output::Dst(d) => d,
        };
        guard::catch_sink(index, || sink(index, data))?;
        stats.bytes_out += std::mem::size_of_val(data) as u64;
        delivered += 1;
        if let Input::Owned(v) = input {
            shared.spares.give(v);
        }
        if let Output::Buf(v) = output {
            shared.spares.give(v);
        }
    }
}

/// Runs the stages over one chunk on the calling thread; returns the
/// output and each stage's host time in ms.
pub(crate) fn run_chunk<T: Element>(
    stages: &[&dyn Stage<T>],
    order: &[usize],
    index: u64,
    input: &[T],
) -> Result<(Vec<T>, Vec<f64>)> {
    let (output, times) = run_stages(stages, order, index, input, None, &Spares::new())?;
    match output {
        Output::Buf(v) => Ok((v, times)),
        Output::Dst(_) => Err(Error::Config("a chunk's output went nowhere")),
    }
}

/// Runs the stages over one chunk: the first reads `input` in place, the
/// last writes into `dst` when one is given (which must then be exactly the
/// output's length), the others into buffers from `spares`. Returns the
/// output and each stage's host time in ms.
fn run_stages<'d, T: Element>(
    stages: &[&dyn Stage<T>],
    order: &[usize],
    index: u64,
    input: &[T],
    mut dst: Option<&'d mut [T]>,
    spares: &Spares<T>,
) -> Result<(Output<'d, T>, Vec<f64>)> {
    let mut times = Vec::with_capacity(order.len());
    // `None`: the data is still `input`.
    let mut cur: Option<Vec<T>> = None;
    for (k, &i) in order.iter().enumerate() {
        let src: &[T] = cur.as_deref().unwrap_or(input);
        let Some(&first) = src.first() else {
            // A stage made no output: nothing is left to process (as on the GPU).
            break;
        };
        let stage = stages[i];
        let _nvtx = prism_stream::nvtx::Range::new(stage.name());
        let out_len = guard::output_len(stage, src.len(), index)?;
        let last = k + 1 == order.len();
        if let Some(d) = dst.take_if(|d| last && d.len() == out_len) {
            let t = Instant::now();
            guard::run_host_stage(stage, index, |s| s.host(src, d))?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            if let Some(old) = cur {
                spares.give(old);
            }
            return Ok((Output::Dst(d), times));
        }
        let mut next = spares.take();
        // A recycled buffer holds old values and a new one copies of an
        // input element: the stage overwrites every one.
        if next.len() < out_len {
            next.resize(out_len, first);
        } else {
            next.truncate(out_len);
        }
        let t = Instant::now();
        guard::run_host_stage(stage, index, |s| s.host(src, &mut next))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if let Some(old) = cur.replace(next) {
            spares.give(old);
        }
    }
    let out = cur.unwrap_or_else(|| {
        let mut v = spares.take();
        v.clear();
        v.extend_from_slice(input);
        v
    });
    match dst {
        // The chain stopped early (an empty output) or made no stage run.
        Some(d) if d.len() == out.len() => {
            d.copy_from_slice(&out);
            spares.give(out);
            Ok((Output::Dst(d), times))
        }
        Some(d) => Err(Error::OutputLength {
            expected: d.len(),
            actual: out.len(),
        }),
        None => Ok((Output::Buf(out), times)),
    }
}
