//! Pageable items, each with its own output: gathered by the host threads
//! into the slot's pinned staging, many per chunk (one copy and one launch
//! per chunk), scattered back into their outputs when the chunk retires.
//! One GPU takes the caller's items straight; several share them through
//! a feed ([`FedItems`]) and number their chunks in upload order
//! ([`Numbered`]).
//!
//! Invariant: an item is never split over two chunks (longer than a chunk
//! is `ItemTooLong`), and a chunk's items keep their order in the slot, so
//! outputs pop in the order their inputs were taken.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use prism_buffer::engine::Recorded;
use prism_buffer::ring::ChunkId;
use prism_buffer::ChunkIo;
use prism_stream::nvtx::Range;
use prism_stream::{DeviceBuffer, Element, Gpu, Lane};

use super::sched::{lock, Feed};
use super::{download_staged, Staged};
use crate::copy::{par_copy, CopyPool};
use crate::error::{Error, Result};
use crate::gpu::{GlobalIndex, StagingCache};

/// An item's rules, on every backend and GPU count: its output as long as
/// its input (`OutputLength`), and no longer than a chunk, since it is
/// processed whole (`ItemTooLong`, naming the run's item number).
pub(crate) fn check_item(len: usize, out: usize, chunk: usize, item: usize) -> Result<()> {
    if len != out {
        return Err(Error::OutputLength {
            expected: len,
            actual: out,
        });
    }
    if len > chunk {
        return Err(Error::ItemTooLong { item, len, chunk });
    }
    Ok(())
}

/// Takes items (input, output) from the front of `items` while they fit one
/// chunk together; `len` gives an item's input and output lengths, which
/// must agree. `next_item` counts the items taken so far (for errors).
pub(crate) fn take_batch<A, B, I: Iterator<Item = (A, B)>>(
    items: &mut std::iter::Peekable<I>,
    chunk: usize,
    next_item: &mut usize,
    len: impl Fn(&A, &B) -> (usize, usize),
) -> Result<(Vec<(A, B)>, usize)> {
    let (mut batch, mut total) = (Vec::new(), 0);
    while let Some((input, output)) = items.peek() {
        let (n, out) = len(input, output);
        check_item(n, out, chunk, *next_item)?;
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

/// A GPU's view of the shared items: takes the next item from the feed,
/// checking it first (the run's item numbers in errors).
pub(crate) struct FedItems<'f, I> {
    pub(crate) feed: &'f Feed<I>,
    pub(crate) chunk: usize,
    /// The first bad item ends the input; the run reports it.
    pub(crate) error: &'f Mutex<Option<Error>>,
    pub(crate) taken: &'f AtomicU64,
}

impl<'a, 'f, T: Element, I: Iterator<Item = (&'a [T], &'a mut [T])>> Iterator for FedItems<'f, I> {
    type Item = (&'a [T], &'a mut [T]);

    fn next(&mut self) -> Option<Self::Item> {
        let chunk = self.chunk;
        let pulled = self.feed.pull(|it, k| {
            let Some((input, out)) = it.next() else {
                return Ok(None);
            };
            check_item(input.len(), out.len(), chunk, k as usize)?;
            Ok(Some((input, out)))
        });
        match pulled {
            Ok(Some((_, item))) => {
                self.taken.fetch_add(1, Ordering::Relaxed);
                Some(item)
            }
            Ok(None) => None,
            Err(e) => {
                lock(self.error).get_or_insert(e);
                None
            }
        }
    }
}

/// Numbers a GPU's chunks in the run's order of uploads (items batched by
/// several GPUs have no other common numbering).
pub(crate) struct Numbered<'c, Io> {
    pub(crate) inner: Io,
    pub(crate) next: &'c AtomicU64,
    pub(crate) global: &'c GlobalIndex,
}

impl<T: Element, Io: ChunkIo<T, Error = Error>> ChunkIo<T> for Numbered<'_, Io> {
    type Slot = Io::Slot;
    type Error = Error;

    fn make_slot(&mut self, gpu: &Gpu) -> Result<Io::Slot> {
        self.inner.make_slot(gpu)
    }

    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Io::Slot,
        dev: &mut DeviceBuffer<T>,
        chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>> {
        let r = self.inner.upload(lane, timed, slot, dev, chunk)?;
        if r.is_some() {
            self.global
                .set(chunk, self.next.fetch_add(1, Ordering::Relaxed));
        }
        Ok(r)
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Io::Slot,
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        self.inner.download(lane, timed, slot, dev, len)
    }

    fn retire(&mut self, slot: &mut Io::Slot, chunk: ChunkId, len: usize) -> Result<()> {
        self.inner.retire(slot, chunk, len)?;
        self.global.retired(chunk);
        Ok(())
    }
}
