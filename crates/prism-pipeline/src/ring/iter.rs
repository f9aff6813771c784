//! One `execute_iteration` step: the step's input (pageable, staged; or
//! the caller's pinned buffers), and the outputs of the chunks that retire
//! during the call, in order.
//!
//! Invariant: a pinned chunk is downloaded in the call that submits it
//! (its output buffer is borrowed for that call only); a pageable one is
//! copied out of its slot's staging into a `Vec` when it retires.

use prism_buffer::engine::Recorded;
use prism_buffer::ring::ChunkId;
use prism_buffer::ChunkIo;
use prism_stream::nvtx::Range;
use prism_stream::{DeviceBuffer, Element, Gpu, Lane, PinnedBuffer};

use super::{download_staged, Staged};
use crate::copy::{par_copy_one, CopyPool};
use crate::error::{Error, Result};
use crate::gpu::StagingCache;

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
    pub(crate) done: &'a mut Vec<crate::source::ChunkOutput<T>>,
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
            self.done
                .push(crate::source::ChunkOutput { index, data: None });
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
        self.done.push(crate::source::ChunkOutput {
            index,
            data: Some(data),
        });
        Ok(())
    }
}
