//! Whole runs: slices, pinned buffers, items and streams, each an I/O mode
//! of the ring engine on the GPU (`io.rs`) or pulled through the host
//! backend.

use std::time::Instant;

use prism_buffer::engine::{ChunkSpan, IoSlots, RunCounts};
use prism_buffer::{ChunkIo, ChunkProcessor, Engine};
use prism_stream::nvtx::Range;
use prism_stream::{zeroed_vec, Element, PinnedBuffer};

use crate::error::{Error, Result};
use crate::gpu::{record_span, GlobalIndex, StageChain};
use crate::guard;
use crate::host::{AsyncPipelineCoordinator, Pull};
use crate::io::{
    ItemsIo, PinnedIo, PinnedItemsCopy, PinnedItemsIo, PinnedItemsPaths, SliceIo, StreamIo,
};
use crate::source::{Sink, Source};
use crate::stage::AnyStage;
use crate::stats::{BackendKind, Lane as SpanLane, PipelineStats, Span, Timeline};
use crate::PipelineStageManager;

/// What a stream run moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamCounts {
    /// Chunks delivered to the sink.
    pub chunks: u64,
    /// Input elements the source gave.
    pub elements_in: u64,
    /// Output elements the sink received.
    pub elements_out: u64,
}

/// Everything one GPU run needs, borrowed from the manager field by field.
pub(crate) struct GpuRun<'a, T: Element> {
    pub(crate) engine: &'a mut Engine<T>,
    pub(crate) stages: &'a mut [Box<dyn AnyStage<T>>],
    pub(crate) order: &'a [usize],
    pub(crate) capacity: usize,
    pub(crate) timing: bool,
    pub(crate) trace: bool,
    pub(crate) stats: &'a mut PipelineStats,
    pub(crate) timeline: &'a mut Timeline,
    /// The host threads (their staging copies go into the trace).
    pub(crate) pool: &'a crate::copy::CopyPool,
    /// A multi-GPU run's numbering of this GPU's chunks.
    pub(crate) global: Option<&'a GlobalIndex>,
    /// Captured stage chains, when `PipelineConfig::graphs` is on.
    pub(crate) graphs: Option<&'a mut crate::gpu::ChainGraphs>,
}

impl<T: Element> GpuRun<'_, T> {
    /// Streams every chunk of `io` through the engine; returns the counts
    /// and the slot states (for their staging to be recycled).
    pub(crate) fn drive<Io: ChunkIo<T, Error = Error>>(
        self,
        io: &mut Io,
    ) -> (Result<RunCounts>, IoSlots<Io::Slot>) {
        let counts_before = self.graphs.as_deref().map(|g| g.counts());
        let mut chain = StageChain {
            stages: self.stages,
            order: self.order,
            capacity: self.capacity,
            base: 0,
            global: self.global,
            graphs: self.graphs,
        };
        let mut driver = Driver {
            engine: self.engine,
            timing: self.timing,
            trace: self.trace,
            stats: self.stats,
            timeline: self.timeline,
            pool: self.pool,
            global: self.global,
        };
        let (result, slots) = driver.drive(io, &mut chain);
        if result.is_ok() {
            if let (Some((l0, c0)), Some(g)) = (counts_before, chain.graphs.as_deref()) {
                let (l1, c1) = g.counts();
                driver.stats.graph_launches += l1 - l0;
                driver.stats.graph_captures += c1 - c0;
            }
        }
        (result, slots)
    }
}

/// The engine of a GPU run and where its times go: drives any processor
/// (a stage chain, a stage graph) over any I/O.
pub(crate) struct Driver<'a, T: Element> {
    pub(crate) engine: &'a mut Engine<T>,
    pub(crate) timing: bool,
    pub(crate) trace: bool,
    pub(crate) stats: &'a mut PipelineStats,
    pub(crate) timeline: &'a mut Timeline,
    pub(crate) pool: &'a crate::copy::CopyPool,
    pub(crate) global: Option<&'a GlobalIndex>,
}

impl<T: Element> Driver<'_, T> {
    /// Streams every chunk of `io` through `p`; returns the counts and the
    /// slot states. A run's step times go into the stats only if it succeeds.
    pub(crate) fn drive<Io, P>(
        &mut self,
        io: &mut Io,
        p: &mut P,
    ) -> (Result<RunCounts>, IoSlots<Io::Slot>)
    where
        Io: ChunkIo<T, Error = Error>,
        P: ChunkProcessor<T, Error = Error>,
    {
        let mut slots = IoSlots::new(self.engine.slot_count());
        if self.timing {
            if let Err(e) = self.engine.start_timing() {
                return (Err(e.into()), slots);
            }
        }
        let mut fresh = Timeline {
            device: self.engine.gpu().info().name.clone(),
            ..Timeline::default()
        };
        let (trace, global) = (self.trace, self.global);
        self.pool.record(trace);
        // This run's step times, added to the stats only if it succeeds (a
        // failed run adds nothing, as it adds no wall time).
        let mut steps = PipelineStats::default();
        let result = {
            let mut spans = |mut s: ChunkSpan| {
                s.chunk.0 = GlobalIndex::or(global, s.chunk, 0);
                let tl = if trace { Some(&mut fresh) } else { None };
                record_span(&mut steps, tl, s);
            };
            self.engine.run(io, &mut slots, p, &mut spans)
        };
        let copies = self.pool.take_spans();
        if trace {
            add_host_spans(&mut fresh, self.engine, copies, global);
            fresh.origin = self.engine.host_origin();
        }
        let busy = if self.timing {
            self.engine.stop_timing()
        } else {
            0.0
        };
        if let Ok(c) = &result {
            let stats = &mut *self.stats;
            stats.upload_ms += steps.upload_ms;
            stats.download_ms += steps.download_ms;
            for st in &steps.stages {
                stats.add_stage_time(&st.name, st.ms);
            }
            stats.compute_busy_ms += busy;
            stats.host_wait_ms += c.wait_ms;
        }
        if trace && result.is_ok() {
            *self.timeline = fresh;
        }
        (result, slots)
    }
}

/// The host's staging copies and waits as spans on the GPU spans' clock.
fn add_host_spans<T: Element>(
    timeline: &mut Timeline,
    engine: &mut Engine<T>,
    copies: Vec<(u64, &'static str, std::time::Instant, std::time::Instant)>,
    global: Option<&GlobalIndex>,
) {
    let Some(origin) = engine.host_origin() else {
        return;
    };
    let ms = |i: std::time::Instant| i.saturating_duration_since(origin).as_secs_f64() * 1e3;
    for (chunk, what, start, end) in copies {
        timeline.spans.push(Span {
            chunk,
            stream: 4,
            lane: SpanLane::HostCopy,
            name: what.to_owned(),
            start_ms: ms(start),
            end_ms: ms(end),
        });
    }
    for (chunk, start_ms, end_ms) in engine.take_waits() {
        timeline.spans.push(Span {
            chunk: GlobalIndex::or(global, chunk, 0),
            stream: 5,
            lane: SpanLane::HostWait,
            name: "wait for the GPU".to_owned(),
            start_ms,
            end_ms,
        });
    }
}

impl<T: Element> PipelineStageManager<T> {
    /// Borrows what a GPU run needs.
    pub(crate) fn gpu_parts<'a>(
        &'a mut self,
        order: &'a [usize],
    ) -> Result<(
        GpuRun<'a, T>,
        &'a mut crate::gpu::StagingCache<T>,
        &'a crate::copy::CopyPool,
    )> {
        let capacity = self.capacity(order);
        let timing = self.config.timing;
        let trace = self.config.trace && timing;
        let graphs_on = self.config.graphs;
        let engine = self.engine.as_mut().ok_or(Error::Config("no GPU engine"))?;
        Ok((
            GpuRun {
                engine,
                stages: &mut self.stages,
                order,
                capacity,
                timing,
                trace,
                stats: &mut self.stats,
                timeline: &mut self.timeline,
                pool: &self.copy_pool,
                global: None,
                graphs: graphs_on.then_some(&mut self.graphs),
            },
            &mut self.cache,
            &self.copy_pool,
        ))
    }

    /// Streams `input` through the stages into `output` (which must hold
    /// exactly [`total_output_len`](Self::total_output_len)`(input.len())`
    /// elements). Empty input is a valid run of zero chunks.
    pub fn run(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let _span = tracing::debug_span!("prism.pipeline.run", n = input.len()).entered();
        let _nvtx = Range::new("run");
        let total = Some(std::mem::size_of_val(input));
        let order = self.begin_run(Some((input.len(), output.len())), false, Some(total))?;
        let started = Instant::now();
        if input.is_empty() {
            self.finish_run(started, 0, 0, 0, 0);
            return Ok(());
        }
        let chunk = self.chunk_elems();
        match self.backend {
            BackendKind::Gpu => {
                let out_capacity = self.output_len(chunk).max(chunk);
                let plan = self.plan(&order, input.len());
                let (run, cache, pool) = self.gpu_parts(&order)?;
                let mut io = SliceIo {
                    input,
                    output,
                    chunk,
                    plan,
                    capacity: out_capacity,
                    pool,
                    next_in: 0,
                    next_out: 0,
                    cache,
                };
                let (r, slots) = run.drive(&mut io);
                for s in slots.into_made() {
                    s.recycle(io.cache);
                }
                let counts = r?;
                self.finish_run(started, counts.chunks, 0, counts.elems_in, counts.elems_out);
            }
            BackendKind::Host => {
                let coordinator = AsyncPipelineCoordinator::new(self.config.slots)?;
                // Chunks are read in place and written straight into their
                // part of `output`: no host copy.
                let mut chunks = input.chunks(chunk);
                let (full_out, last_out) =
                    (self.output_len(chunk), self.output_len(input.len() % chunk));
                let mut rest = output;
                let (chunks_done, failed) = coordinator.run_pull(
                    self.copy_pool.pool(),
                    &crate::stage::refs(&self.stages),
                    &order,
                    &mut |_, _| {
                        let Some(c) = chunks.next() else {
                            return Ok(Pull::End);
                        };
                        let n = if c.len() == chunk { full_out } else { last_out };
                        let (dst, tail) = std::mem::take(&mut rest)
                            .split_at_mut_checked(n)
                            .ok_or(Error::Config("output shorter than the stages produce"))?;
                        rest = tail;
                        Ok(Pull::Borrowed {
                            input: c,
                            output: Some(dst),
                        })
                    },
                    &mut |_, _| Ok(()),
                    &mut self.stats,
                )?;
                if let Some(e) = failed {
                    return Err(e);
                }
                self.finish_run(started, chunks_done, 0, input.len() as u64, 0);
            }
        }
        Ok(())
    }

    /// Streams a pinned input into a pinned output with no staging copies
    /// (GPU backend only). Host reads of `output` wait for the last download.
    pub fn run_pinned(
        &mut self,
        input: &PinnedBuffer<T>,
        output: &mut PinnedBuffer<T>,
    ) -> Result<()> {
        let _span = tracing::debug_span!("prism.pipeline.run_pinned", n = input.len()).entered();
        let _nvtx = Range::new("run_pinned");
        if self.backend != BackendKind::Gpu {
            return Err(Error::Unsupported {
                stage: "run_pinned".into(),
                backend: "host",
            });
        }
        let total = Some(input.len() * std::mem::size_of::<T>());
        let order = self.begin_run(Some((input.len(), output.len())), false, Some(total))?;
        let started = Instant::now();
        let plan = self.plan(&order, input.len());
        let (run, _, _) = self.gpu_parts(&order)?;
        let mut io = PinnedIo {
            input,
            output,
            plan,
            next_in: 0,
            next_out: 0,
        };
        let counts = run.drive(&mut io).0?;
        self.finish_run(started, counts.chunks, 0, counts.elems_in, counts.elems_out);
        Ok(())
    }

    /// Streams items that arrive one by one, each with its own output slice
    /// of the same length. On the GPU many items share one chunk (gathered
    /// into pinned staging, one copy and one launch per stage, scattered
    /// back), so every stage must be elementwise. Empty items are skipped.
    /// Returns the item count.
    pub fn run_items<'a, I>(&mut self, items: I) -> Result<u64>
    where
        I: IntoIterator<Item = (&'a [T], &'a mut [T])>,
    {
        let _span = tracing::debug_span!("prism.pipeline.run_items").entered();
        let _nvtx = Range::new("run_items");
        let order = self.begin_run(None, true, Some(None))?;
        let started = Instant::now();
        let chunk = self.chunk_elems();
        match self.backend {
            BackendKind::Gpu => {
                let (run, cache, pool) = self.gpu_parts(&order)?;
                let mut io = ItemsIo {
                    items: items.into_iter().peekable(),
                    chunk,
                    pool,
                    next_item: 0,
                    outputs: Default::default(),
                    cache,
                };
                let (r, slots) = run.drive(&mut io);
                for s in slots.into_made() {
                    s.staged.recycle(io.cache);
                }
                let n = io.next_item as u64;
                let counts = r?;
                self.finish_run(started, counts.chunks, n, counts.elems_in, counts.elems_out);
                Ok(n)
            }
            BackendKind::Host => {
                let coordinator = AsyncPipelineCoordinator::new(self.config.slots)?;
                let chunk = self.chunk_elems();
                let mut items = items.into_iter();
                let mut elems_in = 0u64;
                let mut next_item = 0usize;
                // Each item is read in place and written straight into its
                // output: no host copy.
                let (n, failed) = coordinator.run_pull(
                    self.copy_pool.pool(),
                    &crate::stage::refs(&self.stages),
                    &order,
                    &mut |_, _| match items.next() {
                        Some((input, out)) => {
                            if input.len() != out.len() {
                                return Err(Error::OutputLength {
                                    expected: input.len(),
                                    actual: out.len(),
                                });
                            }
                            // As on the GPU: an item is processed whole, in one chunk.
                            if input.len() > chunk {
                                return Err(Error::ItemTooLong {
                                    item: next_item,
                                    len: input.len(),
                                    chunk,
                                });
                            }
                            next_item += 1;
                            elems_in += input.len() as u64;
                            Ok(Pull::Borrowed {
                                input,
                                output: Some(out),
                            })
                        }
                        None => Ok(Pull::End),
                    },
                    &mut |_, _| Ok(()),
                    &mut self.stats,
                )?;
                if let Some(e) = failed {
                    return Err(e);
                }
                self.finish_run(started, n, n, elems_in, 0);
                Ok(n)
            }
        }
    }

    /// Streams items that live in the caller's own pinned buffers, each with
    /// its own pinned output (GPU backend only). Many items share one chunk:
    /// one batched DMA copy (`cuMemcpyBatchAsync`) moves them into the
    /// device, the stages run once per chunk, and one batched copy moves
    /// each item's results into its output: no host copy, no per-item copy.
    /// Where the driver has no batched copies (before CUDA 12.8, or a
    /// `cuda-12` build), one zero-copy kernel gathers the items over the
    /// bus and one scatters the results, decided at the run's first chunk.
    /// Every stage must be elementwise. Returns the item count.
    pub fn run_items_pinned<'a, I>(&mut self, items: I) -> Result<u64>
    where
        I: IntoIterator<Item = (&'a PinnedBuffer<T>, &'a mut PinnedBuffer<T>)>,
    {
        let _span = tracing::debug_span!("prism.pipeline.run_items_pinned").entered();
        let _nvtx = Range::new("run_items_pinned");
        if self.backend != BackendKind::Gpu {
            return Err(Error::Unsupported {
                stage: "run_items_pinned".into(),
                backend: "host",
            });
        }
        let mode = PinnedItemsCopy::resolve(self.items_copy)?;
        let order = self.begin_run(None, true, Some(None))?;
        let started = Instant::now();
        let chunk = self.chunk_elems();
        self.items_paths = PinnedItemsPaths::default();
        let (run, cache, _) = self.gpu_parts(&order)?;
        let mut io = PinnedItemsIo::new(items.into_iter(), chunk, cache, mode);
        let (r, slots) = run.drive(&mut io);
        for s in slots.into_made() {
            for d in [s.gather, s.scatter].into_iter().flatten() {
                io.cache.give_descriptors(d);
            }
        }
        let (n, paths) = (io.next_item as u64, io.paths);
        self.items_paths = paths;
        let counts = r?;
        self.finish_run(started, counts.chunks, n, counts.elems_in, counts.elems_out);
        Ok(n)
    }

    /// Streams everything `source` gives through the stages into `sink`,
    /// chunk by chunk in input order, on either backend. A chunk is what one
    /// `source.fill` call writes into the (pinned, on the GPU) upload slot;
    /// the sink reads each output straight from the download slot. Host
    /// memory is bounded by the ring whatever the stream's length.
    ///
    /// Errors: a source that fails (or panics) at chunk k stops the input;
    /// chunks before k are still delivered, nothing after, and the error
    /// names chunk k. A sink that fails (or panics) stops the run: chunks
    /// in flight drain and are not delivered. A failing or panicking stage
    /// stops the run the same way; the error names the stage and chunk.
    ///
    /// With `trace` on, the timeline keeps a few spans per chunk for the
    /// whole run: its memory grows with the stream's length (use it for
    /// bounded streams; `timing` alone holds only the ring's events).
    pub fn run_stream<S: Source<T>, K: Sink<T>>(
        &mut self,
        source: S,
        sink: K,
    ) -> Result<StreamCounts> {
        let _span = tracing::debug_span!("prism.pipeline.run_stream").entered();
        let _nvtx = Range::new("run_stream");
        let order = self.begin_run(None, false, Some(None))?;
        let started = Instant::now();
        let chunk = self.chunk_elems();
        match self.backend {
            BackendKind::Gpu => {
                let capacity = self.capacity(&order);
                let (run, cache, _) = self.gpu_parts(&order)?;
                let mut io = StreamIo {
                    source,
                    sink,
                    chunk,
                    capacity,
                    cache,
                    failed: None,
                };
                let (r, slots) = run.drive(&mut io);
                for s in slots.into_made() {
                    io.cache.give_output(s.input);
                    io.cache.give_output(s.output);
                }
                let failed = io.failed.take();
                let counts = r?;
                self.finish_run(started, counts.chunks, 0, counts.elems_in, counts.elems_out);
                if let Some(e) = failed {
                    return Err(e);
                }
                Ok(StreamCounts {
                    chunks: counts.chunks,
                    elements_in: counts.elems_in,
                    elements_out: counts.elems_out,
                })
            }
            BackendKind::Host => {
                let coordinator = AsyncPipelineCoordinator::new(self.config.slots)?;
                let (mut source, mut sink) = (source, sink);
                let zero = zeroed_vec::<T>(1)[0];
                let (mut elements_in, mut elements_out) = (0u64, 0u64);
                let (chunks, failed) = coordinator.run_pull(
                    self.copy_pool.pool(),
                    &crate::stage::refs(&self.stages),
                    &order,
                    &mut |buf, index| {
                        buf.resize(chunk, zero);
                        let n = guard::fill(&mut source, buf, index)?;
                        if n == 0 {
                            return Ok(Pull::End);
                        }
                        buf.truncate(n);
                        elements_in += n as u64;
                        Ok(Pull::Chunk)
                    },
                    &mut |index, out| {
                        elements_out += out.len() as u64;
                        guard::accept(&mut sink, index, out)
                    },
                    &mut self.stats,
                )?;
                self.finish_run(started, chunks, 0, elements_in, 0);
                if let Some(e) = failed {
                    return Err(e);
                }
                Ok(StreamCounts {
                    chunks,
                    elements_in,
                    elements_out,
                })
            }
        }
    }
}
