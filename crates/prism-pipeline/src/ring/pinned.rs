//! Pinned buffers, no staging: [`PinnedIo`] (one GPU) and [`FedPinnedIo`]
//! (several, pulling from a feed).

use std::collections::VecDeque;

use prism_buffer::engine::Recorded;
use prism_buffer::ring::ChunkId;
use prism_buffer::ChunkIo;
use prism_stream::nvtx::Range;
use std::sync::Mutex;

use prism_stream::{DeviceBuffer, Element, Gpu, Lane, PinnedBuffer};

use super::sched::{lock, Feed};
use crate::error::{Error, Result};
use crate::gpu::GlobalIndex;
use crate::plan::ChunkPlan;

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

/// Where one chunk of a pinned run comes from and goes to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece {
    pub(crate) at: usize,
    pub(crate) len: usize,
    pub(crate) out_at: usize,
    pub(crate) out_len: usize,
}

/// Chunks of a pinned run as a GPU pulls them: copied straight from the
/// shared input and into the shared output (each download enqueued under
/// the output's lock; the ordering module tracks each chunk's byte range,
/// so GPUs writing different chunks never wait for each other).
pub(crate) struct FedPinnedIo<'a, 'o, T: Element> {
    pub(crate) feed: &'a Feed<std::vec::IntoIter<Piece>>,
    pub(crate) input: &'a PinnedBuffer<T>,
    pub(crate) output: &'a Mutex<&'o mut PinnedBuffer<T>>,
    pub(crate) global: &'a GlobalIndex,
    /// This GPU's chunks uploaded and not yet downloaded, oldest first.
    pub(crate) to_download: VecDeque<Piece>,
}

impl<T: Element> ChunkIo<T> for FedPinnedIo<'_, '_, T> {
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
        self.to_download.push_back(p);
        let rec = lane.copy_htod_timed(self.input, p.at, dev, 0, p.len, timed)?;
        Ok(Some((p.len, rec.into())))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        _slot: &mut (),
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        let p = self
            .to_download
            .pop_front()
            .ok_or(Error::Config("chunk outputs out of step"))?;
        if p.out_len != len {
            return Err(Error::Config(
                "a stage produced another length than output_len said",
            ));
        }
        let mut out = lock(self.output);
        let rec = lane.copy_dtoh_timed(dev, 0, &mut out, p.out_at, len, timed)?;
        Ok(rec.into())
    }

    fn retire(&mut self, _slot: &mut (), chunk: ChunkId, _len: usize) -> Result<()> {
        self.global.retired(chunk);
        Ok(())
    }
}
