//! The host backend: the same stages and ordering on CPU threads, for
//! machines without a GPU. The calling thread pulls input chunks (from a
//! slice, items or a stream source) and hands them to a worker thread that
//! runs the stages; at most `slots` chunks are in flight (back-pressure),
//! and the calling thread delivers outputs in input order. Buffers circulate
//! between the two threads and are reused, so memory stays bounded by the
//! ring whatever the input's length.

use std::sync::mpsc;
use std::time::Instant;

use prism_stream::Element;

use crate::error::{Error, Result};
use crate::guard;
use crate::stage::Stage;
use crate::stats::PipelineStats;

/// Runs stages over chunks on a worker thread with at most `slots` chunks in flight.
#[derive(Debug, Clone, Copy)]
pub struct AsyncPipelineCoordinator {
    slots: usize,
}

/// What the worker hands back per chunk: index, output, each stage's host
/// time, and the input buffer (for reuse).
type Done<T> = std::result::Result<(u64, Vec<T>, Vec<f64>, Vec<T>), Error>;

/// What the calling thread sends the worker: index, input, a spare output buffer.
type Job<T> = (u64, Vec<T>, Vec<T>);

/// What the calling thread's input callback says.
pub(crate) enum Pull {
    /// The buffer holds the next chunk.
    Chunk,
    /// No more input.
    End,
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
    /// output)` in chunk order. A failing or panicking stage stops the run:
    /// chunks already processed are dropped and the error names the stage
    /// and chunk.
    pub fn run<'a, T: Element, C>(
        &self,
        stages: &mut [Box<dyn Stage<T>>],
        order: &[usize],
        chunks: C,
        mut sink: impl FnMut(u64, &[T]) -> Result<()>,
        stats: &mut PipelineStats,
    ) -> Result<u64>
    where
        C: Iterator<Item = &'a [T]>,
    {
        let mut chunks = chunks;
        self.run_pull(
            stages,
            order,
            &mut |buf: &mut Vec<T>, _| match chunks.next() {
                Some(c) => {
                    buf.clear();
                    buf.extend_from_slice(c);
                    Ok(Pull::Chunk)
                }
                None => Ok(Pull::End),
            },
            &mut sink,
            stats,
        )
        .map(|(n, failed)| {
            debug_assert!(failed.is_none());
            n
        })
    }

    /// The core: `pull(buf, index)` fills `buf` with input chunk `index`
    /// (on the calling thread); `sink` gets outputs in order. A pull error
    /// stops the input: the chunks before it are still delivered, then it
    /// is returned as the second value (`Ok` overall). A sink or stage
    /// error stops the run at once and is returned as `Err`.
    pub(crate) fn run_pull<T: Element>(
        &self,
        stages: &mut [Box<dyn Stage<T>>],
        order: &[usize],
        pull: &mut dyn FnMut(&mut Vec<T>, u64) -> Result<Pull>,
        sink: &mut dyn FnMut(u64, &[T]) -> Result<()>,
        stats: &mut PipelineStats,
    ) -> Result<(u64, Option<Error>)> {
        let (in_tx, in_rx) = mpsc::sync_channel::<Job<T>>(self.slots);
        let (done_tx, done_rx) = mpsc::sync_channel::<Done<T>>(self.slots);
        let names: Vec<String> = order.iter().map(|&i| stages[i].name().to_owned()).collect();
        let slots = self.slots;
        std::thread::scope(|scope| {
            let worker = scope.spawn(move || {
                let mut spare: Vec<Vec<T>> = Vec::new();
                for (index, input, mut cur) in in_rx.iter() {
                    let msg = run_stages(stages, order, index, &input, &mut cur, &mut spare)
                        .map(|times| (index, cur, times, input));
                    let stop = msg.is_err();
                    // A closed channel means the consumer stopped: stop too.
                    if done_tx.send(msg).is_err() || stop {
                        return;
                    }
                }
            });
            let mut in_tx = Some(in_tx);
            let outcome = feed_and_deliver(slots, &mut in_tx, &done_rx, pull, sink, &names, stats);
            // Stop the worker (it ends at the closed channel or its next send)
            // and wait for it: nothing outlives the run.
            drop(in_tx);
            drop(done_rx);
            match worker.join() {
                Ok(()) => outcome,
                Err(_) => Err(Error::WorkerPanicked),
            }
        })
    }
}

/// The calling thread's side of `run_pull`.
fn feed_and_deliver<T: Element>(
    slots: usize,
    in_tx: &mut Option<mpsc::SyncSender<Job<T>>>,
    done_rx: &mpsc::Receiver<Done<T>>,
    pull: &mut dyn FnMut(&mut Vec<T>, u64) -> Result<Pull>,
    sink: &mut dyn FnMut(u64, &[T]) -> Result<()>,
    names: &[String],
    stats: &mut PipelineStats,
) -> Result<(u64, Option<Error>)> {
    let (mut sent, mut delivered) = (0u64, 0u64);
    let mut failed: Option<Error> = None;
    let mut inputs: Vec<Vec<T>> = Vec::new();
    let mut outputs: Vec<Vec<T>> = Vec::new();
    loop {
        while failed.is_none() && in_tx.is_some() && (sent - delivered) < slots as u64 {
            let mut buf = inputs.pop().unwrap_or_default();
            match pull(&mut buf, sent) {
                Ok(Pull::Chunk) => {
                    let out = outputs.pop().unwrap_or_default();
                    let ok = in_tx
                        .as_ref()
                        .is_some_and(|tx| tx.send((sent, buf, out)).is_ok());
                    if !ok {
                        break;
                    }
                    sent += 1;
                }
                Ok(Pull::End) => *in_tx = None,
                Err(e) => failed = Some(e),
            }
        }
        if sent == delivered {
            return Ok((delivered, failed));
        }
        match done_rx.recv() {
            Ok(Ok((index, out, times, input))) => {
                for (name, ms) in names.iter().zip(times) {
                    stats.add_stage_time(name, ms);
                    stats.compute_busy_ms += ms;
                }
                guard::catch_sink(index, || sink(index, &out))?;
                stats.bytes_out += std::mem::size_of_val(out.as_slice()) as u64;
                delivered += 1;
                inputs.push(input);
                outputs.push(out);
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::WorkerPanicked),
        }
    }
}

/// Runs the stages over one chunk on the calling thread; returns the
/// output and each stage's host time in ms.
pub(crate) fn run_chunk<T: Element>(
    stages: &mut [Box<dyn Stage<T>>],
    order: &[usize],
    index: u64,
    input: &[T],
) -> Result<(Vec<T>, Vec<f64>)> {
    let mut cur = Vec::new();
    let times = run_stages(stages, order, index, input, &mut cur, &mut Vec::new())?;
    Ok((cur, times))
}

/// Runs the stages over one chunk into `cur` (reusing `spare` buffers);
/// returns each stage's host time in ms.
fn run_stages<T: Element>(
    stages: &mut [Box<dyn Stage<T>>],
    order: &[usize],
    index: u64,
    input: &[T],
    cur: &mut Vec<T>,
    spare: &mut Vec<Vec<T>>,
) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(order.len());
    cur.clear();
    cur.extend_from_slice(input);
    for &i in order {
        if cur.is_empty() {
            // A stage made no output: nothing is left to process (as on the GPU).
            break;
        }
        let stage = &mut *stages[i];
        let mut next = spare.pop().unwrap_or_default();
        let out_len = guard::output_len(stage, cur.len(), index)?;
        next.clear();
        // Sized with a copy of an input element (the chunk is not empty);
        // the stage overwrites every one.
        next.resize(out_len, cur[0]);
        let t = Instant::now();
        guard::run_stage(stage, index, |s| s.host(cur, &mut next))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        spare.push(std::mem::replace(cur, next));
    }
    Ok(times)
}
