//! The GPU triple buffer: a [`SlotRing`] driven by CUDA events, each slot a
//! device buffer plus the pinned host staging it needs.
//!
//! Upload of chunk k+1, processing of chunk k and download of chunk k-1 run
//! on three lanes at once. No step waits on the host for the previous one:
//! each buffer's use tracking (prism-stream's lanes) makes the GPU order
//! them (`cuStreamWaitEvent`). A slot's state changes only when `poll`
//! observes the event recorded at the end of a step, and a slot is reused
//! only after its download's event completed and the host took the output.

use prism_stream::{
    DeviceBuffer, Element, Fence as GpuFence, Gpu, HostAllocFlags, Lane, Launch, ManagedGpuContext,
    PinnedBuffer, Probe, StreamPurpose,
};

use crate::ring::{ChunkId, Fence, SlotId, SlotRing, SlotSnapshot, Step, DEFAULT_SLOTS};
use crate::Error;

impl Fence for GpuFence {
    type Error = prism_stream::Error;
    fn is_complete(&self) -> Result<bool, Self::Error> {
        GpuFence::is_complete(self)
    }
}

#[derive(Debug)]
struct Slot<T: Element> {
    host_in: PinnedBuffer<T>,
    dev: DeviceBuffer<T>,
    host_out: PinnedBuffer<T>,
    /// Elements in the chunk this slot holds.
    len: usize,
}

/// A ring of 2 to 8 slots (3 by default) streaming chunks of `T` through the GPU.
#[derive(Debug)]
pub struct TripleBuffer<T: Element> {
    gpu: Gpu,
    ring: SlotRing<GpuFence>,
    slots: Vec<Slot<T>>,
    capacity: usize,
    /// Upload, compute and download lanes.
    lanes: [Lane; 3],
    /// With timing on: the origin fence, the timed fences of the chunks in
    /// flight, and the spans of released chunks not yet taken.
    timing: Option<Timing>,
}

/// Spans kept for [`TripleBuffer::take_timeline`]; past it the oldest go.
const MAX_SPANS: usize = 1 << 16;

#[derive(Debug)]
struct Timing {
    origin: GpuFence,
    /// Per slot: the chunk's timed (step, start, end) fences until release.
    pending: Vec<Vec<(Step, GpuFence, GpuFence)>>,
    spans: std::collections::VecDeque<StepSpan>,
}

/// One step's GPU execution, in ms since timing was enabled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSpan {
    pub chunk: ChunkId,
    pub step: Step,
    pub start_ms: f64,
    pub end_ms: f64,
}

const UP: usize = 0;
const COMPUTE: usize = 1;
const DOWN: usize = 2;

impl<T: Element> TripleBuffer<T> {
    /// Three slots of `len_per_slot` elements each.
    pub fn new(gpu: &Gpu, len_per_slot: usize) -> Result<Self, Error> {
        Self::with_slots(gpu, len_per_slot, DEFAULT_SLOTS)
    }

    /// `slots` (2..=8) slots of `len_per_slot` elements each.
    pub fn with_slots(gpu: &Gpu, len_per_slot: usize, slots: usize) -> Result<Self, Error> {
        let _span = tracing::debug_span!("prism.triple_buffer.new", len_per_slot, slots).entered();
        if len_per_slot == 0 {
            return Err(Error::ZeroLength {
                what: "triple buffer slot",
            });
        }
        let ring = SlotRing::new(slots)?;
        let mut lanes = [
            Lane::with_purpose(gpu, StreamPurpose::Upload)?,
            Lane::with_purpose(gpu, StreamPurpose::Compute)?,
            Lane::with_purpose(gpu, StreamPurpose::Download)?,
        ];
        let slots = (0..slots)
            .map(|_| {
                Ok(Slot {
                    host_in: PinnedBuffer::new(gpu, len_per_slot, HostAllocFlags::UPLOAD_ONLY)?,
                    dev: DeviceBuffer::zeroed(&mut lanes[UP], len_per_slot)?,
                    host_out: PinnedBuffer::new(gpu, len_per_slot, HostAllocFlags::DEFAULT)?,
                    len: 0,
                })
            })
            .collect::<Result<Vec<_>, prism_stream::Error>>()?;
        Ok(Self {
            gpu: gpu.clone(),
            ring,
            slots,
            capacity: len_per_slot,
            lanes,
            timing: None,
        })
    }

    /// Records timed events around every step from now on (costs two timed
    /// events per step, held until the chunk is released). Start events are
    /// recorded after the GPU-side waits, so a step's span is its own
    /// execution, not time spent waiting.
    pub fn enable_timing(&mut self) -> Result<(), Error> {
        // Origin: a timed event on the upload lane; spans on every lane are measured from it.
        let origin = self.lanes[UP].timed_fence()?;
        self.timing = Some(Timing {
            origin,
            pending: (0..self.slots.len()).map(|_| Vec::new()).collect(),
            spans: Default::default(),
        });
        Ok(())
    }

    /// The spans of the steps of every chunk released since the last call
    /// (in GPU ms since timing was enabled), and forgets them: memory stays
    /// bounded by the chunks in flight plus the spans not yet taken (at most
    /// 65536; the oldest are dropped past that).
    pub fn take_timeline(&mut self) -> Vec<StepSpan> {
        self.timing
            .as_mut()
            .map(|t| t.spans.drain(..).collect())
            .unwrap_or_default()
    }

    fn note(&mut self, slot: SlotId, step: Step, start: Option<GpuFence>, end: &GpuFence) {
        if let (Some(t), Some(start)) = (&mut self.timing, start) {
            t.pending[slot.0].push((step, start, end.clone()));
        }
    }

    /// Turns a released chunk's timed fences into spans (they completed:
    /// the chunk's download did, and every step is ordered before it).
    fn resolve_timing(&mut self, slot: SlotId, chunk: ChunkId) -> Result<(), Error> {
        let Some(t) = &mut self.timing else {
            return Ok(());
        };
        for (step, start, end) in t.pending[slot.0].drain(..) {
            if let Probe::Failed(reason) = end.synchronize() {
                return Err(prism_stream::Error::ContextPoisoned { reason }.into());
            }
            if t.spans.len() >= MAX_SPANS {
                t.spans.pop_front();
            }
            t.spans.push_back(StepSpan {
                chunk,
                step,
                start_ms: f64::from(start.elapsed_ms_since(&t.origin)?),
                end_ms: f64::from(end.elapsed_ms_since(&t.origin)?),
            });
        }
        Ok(())
    }

    /// Elements per slot.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of slots.
    pub fn slot_count(&self) -> usize {
        self.ring.len()
    }

    /// Chunks issued and not yet taken back by the host.
    pub fn in_flight(&self) -> usize {
        self.ring.in_flight()
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The lane `step` runs on (to queue extra work in order with it).
    pub fn lane_mut(&mut self, step: Step) -> &mut Lane {
        &mut self.lanes[step.index()]
    }

    /// Snapshot of every slot, for debugging.
    pub fn get_states(&self) -> Vec<SlotSnapshot> {
        self.ring.states()
    }

    /// The slot the next upload would use, or `None` when its previous chunk
    /// has not been downloaded and taken yet.
    pub fn get_upload_buffer(&self) -> Option<SlotId> {
        self.ring.next(Step::Upload).map(|(s, _)| s)
    }

    /// The slot whose chunk is next to process, if its upload was issued.
    pub fn get_process_buffer(&self) -> Option<SlotId> {
        self.ring.next(Step::Process).map(|(s, _)| s)
    }

    /// The slot whose chunk is next to download, if its processing was issued.
    pub fn get_download_buffer(&self) -> Option<SlotId> {
        self.ring.next(Step::Download).map(|(s, _)| s)
    }

    /// Copies `data` into the next free slot's pinned staging and queues its
    /// upload. `NoSlotReady` when every slot is still in use (poll / take outputs first).
    pub fn upload(&mut self, data: &[T]) -> Result<ChunkId, Error> {
        self.upload_with(data.len(), |dst| dst.copy_from_slice(data))
    }

    /// Like [`upload`](Self::upload), letting `fill` write the chunk straight
    /// into pinned memory (no extra copy).
    pub fn upload_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [T]),
    ) -> Result<ChunkId, Error> {
        if len == 0 {
            return Err(Error::ZeroLength { what: "chunk" });
        }
        if len > self.capacity {
            return Err(Error::ChunkTooLong {
                len,
                capacity: self.capacity,
            });
        }
        let (slot, _) = self.ring.next(Step::Upload).ok_or(Error::NoSlotReady {
            step: Step::Upload,
            why: "every slot holds a chunk that has not been downloaded and taken yet",
        })?;
        let s = &mut self.slots[slot.0];
        // The slot was released, so its last upload read of host_in completed:
        // as_mut_slice cannot report BufferInFlight here.
        fill(&mut s.host_in.as_mut_slice()?[..len]);
        let timed = self.timing.is_some();
        let (start, fence) =
            self.lanes[UP].copy_htod_timed(&s.host_in, 0, &mut s.dev, 0, len, timed)?;
        s.len = len;
        let chunk = self.ring.issue(Step::Upload, slot, fence.clone())?;
        self.note(slot, Step::Upload, start, &fence);
        Ok(chunk)
    }

    /// Queues processing of the next uploaded chunk on the compute lane:
    /// `f` gets a [`Launch`] (already ordered after the upload), the slot's
    /// device buffer and the chunk length, and enqueues kernels in place.
    /// If `f` fails, the chunk stays unprocessed (call `process` again or
    /// drop the buffer); kernels it queued before failing are still tracked,
    /// and may have changed the slot's data.
    pub fn process<F>(&mut self, f: F) -> Result<ChunkId, Error>
    where
        F: FnOnce(&mut Launch<'_>, &mut DeviceBuffer<T>, usize) -> Result<(), prism_stream::Error>,
    {
        let (slot, _) = self.ring.next(Step::Process).ok_or(Error::NoSlotReady {
            step: Step::Process,
            why: "no uploaded chunk is waiting to be processed",
        })?;
        let s = &mut self.slots[slot.0];
        let timed = self.timing.is_some();
        let own = self.lanes[COMPUTE].stream_id();
        let mut launch = self.lanes[COMPUTE].launch();
        // Order the kernels after the upload now, so a timed start excludes the wait.
        launch.prepare_write(&mut s.dev)?;
        let start = if timed {
            Some(launch.timed_fence()?)
        } else {
            None
        };
        f(&mut launch, &mut s.dev, s.len)?;
        // The step ends after its last kernel; a timed end fence (or, with
        // nothing launched on this lane, a plain one) marks it. A closure
        // that swapped the scope for another lane's gets a fence of ours.
        let last = launch.last_fence().cloned().filter(|f| f.stream() == own);
        drop(launch);
        let fence = match (timed, last) {
            (false, Some(last)) => last,
            (true, _) => self.lanes[COMPUTE].timed_fence()?,
            (false, None) => self.lanes[COMPUTE].fence()?,
        };
        let chunk = self.ring.issue(Step::Process, slot, fence.clone())?;
        self.note(slot, Step::Process, start, &fence);
        Ok(chunk)
    }

    /// Queues the download of the next processed chunk.
    pub fn download(&mut self) -> Result<ChunkId, Error> {
        let (slot, _) = self.ring.next(Step::Download).ok_or(Error::NoSlotReady {
            step: Step::Download,
            why: "no processed chunk is waiting to be downloaded",
        })?;
        let s = &mut self.slots[slot.0];
        let timed = self.timing.is_some();
        let (start, fence) =
            self.lanes[DOWN].copy_dtoh_timed(&s.dev, 0, &mut s.host_out, 0, s.len, timed)?;
        let chunk = self.ring.issue(Step::Download, slot, fence.clone())?;
        self.note(slot, Step::Download, start, &fence);
        Ok(chunk)
    }

    /// Observes completed events (non-blocking); returns how many steps completed.
    pub fn advance(&mut self) -> Result<usize, Error> {
        Ok(self.ring.poll()?)
    }

    /// If the oldest chunk's download completed: hands its output to `take`
    /// and frees the slot. Chunks come out in upload order.
    pub fn take_output<R>(
        &mut self,
        take: impl FnOnce(ChunkId, &[T]) -> R,
    ) -> Result<Option<R>, Error> {
        self.ring.poll()?;
        let Some((slot, chunk)) = self.ring.completed() else {
            return Ok(None);
        };
        let s = &self.slots[slot.0];
        let r = take(chunk, &s.host_out.as_slice()?[..s.len]);
        self.ring.release(slot)?;
        self.resolve_timing(slot, chunk)?;
        Ok(Some(r))
    }

    /// Blocks until the oldest chunk in flight has been downloaded, then as
    /// [`take_output`](Self::take_output). `Ok(None)` when nothing is in flight
    /// past the download step.
    pub fn wait_output<R>(
        &mut self,
        take: impl FnOnce(ChunkId, &[T]) -> R,
    ) -> Result<Option<R>, Error> {
        let oldest = self
            .ring
            .states()
            .into_iter()
            .filter_map(|s| s.chunk.map(|c| (c, s.slot)))
            .min();
        if let Some((_, slot)) = oldest {
            if let Some(f) = self.ring.fence(slot, Step::Download) {
                if let Probe::Failed(reason) = f.synchronize() {
                    self.gpu.poison(&reason);
                    return Err(prism_stream::Error::ContextPoisoned { reason }.into());
                }
            }
        }
        self.take_output(take)
    }
}

/// `ManagedGpuContext::create_triple_buffer::<T>(len)`, as an extension trait
/// (prism-stream sits below this crate and cannot name it).
pub trait GpuTripleBufferExt {
    fn create_triple_buffer<T: Element>(
        &self,
        len_per_slot: usize,
    ) -> Result<TripleBuffer<T>, Error>;
}

impl GpuTripleBufferExt for ManagedGpuContext {
    fn create_triple_buffer<T: Element>(
        &self,
        len_per_slot: usize,
    ) -> Result<TripleBuffer<T>, Error> {
        if !self.streams_enabled() {
            return Err(prism_stream::Error::StreamsDisabled {
                what: "triple buffer",
            }
            .into());
        }
        TripleBuffer::new(self.gpu(), len_per_slot)
    }
}
