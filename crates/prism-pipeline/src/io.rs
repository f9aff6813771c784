//! The GPU backend's I/O modes, each a [`ChunkIo`] of the ring engine with
//! its own per-slot state: pageable slices, pinned buffers, items, streams,
//! and the steps of `execute_iteration`.

use std::collections::VecDeque;

use prism_buffer::engine::Recorded;
use prism_buffer::ring::ChunkId;
use prism_buffer::ChunkIo;
use prism_stream::nvtx::Range;
use prism_stream::{BatchItem, DeviceBuffer, Element, Gpu, Lane, Launch, PinnedBuffer};

use crate::copy::{par_copy, par_copy_one, CopyPool};
use crate::error::{Error, Result};
use crate::gpu::StagingCache;
use crate::guard;
use crate::plan::ChunkPlan;
use crate::source::{Sink, Source};

/// A slot's pinned staging: input (the host writes it, the GPU reads it)
/// and output (the GPU writes it, the host reads it).
#[derive(Debug)]
pub(crate) struct Staged<T: Element> {
    pub(crate) input: PinnedBuffer<T>,
    pub(crate) output: PinnedBuffer<T>,
}

impl<T: Element> Staged<T> {
    pub(crate) fn make(
        cache: &mut StagingCache<T>,
        gpu: &Gpu,
        input: usize,
        output: usize,
    ) -> Result<Self> {
        Ok(Self {
            input: cache.input(gpu, input)?,
            output: cache.output(gpu, output)?,
        })
    }

    pub(crate) fn recycle(self, cache: &mut StagingCache<T>) {
        cache.give_input(self.input);
        cache.give_output(self.output);
    }
}

pub(crate) fn download_staged<T: Element>(
    lane: &mut Lane,
    timed: bool,
    out: &mut PinnedBuffer<T>,
    dev: &DeviceBuffer<T>,
    len: usize,
) -> Result<Recorded> {
    Ok(lane.copy_dtoh_timed(dev, 0, out, 0, len, timed)?.into())
}

/// Pageable input and output: chunks are staged through pinned memory,
/// copied by several host threads.
pub(crate) struct SliceIo<'a, T: Element> {
    pub(crate) input: &'a [T],
    pub(crate) output: &'a mut [T],
    /// Largest chunk input, for sizing staging.
    pub(crate) chunk: usize,
    pub(crate) plan: ChunkPlan,
    /// Largest chunk output, for sizing staging.
    pub(crate) capacity: usize,
    pub(crate) pool: &'a CopyPool,
    pub(crate) next_in: usize,
    pub(crate) next_out: usize,
    pub(crate) cache: &'a mut StagingCache<T>,
}

impl<T: Element> ChunkIo<T> for SliceIo<'_, T> {
    type Slot = Staged<T>;
    type Error = Error;

    fn make_slot(&mut self, gpu: &Gpu) -> Result<Staged<T>> {
        Staged::make(self.cache, gpu, self.chunk, self.capacity)
    }

    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Staged<T>,
        dev: &mut DeviceBuffer<T>,
        chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>> {
        let Some(len) = self.plan.next() else {
            return Ok(None);
        };
        let _nvtx = Range::new("upload");
        self.pool.label(chunk.0, "staging copy in");
        // The slot was released, so the previous upload from it completed.
        {
            let _nvtx = Range::new("staging copy in");
            par_copy_one(
                &mut slot.input.as_mut_slice()?[..len],
                &self.input[self.next_in..self.next_in + len],
                self.pool,
            );
        }
        self.next_in += len;
        let rec = lane.copy_htod_timed(&slot.input, 0, dev, 0, len, timed)?;
        Ok(Some((len, rec.into())))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Staged<T>,
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        download_staged(lane, timed, &mut slot.output, dev, len)
    }

    fn retire(&mut self, slot: &mut Staged<T>, chunk: ChunkId, len: usize) -> Result<()> {
        let _nvtx = Range::new("staging copy out");
        self.pool.label(chunk.0, "staging copy out");
        par_copy_one(
            &mut self.output[self.next_out..self.next_out + len],
            &slot.output.as_slice()?[..len],
            self.pool,
        );
        self.next_out += len;
        Ok(())
    }
}

/// Pinned input and output: chunks are copied straight from and to the
/// user's page-locked buffers, no staging.
pub(crate) struct PinnedIo<'a, T: Element> {
    pub(crate) input: &'a PinnedBuffer<T>,
    pub(crate) output: &'a mut PinnedBuffer<T>,
    pub(crate) plan: ChunkPlan,
    pub(crate) next_in: usize,
    pub(crate) next_out: usize,
}

impl<T: Element> ChunkIo<T> for PinnedIo<'_, T> {
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
        _chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>> {
        let Some(len) = self.plan.next() else {
            return Ok(None);
        };
        let _nvtx = Range::new("upload");
        let rec = lane.copy_htod_timed(self.input, self.next_in, dev, 0, len, timed)?;
        self.next_in += len;
        Ok(Some((len, rec.into())))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        _slot: &mut (),
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        let rec = lane.copy_dtoh_timed(dev, 0, self.output, self.next_out, len, timed)?;
        self.next_out += len;
        Ok(rec.into())
    }

    fn retire(&mut self, _slot: &mut (), _chunk: ChunkId, _len: usize) -> Result<()> {
        Ok(())
    }
}

/// Takes items (input, output) from the front of `items` while they fit one
/// chunk together; `len` gives an item's input and output lengths, which
/// must agree. `next_item` counts the items taken so far (for errors).
fn take_batch<A, B, I: Iterator<Item = (A, B)>>(
    items: &mut std::iter::Peekable<I>,
    chunk: usize,
    next_item: &mut usize,
    len: impl Fn(&A, &B) -> (usize, usize),
) -> Result<(Vec<(A, B)>, usize)> {
    let (mut batch, mut total) = (Vec::new(), 0);
    while let Some((input, output)) = items.peek() {
        let (n, out) = len(input, output);
        if n != out {
            return Err(Error::OutputLength {
                expected: n,
                actual: out,
            });
        }
        if n > chunk {
            return Err(Error::ItemTooLong {
                item: *next_item,
                len: n,
                chunk,
            });
        }
        if total + n > chunk {
            break;
        }
        let Some(item) = items.next() else { break };
        *next_item += 1;
        total += n;
        batch.push(item);
    }
    Ok((batch, total))
}

/// A slot of [`ItemsIo`]: staging and the items batched in its chunk.
#[derive(Debug)]
pub(crate) struct ItemsSlot<T: Element> {
    pub(crate) staged: Staged<T>,
    /// (offset, length) of each item in the chunk, in item order.
    items: Vec<(usize, usize)>,
}

/// Separate items, each with its own output: gathered into pinned staging
/// (many items per chunk), one copy and one launch per chunk, scattered back.
/// Only for elementwise stages (checked by the caller).
pub(crate) struct ItemsIo<'a, 'c, T: Element, I: Iterator<Item = (&'a [T], &'a mut [T])>> {
    pub(crate) items: std::iter::Peekable<I>,
    pub(crate) chunk: usize,
    pub(crate) pool: &'c CopyPool,
    pub(crate) next_item: usize,
    /// Outputs of items in flight, oldest first.
    pub(crate) outputs: VecDeque<&'a mut [T]>,
    pub(crate) cache: &'c mut StagingCache<T>,
}

impl<'a, T: Element, I: Iterator<Item = (&'a [T], &'a mut [T])>> ChunkIo<T>
    for ItemsIo<'a, '_, T, I>
{
    type Slot = ItemsSlot<T>;
    type Error = Error;

    fn make_slot(&mut self, gpu: &Gpu) -> Result<ItemsSlot<T>> {
        Ok(ItemsSlot {
            staged: Staged::make(self.cache, gpu, self.chunk, self.chunk)?,
            items: Vec::new(),
        })
    }

    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut ItemsSlot<T>,
        dev: &mut DeviceBuffer<T>,
        _chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>> {
        // Zero-length items carry nothing: they are skipped (their outputs
        // are empty as they are).
        let (taken, len) = loop {
            let (taken, len) =
                take_batch(&mut self.items, self.chunk, &mut self.next_item, |i, o| {
                    (i.len(), o.len())
                })?;
            if taken.is_empty() || len > 0 {
                break (taken, len);
            }
        };
        if taken.is_empty() {
            return Ok(None);
        }
        let _nvtx = Range::new("upload");
        slot.items.clear();
        let mut batch: Vec<&[T]> = Vec::with_capacity(taken.len());
        let mut offset = 0;
        for (item, out) in taken {
            if item.is_empty() {
                continue;
            }
            slot.items.push((offset, item.len()));
            offset += item.len();
            batch.push(item);
            self.outputs.push_back(out);
        }
        let mut rest = &mut slot.staged.input.as_mut_slice()?[..len];
        let mut pairs = Vec::with_capacity(batch.len());
        for item in batch {
            let (head, tail) = rest.split_at_mut(item.len());
            pairs.push((head, item));
            rest = tail;
        }
        {
            let _nvtx = Range::new("staging copy in");
            par_copy(pairs, self.pool);
        }
        let rec = lane.copy_htod_timed(&slot.staged.input, 0, dev, 0, len, timed)?;
        Ok(Some((len, rec.into())))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut ItemsSlot<T>,
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        download_staged(lane, timed, &mut slot.staged.output, dev, len)
    }

    fn retire(&mut self, slot: &mut ItemsSlot<T>, _chunk: ChunkId, _len: usize) -> Result<()> {
        let _nvtx = Range::new("staging copy out");
        let data = slot.staged.output.as_slice()?;
        let mut pairs = Vec::with_capacity(slot.items.len());
        for &(off, len) in &slot.items {
            let out = self
                .outputs
                .pop_front()
                .ok_or(Error::Config("item outputs out of step"))?;
            pairs.push((out, &data[off..off + len]));
        }
        par_copy(pairs, self.pool);
        Ok(())
    }
}

/// A slot of [`PinnedItemsIo`]: the zero-copy descriptors of its chunk.
#[derive(Debug)]
pub(crate) struct DescSlot {
    pub(crate) gather: Option<PinnedBuffer<u64>>,
    pub(crate) scatter: Option<PinnedBuffer<u64>>,
}

/// How `run_items_pinned` moves items between their pinned buffers and the
/// device (a knob for benchmarks and tests, hidden from the docs:
/// [`PipelineStageManager::set_pinned_items_copy`](crate::PipelineStageManager::set_pinned_items_copy),
/// or the environment variable `PRISM_PINNED_ITEMS_COPY` = `auto`,
/// `batched` or `kernels` when no choice was set).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PinnedItemsCopy {
    /// Batched DMA copies (`cuMemcpyBatchAsync`, one per chunk and
    /// direction) where the driver has them, else the zero-copy kernels,
    /// decided per run and direction at the first chunk (the default).
    #[default]
    Auto,
    /// Batched copies only: a driver without them fails the run.
    Batched,
    /// The zero-copy gather and scatter kernels only.
    Kernels,
}

/// The environment variable read when no [`PinnedItemsCopy`] was set.
pub(crate) const ITEMS_COPY_VAR: &str = "PRISM_PINNED_ITEMS_COPY";

impl PinnedItemsCopy {
    /// The explicit choice, else the environment's, else `Auto`.
    pub(crate) fn resolve(set: Option<Self>) -> Result<Self> {
        if let Some(mode) = set {
            return Ok(mode);
        }
        match std::env::var(ITEMS_COPY_VAR) {
            Err(_) => Ok(Self::Auto),
            Ok(v) => Self::parse(&v).ok_or(Error::Config(
                "PRISM_PINNED_ITEMS_COPY must be auto, batched or kernels",
            )),
        }
    }

    fn parse(v: &str) -> Option<Self> {
        match v.trim() {
            "" | "auto" => Some(Self::Auto),
            "batched" | "batch" => Some(Self::Batched),
            "kernels" | "kernel" => Some(Self::Kernels),
            _ => None,
        }
    }
}

/// Chunks of the last `run_items_pinned` moved each way (hidden from the
/// docs, for benchmarks and tests: which path really ran).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PinnedItemsPaths {
    /// Chunks uploaded with one batched copy.
    pub uploads_batched: u64,
    /// Chunks uploaded with the zero-copy gather kernel.
    pub uploads_kernel: u64,
    /// Chunks downloaded with one batched copy.
    pub downloads_batched: u64,
    /// Chunks downloaded with the zero-copy scatter kernel.
    pub downloads_kernel: u64,
}

/// Items in the user's own pinned buffers, many per chunk, each with its
/// own pinned output. Upload lane: one batched DMA copy of every item of
/// the chunk into its place in the device chunk (`Lane::copy_batch_htod`),
/// or, where the driver has no batched copies, one zero-copy kernel that
/// gathers them over the bus; download lane: one batched copy back into
/// each item's output (`Lane::copy_batch_dtoh`), or one zero-copy scatter
/// kernel. No host copy, no per-item copy. Elementwise stages only.
pub(crate) struct PinnedItemsIo<
    'a,
    'c,
    T: Element,
    I: Iterator<Item = (&'a PinnedBuffer<T>, &'a mut PinnedBuffer<T>)>,
> {
    pub(crate) items: std::iter::Peekable<I>,
    pub(crate) chunk: usize,
    pub(crate) next_item: usize,
    /// Output buffers of each chunk in flight, oldest first.
    pub(crate) outputs: VecDeque<Vec<&'a mut PinnedBuffer<T>>>,
    pub(crate) cache: &'c mut StagingCache<T>,
    /// The path asked for.
    pub(crate) mode: PinnedItemsCopy,
    /// Batched copies are still tried for uploads / downloads (cleared, in
    /// `Auto`, at the first `DriverUnsupported`).
    pub(crate) batch_up: bool,
    pub(crate) batch_down: bool,
    pub(crate) paths: PinnedItemsPaths,
}

impl<'a, 'c, T: Element, I: Iterator<Item = (&'a PinnedBuffer<T>, &'a mut PinnedBuffer<T>)>>
    PinnedItemsIo<'a, 'c, T, I>
{
    pub(crate) fn new(
        items: I,
        chunk: usize,
        cache: &'c mut StagingCache<T>,
        mode: PinnedItemsCopy,
    ) -> Self {
        let batch = mode != PinnedItemsCopy::Kernels;
        Self {
            items: items.peekable(),
            chunk,
            next_item: 0,
            outputs: VecDeque::new(),
            cache,
            mode,
            batch_up: batch,
            batch_down: batch,
            paths: PinnedItemsPaths::default(),
        }
    }

    /// Whether a failed batched copy falls back to the kernels: only a
    /// driver without batched copies, and only in `Auto`.
    fn falls_back(&self, e: &prism_stream::Error) -> bool {
        self.mode == PinnedItemsCopy::Auto
            && matches!(e, prism_stream::Error::DriverUnsupported { .. })
    }
}

/// The items' places in the chunk: back to back from 0, as the gather
/// kernel packs them; empty items have none.
fn batch_places(lens: impl Iterator<Item = usize>) -> Vec<Option<BatchItem>> {
    let mut at = 0;
    lens.map(|n| {
        let place = (n > 0).then(|| BatchItem::new(0, at, n));
        at += n;
        place
    })
    .collect()
}

/// One batched copy of a chunk's items into `dev`; `None` when every item
/// is empty (nothing a batch can copy).
fn batched_upload<T: Element>(
    lane: &mut Lane,
    timed: bool,
    batch: &[&PinnedBuffer<T>],
    dev: &mut DeviceBuffer<T>,
) -> prism_stream::Result<Option<Recorded>> {
    let list: Vec<(&PinnedBuffer<T>, BatchItem)> = batch
        .iter()
        .zip(batch_places(batch.iter().map(|b| b.len())))
        .filter_map(|(b, place)| place.map(|p| (*b, p)))
        .collect();
    if list.is_empty() {
        return Ok(None);
    }
    lane.copy_batch_htod_timed(&list, dev, timed)
        .map(|r| Some(r.into()))
}

/// One batched copy of a chunk back into its items' outputs; `None` when
/// every item is empty.
fn batched_download<T: Element>(
    lane: &mut Lane,
    timed: bool,
    dev: &DeviceBuffer<T>,
    outs: &mut [&mut PinnedBuffer<T>],
) -> prism_stream::Result<Option<Recorded>> {
    let places = batch_places(outs.iter().map(|b| b.len()));
    let mut list: Vec<(&mut PinnedBuffer<T>, BatchItem)> = outs
        .iter_mut()
        .zip(places)
        .filter_map(|(b, place)| place.map(|p| (&mut **b, p)))
        .collect();
    if list.is_empty() {
        return Ok(None);
    }
    lane.copy_batch_dtoh_timed(dev, &mut list, timed)
        .map(|r| Some(r.into()))
}

/// Descriptors for `items` (3 words each), from `slot` or the cache.
fn descriptors<'b, T: Element>(
    slot: &'b mut Option<PinnedBuffer<u64>>,
    cache: &mut StagingCache<T>,
    gpu: &Gpu,
    items: usize,
) -> Result<&'b mut PinnedBuffer<u64>> {
    if slot.as_ref().is_none_or(|b| b.len() < 3 * items) {
        if let Some(old) = slot.take() {
            cache.give_descriptors(old);
        }
        *slot = Some(cache.descriptors(gpu, (3 * items).max(3 * 64))?);
    }
    slot.as_mut()
        .ok_or(Error::Config("zero-copy descriptors missing"))
}

/// The fence ending a scope's single kernel: a timed one when timing (so
/// its span has an end), else the kernel's own.
fn end_fence(mut launch: Launch<'_>, start: Option<prism_stream::Fence>) -> Result<Recorded> {
    if start.is_some() {
        let end = launch.timed_fence()?;
        return Ok(Recorded { start, end });
    }
    let end = launch
        .last_fence()
        .cloned()
        .ok_or(Error::Config("a zero-copy step launched no kernel"))?;
    Ok(Recorded { start, end })
}

impl<'a, T: Element, I: Iterator<Item = (&'a PinnedBuffer<T>, &'a mut PinnedBuffer<T>)>> ChunkIo<T>
    for PinnedItemsIo<'a, '_, T, I>
{
    type Slot = DescSlot;
    type Error = Error;

    fn make_slot(&mut self, _gpu: &Gpu) -> Result<DescSlot> {
        Ok(DescSlot {
            gather: None,
            scatter: None,
        })
    }

    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut DescSlot,
        dev: &mut DeviceBuffer<T>,
        _chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>> {
        let (taken, len) = take_batch(&mut self.items, self.chunk, &mut self.next_item, |i, o| {
            (i.len(), o.len())
        })?;
        let (batch, outs): (Vec<&PinnedBuffer<T>>, Vec<&'a mut PinnedBuffer<T>>) =
            taken.into_iter().unzip();
        if batch.is_empty() {
            return Ok(None);
        }
        let _nvtx = Range::new("upload");
        if self.batch_up {
            match batched_upload(lane, timed, &batch, dev) {
                Ok(Some(rec)) => {
                    self.paths.uploads_batched += 1;
                    self.outputs.push_back(outs);
                    return Ok(Some((len, rec)));
                }
                Ok(None) => {}
                Err(e) if self.falls_back(&e) => {
                    tracing::debug!(
                        "run_items_pinned: uploads fall back to the gather kernel: {e}"
                    );
                    self.batch_up = false;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.paths.uploads_kernel += 1;
        let gpu = lane.gpu().clone();
        let desc = descriptors(&mut slot.gather, self.cache, &gpu, batch.len())?;
        let mut launch = lane.launch();
        let start = if timed {
            // Order against earlier uses first, so a timed start excludes waiting.
            launch.prepare_write(dev)?;
            Some(launch.timed_fence()?)
        } else {
            None
        };
        launch.gather_pinned(&batch, desc, dev)?;
        let rec = end_fence(launch, start)?;
        self.outputs.push_back(outs);
        Ok(Some((len, rec)))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut DescSlot,
        dev: &DeviceBuffer<T>,
        _len: usize,
    ) -> Result<Recorded> {
        let mut outs = self
            .outputs
            .pop_front()
            .ok_or(Error::Config("item outputs out of step"))?;
        if self.batch_down {
            match batched_download(lane, timed, dev, &mut outs) {
                Ok(Some(rec)) => {
                    self.paths.downloads_batched += 1;
                    return Ok(rec);
                }
                Ok(None) => {}
                Err(e) if self.falls_back(&e) => {
                    tracing::debug!(
                        "run_items_pinned: downloads fall back to the scatter kernel: {e}"
                    );
                    self.batch_down = false;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.paths.downloads_kernel += 1;
        let gpu = lane.gpu().clone();
        let desc = descriptors(&mut slot.scatter, self.cache, &gpu, outs.len())?;
        let mut launch = lane.launch();
        let start = if timed {
            launch.prepare_read(dev)?;
            Some(launch.timed_fence()?)
        } else {
            None
        };
        launch.scatter_pinned(dev, &mut outs, desc)?;
        end_fence(launch, start)
    }

    fn retire(&mut self, _slot: &mut DescSlot, _chunk: ChunkId, _len: usize) -> Result<()> {
        Ok(())
    }
}

/// A stream: input from a [`Source`] straight into the slot's pinned
/// staging, output handed to a [`Sink`] straight from it.
pub(crate) struct StreamIo<'a, T: Element, S, K> {
    pub(crate) source: S,
    pub(crate) sink: K,
    pub(crate) chunk: usize,
    /// Largest chunk output, for sizing staging.
    pub(crate) capacity: usize,
    pub(crate) cache: &'a mut StagingCache<T>,
    /// The source failed at this chunk: no more input; the chunks before it
    /// still drain to the sink, then the run reports this.
    pub(crate) failed: Option<Error>,
}

impl<T: Element, S: Source<T>, K: Sink<T>> ChunkIo<T> for StreamIo<'_, T, S, K> {
    type Slot = Staged<T>;
    type Error = Error;

    fn make_slot(&mut self, gpu: &Gpu) -> Result<Staged<T>> {
        // Both host-readable (a source may read what it wrote): no write-combining.
        Ok(Staged {
            input: self.cache.output(gpu, self.chunk)?,
            output: self.cache.output(gpu, self.capacity)?,
        })
    }

    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Staged<T>,
        dev: &mut DeviceBuffer<T>,
        chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>> {
        if self.failed.is_some() {
            return Ok(None);
        }
        let dst = &mut slot.input.as_mut_slice()?[..self.chunk];
        let len = match guard::fill(&mut self.source, dst, chunk.0) {
            Ok(n) => n,
            Err(e) => {
                self.failed = Some(e);
                return Ok(None);
            }
        };
        if len == 0 {
            return Ok(None);
        }
        // After the source's fill: only now is it known that there is a chunk.
        let _nvtx = Range::new("upload");
        let rec = lane.copy_htod_timed(&slot.input, 0, dev, 0, len, timed)?;
        Ok(Some((len, rec.into())))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Staged<T>,
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        download_staged(lane, timed, &mut slot.output, dev, len)
    }

    fn retire(&mut self, slot: &mut Staged<T>, chunk: ChunkId, len: usize) -> Result<()> {
        guard::accept(&mut self.sink, chunk.0, &slot.output.as_slice()?[..len])
    }
}

/// A slot of an `execute_iteration` session: staging for pageable steps,
/// and where the chunk in the slot goes.
#[derive(Debug)]
pub(crate) struct IterSlot<T: Element> {
    pub(crate) staged: Option<Staged<T>>,
    /// The chunk in this slot came from (and goes to) the caller's pinned buffers.
    pinned: bool,
}

/// Where one `execute_iteration` step's data comes from and goes to.
pub(crate) enum IterData<'a, T: Element> {
    /// Pageable: copied into the slot's staging; the output is copied into
    /// a `Vec` when the chunk retires.
    Pageable(&'a [T]),
    /// The user's pinned buffers: no staging.
    Pinned {
        input: &'a PinnedBuffer<T>,
        from: usize,
        len: usize,
        output: &'a mut PinnedBuffer<T>,
        to: usize,
    },
    /// Nothing to upload (a call that only retires).
    None,
}

/// The I/O of `execute_iteration`: one step's input (if any), and the
/// outputs of the chunks that retire, in order.
pub(crate) struct IterIo<'a, T: Element> {
    pub(crate) data: IterData<'a, T>,
    pub(crate) chunk: usize,
    pub(crate) capacity: usize,
    pub(crate) pool: &'a CopyPool,
    pub(crate) cache: &'a mut StagingCache<T>,
    /// Session index of the ring's chunk 0.
    pub(crate) base: u64,
    /// Chunks that retired during this call (pinned ones with no data).
    pub(crate) done: &'a mut Vec<crate::ChunkOutput<T>>,
}

impl<T: Element> ChunkIo<T> for IterIo<'_, T> {
    type Slot = IterSlot<T>;
    type Error = Error;

    fn make_slot(&mut self, _gpu: &Gpu) -> Result<IterSlot<T>> {
        Ok(IterSlot {
            staged: None,
            pinned: false,
        })
    }

    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut IterSlot<T>,
        dev: &mut DeviceBuffer<T>,
        _chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>> {
        match std::mem::replace(&mut self.data, IterData::None) {
            IterData::None => Ok(None),
            IterData::Pageable(input) => {
                let _nvtx = Range::new("upload");
                if slot.staged.is_none() {
                    let gpu = lane.gpu().clone();
                    slot.staged = Some(Staged::make(self.cache, &gpu, self.chunk, self.capacity)?);
                }
                let staged = slot
                    .staged
                    .as_mut()
                    .ok_or(Error::Config("staging missing"))?;
                {
                    let _nvtx = Range::new("staging copy in");
                    par_copy_one(
                        &mut staged.input.as_mut_slice()?[..input.len()],
                        input,
                        self.pool,
                    );
                }
                let rec = lane.copy_htod_timed(&staged.input, 0, dev, 0, input.len(), timed)?;
                slot.pinned = false;
                Ok(Some((input.len(), rec.into())))
            }
            IterData::Pinned {
                input,
                from,
                len,
                output,
                to,
            } => {
                let _nvtx = Range::new("upload");
                let rec = lane.copy_htod_timed(input, from, dev, 0, len, timed)?;
                // Kept for this chunk's download, queued in the same call.
                self.data = IterData::Pinned {
                    input,
                    from,
                    len,
                    output,
                    to,
                };
                slot.pinned = true;
                Ok(Some((len, rec.into())))
            }
        }
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut IterSlot<T>,
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        match (&mut self.data, slot.pinned) {
            (IterData::Pinned { output, to, .. }, true) => Ok(lane
                .copy_dtoh_timed(dev, 0, output, *to, len, timed)?
                .into()),
            (_, false) => {
                let staged = slot
                    .staged
                    .as_mut()
                    .ok_or(Error::Config("staging missing"))?;
                download_staged(lane, timed, &mut staged.output, dev, len)
            }
            (_, true) => Err(Error::Config(
                "a pinned execute_iteration chunk must be downloaded in the call that submits it",
            )),
        }
    }

    fn retire(&mut self, slot: &mut IterSlot<T>, chunk: ChunkId, len: usize) -> Result<()> {
        let index = self.base + chunk.0;
        if slot.pinned {
            self.done.push(crate::ChunkOutput { index, data: None });
            return Ok(());
        }
        let staged = slot
            .staged
            .as_ref()
            .ok_or(Error::Config("staging missing"))?;
        let data = {
            let _nvtx = Range::new("staging copy out");
            staged.output.as_slice()?[..len].to_vec()
        };
        self.done.push(crate::ChunkOutput {
            index,
            data: Some(data),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_copy_modes_parse_and_an_explicit_choice_wins() {
        assert_eq!(PinnedItemsCopy::parse("auto"), Some(PinnedItemsCopy::Auto));
        assert_eq!(PinnedItemsCopy::parse(""), Some(PinnedItemsCopy::Auto));
        assert_eq!(
            PinnedItemsCopy::parse(" batched"),
            Some(PinnedItemsCopy::Batched)
        );
        assert_eq!(
            PinnedItemsCopy::parse("kernels"),
            Some(PinnedItemsCopy::Kernels)
        );
        assert_eq!(PinnedItemsCopy::parse("dma"), None);
        assert_eq!(
            PinnedItemsCopy::resolve(Some(PinnedItemsCopy::Kernels)).unwrap(),
            PinnedItemsCopy::Kernels
        );
    }

    #[test]
    fn batch_places_pack_items_like_the_gather_kernel() {
        let places = batch_places([3, 0, 5, 1].into_iter());
        assert_eq!(
            places,
            vec![
                Some(BatchItem::new(0, 0, 3)),
                None,
                Some(BatchItem::new(0, 3, 5)),
                Some(BatchItem::new(0, 8, 1)),
            ]
        );
        assert!(batch_places(std::iter::empty()).is_empty());
    }
}
