//! Pageable slices, staged through pinned memory by the host threads:
//! [`SliceIo`] (one GPU) and [`FedSliceIo`] (several, pulling from a feed).

use std::collections::VecDeque;

use prism_buffer::engine::Recorded;
use prism_buffer::ring::ChunkId;
use prism_buffer::ChunkIo;
use prism_stream::nvtx::Range;
use prism_stream::{DeviceBuffer, Element, Gpu, Lane};

use super::sched::Feed;
use super::{download_staged, Staged};
use crate::copy::{par_copy_one, CopyPool};
use crate::error::{Error, Result};
use crate::gpu::{GlobalIndex, StagingCache};
use crate::plan::ChunkPlan;

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

/// One chunk of a pageable run, as a GPU pulls it: its input and where
/// its output goes; staged through the GPU's own pinned memory.
pub(crate) struct FedSliceIo<'a, 'c, T: Element, I> {
    pub(crate) feed: &'c Feed<I>,
    pub(crate) chunk: usize,
    pub(crate) capacity: usize,
    pub(crate) pool: &'c CopyPool,
    pub(crate) cache: &'c mut StagingCache<T>,
    pub(crate) global: &'c GlobalIndex,
    /// Outputs of this GPU's chunks in flight, oldest first.
    pub(crate) outputs: VecDeque<&'a mut [T]>,
}

impl<'a, T: Element, I: Iterator<Item = (&'a [T], &'a mut [T])>> ChunkIo<T>
    for FedSliceIo<'a, '_, T, I>
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
