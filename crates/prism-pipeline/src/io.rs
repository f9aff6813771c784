//! The GPU backend's I/O modes: pageable slices, pinned buffers, items.

use prism_stream::{DeviceBuffer, Element, Fence, Gpu, HostAllocFlags, Lane, PinnedBuffer};

use crate::copy::{par_copy, par_copy_one};
use crate::error::{Error, Result};
use crate::gpu::{Io, SlotIo};

fn staging<'b, T: Element>(
    slot: &'b mut Option<PinnedBuffer<T>>,
    gpu: &Gpu,
    len: usize,
    flags: HostAllocFlags,
) -> Result<&'b mut PinnedBuffer<T>> {
    if slot.as_ref().is_none_or(|b| b.len() < len) {
        *slot = Some(PinnedBuffer::new(gpu, len, flags)?);
    }
    Ok(slot.as_mut().expect("just filled"))
}

/// Downloads `dev[..out_len]` into the slot's pinned output staging
/// (allocated on first use with room for `capacity` elements).
fn download_staged<T: Element>(
    lane: &mut Lane,
    timed: bool,
    io: &mut SlotIo<T>,
    dev: &DeviceBuffer<T>,
    out_len: usize,
    capacity: usize,
) -> Result<(Option<Fence>, Fence)> {
    let gpu = lane.gpu().clone();
    let buf = staging(&mut io.staging_out, &gpu, capacity, HostAllocFlags::DEFAULT)?;
    Ok(lane.copy_dtoh_timed(dev, 0, buf, 0, out_len, timed)?)
}

/// The staging buffer `download_staged` filled, for a retiring chunk.
fn downloaded<T: Element>(io: &SlotIo<T>) -> Result<&PinnedBuffer<T>> {
    io.staging_out
        .as_ref()
        .ok_or(Error::Config("retired a chunk that was never downloaded"))
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

/// Pageable input and output: chunks are staged through pinned memory,
/// copied by several host threads.
pub(crate) struct SliceIo<'a, T> {
    pub(crate) input: &'a [T],
    pub(crate) output: &'a mut [T],
    pub(crate) chunk: usize,
    /// Largest chunk output, for sizing staging.
    pub(crate) capacity: usize,
    pub(crate) threads: usize,
    pub(crate) next_in: usize,
    pub(crate) next_out: usize,
}

impl<T: Element> Io<T> for SliceIo<'_, T> {
    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        io: &mut SlotIo<T>,
        dev: &mut DeviceBuffer<T>,
        _chunk: u64,
    ) -> Result<Option<(usize, Option<Fence>, Fence)>> {
        if self.next_in >= self.input.len() {
            return Ok(None);
        }
        let len = self.chunk.min(self.input.len() - self.next_in);
        let gpu = lane.gpu().clone();
        let buf = staging(
            &mut io.staging_in,
            &gpu,
            self.chunk,
            HostAllocFlags::UPLOAD_ONLY,
        )?;
        // The slot was released, so the previous upload from this staging completed.
        par_copy_one(
            &mut buf.as_mut_slice()?[..len],
            &self.input[self.next_in..self.next_in + len],
            self.threads,
        );
        self.next_in += len;
        let (start, end) = lane.copy_htod_timed(buf, 0, dev, 0, len, timed)?;
        Ok(Some((len, start, end)))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        io: &mut SlotIo<T>,
        dev: &DeviceBuffer<T>,
        out_len: usize,
    ) -> Result<(Option<Fence>, Fence)> {
        download_staged(lane, timed, io, dev, out_len, self.capacity)
    }

    fn retire(&mut self, io: &mut SlotIo<T>, out_len: usize) -> Result<()> {
        let buf = downloaded(io)?;
        par_copy_one(
            &mut self.output[self.next_out..self.next_out + out_len],
            &buf.as_slice()?[..out_len],
            self.threads,
        );
        self.next_out += out_len;
        Ok(())
    }
}

/// Pinned input and output: chunks are copied straight from and to the
/// user's page-locked buffers, no staging.
pub(crate) struct PinnedIo<'a, T: Element> {
    pub(crate) input: &'a PinnedBuffer<T>,
    pub(crate) output: &'a mut PinnedBuffer<T>,
    pub(crate) chunk: usize,
    pub(crate) next_in: usize,
    pub(crate) next_out: usize,
}

impl<T: Element> Io<T> for PinnedIo<'_, T> {
    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        _io: &mut SlotIo<T>,
        dev: &mut DeviceBuffer<T>,
        _chunk: u64,
    ) -> Result<Option<(usize, Option<Fence>, Fence)>> {
        if self.next_in >= self.input.len() {
            return Ok(None);
        }
        let len = self.chunk.min(self.input.len() - self.next_in);
        let (start, end) = lane.copy_htod_timed(self.input, self.next_in, dev, 0, len, timed)?;
        self.next_in += len;
        Ok(Some((len, start, end)))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        _io: &mut SlotIo<T>,
        dev: &DeviceBuffer<T>,
        out_len: usize,
    ) -> Result<(Option<Fence>, Fence)> {
        let r = lane.copy_dtoh_timed(dev, 0, self.output, self.next_out, out_len, timed)?;
        self.next_out += out_len;
        Ok(r)
    }

    fn retire(&mut self, _io: &mut SlotIo<T>, _out_len: usize) -> Result<()> {
        Ok(())
    }
}

/// Separate items, each with its own output: gathered into pinned staging
/// (many items per chunk), one copy and one launch per chunk, scattered back.
/// Only for elementwise stages (checked by the caller).
pub(crate) struct ItemsIo<'a, T, I: Iterator<Item = (&'a [T], &'a mut [T])>> {
    pub(crate) items: std::iter::Peekable<I>,
    pub(crate) chunk: usize,
    pub(crate) threads: usize,
    pub(crate) next_item: usize,
    /// Outputs of items in flight, by item index (oldest first).
    pub(crate) outputs: std::collections::VecDeque<&'a mut [T]>,
    pub(crate) first_out: usize,
}

impl<'a, T: Element, I: Iterator<Item = (&'a [T], &'a mut [T])>> Io<T> for ItemsIo<'a, T, I> {
    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        io: &mut SlotIo<T>,
        dev: &mut DeviceBuffer<T>,
        _chunk: u64,
    ) -> Result<Option<(usize, Option<Fence>, Fence)>> {
        let (taken, len) = take_batch(&mut self.items, self.chunk, &mut self.next_item, |i, o| {
            (i.len(), o.len())
        })?;
        io.items.clear();
        let first = self.next_item - taken.len();
        let mut batch: Vec<&[T]> = Vec::with_capacity(taken.len());
        let mut offset = 0;
        for (k, (item, out)) in taken.into_iter().enumerate() {
            io.items.push((first + k, offset, item.len()));
            offset += item.len();
            batch.push(item);
            self.outputs.push_back(out);
        }
        if len == 0 {
            // Zero-length items carry nothing; they are delivered as they are.
            return Ok(None);
        }
        let gpu = lane.gpu().clone();
        let buf = staging(
            &mut io.staging_in,
            &gpu,
            self.chunk,
            HostAllocFlags::UPLOAD_ONLY,
        )?;
        let mut rest = &mut buf.as_mut_slice()?[..len];
        let mut pairs = Vec::with_capacity(batch.len());
        for item in batch {
            let (head, tail) = rest.split_at_mut(item.len());
            pairs.push((head, item));
            rest = tail;
        }
        par_copy(pairs, self.threads);
        let (start, end) = lane.copy_htod_timed(buf, 0, dev, 0, len, timed)?;
        Ok(Some((len, start, end)))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        io: &mut SlotIo<T>,
        dev: &DeviceBuffer<T>,
        out_len: usize,
    ) -> Result<(Option<Fence>, Fence)> {
        download_staged(lane, timed, io, dev, out_len, self.chunk)
    }

    fn retire(&mut self, io: &mut SlotIo<T>, _out_len: usize) -> Result<()> {
        let buf = downloaded(io)?;
        let data = buf.as_slice()?;
        let mut pairs = Vec::with_capacity(io.items.len());
        for &(item, off, len) in &io.items {
            debug_assert_eq!(item, self.first_out);
            let out = self
                .outputs
                .pop_front()
                .ok_or(Error::Config("item outputs out of step"))?;
            self.first_out += 1;
            pairs.push((out, &data[off..off + len]));
        }
        par_copy(pairs, self.threads);
        Ok(())
    }
}

/// Items in the user's own pinned buffers: gathered into a chunk on the
/// device by one zero-copy kernel that reads them over the bus (upload
/// stream), processed, and scattered back by one zero-copy kernel (download
/// stream). No host copy and no per-item copy. Elementwise stages only.
pub(crate) struct PinnedItemsIo<
    'a,
    T: Element,
    I: Iterator<Item = (&'a PinnedBuffer<T>, &'a mut PinnedBuffer<T>)>,
> {
    pub(crate) items: std::iter::Peekable<I>,
    pub(crate) chunk: usize,
    pub(crate) next_item: usize,
    /// Output buffers of each chunk in flight, oldest first.
    pub(crate) outputs: std::collections::VecDeque<Vec<&'a mut PinnedBuffer<T>>>,
}

/// The fence ending a scope's single kernel: a timed one when timing (so
/// its span has an end), else the kernel's own.
fn end_fence(mut launch: prism_stream::Launch<'_>, timed: bool) -> Result<Fence> {
    if timed {
        return Ok(launch.timed_fence()?);
    }
    launch
        .last_fence()
        .cloned()
        .ok_or(Error::Config("a zero-copy step launched no kernel"))
}

fn descriptors<'b>(
    slot: &'b mut Option<PinnedBuffer<u64>>,
    gpu: &Gpu,
    items: usize,
) -> Result<&'b mut PinnedBuffer<u64>> {
    if slot.as_ref().is_none_or(|b| b.len() < 3 * items) {
        *slot = Some(PinnedBuffer::new(
            gpu,
            (3 * items).max(3 * 64),
            HostAllocFlags::DEFAULT,
        )?);
    }
    Ok(slot.as_mut().expect("just filled"))
}

impl<'a, T: Element, I: Iterator<Item = (&'a PinnedBuffer<T>, &'a mut PinnedBuffer<T>)>> Io<T>
    for PinnedItemsIo<'a, T, I>
{
    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        io: &mut SlotIo<T>,
        dev: &mut DeviceBuffer<T>,
        _chunk: u64,
    ) -> Result<Option<(usize, Option<Fence>, Fence)>> {
        let (taken, len) = take_batch(&mut self.items, self.chunk, &mut self.next_item, |i, o| {
            (i.len(), o.len())
        })?;
        let (batch, outs): (Vec<&PinnedBuffer<T>>, Vec<&'a mut PinnedBuffer<T>>) =
            taken.into_iter().unzip();
        if batch.is_empty() {
            return Ok(None);
        }
        let gpu = lane.gpu().clone();
        let desc = descriptors(&mut io.desc_in, &gpu, batch.len())?;
        let mut launch = lane.launch();
        let start = if timed {
            // Order against earlier uses first, so a timed start excludes waiting.
            launch.prepare_write(dev)?;
            Some(launch.timed_fence()?)
        } else {
            None
        };
        launch.gather_pinned(&batch, desc, dev)?;
        let end = end_fence(launch, timed)?;
        self.outputs.push_back(outs);
        Ok(Some((len, start, end)))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        io: &mut SlotIo<T>,
        dev: &DeviceBuffer<T>,
        _out_len: usize,
    ) -> Result<(Option<Fence>, Fence)> {
        let mut outs = self
            .outputs
            .pop_front()
            .ok_or(Error::Config("item outputs out of step"))?;
        let gpu = lane.gpu().clone();
        let desc = descriptors(&mut io.desc_out, &gpu, outs.len())?;
        let mut launch = lane.launch();
        let start = if timed {
            launch.prepare_read(dev)?;
            Some(launch.timed_fence()?)
        } else {
            None
        };
        launch.scatter_pinned(dev, &mut outs, desc)?;
        let end = end_fence(launch, timed)?;
        Ok((start, end))
    }

    fn retire(&mut self, _io: &mut SlotIo<T>, _out_len: usize) -> Result<()> {
        Ok(())
    }
}
