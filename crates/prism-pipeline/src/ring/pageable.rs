//! Pageable slices: each device pulls a chunk (its input slice and the
//! output slice cut for it) from the run's feed, its host threads copy the
//! input into the slot's pinned staging, and copy the output back out of
//! it when the chunk retires.
//!
//! Invariant: a slot's staging input is written only after the slot was
//! released (the previous upload from it completed), and each chunk's
//! output lands in its own slice, whose length is checked against what
//! the stages produced.

use std::collections::VecDeque;

use prism_buffer::engine::{Recorded, RunCounts};
use prism_buffer::ring::ChunkId;
use prism_buffer::ChunkIo;
use prism_stream::nvtx::Range;
use prism_stream::{DeviceBuffer, Element, Gpu, Lane};

use super::sched::Feed;
use super::{download_staged, drive, Devices, Driven, Staged};
use crate::copy::{par_copy_one, CopyPool};
use crate::error::{Error, Result};
use crate::gpu::{GlobalIndex, StagingCache};
use crate::plan::ChunkPlan;

/// Chunks of a pageable run as one device pulls them, staged through its
/// own pinned memory with its own host threads.
pub(crate) struct SliceIo<'a, 'c, T: Element, I> {
    pub(crate) feed: &'c Feed<I>,
    /// Largest chunk input, for sizing staging.
    pub(crate) chunk: usize,
    /// Largest chunk output, for sizing staging.
    pub(crate) capacity: usize,
    pub(crate) pool: &'c CopyPool,
    pub(crate) cache: &'c mut StagingCache<T>,
    pub(crate) global: &'c GlobalIndex,
    /// Outputs of this device's chunks in flight, oldest first.
    pub(crate) outputs: VecDeque<&'a mut [T]>,
}

impl<'a, T: Element, I: Iterator<Item = (&'a [T], &'a mut [T])>> ChunkIo<T>
    for SliceIo<'a, '_, T, I>
{
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
        let Some((k, (input, out))) = self.feed.pull(|it, _| Ok::<_, Error>(it.next()))? else {
            return Ok(None);
        };
        let _nvtx = Range::new("upload");
        self.global.set(chunk, k);
        self.outputs.push_back(out);
        self.pool.label(k, "staging copy in");
        // The slot was released, so the previous upload from it completed.
        {
            let _nvtx = Range::new("staging copy in");
            par_copy_one(
                &mut slot.input.as_mut_slice()?[..input.len()],
                input,
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
        slot: &mut Staged<T>,
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        download_staged(lane, timed, &mut slot.output, dev, len)
    }

    fn retire(&mut self, slot: &mut Staged<T>, chunk: ChunkId, len: usize) -> Result<()> {
        let out = self
            .outputs
            .pop_front()
            .ok_or(Error::Config("chunk outputs out of step"))?;
        if out.len() != len {
            return Err(Error::Config(
                "a stage produced another length than output_len said",
            ));
        }
        let k = GlobalIndex::or(Some(self.global), chunk, 0);
        self.pool.label(k, "staging copy out");
        {
            let _nvtx = Range::new("staging copy out");
            par_copy_one(out, &slot.output.as_slice()?[..len], self.pool);
        }
        self.global.retired(chunk);
        Ok(())
    }
}

/// Streams `input` through the stages of `order` into `output`, cut as
/// `plan` says, over `devices` (one GPU or several): each device
/// pulls the next chunk when a slot of its ring frees. Returns each
/// device's counts.
pub(crate) fn run_slices<T: Element>(
    devices: Devices<'_, T>,
    order: &[usize],
    plan: ChunkPlan,
    input: &[T],
    output: &mut [T],
) -> Driven<Vec<RunCounts>> {
    let first = devices.first()?;
    let chunk = first.chunk_elems();
    let mut pieces = Vec::with_capacity(input.len().div_ceil(chunk.max(1)));
    let (mut at, mut rest) = (0usize, output);
    for len in plan {
        let n = first.output_len(len);
        let (dst, tail) = std::mem::take(&mut rest)
            .split_at_mut_checked(n)
            .ok_or(Error::Config("output shorter than the stages produce"))?;
        rest = tail;
        pieces.push((&input[at..at + len], dst));
        at += len;
    }
    let feed = Feed::new(pieces.into_iter());
    drive(devices, &|| feed.stop(), &|_, d, global| {
        let capacity = d.output_len(chunk).max(chunk);
        let (mut run, cache, pool) = d.gpu_parts(order)?;
        run.global = Some(global);
        let mut io = SliceIo {
            feed: &feed,
            chunk,
            capacity,
            pool,
            cache,
            global,
            outputs: VecDeque::new(),
        };
        let (r, slots) = run.drive(&mut io);
        for s in slots.into_made() {
            s.recycle(io.cache);
        }
        r
    })
}
