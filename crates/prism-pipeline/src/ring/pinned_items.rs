//! The caller's pinned items, each with its own pinned output: gathered
//! into a chunk on the device by one zero-copy kernel that reads them over
//! the bus (upload lane), and scattered back by one (download lane). No
//! host copy, no per-item copy.
//!
//! Invariant: a chunk's gather and scatter descriptors live in its slot
//! (reused, grown from the cache), and its outputs wait in order until its
//! scatter was queued.

use std::collections::VecDeque;

use prism_buffer::engine::Recorded;
use prism_buffer::ring::ChunkId;
use prism_buffer::ChunkIo;
use prism_stream::nvtx::Range;
use prism_stream::{DeviceBuffer, Element, Gpu, Lane, Launch, PinnedBuffer};

use super::items::take_batch;
use crate::error::{Error, Result};
use crate::gpu::StagingCache;

/// A slot of [`PinnedItemsIo`]: the zero-copy descriptors of its chunk.
#[derive(Debug)]
pub(crate) struct DescSlot {
    pub(crate) gather: Option<PinnedBuffer<u64>>,
    pub(crate) scatter: Option<PinnedBuffer<u64>>,
}

/// Items in the user's own pinned buffers: gathered into a chunk on the
/// device by one zero-copy kernel that reads them over the bus (upload
/// lane), processed, and scattered back by one zero-copy kernel (download
/// lane). No host copy and no per-item copy. Elementwise stages only.
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
