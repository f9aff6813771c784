//! Pinned buffers: each device pulls a chunk's place (its range of the
//! input and of the output) from the run's feed and copies it straight
//! from the caller's pinned input and into the caller's pinned output: no
//! staging.
//!
//! Invariant: a chunk's output is downloaded into its own range of the
//! output, queued under the output's lock (uncontended with one device);
//! prism-stream's ordering tracks each chunk's byte range, so devices
//! writing different chunks never wait for each other.

use std::collections::VecDeque;
use std::sync::Mutex;

use prism_buffer::engine::{Recorded, RunCounts};
use prism_buffer::ring::ChunkId;
use prism_buffer::ChunkIo;
use prism_stream::nvtx::Range;
use prism_stream::{DeviceBuffer, Element, Gpu, Lane, PinnedBuffer};

use super::sched::{lock, Feed};
use super::{drive, Devices, Driven};
use crate::error::{Error, Result};
use crate::gpu::GlobalIndex;
use crate::plan::ChunkPlan;

/// Where one chunk of a pinned run comes from and goes to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece {
    at: usize,
    len: usize,
    out_at: usize,
    out_len: usize,
}

/// Chunks of a pinned run as one device pulls them.
pub(crate) struct PinnedIo<'a, 'o, T: Element> {
    pub(crate) feed: &'a Feed<std::vec::IntoIter<Piece>>,
    pub(crate) input: &'a PinnedBuffer<T>,
    pub(crate) output: &'a Mutex<&'o mut PinnedBuffer<T>>,
    pub(crate) global: &'a GlobalIndex,
    /// This device's chunks uploaded and not yet downloaded, oldest first.
    pub(crate) to_download: VecDeque<Piece>,
}

impl<T: Element> ChunkIo<T> for PinnedIo<'_, '_, T> {
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

/// Streams a pinned input through the stages of `order` into a pinned
/// output, cut as `plan` says, over `devices` (one GPU or several).
/// Returns each device's counts.
pub(crate) fn run_pinned<T: Element>(
    devices: Devices<'_, T>,
    order: &[usize],
    plan: ChunkPlan,
    input: &PinnedBuffer<T>,
    output: &mut PinnedBuffer<T>,
) -> Driven<Vec<RunCounts>> {
    let first = devices.first()?;
    let mut pieces = Vec::new();
    let (mut at, mut out_at) = (0usize, 0usize);
    for len in plan {
        let out_len = first.output_len(len);
        pieces.push(Piece {
            at,
            len,
            out_at,
            out_len,
        });
        at += len;
        out_at += out_len;
    }
    let feed = Feed::new(pieces.into_iter());
    let output = Mutex::new(output);
    drive(devices, &|| feed.stop(), &|_, d, global| {
        let (mut run, _, _) = d.gpu_parts(order)?;
        run.global = Some(global);
        let mut io = PinnedIo {
            feed: &feed,
            input,
            output: &output,
            global,
            to_download: VecDeque::new(),
        };
        run.drive(&mut io).0
    })
}
