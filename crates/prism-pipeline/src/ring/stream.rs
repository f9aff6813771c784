//! Streams from a `Source` to a `Sink`: [`StreamIo`] (one GPU) and
//! [`FedStreamIo`] (several, pulling from a feed, delivering in order).

use std::sync::Mutex;

use prism_buffer::engine::Recorded;
use prism_buffer::ring::ChunkId;
use prism_buffer::ChunkIo;
use prism_stream::nvtx::Range;
use prism_stream::{DeviceBuffer, Element, Gpu, Lane};

use super::sched::{lock, Feed, InOrder};
use super::{download_staged, Staged};
use crate::error::{Error, Result};
use crate::gpu::{GlobalIndex, StagingCache};
use crate::guard;
use crate::source::{Sink, Source};

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

/// A stream's chunks as a GPU pulls them: the source fills the GPU's own
/// pinned slot (under the feed's lock, in input order); outputs reach the
/// sink in input order through [`InOrder`].
pub(crate) struct FedStreamIo<'a, T: Element, S, K> {
    pub(crate) feed: &'a Feed<S>,
    pub(crate) out: &'a InOrder<K, Vec<T>>,
    pub(crate) chunk: usize,
    pub(crate) capacity: usize,
    pub(crate) cache: &'a mut StagingCache<T>,
    pub(crate) global: &'a GlobalIndex,
    /// The source's failure: no more input for any GPU; the chunks before
    /// it still reach the sink, then the run reports it.
    pub(crate) failed: &'a Mutex<Option<Error>>,
}

impl<T: Element, S: Source<T>, K: Sink<T>> ChunkIo<T> for FedStreamIo<'_, T, S, K> {
    type Slot = Staged<T>;
    type Error = Error;

    fn make_slot(&mut self, gpu: &Gpu) -> Result<Staged<T>> {
        // Both host-readable (a source may read what it wrote).
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
        let dst = &mut slot.input.as_mut_slice()?[..self.chunk];
        let pulled = self
            .feed
            .pull(|source, k| guard::fill(source, dst, k).map(|n| (n > 0).then_some(n)));
        let (k, len) = match pulled {
            Ok(Some(x)) => x,
            Ok(None) => return Ok(None),
            Err(e) => {
                lock(self.failed).get_or_insert(e);
                return Ok(None);
            }
        };
        let _nvtx = Range::new("upload");
        self.global.set(chunk, k);
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
        let k = self
            .global
            .get(chunk)
            .ok_or(Error::Config("a chunk's number was lost"))?;
        let data = &slot.output.as_slice()?[..len];
        let delivered = self.out.deliver(
            k,
            |sink| guard::accept(sink, k, data),
            || Ok(data.to_vec()),
            &|sink, i, v: Vec<T>| guard::accept(sink, i, &v),
        );
        // `None`: another GPU failed and the run stopped; this chunk is
        // not delivered.
        delivered.unwrap_or(Ok(()))?;
        self.global.retired(chunk);
        Ok(())
    }
}
