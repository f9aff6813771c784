//! The caller's pinned items, each with its own pinned output: moved into
//! a chunk on the device by one batched DMA copy (upload lane) and back
//! into their outputs by one (download lane) where the driver has batched
//! copies, else gathered by one zero-copy kernel that reads them over the
//! bus and scattered back by one. No host copy, no per-item copy.
//!
//! Invariant: a chunk's gather and scatter descriptors live in its slot
//! (reused, grown from the cache; the batched path needs none), and its
//! outputs wait in order until its download (batched copy or scatter) was
//! queued. In `Auto` the first `DriverUnsupported` of a direction moves
//! that direction to the kernels for the rest of the run.

use std::collections::VecDeque;

use prism_buffer::engine::Recorded;
use prism_buffer::ring::ChunkId;
use prism_buffer::ChunkIo;
use prism_stream::nvtx::Range;
use prism_stream::{BatchItem, DeviceBuffer, Element, Gpu, Lane, Launch, PinnedBuffer};

use super::items::take_batch;
use crate::error::{Error, Result};
use crate::gpu::StagingCache;

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
