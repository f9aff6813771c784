//! `execute_iteration`: the design's loop, one chunk per call, overlapped.
//!
//! Each call submits one chunk (its upload, stages and download are all
//! queued in the call, the GPU orders them) and returns the outputs of the
//! chunks that finished, in submission order, without waiting for its own.
//! Once every slot is in flight, the call waits for the oldest chunk, so
//! chunk k − (slots − 1) comes back while chunk k is submitted. `flush`
//! drains the rest. `execute_iteration_blocking` is one synchronous round
//! trip on a single lane (the old behaviour, made cheap).

use std::ops::Range;
use std::time::Instant;

use prism_buffer::engine::{ChunkSpan, ComputeSpans, IoSlots, Upload};
use prism_buffer::ring::ChunkId;
use prism_buffer::{ChunkProcessor, Engine};
use prism_stream::nvtx::Range as NvtxRange;
use prism_stream::{Element, PinnedBuffer, Probe};

use crate::copy::par_copy_one;
use crate::error::{Error, Result};
use crate::gpu::{record_span, StageChain, StagingCache};
use crate::ring::{IterData, IterIo, IterSlot};
use crate::source::ChunkOutput;
use crate::stats::{BackendKind, PipelineStats};
use crate::PipelineStageManager;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// An `execute_iteration` session: chunks in flight and their slots' state.
#[derive(Debug)]
pub(crate) struct Session<T: Element> {
    slots: IoSlots<IterSlot<T>>,
    /// Session index of the engine ring's chunk 0 (the ring restarts after
    /// a failed call; indices go on).
    base: u64,
    /// Indices handed out (submitted chunks) and chunks handed back (or lost
    /// to a failure).
    submitted: u64,
    returned: u64,
    /// The stats' chunk count when the session began: the session counts
    /// as a run only if a chunk came back after it (a session whose every
    /// chunk failed adds no run).
    chunks_at_start: u64,
    /// Outputs that finished during a call that failed: returned first by
    /// the next call or `flush`.
    carry: Vec<ChunkOutput<T>>,
}

impl<T: Element> Session<T> {
    fn new(slots: usize, chunks_at_start: u64) -> Self {
        Self {
            slots: IoSlots::new(slots),
            base: 0,
            submitted: 0,
            returned: 0,
            chunks_at_start,
            carry: Vec::new(),
        }
    }

    /// Chunks submitted and not handed back yet (in flight or carried).
    pub(crate) fn pending(&self) -> usize {
        (self.submitted - self.returned) as usize
    }

    fn recycle(self, cache: &mut StagingCache<T>) {
        for s in self.slots.into_made() {
            if let Some(st) = s.staged {
                st.recycle(cache);
            }
        }
    }
}

/// Retires every chunk whose download completed (non-blocking).
fn retire_ready<T: Element>(
    engine: &mut Engine<T>,
    io: &mut IterIo<'_, T>,
    slots: &mut IoSlots<IterSlot<T>>,
    stats: &mut PipelineStats,
) -> Result<()> {
    let elem = std::mem::size_of::<T>() as u64;
    loop {
        let mut got: Vec<ChunkSpan> = Vec::new();
        let r = engine.retire(io, slots, &mut |s| got.push(s))?;
        for s in got {
            record_span(stats, None, s);
        }
        match r {
            Some((_, len)) => {
                stats.chunks += 1;
                stats.bytes_out += len as u64 * elem;
            }
            None => return Ok(()),
        }
    }
}

impl<T: Element> PipelineStageManager<T> {
    /// Chunks submitted with `execute_iteration` that have not come back yet.
    pub fn pending_iterations(&self) -> usize {
        self.iter.as_ref().map_or(0, Session::pending)
    }

    /// Submits `chunk` (at most one chunk long) through the stages and
    /// returns the outputs of the chunks that finished, in submission order;
    /// it does not wait for `chunk` itself. Each call queues its chunk's
    /// upload, stages and download (the GPU orders them); once every slot is
    /// in flight it waits for the oldest chunk, so chunk k − (slots − 1)
    /// comes back while chunk k is submitted. Chunks may change length from
    /// call to call. An empty `chunk` submits nothing and returns what
    /// finished. On the host backend each call runs its chunk at once and
    /// returns it.
    ///
    /// If the call fails (a stage error, say), its chunk is lost (its index
    /// is not reused); the chunks before it still come back, from the next
    /// call or `flush`.
    pub fn execute_iteration(&mut self, chunk: &[T]) -> Result<Vec<ChunkOutput<T>>> {
        let _nvtx = NvtxRange::new("execute_iteration");
        // A failed run's adaptive choice must not size this call.
        self.effective = None;
        if chunk.len() > self.chunk_elems() {
            return Err(Error::Config(
                "execute_iteration takes at most one chunk (PipelineConfig::chunk_bytes)",
            ));
        }
        let data = if chunk.is_empty() {
            IterData::None
        } else {
            IterData::Pageable(chunk)
        };
        self.iteration(data, chunk)
    }

    /// [`execute_iteration`](Self::execute_iteration) from `input[range]`
    /// into `output[to..]`, both pinned: no host copy (GPU backend only).
    /// The call queues the whole round trip; host reads of `output` fail
    /// with `BufferInFlight` (or wait, with `wait_slice`) until it is done,
    /// and the chunk comes back with `data: None` from a later call or
    /// `flush`.
    pub fn execute_iteration_pinned(
        &mut self,
        input: &PinnedBuffer<T>,
        range: Range<usize>,
        output: &mut PinnedBuffer<T>,
        to: usize,
    ) -> Result<Vec<ChunkOutput<T>>> {
        let _nvtx = NvtxRange::new("execute_iteration_pinned");
        self.effective = None;
        if self.backend != BackendKind::Gpu {
            return Err(Error::Unsupported {
                stage: "execute_iteration_pinned".into(),
                backend: "host",
            });
        }
        let len = range.len();
        if range.end > input.len() || range.start > range.end {
            return Err(prism_stream::Error::LengthMismatch {
                what: "execute_iteration_pinned input range",
                expected: input.len(),
                actual: range.end,
            }
            .into());
        }
        if len == 0 || len > self.chunk_elems() {
            return Err(Error::Config(
                "execute_iteration_pinned takes 1 to chunk_bytes elements",
            ));
        }
        let out_len = self.checked_output_len(&self.order(), len, 0)?;
        if to.saturating_add(out_len) > output.len() {
            return Err(Error::OutputLength {
                expected: to.saturating_add(out_len),
                actual: output.len(),
            });
        }
        let data = IterData::Pinned {
            input,
            from: range.start,
            len,
            output,
            to,
        };
        self.iteration(data, &[])
    }

    /// Ends an `execute_iteration` session that has nothing in flight or
    /// carried (before a whole run, a new configuration or a new ring);
    /// `IterationPending` when it has.
    pub(crate) fn close_idle_session(&mut self) -> Result<()> {
        let Some(session) = self.iter.take() else {
            return Ok(());
        };
        if session.pending() > 0 {
            let pending = session.pending();
            self.iter = Some(session);
            return Err(Error::IterationPending { pending });
        }
        if self.stats.chunks > session.chunks_at_start {
            self.stats.runs += 1;
        }
        if let Some(engine) = self.engine.as_mut() {
            if engine.timed() {
                self.stats.compute_busy_ms += engine.stop_timing();
            }
        }
        session.recycle(&mut self.cache);
        Ok(())
    }

    /// One submission (or, with `IterData::None`, only the retirement of
    /// what finished).
    fn iteration(
        &mut self,
        data: IterData<'_, T>,
        host_chunk: &[T],
    ) -> Result<Vec<ChunkOutput<T>>> {
        let _span = tracing::trace_span!("prism.pipeline.execute_iteration").entered();
        let started = Instant::now();
        let order = self.order();
        self.check_stages(&order)?;
        if self.backend == BackendKind::Host {
            let out = self.host_iteration(&order, host_chunk);
            if out.is_ok() {
                // A failed chunk adds nothing (its chunk is lost alone).
                self.stats.wall_ms += started.elapsed().as_secs_f64() * 1e3;
            }
            return out;
        }
        let has_chunk = !matches!(data, IterData::None);
        if !has_chunk && self.iter.is_none() {
            return Ok(Vec::new());
        }
        // The ring must fit the stages as they are now (a rebuild ends an
        // idle session, and is refused while chunks are in flight).
        self.engine(&order)?;
        let chunk = self.chunk_elems();
        let capacity = self.capacity(&order)?;
        let timing = self.config.timing;
        let elem = std::mem::size_of::<T>() as u64;
        let submitted_len = match &data {
            IterData::Pageable(c) => c.len(),
            IterData::Pinned { len, .. } => *len,
            IterData::None => 0,
        };
        let Self {
            engine,
            stages,
            stats,
            cache,
            iter,
            copy_pool,
            ..
        } = self;
        let engine = engine.as_mut().ok_or(Error::Config("no GPU engine"))?;
        if iter.is_none() {
            engine.restart()?;
            if timing {
                engine.start_timing()?;
            }
            *iter = Some(Session::new(engine.slot_count(), stats.chunks));
        }
        let Some(session) = iter.as_mut() else {
            return Err(Error::Config("no execute_iteration session"));
        };
        let mut done = std::mem::take(&mut session.carry);
        let before = done.len();
        let result = {
            let mut io = IterIo {
                data,
                chunk,
                capacity,
                pool: copy_pool,
                cache,
                base: session.base,
                done: &mut done,
            };
            let mut chain = StageChain {
                stages,
                order: &order,
                capacity,
                base: session.base,
                global: None,
                graphs: None,
            };
            let slots = &mut session.slots;
            catch_unwind(AssertUnwindSafe(|| {
                submit(engine, &mut io, slots, &mut chain, stats, has_chunk)
            }))
        };
        if has_chunk {
            session.submitted += 1;
            stats.bytes_in += submitted_len as u64 * elem;
        }
        stats.wall_ms += started.elapsed().as_secs_f64() * 1e3;
        stats.timed = timing;
        match result {
            Ok(Ok(())) => {
                session.returned += (done.len() - before) as u64;
                Ok(done)
            }
            Ok(Err(e)) => {
                recover(
                    engine, session, cache, copy_pool, chunk, capacity, stats, done,
                );
                Err(e)
            }
            Err(payload) => {
                recover(
                    engine, session, cache, copy_pool, chunk, capacity, stats, done,
                );
                std::panic::resume_unwind(payload)
            }
        }
    }

    fn host_iteration(&mut self, order: &[usize], chunk: &[T]) -> Result<Vec<ChunkOutput<T>>> {
        if chunk.is_empty() {
            return Ok(Vec::new());
        }
        let chunks_now = self.stats.chunks;
        let session = self.iter.get_or_insert_with(|| Session::new(0, chunks_now));
        let index = session.submitted;
        session.submitted += 1;
        session.returned += 1;
        let (out, times) =
            crate::host::run_chunk(&crate::stage::refs(&self.stages), order, index, chunk)?;
        for (&i, ms) in order.iter().zip(times) {
            let name = self.stages[i].name().to_owned();
            self.stats.add_stage_time(&name, ms);
            self.stats.compute_busy_ms += ms;
        }
        self.stats.chunks += 1;
        self.stats.bytes_in += std::mem::size_of_val(chunk) as u64;
        self.stats.bytes_out += std::mem::size_of_val(out.as_slice()) as u64;
        self.stats.timed = true;
        Ok(vec![ChunkOutput {
            index,
            data: Some(out),
        }])
    }

    /// Waits for every chunk submitted with `execute_iteration` and returns
    /// their outputs in submission order (empty when nothing was pending).
    /// The next submission starts a new session (indices from 0).
    pub fn flush(&mut self) -> Result<Vec<ChunkOutput<T>>> {
        let _span = tracing::trace_span!("prism.pipeline.flush").entered();
        let _nvtx = NvtxRange::new("flush");
        let started = Instant::now();
        let chunk = self.chunk_elems();
        let order = self.order();
        let capacity = self.capacity(&order)?;
        let Self {
            engine,
            stats,
            cache,
            iter,
            copy_pool,
            ..
        } = self;
        let Some(mut session) = iter.take() else {
            return Ok(Vec::new());
        };
        if stats.chunks > session.chunks_at_start {
            stats.runs += 1;
        }
        let mut done = std::mem::take(&mut session.carry);
        let Some(engine) = engine.as_mut() else {
            // The host backend: nothing is ever in flight.
            return Ok(done);
        };
        let result = {
            let mut io = IterIo {
                data: IterData::None,
                chunk,
                capacity,
                pool: copy_pool,
                cache,
                base: session.base,
                done: &mut done,
            };
            drain(engine, &mut io, &mut session.slots, stats)
        };
        if result.is_err() {
            engine.abandon();
        }
        if engine.timed() {
            stats.compute_busy_ms += engine.stop_timing();
        }
        stats.wall_ms += started.elapsed().as_secs_f64() * 1e3;
        session.recycle(cache);
        result?;
        Ok(done)
    }

    /// One synchronous step: uploads `chunk`, runs the stages, downloads the
    /// output and waits for it. On the GPU it runs on a single lane (no
    /// cross-lane waits) with the ring's first slot, the cheapest round trip
    /// for small chunks; per-step GPU times are not recorded. It copies
    /// `chunk` into pinned staging and the output out of it on the calling
    /// thread; [`execute_iteration_blocking_pinned`](Self::execute_iteration_blocking_pinned)
    /// skips both. Needs no `execute_iteration` chunk in flight.
    pub fn execute_iteration_blocking(&mut self, chunk: &[T]) -> Result<Vec<T>> {
        // A failed run's adaptive choice must not size this call.
        self.effective = None;
        let _span = tracing::trace_span!("prism.pipeline.execute_iteration_blocking").entered();
        let _nvtx = NvtxRange::new("execute_iteration_blocking");
        if chunk.len() > self.chunk_elems() {
            return Err(Error::Config(
                "execute_iteration takes at most one chunk (PipelineConfig::chunk_bytes)",
            ));
        }
        let started = Instant::now();
        let order = self.begin_run(None, false, None)?;
        if chunk.is_empty() {
            return Ok(Vec::new());
        }
        if self.backend == BackendKind::Host {
            let (out, times) =
                crate::host::run_chunk(&crate::stage::refs(&self.stages), &order, 0, chunk)?;
            for (&i, ms) in order.iter().zip(times) {
                let name = self.stages[i].name().to_owned();
                self.stats.add_stage_time(&name, ms);
                self.stats.compute_busy_ms += ms;
            }
            let bytes_out = std::mem::size_of_val(out.as_slice()) as u64;
            self.stats.bytes_out += bytes_out;
            self.finish_run(started, 1, 0, chunk.len() as u64, 0);
            return Ok(out);
        }
        let capacity = self.capacity(&order)?;
        let (run, cache, pool) = self.gpu_parts(&order)?;
        let gpu = run.engine.gpu().clone();
        let mut input = cache.input(&gpu, chunk.len())?;
        let mut output = cache.output(&gpu, capacity)?;
        {
            let _nvtx = NvtxRange::new("staging copy in");
            par_copy_one(&mut input.as_mut_slice()?[..chunk.len()], chunk, pool);
        }
        let out_len = round_trip(run, &order, &input, 0..chunk.len(), &mut output, 0)?;
        let out = {
            let _nvtx = NvtxRange::new("staging copy out");
            output.as_slice()?[..out_len].to_vec()
        };
        cache.give_input(input);
        cache.give_output(output);
        self.finish_run(started, 1, 0, chunk.len() as u64, out_len as u64);
        Ok(out)
    }

    /// [`execute_iteration_blocking`](Self::execute_iteration_blocking) from
    /// `input[range]` into `output[to..]`, both pinned: no host copy (GPU
    /// backend only). Returns the output length.
    pub fn execute_iteration_blocking_pinned(
        &mut self,
        input: &PinnedBuffer<T>,
        range: Range<usize>,
        output: &mut PinnedBuffer<T>,
        to: usize,
    ) -> Result<usize> {
        self.effective = None;
        let _span =
            tracing::trace_span!("prism.pipeline.execute_iteration_blocking_pinned").entered();
        let _nvtx = NvtxRange::new("execute_iteration_blocking_pinned");
        if self.backend != BackendKind::Gpu {
            return Err(Error::Unsupported {
                stage: "execute_iteration_blocking_pinned".into(),
                backend: "host",
            });
        }
        if range.is_empty() || range.len() > self.chunk_elems() {
            return Err(Error::Config(
                "execute_iteration_blocking_pinned takes 1 to chunk_bytes elements",
            ));
        }
        let started = Instant::now();
        let order = self.begin_run(None, false, None)?;
        let len = range.len();
        let (run, _, _) = self.gpu_parts(&order)?;
        let out_len = round_trip(run, &order, input, range, output, to)?;
        self.finish_run(started, 1, 0, len as u64, out_len as u64);
        Ok(out_len)
    }
}

/// One synchronous round trip on the engine's first compute lane and slot:
/// `input[range]` up, the stages, the output down into `output[to..]`, and a
/// wait for it. Returns the output length.
fn round_trip<T: Element>(
    run: crate::ring::GpuRun<'_, T>,
    order: &[usize],
    input: &PinnedBuffer<T>,
    range: Range<usize>,
    output: &mut PinnedBuffer<T>,
    to: usize,
) -> Result<usize> {
    let capacity = run.capacity;
    let gpu = run.engine.gpu().clone();
    let (lane, bufs) = run
        .engine
        .idle_parts()
        .ok_or(Error::Config("the ring is busy"))?;
    let len = range.len();
    {
        let _nvtx = NvtxRange::new("upload");
        lane.copy_htod(input, range.start, &mut bufs[0], 0, len)?;
    }
    let mut chain = StageChain {
        stages: run.stages,
        order,
        capacity,
        base: 0,
        global: None,
        graphs: None,
    };
    let outs = {
        let mut launch = lane.launch();
        chain.process(
            &mut launch,
            bufs,
            len,
            ChunkId(0),
            &mut ComputeSpans::default(),
        )?
    };
    let [(out_buf, out_len)] = *outs.as_slice() else {
        return Err(Error::Config("a stage chain made more than one output"));
    };
    let done = {
        let _nvtx = NvtxRange::new("download");
        lane.copy_dtoh(&bufs[out_buf], 0, output, to, out_len)?
    };
    let _nvtx = NvtxRange::new("wait for the GPU");
    if let Probe::Failed(reason) = done.synchronize() {
        gpu.poison(&reason);
        return Err(prism_stream::Error::ContextPoisoned { reason }.into());
    }
    Ok(out_len)
}

/// Submits the step's chunk (waiting for a free slot if every slot is in
/// flight), queues its stages and download, retires what finished, and
/// once the ring is full waits for the oldest chunk.
fn submit<T: Element>(
    engine: &mut Engine<T>,
    io: &mut IterIo<'_, T>,
    slots: &mut IoSlots<IterSlot<T>>,
    chain: &mut StageChain<'_, T>,
    stats: &mut PipelineStats,
    has_chunk: bool,
) -> Result<()> {
    if has_chunk {
        loop {
            match engine.upload(io, slots)? {
                Upload::Issued(..) => break,
                Upload::NoSlot => {
                    engine.wait_oldest()?;
                    retire_ready(engine, io, slots, stats)?;
                }
                Upload::Exhausted => {
                    return Err(Error::Config("execute_iteration lost its chunk"));
                }
            }
        }
        if engine.process(chain)?.is_none() || engine.download(io, slots)?.is_none() {
            return Err(Error::Config("execute_iteration could not queue its chunk"));
        }
    }
    retire_ready(engine, io, slots, stats)?;
    if has_chunk && engine.in_flight() == engine.slot_count() {
        engine.wait_oldest()?;
        retire_ready(engine, io, slots, stats)?;
    }
    Ok(())
}

/// Retires every chunk in flight, in order.
fn drain<T: Element>(
    engine: &mut Engine<T>,
    io: &mut IterIo<'_, T>,
    slots: &mut IoSlots<IterSlot<T>>,
    stats: &mut PipelineStats,
) -> Result<()> {
    loop {
        retire_ready(engine, io, slots, stats)?;
        if engine.is_idle() {
            return Ok(());
        }
        engine.wait_oldest()?;
    }
}

/// After a failed call: brings back the chunks before the failing one
/// (those whose download was queued) into the session's carry, then
/// drains the ring and restarts it with indices going on. If even that
/// fails, the session ends (its chunks are lost; staging recycled).
#[allow(clippy::too_many_arguments)]
fn recover<T: Element>(
    engine: &mut Engine<T>,
    session: &mut Session<T>,
    cache: &mut StagingCache<T>,
    pool: &crate::copy::CopyPool,
    chunk: usize,
    capacity: usize,
    stats: &mut PipelineStats,
    mut done: Vec<ChunkOutput<T>>,
) {
    let salvaged: Result<()> = (|| {
        let mut io = IterIo {
            data: IterData::None,
            chunk,
            capacity,
            pool,
            cache,
            base: session.base,
            done: &mut done,
        };
        loop {
            retire_ready(engine, &mut io, &mut session.slots, stats)?;
            // Stop at the first chunk whose download was never queued.
            let oldest = engine
                .states()
                .into_iter()
                .filter_map(|s| s.chunk.map(|c| (c, s.next_step)))
                .min_by_key(|(c, _)| *c);
            match oldest {
                Some((_, None)) => {
                    engine.wait_oldest()?;
                }
                _ => return Ok(()),
            }
        }
    })();
    engine.abandon();
    match salvaged.and_then(|()| Ok(engine.restart()?)) {
        Ok(()) => {
            // Everything not brought back is lost (counted as returned); the
            // restarted ring's chunk 0 gets the next index.
            session.returned = session.submitted - done.len() as u64;
            session.base = session.submitted;
            session.carry = done;
        }
        Err(_) => {
            // Indices still go on: the next chunk is not mistaken for one
            // of the lost ones.
            let mut fresh = Session::new(engine.slot_count(), session.chunks_at_start);
            fresh.submitted = session.submitted;
            fresh.returned = session.submitted;
            fresh.base = session.submitted;
            let old = std::mem::replace(session, fresh);
            old.recycle(cache);
        }
    }
}
