//! The GPU ring of every run: the driver of prism-buffer's
//! [`Engine`](prism_buffer::Engine) (`engine.rs`) and every way chunks get
//! in and out of it, one file per I/O mode, each a
//! [`ChunkIo`](prism_buffer::ChunkIo) with its own slot state; the
//! multi-device scheduling (`sched.rs`).

mod engine;
mod graph;
mod items;
mod iter;
mod pageable;
mod pinned;
mod pinned_items;
pub(crate) mod sched;
mod stream;

use prism_buffer::engine::Recorded;
use prism_stream::{DeviceBuffer, Element, Gpu, Lane, PinnedBuffer};

use crate::error::Result;
use crate::gpu::StagingCache;

pub(crate) use engine::GpuRun;
pub(crate) use graph::{FedGraphPinnedIo, GraphPiece, GraphPinnedIo, GraphSliceIo, TaggedIo};
pub(crate) use items::{FedItems, ItemsIo, Numbered};
pub(crate) use iter::{IterData, IterIo, IterSlot};
pub(crate) use pageable::{FedSliceIo, SliceIo};
pub(crate) use pinned::{FedPinnedIo, Piece, PinnedIo};
pub(crate) use pinned_items::PinnedItemsIo;
pub(crate) use stream::{FedStreamIo, StreamIo};

/// A slot's pinned staging: input (the host writes it, the GPU reads it)
/// and output (the GPU writes it, the host reads it).
#[derive(Debug)]
pub(crate) struct Staged<T: Element> {
    pub(crate) input: PinnedBuffer<T>,
    pub(crate) output: PinnedBuffer<T>,
}

impl<T: Element> Staged<T> {
    pub(crate) fn make(
        cache: &mut StagingCache<T>,
        gpu: &Gpu,
        input: usize,
        output: usize,
    ) -> Result<Self> {
        Ok(Self {
            input: cache.input(gpu, input)?,
            output: cache.output(gpu, output)?,
        })
    }

    pub(crate) fn recycle(self, cache: &mut StagingCache<T>) {
        cache.give_input(self.input);
        cache.give_output(self.output);
    }
}

pub(crate) fn download_staged<T: Element>(
    lane: &mut Lane,
    timed: bool,
    out: &mut PinnedBuffer<T>,
    dev: &DeviceBuffer<T>,
    len: usize,
) -> Result<Recorded> {
    Ok(lane.copy_dtoh_timed(dev, 0, out, 0, len, timed)?.into())
}
