//! A stream from a [`Source`] to a [`Sink`]: the device that pulls a chunk
//! has the source fill its slot's pinned staging in place (under the feed's
//! lock, so the source is called once at a time, in order), and the sink
//! reads each output straight from the slot's staging when its turn comes.
//!
//! Invariant: the sink receives chunks 0, 1, 2, ... in input order
//! ([`InOrder`]: one device always delivers at once; with several, a
//! device whose chunk is not next parks a copy). A source failure at
//! chunk k ends the input for every device: chunks before k still reach
//! the sink, then the run reports it.

use std::sync::Mutex;

use prism_buffer::engine::{Recorded, RunCounts};
use prism_buffer::ring::ChunkId;
use prism_buffer::ChunkIo;
use prism_stream::nvtx::Range;
use prism_stream::{DeviceBuffer, Element, Gpu, Lane};

use super::sched::{lock, Feed, InOrder};
use super::{download_staged, FedRun, Staged};
use crate::error::{Error, Result};
use crate::gpu::{GlobalIndex, StagingCache};
use crate::guard;
use crate::source::{Sink, Source};
use crate::PipelineStageManager;

/// A stream's chunks as one device pulls them.
pub(crate) struct StreamIo<'a, T: Element, S, K> {
    pub(crate) feed: &'a Feed<S>,
    pub(crate) out: &'a InOrder<K, Vec<T>>,
    pub(crate) chunk: usize,
    /// Largest chunk output, for sizing staging.
    pub(crate) capacity: usize,
    pub(crate) cache: &'a mut StagingCache<T>,
    pub(crate) global: &'a GlobalIndex,
    /// The source's failure: no more input for any device; the chunks
    /// before it still reach the sink, then the run reports it.
    pub(crate) failed: &'a Mutex<Option<Error>>,
}

impl<T: Element, S: Source<T>, K: Sink<T>> ChunkIo<T> for StreamIo<'_, T, S, K> {
    type Slot = Staged<T>;
    type Error = Error;

    fn make_slot(&mut self, gpu: &Gpu) -> Result<Staged<T>> {
        Staged::readable(self.cache, gpu, self.chunk, self.capacity)
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
        // After the source's fill: only now is it known that there is a chunk.
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
        // `None`: another device failed and the run stopped; this chunk is
        // not delivered.
        delivered.unwrap_or(Ok(()))?;
        self.global.retired(chunk);
        Ok(())
    }
}

/// What every device of a stream run shares: the source behind a feed,
/// the sink behind in-order delivery (parking owned outputs), and the
/// source's failure.
pub(crate) type StreamRun<T, S, K> = FedRun<S, K, Vec<T>>;

impl<T: Element, S: Source<T>, K: Sink<T>> FedRun<S, K, Vec<T>> {
    /// One device's part of the run (the stages of `order`).
    pub(crate) fn device(
        &self,
        d: &mut PipelineStageManager<T>,
        global: &GlobalIndex,
        order: &[usize],
    ) -> Result<RunCounts> {
        let capacity = d.capacity(order)?;
        let (mut run, cache, _) = d.gpu_parts(order)?;
        run.global = Some(global);
        let mut io = StreamIo {
            feed: &self.feed,
            out: &self.out,
            chunk: self.chunk,
            capacity,
            cache,
            global,
            failed: &self.failed,
        };
        let (r, slots) = run.drive(&mut io);
        for s in slots.into_made() {
            io.cache.give_output(s.input);
            io.cache.give_output(s.output);
        }
        r
    }
}
