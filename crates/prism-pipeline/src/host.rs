//! The host backend: the same stages and ordering on CPU threads, for
//! machines without a GPU. A worker thread runs the stages chunk by chunk and
//! hands results over a bounded channel, so at most `slots` chunks are ever
//! ahead of the consumer (back-pressure); the calling thread delivers outputs
//! in input order. Buffers circulate between the two threads and are reused.

use std::sync::mpsc;
use std::time::Instant;

use prism_stream::Element;

use crate::error::{Error, Result};
use crate::stage::Stage;
use crate::stats::PipelineStats;

/// Runs stages over chunks on a worker thread with at most `slots` chunks in flight.
#[derive(Debug, Clone, Copy)]
pub struct AsyncPipelineCoordinator {
    slots: usize,
}

/// What the worker hands back per chunk: output, and each stage's host time.
type Done<T> = std::result::Result<(Vec<T>, Vec<f64>), Error>;

impl AsyncPipelineCoordinator {
    /// `slots` chunks may be processed ahead of the consumer (2..=8).
    pub fn new(slots: usize) -> Result<Self> {
        if !(prism_buffer::MIN_SLOTS..=prism_buffer::MAX_SLOTS).contains(&slots) {
            return Err(Error::Config("slots must be between 2 and 8"));
        }
        Ok(Self { slots })
    }

    /// Runs `order`'s stages over each chunk and calls `sink(chunk index,
    /// output)` in chunk order. A failing stage stops the run: chunks already
    /// processed are dropped and the error names the stage and chunk.
    pub fn run<'a, T: Element, C>(
        &self,
        stages: &mut [Box<dyn Stage<T>>],
        order: &[usize],
        chunks: C,
        mut sink: impl FnMut(u64, &[T]) -> Result<()>,
        stats: &mut PipelineStats,
    ) -> Result<u64>
    where
        C: Iterator<Item = &'a [T]> + Send,
    {
        let (done_tx, done_rx) = mpsc::sync_channel::<Done<T>>(self.slots);
        let (recycle_tx, recycle_rx) = mpsc::channel::<Vec<T>>();
        let names: Vec<String> = order.iter().map(|&i| stages[i].name().to_owned()).collect();
        let mut delivered = 0u64;
        let outcome = std::thread::scope(|scope| {
            let worker = scope.spawn(move || {
                let mut spare: Vec<Vec<T>> = Vec::new();
                for (index, chunk) in chunks.enumerate() {
                    let mut times = Vec::with_capacity(order.len());
                    let mut cur: Vec<T> = recycle_rx.try_recv().unwrap_or_default();
                    cur.clear();
                    cur.extend_from_slice(chunk);
                    let mut failed = None;
                    for &i in order {
                        let stage = &mut stages[i];
                        let mut next = spare.pop().unwrap_or_default();
                        next.clear();
                        let out_len = stage.output_len(cur.len());
                        // Sized with a copy of an input element; the stage overwrites every one.
                        match cur.first() {
                            Some(&fill) => next.resize(out_len, fill),
                            None if out_len == 0 => {}
                            None => {
                                failed = Some(Error::Config(
                                    "a stage claims output from an empty chunk",
                                ));
                                break;
                            }
                        }
                        let t = Instant::now();
                        if let Err(source) = stage.host(&cur, &mut next) {
                            failed = Some(Error::Stage {
                                stage: stage.name().to_owned(),
                                chunk: index as u64,
                                source,
                            });
                            break;
                        }
                        times.push(t.elapsed().as_secs_f64() * 1e3);
                        spare.push(std::mem::replace(&mut cur, next));
                    }
                    let msg = match failed {
                        Some(e) => Err(e),
                        None => Ok((cur, times)),
                    };
                    let stop = msg.is_err();
                    // A closed channel means the consumer stopped: stop too.
                    if done_tx.send(msg).is_err() || stop {
                        return;
                    }
                }
            });
            let mut result = Ok(());
            for msg in done_rx.iter() {
                match msg {
                    Ok((out, times)) => {
                        for (name, ms) in names.iter().zip(times) {
                            stats.add_stage_time(name, ms);
                            stats.compute_busy_ms += ms;
                        }
                        stats.bytes_out += std::mem::size_of_val(out.as_slice()) as u64;
                        if let Err(e) = sink(delivered, &out) {
                            result = Err(e);
                            break;
                        }
                        delivered += 1;
                        let _ = recycle_tx.send(out);
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            drop(done_rx);
            match worker.join() {
                Ok(()) => result,
                Err(_) => Err(Error::WorkerPanicked),
            }
        });
        outcome.map(|()| delivered)
    }
}
