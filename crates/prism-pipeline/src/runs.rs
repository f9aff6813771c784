//! Whole runs: slices, pinned buffers, items and streams, each an I/O mode
//! of the ring engine on the GPU (`ring`, the same functions a
//! `MultiGpuPipeline` runs, with one device) or pulled through the host
//! backend.

use std::time::Instant;

use prism_stream::nvtx::Range;
use prism_stream::{zeroed_vec, Element, PinnedBuffer};

use crate::error::{Error, Result};
use crate::guard;
use crate::host::{AsyncPipelineCoordinator, Pull};
use crate::ring::{
    self, Devices, Failure, ItemsIo, PinnedItemsCopy, PinnedItemsIo, PinnedItemsPaths, StreamRun,
};
use crate::source::{Sink, Source, StreamCounts};
use crate::stats::BackendKind;
use crate::PipelineStageManager;

impl<T: Element> PipelineStageManager<T> {
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
                let plan = self.plan(&order, input.len());
                let devices = Devices::one(self);
                let counts = ring::run_slices(devices, &order, plan, input, output);
                let c = counts.map_err(Failure::into_error)?[0];
                self.finish_run(started, c.chunks, 0, c.elems_in, c.elems_out);
            }
            BackendKind::Host => {
                let coordinator = AsyncPipelineCoordinator::new(self.config.slots)?;
                // Chunks are read in place and written straight into their
                // part of `output`: no host copy.
                let mut chunks = input.chunks(chunk);
                let (full_out, last_out) =
                    (self.output_len(chunk), self.output_len(input.len() % chunk));
                let mut rest = output;
                let (chunks_done, failed, tally) = coordinator.run_pull(
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
                )?;
                if let Some(e) = failed {
                    return Err(e);
                }
                self.stats.add_host_run(&tally);
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
        let devices = Devices::one(self);
        let counts = ring::run_pinned(devices, &order, plan, input, output);
        let c = counts.map_err(Failure::into_error)?[0];
        self.finish_run(started, c.chunks, 0, c.elems_in, c.elems_out);
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
                let (n, failed, tally) = coordinator.run_pull(
                    self.copy_pool.pool(),
                    &crate::stage::refs(&self.stages),
                    &order,
                    &mut |_, _| match items.next() {
                        Some((input, out)) => {
                            // As on the GPU: an item is processed whole, in one chunk.
                            ring::check_item(input.len(), out.len(), chunk, next_item)?;
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
                )?;
                if let Some(e) = failed {
                    return Err(e);
                }
                self.stats.add_host_run(&tally);
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
                // One device on this thread: the source and sink need not
                // be `Send` (the same per-device run as several GPUs').
                let run = StreamRun::new(source, sink, chunk, self.slots());
                let counts = ring::drive_one(self, &|_, d, global| run.device(d, global, &order));
                let counts = counts.map_err(Failure::into_error)?;
                let (_, failed) = run.finish();
                self.finish_run(started, counts.chunks, 0, counts.elems_in, counts.elems_out);
                if let Some(e) = failed {
                    return Err(e);
                }
                Ok(StreamCounts::from(counts))
            }
            BackendKind::Host => {
                let coordinator = AsyncPipelineCoordinator::new(self.config.slots)?;
                let (mut source, mut sink) = (source, sink);
                let zero = zeroed_vec::<T>(1)[0];
                let (mut elements_in, mut elements_out) = (0u64, 0u64);
                let (chunks, failed, tally) = coordinator.run_pull(
                    self.copy_pool.pool(),
                    &crate::stage::refs(&self.stages),
                    &order,
                    &mut |buf, index| {
                        crate::host::size_slot(buf, chunk, zero)?;
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
                )?;
                // A source failure ends a run that counts (its chunks were
                // delivered), as on the GPU.
                self.stats.add_host_run(&tally);
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
