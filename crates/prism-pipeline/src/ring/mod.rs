//! The GPU ring of every run: prism-buffer's
//! [`Engine`](prism_buffer::Engine) driven over one GPU or several, and
//! every way chunks get in and out of it, one file per I/O mode over one
//! contract (as crossbeam's channel flavors over a shared core).
//!
//! # One engine
//!
//! `engine.rs` holds the one driver. [`GpuRun`](engine::GpuRun) and
//! [`Driver`](engine::Driver) stream a run's chunks through one GPU's
//! engine (stats, timeline, host spans); [`drive`](engine::drive) runs a
//! run's per-device work on every device of a
//! [`Devices`](engine::Devices) at once, the first on the calling thread
//! and the others on threads of their own (`sched.rs`'s `on_devices`).
//! A single GPU is the same with one device: `PipelineStageManager`'s
//! runs pass `Devices::one(self)` to the same functions a
//! `MultiGpuPipeline` passes its GPUs to (`run_slices`, `run_pinned`,
//! `run_graph_pinned`, `run_graph_slices`, `StreamRun`, `TaggedRun`), or,
//! for a stream whose source and sinks need not be `Send`, run
//! `StreamRun`'s or `TaggedRun`'s per-device work through
//! [`drive_one`](engine::drive_one) on the calling thread. A failure
//! comes back as a [`Failure`](engine::Failure): a single manager returns
//! its error as it is, a `MultiGpuPipeline` wraps it in `Error::Device`.
//!
//! Where a run's chunks come from is a `sched::Feed` that each device
//! *pulls* from when a slot of its ring frees, in input order (one GPU: a
//! feed with one puller); outputs that must reach one consumer in order
//! go through `sched::InOrder` (one GPU always delivers at once).
//!
//! # The contract of an I/O mode
//!
//! Each file is a [`ChunkIo`](prism_buffer::ChunkIo) of the engine, built
//! per device for one run, with its own slot state:
//!
//! - `upload` takes the next chunk (a fed mode from the run's `Feed`,
//!   recording the run's number of the chunk in the device's
//!   [`GlobalIndex`](crate::gpu::GlobalIndex); the others from what they
//!   own), marks an NVTX `upload` range only once it knows there is a
//!   chunk, and queues its copy into the slot's device buffer; `Ok(None)`
//!   ends this device's input.
//! - `download` queues the copy of the chunk's output(s) on the download
//!   lane; `retire` (its download was observed complete) delivers it and
//!   forgets the chunk's number.
//! - A failure of the input (a source, a bad item) ends the input for
//!   every device: the chunks before it still retire, then the run
//!   reports it. Anything else fails the device.
//! - Slot state that holds pinned staging goes back to the manager's
//!   `StagingCache` when the run ends.
//!
//! The files, and the invariant each keeps:
//!
//! - `pageable.rs` ([`SliceIo`](pageable::SliceIo), fed): pageable
//!   slices staged through pinned memory by the host threads; a slot's
//!   staging is written only after the slot was released, and each chunk's
//!   output lands in the slice cut for it (checked against the length the
//!   stages produced).
//! - `pinned.rs` ([`PinnedIo`](pinned::PinnedIo), fed): the caller's
//!   pinned buffers, no staging; a chunk's output is downloaded straight
//!   into its own range of the output, under the output's lock.
//! - `items.rs` ([`ItemsIo`](items::ItemsIo); fed over several GPUs by
//!   [`FedItems`](items::FedItems) and [`Numbered`](items::Numbered)):
//!   pageable items, many per chunk, each scattered back into its own
//!   output; an item is never split over two chunks.
//! - `pinned_items.rs` ([`PinnedItemsIo`](pinned_items::PinnedItemsIo)):
//!   the caller's pinned items, moved by one batched DMA copy per chunk and
//!   direction where the driver has them, else gathered and scattered by
//!   zero-copy kernels, on the copy lanes (`PinnedItemsCopy` picks, hidden);
//!   a chunk's outputs wait in order until its download was queued.
//! - `stream.rs` ([`StreamIo`](stream::StreamIo), fed): a `Source` fills
//!   the slot's staging in place, under the feed's lock so it is called in
//!   order; the `Sink` receives every chunk in input order.
//! - `iter.rs` ([`IterIo`](iter::IterIo)): one `execute_iteration` step;
//!   a pinned chunk is downloaded in the call that submits it.
//! - `graph.rs` ([`GraphPinnedIo`](graph::GraphPinnedIo) and
//!   [`GraphSliceIo`](graph::GraphSliceIo), [`TaggedIo`](graph::TaggedIo), fed):
//!   a stage graph's, one input and several outputs per chunk, each output
//!   into its own destination, in output order.
//!
//! Still one GPU only: `run_items` (a bad item fails a single GPU's run at
//! once, where several GPUs drain the items before it), and the pinned
//! items and `execute_iteration` modes, which have no multi-GPU run.

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

pub(crate) use engine::{drive, drive_one, Devices, Driven, Failure, GpuRun};
pub(crate) use graph::{run_graph_pinned, run_graph_slices, TaggedRun};
pub(crate) use items::{check_item, FedItems, ItemsIo, Numbered};
pub(crate) use iter::{IterData, IterIo, IterSlot};
pub(crate) use pageable::run_slices;
pub(crate) use pinned::run_pinned;
pub(crate) use pinned_items::PinnedItemsIo;
// Hidden knobs of `run_items_pinned`, re-exported by the crate root.
pub use pinned_items::{PinnedItemsCopy, PinnedItemsPaths};
pub(crate) use stream::StreamRun;

/// What every device of a streamed run shares (`StreamRun`, `TaggedRun`):
/// the source behind a feed (called once at a time, in order), the
/// consumer `K` behind in-order delivery (a device whose chunk is not next
/// parks a `P`), the source's failure, and the chunk length.
pub(crate) struct FedRun<S, K, P> {
    pub(crate) feed: sched::Feed<S>,
    pub(crate) out: sched::InOrder<K, P>,
    /// The source's failure: no more input for any device; the chunks
    /// before it still reach the consumer, then the run reports it.
    pub(crate) failed: std::sync::Mutex<Option<crate::error::Error>>,
    pub(crate) chunk: usize,
}

impl<S, K, P> FedRun<S, K, P> {
    /// A run over `source` into `sink` in chunks of `chunk` elements, with
    /// at most `window` chunks parked for in-order delivery.
    pub(crate) fn new(source: S, sink: K, chunk: usize, window: usize) -> Self {
        Self {
            feed: sched::Feed::new(source),
            out: sched::InOrder::new(sink, window),
            failed: std::sync::Mutex::new(None),
            chunk,
        }
    }

    /// No device takes another chunk or delivers another output.
    pub(crate) fn stop(&self) {
        self.feed.stop();
        self.out.stop();
    }

    /// Chunks the consumer received, and the source's failure, if any.
    pub(crate) fn finish(self) -> (u64, Option<crate::error::Error>) {
        let failed = self
            .failed
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (self.out.delivered(), failed)
    }
}

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

    /// Both host-readable (a source may read what it wrote): no
    /// write-combining.
    pub(crate) fn readable(
        cache: &mut StagingCache<T>,
        gpu: &Gpu,
        input: usize,
        output: usize,
    ) -> Result<Self> {
        Ok(Self {
            input: cache.output(gpu, input)?,
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
