//! The GPU triple buffer: the ring [`Engine`] driven by hand, one device
//! buffer per slot plus the pinned host staging it needs.
//!
//! Upload of chunk k+1, processing of chunk k and download of chunk k-1 run
//! on three lanes at once. No step waits on the host for the previous one:
//! the lanes (prism-stream) make the GPU order them. A slot's state changes
//! only when [`TripleBuffer::advance`] (or any call that polls) observes the
//! event recorded at the end of a step, and a slot is reused only after its
//! download's event completed and the host took the output.

use std::collections::VecDeque;

use prism_stream::{
    DeviceBuffer, Element, Fence as GpuFence, Gpu, HostAllocFlags, Lane, Launch, ManagedGpuContext,
    PinnedBuffer,
};

use crate::engine::{
    ChunkIo, ChunkOutputs, ChunkProcessor, ChunkSpan, ComputeSpans, Engine, EngineConfig, IoSlots,
    Recorded, Upload, COMPUTE_LANE, DOWNLOAD_LANE, UPLOAD_LANE,
};
use crate::ring::{ChunkId, RingFence, SlotId, SlotSnapshot, Step, DEFAULT_SLOTS};
use crate::Error;

impl RingFence for GpuFence {
    type Error = prism_stream::Error;
    fn is_complete(&self) -> Result<bool, Self::Error> {
        GpuFence::is_complete(self)
    }
}

/// The host side of one slot: write-combined pinned input, pinned output.
#[derive(Debug)]
struct HostSlot<T: Element> {
    host_in: PinnedBuffer<T>,
    host_out: PinnedBuffer<T>,
}

fn host_slot<T: Element>(gpu: &Gpu, capacity: usize) -> Result<HostSlot<T>, Error> {
    Ok(HostSlot {
        host_in: PinnedBuffer::new(gpu, capacity, HostAllocFlags::UPLOAD_ONLY)?,
        host_out: PinnedBuffer::new(gpu, capacity, HostAllocFlags::DEFAULT)?,
    })
}

/// `upload_with`: fill the slot's pinned input in place, then copy it up.
struct FillIo<F> {
    capacity: usize,
    len: usize,
    fill: Option<F>,
}

/// `download` and `take_output`: the slot's pinned output.
struct OutIo<R, X> {
    capacity: usize,
    take: Option<R>,
    result: Option<X>,
}

impl<T: Element, F: FnOnce(&mut [T])> ChunkIo<T> for FillIo<F> {
    type Slot = HostSlot<T>;
    type Error = Error;
    fn make_slot(&mut self, gpu: &Gpu) -> Result<HostSlot<T>, Error> {
        host_slot(gpu, self.capacity)
    }
    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut HostSlot<T>,
        dev: &mut DeviceBuffer<T>,
        _chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>, Error> {
        let _nvtx = prism_stream::nvtx::Range::new("upload");
        // The slot was released, so its last upload's read of host_in
        // completed: as_mut_slice cannot report BufferInFlight here.
        if let Some(fill) = self.fill.take() {
            fill(&mut slot.host_in.as_mut_slice()?[..self.len]);
        }
        let rec = lane.copy_htod_timed(&slot.host_in, 0, dev, 0, self.len, timed)?;
        Ok(Some((self.len, rec.into())))
    }
    fn download(
        &mut self,
        _: &mut Lane,
        _: bool,
        _: &mut HostSlot<T>,
        _: &DeviceBuffer<T>,
        _: usize,
    ) -> Result<Recorded, Error> {
        Err(Error::Config("an upload I/O cannot download"))
    }
    fn retire(&mut self, _: &mut HostSlot<T>, _: ChunkId, _: usize) -> Result<(), Error> {
        Err(Error::Config("an upload I/O cannot retire"))
    }
}

impl<T: Element, X, R: FnOnce(ChunkId, &[T]) -> X> ChunkIo<T> for OutIo<R, X> {
    type Slot = HostSlot<T>;
    type Error = Error;
    fn make_slot(&mut self, gpu: &Gpu) -> Result<HostSlot<T>, Error> {
        host_slot(gpu, self.capacity)
    }
    fn upload(
        &mut self,
        _: &mut Lane,
        _: bool,
        _: &mut HostSlot<T>,
        _: &mut DeviceBuffer<T>,
        _: ChunkId,
    ) -> Result<Option<(usize, Recorded)>, Error> {
        Ok(None)
    }
    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut HostSlot<T>,
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded, Error> {
        Ok(lane
            .copy_dtoh_timed(dev, 0, &mut slot.host_out, 0, len, timed)?
            .into())
    }
    fn retire(&mut self, slot: &mut HostSlot<T>, chunk: ChunkId, len: usize) -> Result<(), Error> {
        if let Some(take) = self.take.take() {
            // The download completed (observed), so the read cannot fail with
            // BufferInFlight.
            let out = &slot.host_out.as_slice()?[..len];
            self.result = Some(take(chunk, out));
        }
        Ok(())
    }
}

/// `process`: the user's closure over the slot's device buffer, in place.
struct InPlace<F> {
    f: Option<F>,
}

impl<T: Element, F> ChunkProcessor<T> for InPlace<F>
where
    F: FnOnce(&mut Launch<'_>, &mut DeviceBuffer<T>, usize) -> Result<(), prism_stream::Error>,
{
    type Error = Error;
    fn process(
        &mut self,
        launch: &mut Launch<'_>,
        bufs: &mut [DeviceBuffer<T>],
        len: usize,
        _chunk: ChunkId,
        spans: &mut ComputeSpans,
    ) -> Result<ChunkOutputs, Error> {
        let Some(f) = self.f.take() else {
            return Ok(ChunkOutputs::one(0, len));
        };
        let _nvtx = prism_stream::nvtx::Range::new("process");
        let start = if spans.timed() {
            // Order the kernels after the upload now, so the span excludes the wait.
            launch.prepare_write(&mut bufs[0])?;
            Some(launch.timed_fence()?)
        } else {
            None
        };
        f(launch, &mut bufs[0], len)?;
        if let Some(start) = start {
            let end = launch.timed_fence()?;
            spans.record("process", start, end);
        }
        Ok(ChunkOutputs::one(0, len))
    }
}

/// Spans kept for [`TripleBuffer::take_timeline`]; past it the oldest go.
const MAX_SPANS: usize = 1 << 16;

/// A ring of 2 to 8 slots (3 by default) streaming chunks of `T` through the GPU.
#[derive(Debug)]
pub struct TripleBuffer<T: Element> {
    engine: Engine<T>,
    host: IoSlots<HostSlot<T>>,
    spans: VecDeque<ChunkSpan>,
}

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
        let engine = Engine::new(
            gpu,
            EngineConfig {
                slots,
                capacity: len_per_slot,
                buffers_per_slot: 1,
                compute_lanes: 1,
            },
        )?;
        // Host staging for every slot now, so the first chunks pay no allocation.
        let mut host = IoSlots::new(slots);
        let mut io = OutIo::<fn(ChunkId, &[T]), ()> {
            capacity: len_per_slot,
            take: None,
            result: None,
        };
        host.prepare(&mut io, gpu)?;
        Ok(Self {
            engine,
            host,
            spans: VecDeque::new(),
        })
    }

    /// Records timed events around every step from now on (two timed events
    /// per step, held until the chunk is released). Start events are
    /// recorded after the GPU-side waits, so a step's span is its own
    /// execution, not time spent waiting.
    pub fn enable_timing(&mut self) -> Result<(), Error> {
        self.engine.start_timing()
    }

    /// The spans of the steps of every chunk released since the last call
    /// (in GPU ms since timing was enabled), and forgets them: memory stays
    /// bounded by the chunks in flight plus the spans not yet taken (at most
    /// 65536; the oldest are dropped past that).
    pub fn take_timeline(&mut self) -> Vec<ChunkSpan> {
        self.spans.drain(..).collect()
    }

    /// Elements per slot.
    pub fn capacity(&self) -> usize {
        self.engine.capacity()
    }

    /// Number of slots.
    pub fn slot_count(&self) -> usize {
        self.engine.slot_count()
    }

    /// Chunks issued and not yet taken back by the host.
    pub fn in_flight(&self) -> usize {
        self.engine.in_flight()
    }

    /// The GPU the ring runs on.
    pub fn gpu(&self) -> &Gpu {
        self.engine.gpu()
    }

    /// The lane `step` runs on (to queue extra work in order with it).
    pub fn lane_mut(&mut self, step: Step) -> &mut Lane {
        let i = match step {
            Step::Upload => UPLOAD_LANE,
            Step::Process => COMPUTE_LANE,
            Step::Download => DOWNLOAD_LANE,
        };
        match self.engine.lane_mut(i) {
            Some(lane) => lane,
            None => unreachable!("a triple buffer's engine has its three lanes"),
        }
    }

    /// Snapshot of every slot, for debugging.
    pub fn get_states(&self) -> Vec<SlotSnapshot> {
        self.engine.states()
    }

    /// The slot the next upload would use, or `None` when its previous chunk
    /// has not been downloaded and taken yet.
    pub fn get_upload_buffer(&self) -> Option<SlotId> {
        self.engine.next(Step::Upload).map(|(s, _)| s)
    }

    /// The slot whose chunk is next to process, if its upload was issued.
    pub fn get_process_buffer(&self) -> Option<SlotId> {
        self.engine.next(Step::Process).map(|(s, _)| s)
    }

    /// The slot whose chunk is next to download, if its processing was issued.
    pub fn get_download_buffer(&self) -> Option<SlotId> {
        self.engine.next(Step::Download).map(|(s, _)| s)
    }

    /// Copies `data` into the next free slot's pinned staging and queues its
    /// upload. `NoSlotReady` when every slot is still in use (take outputs first).
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
        if len > self.capacity() {
            return Err(Error::ChunkTooLong {
                len,
                capacity: self.capacity(),
            });
        }
        let mut io = FillIo {
            capacity: self.capacity(),
            len,
            fill: Some(fill),
        };
        match self.engine.upload(&mut io, &mut self.host)? {
            Upload::Issued(chunk, _) => Ok(chunk),
            _ => Err(Error::NoSlotReady {
                step: Step::Upload,
                why: "every slot holds a chunk that has not been downloaded and taken yet",
            }),
        }
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
        self.engine
            .process(&mut InPlace { f: Some(f) })?
            .ok_or(Error::NoSlotReady {
                step: Step::Process,
                why: "no uploaded chunk is waiting to be processed",
            })
    }

    /// Queues the download of the next processed chunk.
    pub fn download(&mut self) -> Result<ChunkId, Error> {
        let mut io = OutIo::<fn(ChunkId, &[T]), ()> {
            capacity: self.capacity(),
            take: None,
            result: None,
        };
        self.engine
            .download(&mut io, &mut self.host)?
            .ok_or(Error::NoSlotReady {
                step: Step::Download,
                why: "no processed chunk is waiting to be downloaded",
            })
    }

    /// Polls the GPU without blocking: observes the steps that completed
    /// since the last call (slot states move on) and returns how many. It
    /// issues nothing and hands out no output; see
    /// [`take_output`](Self::take_output).
    pub fn advance(&mut self) -> Result<usize, Error> {
        self.engine.poll()
    }

    /// If the oldest chunk's download completed: hands its output to `take`
    /// and frees the slot. Chunks come out in upload order.
    pub fn take_output<X>(
        &mut self,
        take: impl FnOnce(ChunkId, &[T]) -> X,
    ) -> Result<Option<X>, Error> {
        let mut io = OutIo {
            capacity: self.capacity(),
            take: Some(take),
            result: None,
        };
        let spans = &mut self.spans;
        let mut keep = |s: ChunkSpan| {
            if spans.len() >= MAX_SPANS {
                spans.pop_front();
            }
            spans.push_back(s);
        };
        self.engine.retire(&mut io, &mut self.host, &mut keep)?;
        Ok(io.result)
    }

    /// Blocks until the oldest chunk in flight has finished its last issued
    /// step, then as [`take_output`](Self::take_output) (`Ok(None)` when
    /// nothing is in flight past the download step).
    pub fn wait_output<X>(
        &mut self,
        take: impl FnOnce(ChunkId, &[T]) -> X,
    ) -> Result<Option<X>, Error> {
        self.engine.wait_oldest()?;
        self.take_output(take)
    }
}

/// `ManagedGpuContext::create_triple_buffer::<T>(len)`, as an extension trait
/// (prism-stream sits below this crate and cannot name it).
pub trait GpuTripleBufferExt {
    /// A triple buffer of `len_per_slot` elements per slot on this context; fails when streams are disabled.
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
