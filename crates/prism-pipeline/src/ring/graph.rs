//! A stage graph's I/O: one input and several outputs per chunk (the
//! processor, `dag::GraphChain`, says where each output is), every output
//! downloaded into its own destination, in output order.
//!
//! - [`GraphPinnedIo`]: the caller's pinned input and outputs, no staging;
//!   each device pulls a chunk's place from the run's feed
//!   ([`run_graph_pinned`], one GPU or several).
//! - [`GraphSliceIo`]: pageable input and outputs staged through the slot's
//!   pinned memory by the host threads; each device pulls a chunk and its
//!   output parts from the run's feed ([`run_graph_slices`], one GPU or
//!   several).
//! - [`TaggedIo`]: a tagged stream ([`TaggedRun`], one GPU or several):
//!   each device pulls a chunk from the source behind the run's feed, its
//!   metadata waits in the slot, and the chunk's outputs reach their sinks
//!   in input order (`InOrder`), each with the chunk's metadata.
//!
//! Invariant: a chunk's outputs are as many as the graph's, each as long
//! as planned; an empty output is skipped, not copied (a chunk whose
//! outputs are all empty has no download step, and its piece is dropped);
//! a pinned run writes every destination to its end.

use std::collections::VecDeque;
use std::sync::Mutex;

use prism_buffer::engine::{Recorded, RunCounts};
use prism_buffer::ring::ChunkId;
use prism_buffer::ChunkIo;
use prism_stream::nvtx::Range;
use prism_stream::{DeviceBuffer, Element, Gpu, Lane, PinnedBuffer};

use super::sched::{lock, Feed};
use super::{drive, Devices, Driven, FedRun};
use crate::copy::{par_copy, CopyPool};
use crate::dag::{filled, ChunkParts, GraphChain, GraphRun, StageGraph};
use crate::dag_stream::{accept, fill, TaggedSink, TaggedSource};
use crate::error::{Error, Result};
use crate::gpu::{GlobalIndex, StagingCache};
use crate::plan::ChunkPlan;

/// Queues each output's download on `lane`, output `k` into
/// `dsts[k] = (buffer, offset)` (empty ones skipped); the record runs from
/// the first copy's start to the last one's end.
pub(crate) fn download_into<'d, T: Element + 'd>(
    lane: &mut Lane,
    timed: bool,
    outs: &[(&DeviceBuffer<T>, usize)],
    dsts: impl Iterator<Item = (&'d mut PinnedBuffer<T>, usize)>,
) -> Result<Recorded> {
    let mut first: Option<prism_stream::Fence> = None;
    let mut end: Option<prism_stream::Fence> = None;
    let mut dsts = dsts;
    for &(dev, len) in outs {
        let (dst, at) = dsts
            .next()
            .ok_or(Error::Config("a chunk's outputs differ from the graph's"))?;
        if len == 0 {
            continue;
        }
        // With timing every copy is timed: the span runs from the first
        // copy's start to the last one's end, both timing events (an
        // untimed end cannot be measured against a timed start).
        let (start, e) = lane.copy_dtoh_timed(dev, 0, dst, at, len, timed)?;
        if end.is_none() {
            first = start;
        }
        end = Some(e);
    }
    let end = match (end, timed) {
        (Some(e), _) => e,
        (None, false) => lane.fence()?,
        (None, true) => {
            first = Some(lane.timed_fence()?);
            lane.timed_fence()?
        }
    };
    Ok(Recorded { start: first, end })
}

/// Where one chunk of a pinned graph run comes from and where each of
/// its outputs goes.
#[derive(Debug, Clone)]
pub(crate) struct GraphPiece {
    at: usize,
    len: usize,
    /// (offset, length) in each output.
    outs: Vec<(usize, usize)>,
}

/// Streams a pinned input through a stage graph into pinned outputs, cut
/// as `plan` says, over `devices` (one GPU or several): `graphs[i]`
/// and `runs[i]` (what `begin_graph` planned) are device `i`'s. Returns
/// each device's counts. After the run every destination must have been
/// written to its end (`dag::filled`: a node whose `output_len` answered
/// differently during the run than before leaves a gap).
pub(crate) fn run_graph_pinned<T: Element>(
    devices: Devices<'_, T>,
    graphs: &mut [StageGraph<T>],
    runs: &[GraphRun],
    plan: ChunkPlan,
    input: &PinnedBuffer<T>,
    outputs: &mut [&mut PinnedBuffer<T>],
) -> Driven<Vec<RunCounts>> {
    let (Some(graph), Some(run)) = (graphs.first(), runs.first()) else {
        return Err(Error::Config("a graph run needs a graph per GPU").into());
    };
    let mut pieces = Vec::new();
    let mut at = 0usize;
    let mut out_at = vec![0usize; outputs.len()];
    for len in plan {
        let node_lens = graph.lengths(&run.plan, len, pieces.len() as u64)?;
        let outs: Vec<(usize, usize)> = graph
            .output_lens(&node_lens)
            .into_iter()
            .zip(out_at.iter_mut())
            .map(|(l, o)| {
                let r = (*o, l);
                *o += l;
                r
            })
            .collect();
        pieces.push(GraphPiece { at, len, outs });
        at += len;
    }
    let lens: Vec<usize> = outputs.iter().map(|o| o.len()).collect();
    let feed = Feed::new(pieces.into_iter());
    let outputs = Mutex::new(outputs);
    let graphs: Vec<Mutex<&mut StageGraph<T>>> = graphs.iter_mut().map(Mutex::new).collect();
    let done = drive(devices, &|| feed.stop(), &|i, d, global| {
        let mut graph = lock(&graphs[i]);
        let run = &runs[i];
        let parts = d.graph_parts()?;
        let mut driver = parts.driver;
        driver.global = Some(global);
        let mut io = GraphPinnedIo {
            feed: &feed,
            input,
            outputs: &outputs,
            global,
            to_download: VecDeque::new(),
            written: vec![0; lens.len()],
        };
        let mut p = GraphChain::new(
            &mut **graph,
            &run.plan,
            run.capacity,
            Some(global),
            parts.branches,
        );
        let counts = driver.drive(&mut io, &mut p).0?;
        Ok((counts, io.written))
    })?;
    let mut written = vec![0usize; lens.len()];
    for (_, w) in &done {
        for (t, n) in written.iter_mut().zip(w) {
            *t += n;
        }
    }
    filled(&written, &lens)?;
    Ok(done.into_iter().map(|(c, _)| c).collect())
}

/// Chunks of a pinned graph run as one device pulls them: uploaded from
/// the shared input, each output downloaded into its place in the shared
/// outputs (under their lock; the ordering module tracks byte ranges, so
/// devices writing different chunks never wait for each other).
pub(crate) struct GraphPinnedIo<'a, 'o, 'p, T: Element> {
    pub(crate) feed: &'a Feed<std::vec::IntoIter<GraphPiece>>,
    pub(crate) input: &'a PinnedBuffer<T>,
    pub(crate) outputs: &'a Mutex<&'o mut [&'p mut PinnedBuffer<T>]>,
    pub(crate) global: &'a GlobalIndex,
    pub(crate) to_download: VecDeque<GraphPiece>,
    /// Elements this device downloaded into each output.
    pub(crate) written: Vec<usize>,
}

impl<T: Element> ChunkIo<T> for GraphPinnedIo<'_, '_, '_, T> {
    type Slot = ();
    type Error = Error;

    fn make_slot(&mut self, _gpu: &Gpu) -> Result<()> {
        Ok(())
    }

    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        _slot: &mut (),
        dev: &mut DeviceBuffer<T>,
        chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>> {
        let Some((k, p)) = self.feed.pull(|it, _| Ok::<_, Error>(it.next()))? else {
            return Ok(None);
        };
        let _nvtx = Range::new("upload");
        self.global.set(chunk, k);
        let rec = lane.copy_htod_timed(self.input, p.at, dev, 0, p.len, timed)?;
        let len = p.len;
        self.to_download.push_back(p);
        Ok(Some((len, rec.into())))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut (),
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        self.download_outputs(lane, timed, slot, &[(dev, len)])
    }

    fn download_outputs(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        _slot: &mut (),
        outs: &[(&DeviceBuffer<T>, usize)],
    ) -> Result<Recorded> {
        // A chunk whose outputs are all empty has no download step (the
        // engine skips it): its piece is dropped here.
        while self
            .to_download
            .front()
            .is_some_and(|p| p.outs.iter().all(|&(_, l)| l == 0))
        {
            self.to_download.pop_front();
        }
        let p = self
            .to_download
            .pop_front()
            .ok_or(Error::Config("chunk outputs out of step"))?;
        if p.outs.len() != outs.len() || p.outs.iter().zip(outs).any(|(a, b)| a.1 != b.1) {
            return Err(Error::Config(
                "a graph node produced another length than output_len said",
            ));
        }
        let mut dsts = lock(self.outputs);
        let targets = dsts
            .iter_mut()
            .map(|b| &mut **b)
            .zip(p.outs.iter().map(|&(at, _)| at));
        let rec = download_into(lane, timed, outs, targets)?;
        for (w, &(_, len)) in self.written.iter_mut().zip(outs) {
            *w += len;
        }
        Ok(rec)
    }

    fn retire(&mut self, _slot: &mut (), chunk: ChunkId, _len: usize) -> Result<()> {
        self.global.retired(chunk);
        Ok(())
    }

    fn retire_outputs(&mut self, _slot: &mut (), chunk: ChunkId, _lens: &[usize]) -> Result<()> {
        self.global.retired(chunk);
        Ok(())
    }
}

/// A slot's pinned staging for a graph: the input and one per output.
pub(crate) struct GraphStaged<T: Element> {
    pub(crate) input: PinnedBuffer<T>,
    pub(crate) outputs: Vec<PinnedBuffer<T>>,
}

impl<T: Element> GraphStaged<T> {
    /// Back to the pools `GraphSliceIo::make_slot` took them from.
    fn recycle(self, cache: &mut StagingCache<T>) {
        cache.give_input(self.input);
        for o in self.outputs {
            cache.give_output(o);
        }
    }
}

/// Streams pageable `input` through a stage graph into pageable `outputs`
/// (one per graph output), cut as `plan` says, over `devices` (one GPU or
/// several; `graphs[i]` and `runs[i]` are device `i`'s): each device
/// pulls a chunk and the parts of the outputs cut for it, stages it
/// through its own pinned memory with its own host threads, and copies
/// each output part back when the chunk retires. Returns each device's
/// counts.
pub(crate) fn run_graph_slices<T: Element>(
    devices: Devices<'_, T>,
    graphs: &mut [StageGraph<T>],
    runs: &[GraphRun],
    plan: ChunkPlan,
    input: &[T],
    outputs: &mut [&mut [T]],
) -> Driven<Vec<RunCounts>> {
    let (Some(graph), Some(run)) = (graphs.first(), runs.first()) else {
        return Err(Error::Config("a graph run needs a graph per GPU").into());
    };
    let pieces = graph.cut(&run.plan, plan, input, outputs)?;
    let feed = Feed::new(pieces.into_iter());
    let graphs: Vec<Mutex<&mut StageGraph<T>>> = graphs.iter_mut().map(Mutex::new).collect();
    drive(devices, &|| feed.stop(), &|i, d, global| {
        let mut graph = lock(&graphs[i]);
        let run = &runs[i];
        let parts = d.graph_parts()?;
        let (mut driver, cache, pool) = (parts.driver, parts.cache, parts.pool);
        driver.global = Some(global);
        let mut io = GraphSliceIo {
            feed: &feed,
            outputs: graph.output_count(),
            chunk: run.chunk,
            capacity: run.capacity,
            pool,
            cache,
            global,
            parts: VecDeque::new(),
        };
        let mut p = GraphChain::new(
            &mut **graph,
            &run.plan,
            run.capacity,
            Some(global),
            parts.branches,
        );
        let (r, slots) = driver.drive(&mut io, &mut p);
        for s in slots.into_made() {
            s.recycle(io.cache);
        }
        r
    })
}

/// Chunks of a pageable graph run as one device pulls them, staged
/// through its own pinned memory with its own host threads.
pub(crate) struct GraphSliceIo<'a, 'c, T: Element, I> {
    pub(crate) feed: &'c Feed<I>,
    /// Outputs of the graph.
    pub(crate) outputs: usize,
    /// Largest chunk input, for sizing staging.
    pub(crate) chunk: usize,
    /// Largest node output, for sizing staging.
    pub(crate) capacity: usize,
    pub(crate) pool: &'c CopyPool,
    pub(crate) cache: &'c mut StagingCache<T>,
    pub(crate) global: &'c GlobalIndex,
    /// The output parts of this device's chunks in flight, oldest first.
    pub(crate) parts: VecDeque<Vec<&'a mut [T]>>,
}

impl<'a, T: Element, I: Iterator<Item = ChunkParts<'a, T>>> ChunkIo<T>
    for GraphSliceIo<'a, '_, T, I>
{
    type Slot = GraphStaged<T>;
    type Error = Error;

    fn make_slot(&mut self, gpu: &Gpu) -> Result<GraphStaged<T>> {
        let input = self.cache.input(gpu, self.chunk)?;
        let mut outputs = Vec::with_capacity(self.outputs);
        for _ in 0..self.outputs {
            outputs.push(self.cache.output(gpu, self.capacity)?);
        }
        Ok(GraphStaged { input, outputs })
    }

    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut GraphStaged<T>,
        dev: &mut DeviceBuffer<T>,
        chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>> {
        let Some((k, (input, parts))) = self.feed.pull(|it, _| Ok::<_, Error>(it.next()))? else {
            return Ok(None);
        };
        let _nvtx = Range::new("upload");
        self.global.set(chunk, k);
        self.parts.push_back(parts);
        self.pool.label(k, "staging copy in");
        // The slot was released, so the previous upload from it completed.
        {
            let _nvtx = Range::new("staging copy in");
            par_copy(
                vec![(&mut slot.input.as_mut_slice()?[..input.len()], input)],
                self.pool,
            );
        }
        let rec = lane.copy_htod_timed(&slot.input, 0, dev, 0, input.len(), timed)?;
        Ok(Some((input.len(), rec.into())))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut GraphStaged<T>,
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        self.download_outputs(lane, timed, slot, &[(dev, len)])
    }

    fn download_outputs(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut GraphStaged<T>,
        outs: &[(&DeviceBuffer<T>, usize)],
    ) -> Result<Recorded> {
        if outs.len() != slot.outputs.len() {
            return Err(Error::Config("a chunk's outputs differ from the graph's"));
        }
        download_into(lane, timed, outs, slot.outputs.iter_mut().map(|b| (b, 0)))
    }

    fn retire(&mut self, slot: &mut GraphStaged<T>, chunk: ChunkId, len: usize) -> Result<()> {
        self.retire_outputs(slot, chunk, &[len])
    }

    /// Every chunk retires here, one whose outputs are all empty included
    /// (it had no download), so the parts stay in step with the chunks.
    fn retire_outputs(
        &mut self,
        slot: &mut GraphStaged<T>,
        chunk: ChunkId,
        lens: &[usize],
    ) -> Result<()> {
        let parts = self
            .parts
            .pop_front()
            .ok_or(Error::Config("chunk outputs out of step"))?;
        if parts.len() != lens.len() || parts.iter().zip(lens).any(|(p, &l)| p.len() != l) {
            return Err(Error::Config(
                "a graph node produced another length than output_len said",
            ));
        }
        let k = GlobalIndex::or(Some(self.global), chunk, 0);
        self.pool.label(k, "staging copy out");
        {
            let _nvtx = Range::new("staging copy out");
            let mut pairs = Vec::with_capacity(lens.len());
            for ((dst, staged), &len) in parts.into_iter().zip(&slot.outputs).zip(lens) {
                pairs.push((dst, &staged.as_slice()?[..len]));
            }
            par_copy(pairs, self.pool);
        }
        self.global.retired(chunk);
        Ok(())
    }
}

/// A slot of a tagged stream on the GPU: host-readable staging for the
/// input and each output, and the metadata of the chunk in the slot.
pub(crate) struct TaggedSlot<T: Element, M> {
    pub(crate) input: PinnedBuffer<T>,
    pub(crate) outputs: Vec<PinnedBuffer<T>>,
    pub(crate) meta: Option<M>,
}

impl<T: Element, M> TaggedSlot<T, M> {
    /// Back to the pool `TaggedIo::make_slot` took them from (all
    /// host-readable).
    fn recycle(self, cache: &mut StagingCache<T>) {
        cache.give_output(self.input);
        for o in self.outputs {
            cache.give_output(o);
        }
    }
}

/// A parked chunk of a tagged stream: its metadata and each output's part.
type TaggedParked<T, M> = (M, Vec<Vec<T>>);

/// What every device of a tagged graph stream shares: the source behind a
/// feed (called once at a time, in order), the sinks behind in-order
/// delivery (every output's sink gets chunks 0, 1, 2, ... with their
/// metadata; a device whose chunk is not next parks a copy), and the
/// source's failure.
pub(crate) type TaggedRun<'k, T, M, S, K> = FedRun<S, &'k mut [K], TaggedParked<T, M>>;

impl<T: Element, M, S: TaggedSource<T, M>, K: TaggedSink<T, M>>
    FedRun<S, &mut [K], TaggedParked<T, M>>
{
    /// One device's part of the run: `graph` (this device's) as `run` planned.
    pub(crate) fn device(
        &self,
        d: &mut crate::PipelineStageManager<T>,
        global: &GlobalIndex,
        graph: &Mutex<&mut StageGraph<T>>,
        run: &GraphRun,
    ) -> Result<RunCounts> {
        let mut graph = lock(graph);
        let outputs = graph.output_count();
        let parts = d.graph_parts()?;
        let (mut driver, cache) = (parts.driver, parts.cache);
        driver.global = Some(global);
        let mut io = TaggedIo {
            run: self,
            outputs,
            capacity: run.capacity,
            cache,
            global,
        };
        let mut p = GraphChain::new(
            &mut **graph,
            &run.plan,
            run.capacity,
            Some(global),
            parts.branches,
        );
        let (r, slots) = driver.drive(&mut io, &mut p);
        for s in slots.into_made() {
            s.recycle(io.cache);
        }
        r
    }
}

/// The chunks of a tagged stream as one device pulls them: the source
/// fills the slot's staging in place (under the feed's lock), the metadata
/// waits in the slot, and each output's sink reads its staging in place
/// when the chunk's turn comes.
pub(crate) struct TaggedIo<'a, 'k, T: Element, M, S, K> {
    run: &'a TaggedRun<'k, T, M, S, K>,
    outputs: usize,
    capacity: usize,
    cache: &'a mut StagingCache<T>,
    global: &'a GlobalIndex,
}

impl<T: Element, M, S: TaggedSource<T, M>, K: TaggedSink<T, M>> ChunkIo<T>
    for TaggedIo<'_, '_, T, M, S, K>
{
    type Slot = TaggedSlot<T, M>;
    type Error = Error;

    fn make_slot(&mut self, gpu: &Gpu) -> Result<TaggedSlot<T, M>> {
        // Host-readable (a source may read what it wrote): no write-combining.
        let input = self.cache.output(gpu, self.run.chunk)?;
        let mut outputs = Vec::with_capacity(self.outputs);
        for _ in 0..self.outputs {
            outputs.push(self.cache.output(gpu, self.capacity)?);
        }
        Ok(TaggedSlot {
            input,
            outputs,
            meta: None,
        })
    }

    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut TaggedSlot<T, M>,
        dev: &mut DeviceBuffer<T>,
        chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>> {
        let dst = &mut slot.input.as_mut_slice()?[..self.run.chunk];
        let (k, (len, meta)) = match self.run.feed.pull(|source, k| fill(source, dst, k)) {
            Ok(Some(x)) => x,
            Ok(None) => return Ok(None),
            Err(e) => {
                lock(&self.run.failed).get_or_insert(e);
                return Ok(None);
            }
        };
        // After the source's fill: only now is it known that there is a chunk.
        let _nvtx = Range::new("upload");
        self.global.set(chunk, k);
        slot.meta = Some(meta);
        let rec = lane.copy_htod_timed(&slot.input, 0, dev, 0, len, timed)?;
        Ok(Some((len, rec.into())))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut TaggedSlot<T, M>,
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        self.download_outputs(lane, timed, slot, &[(dev, len)])
    }

    fn download_outputs(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut TaggedSlot<T, M>,
        outs: &[(&DeviceBuffer<T>, usize)],
    ) -> Result<Recorded> {
        if outs.len() != slot.outputs.len() {
            return Err(Error::Config("a chunk's outputs differ from the graph's"));
        }
        download_into(lane, timed, outs, slot.outputs.iter_mut().map(|b| (b, 0)))
    }

    fn retire(&mut self, slot: &mut TaggedSlot<T, M>, chunk: ChunkId, len: usize) -> Result<()> {
        self.retire_outputs(slot, chunk, &[len])
    }

    /// Every chunk retires here (one whose outputs are all empty too), so
    /// every sink sees every chunk's metadata.
    fn retire_outputs(
        &mut self,
        slot: &mut TaggedSlot<T, M>,
        chunk: ChunkId,
        lens: &[usize],
    ) -> Result<()> {
        let k = self
            .global
            .get(chunk)
            .ok_or(Error::Config("a chunk's number was lost"))?;
        let meta = slot
            .meta
            .take()
            .ok_or(Error::Config("a retired chunk has no metadata"))?;
        if lens.len() != slot.outputs.len() {
            return Err(Error::Config("a chunk's outputs differ from the graph's"));
        }
        let parts = slot
            .outputs
            .iter()
            .zip(lens)
            .map(|(b, &len)| Ok(&b.as_slice()?[..len]))
            .collect::<Result<Vec<&[T]>>>()?;
        let send = |sinks: &mut &mut [K], i: u64, meta: &M, parts: &[&[T]]| -> Result<()> {
            for (sink, data) in sinks.iter_mut().zip(parts) {
                accept(sink, i, meta, data)?;
            }
            Ok(())
        };
        // Delivered now (by reference) or parked (moved): one of the two.
        let meta = std::cell::Cell::new(Some(meta));
        let taken = || {
            meta.take()
                .ok_or(Error::Config("a chunk's metadata was taken twice"))
        };
        let delivered = self.run.out.deliver(
            k,
            |sinks| send(sinks, k, &taken()?, &parts),
            || Ok((taken()?, parts.iter().map(|p| p.to_vec()).collect())),
            &|sinks, i, (m, vs): TaggedParked<T, M>| {
                let parts: Vec<&[T]> = vs.iter().map(|v| &v[..]).collect();
                send(sinks, i, &m, &parts)
            },
        );
        delivered.unwrap_or(Ok(()))?;
        self.global.retired(chunk);
        Ok(())
    }
}
