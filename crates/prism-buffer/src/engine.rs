//! The ring engine: one implementation of the slot ring on the GPU, used by
//! the [`TripleBuffer`](crate::TripleBuffer) and by prism-pipeline's
//! streaming runs.
//!
//! This module is prism-buffer's extension point, public because
//! prism-pipeline (another crate) plugs into it: a [`ChunkIo`] says how
//! chunks get in and out, a [`ChunkProcessor`] what runs on them. A user
//! of the triple buffer or of prism-pipeline never needs it; one writing
//! a new chunk I/O mode does. Its bookkeeping stays private.
//!
//! An [`Engine`] owns the lanes (upload, download, one or two compute
//! lanes), the device buffers of every slot (1 to
//! [`MAX_BUFFERS_PER_SLOT`] per slot), a
//! [`SlotRing`] driven by the fences its steps record, and the timing of
//! the chunks in flight. How chunks get in and out is a [`ChunkIo`]: its
//! per-slot state (staging buffers, item lists, nothing at all) is its
//! associated type `Slot`, kept by the caller in an [`IoSlots`]. What
//! happens to a chunk on the GPU is a [`ChunkProcessor`].
//!
//! Every step is issued as soon as the ring allows it; the GPU orders the
//! steps through the lanes (prism-stream), so the host never blocks to order
//! work. It blocks only in [`Engine::wait_oldest`], when the caller has
//! nothing else to do. With timing on, a chunk's timed fences become
//! [`ChunkSpan`]s when it retires, so the events held are those of the
//! chunks in flight, whatever the run's length.
//!
//! NVTX (prism-stream's `nvtx`): the engine marks each chunk's `download`
//! step and each host `wait for the GPU` with a range; a [`ChunkIo`] marks
//! its `upload` once it has the chunk's input (only it knows whether there
//! is one), a [`ChunkProcessor`] its own kernels, so each name counts
//! chunks exactly.

use std::borrow::Cow;
use std::collections::VecDeque;

use prism_stream::{
    DeviceBuffer, Element, Fence as GpuFence, Gpu, Lane, Launch, Probe, StreamPurpose,
};

use crate::ring::{ChunkId, SlotId, SlotRing, SlotSnapshot, Step};
use crate::Error;

/// The most device buffers a slot may have ([`EngineConfig::buffers_per_slot`]).
pub const MAX_BUFFERS_PER_SLOT: usize = 16;

/// Index of the upload lane in [`Engine::lane_mut`].
pub const UPLOAD_LANE: usize = 0;
/// Index of the download lane.
pub const DOWNLOAD_LANE: usize = 1;
/// Index of the first compute lane (chunk k runs on compute lane k % n).
pub const COMPUTE_LANE: usize = 2;
/// The [`ChunkSpan::lane`] of a processor's first branch lane (a lane of
/// its own on which it runs work of a chunk concurrently with the chunk's
/// compute lane; see [`ComputeSpans::record_branch`]); branch `k` is
/// `BRANCH_LANE + k - 1`. Not a lane of the engine.
pub const BRANCH_LANE: usize = COMPUTE_LANE + 2;

/// The shape of an engine's ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Slots: chunks in flight at once (2..=8).
    pub slots: usize,
    /// Elements per device buffer.
    pub capacity: usize,
    /// Device buffers per slot, 1 to [`MAX_BUFFERS_PER_SLOT`]: 1 (in place),
    /// 2 (a chain: stages read one, write the other), more for a stage
    /// graph (one per value alive at once).
    pub buffers_per_slot: usize,
    /// Compute lanes (1 or 2): with two, chunks alternate between them so
    /// one chunk's kernels can use SMs the tail of another's leaves idle.
    pub compute_lanes: usize,
}

/// What the GPU did for one step of one chunk, in ms since timing began.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkSpan {
    /// The chunk.
    pub chunk: ChunkId,
    /// Which step.
    pub step: Step,
    /// Lane it ran on: [`UPLOAD_LANE`], [`DOWNLOAD_LANE`], a compute lane
    /// (engine lanes), or [`BRANCH_LANE`]` + k` (a processor's own lane).
    pub lane: usize,
    /// "upload", "download", or the name a processor gave its kernels.
    pub name: Cow<'static, str>,
    /// Start, in ms since timing began.
    pub start_ms: f64,
    /// End, in ms since timing began.
    pub end_ms: f64,
}

/// The fences one step recorded: a timed start (with timing on) and its end.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The timed start fence (with timing on).
    pub start: Option<GpuFence>,
    /// The fence that marks the step's end.
    pub end: GpuFence,
}

impl From<(Option<GpuFence>, GpuFence)> for Recorded {
    fn from((start, end): (Option<GpuFence>, GpuFence)) -> Self {
        Self { start, end }
    }
}

/// Where chunks come from and where they go. The engine calls `upload` for
/// the next chunk when a slot is free, `download` once the chunk was
/// processed, and `retire` once its download was observed complete.
/// An implementation marks a chunk's upload with an NVTX range named
/// `upload` (`prism_stream::nvtx::Range`) from the moment it knows there is
/// a chunk; the engine marks the download.
pub trait ChunkIo<T: Element> {
    /// What this way in and out keeps per slot (staging, item lists, ...).
    type Slot;
    /// Errors of this I/O (and of the engine, through `From`).
    type Error: From<Error>;

    /// The state of one slot, made on the slot's first use.
    fn make_slot(&mut self, gpu: &Gpu) -> Result<Self::Slot, Self::Error>;

    /// Queues the upload of chunk `chunk` into `dev` on `lane` (timed start
    /// and end fences when `timed`); `Ok(None)` when there is no more input.
    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Self::Slot,
        dev: &mut DeviceBuffer<T>,
        chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>, Self::Error>;

    /// Queues the download of `dev[..len]`, the chunk's output.
    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Self::Slot,
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded, Self::Error>;

    /// The chunk's download completed: deliver its `len` output elements.
    fn retire(
        &mut self,
        slot: &mut Self::Slot,
        chunk: ChunkId,
        len: usize,
    ) -> Result<(), Self::Error>;

    /// Queues the downloads of a chunk's outputs (`(buffer, length)` each,
    /// in the processor's output order; some may be empty). An I/O that
    /// takes several outputs per chunk (a stage graph's) implements it; the
    /// default takes exactly one, through [`download`](Self::download), and
    /// refuses more.
    fn download_outputs(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Self::Slot,
        outs: &[(&DeviceBuffer<T>, usize)],
    ) -> Result<Recorded, Self::Error> {
        match outs {
            [(dev, len)] => self.download(lane, timed, slot, dev, *len),
            _ => Err(Error::Config("this I/O takes exactly one output per chunk").into()),
        }
    }

    /// The chunk's downloads completed: deliver its outputs (`lens[i]`
    /// elements of output `i`). The default takes exactly one, through
    /// [`retire`](Self::retire).
    fn retire_outputs(
        &mut self,
        slot: &mut Self::Slot,
        chunk: ChunkId,
        lens: &[usize],
    ) -> Result<(), Self::Error> {
        match lens {
            [len] => self.retire(slot, chunk, *len),
            _ => Err(Error::Config("this I/O takes exactly one output per chunk").into()),
        }
    }
}

/// Where a processed chunk's outputs are: `(index in the slot's buffers,
/// length)` for each, in output order. A chain has one; a stage graph one
/// per output (the same buffer may appear more than once).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkOutputs(Vec<(usize, usize)>);

impl ChunkOutputs {
    /// One output: `len` elements in buffer `buf`.
    pub fn one(buf: usize, len: usize) -> Self {
        Self(vec![(buf, len)])
    }

    /// No outputs yet (add them with [`push`](Self::push)).
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Adds the next output: `len` elements in buffer `buf`.
    pub fn push(&mut self, buf: usize, len: usize) {
        self.0.push((buf, len));
    }

    /// The outputs, `(buffer, length)` each.
    pub fn as_slice(&self) -> &[(usize, usize)] {
        &self.0
    }

    /// Elements over every output.
    pub fn total(&self) -> usize {
        self.0.iter().map(|&(_, len)| len).sum()
    }
}

/// The kernels of one chunk.
pub trait ChunkProcessor<T: Element> {
    /// Errors of the processing (and of the engine, through `From`).
    type Error: From<Error>;

    /// Queues the chunk's kernels through `launch`. `bufs[0]` holds the
    /// `len` input elements; returns where the outputs are (buffer index
    /// and length of each). With `spans.timed()`, name and time each kernel
    /// group with [`ComputeSpans::record`].
    ///
    /// The step ends at `launch`'s last fence. A processor may run part of
    /// a chunk on lanes of its own (independent branches, concurrently);
    /// the ordering module orders every buffer use whatever the lane, and
    /// the processor joins that work back before it returns
    /// (`launch.wait_for` each lane's last fence, then `launch.fence()`),
    /// so that the step's end covers it.
    fn process(
        &mut self,
        launch: &mut Launch<'_>,
        bufs: &mut [DeviceBuffer<T>],
        len: usize,
        chunk: ChunkId,
        spans: &mut ComputeSpans,
    ) -> Result<ChunkOutputs, Self::Error>;
}

/// Named, timed kernel groups of one chunk (see [`ChunkProcessor::process`]).
#[derive(Debug, Default)]
pub struct ComputeSpans {
    timed: bool,
    /// Name, start, end, and branch (0: the chunk's compute lane).
    spans: Vec<(Cow<'static, str>, GpuFence, GpuFence, usize)>,
}

impl ComputeSpans {
    /// Spans of an untimed step (a processor's work that records no fence,
    /// such as a chain being captured into a CUDA graph).
    pub fn untimed() -> Self {
        Self {
            timed: false,
            spans: Vec::new(),
        }
    }

    /// Is timing on (should the processor record spans)?
    pub fn timed(&self) -> bool {
        self.timed
    }

    /// A kernel group that ran from `start` to `end` (timed fences of the
    /// processor's launch scope).
    pub fn record(&mut self, name: impl Into<Cow<'static, str>>, start: GpuFence, end: GpuFence) {
        self.spans.push((name.into(), start, end, 0));
    }

    /// A kernel group that ran on the processor's branch lane `branch`
    /// (1 for the first; 0 is the chunk's compute lane, as
    /// [`record`](Self::record)): its span's lane is
    /// [`BRANCH_LANE`]` + branch - 1`.
    pub fn record_branch(
        &mut self,
        branch: usize,
        name: impl Into<Cow<'static, str>>,
        start: GpuFence,
        end: GpuFence,
    ) {
        self.spans.push((name.into(), start, end, branch));
    }
}

/// The per-slot states of one [`ChunkIo`], kept by the caller between the
/// engine calls of a run (they hold staging and other buffers the slots'
/// chunks use).
#[derive(Debug)]
pub struct IoSlots<S> {
    slots: Vec<Option<S>>,
}

impl<S> IoSlots<S> {
    /// Room for `n` slots, none made yet.
    pub fn new(n: usize) -> Self {
        Self {
            slots: (0..n).map(|_| None).collect(),
        }
    }

    /// The states made so far.
    pub fn into_made(self) -> impl Iterator<Item = S> {
        self.slots.into_iter().flatten()
    }

    /// Makes the state of every slot now (so a run's first chunks pay no
    /// allocation).
    pub fn prepare<T: Element, Io: ChunkIo<T, Slot = S>>(
        &mut self,
        io: &mut Io,
        gpu: &Gpu,
    ) -> Result<(), Io::Error> {
        for i in 0..self.slots.len() {
            self.get(i, io, gpu)?;
        }
        Ok(())
    }

    fn get<T: Element, Io: ChunkIo<T, Slot = S>>(
        &mut self,
        i: usize,
        io: &mut Io,
        gpu: &Gpu,
    ) -> Result<&mut S, Io::Error> {
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
        }
        if self.slots[i].is_none() {
            self.slots[i] = Some(io.make_slot(gpu)?);
        }
        match self.slots[i].as_mut() {
            Some(s) => Ok(s),
            None => Err(Error::ZeroLength { what: "I/O slot" }.into()),
        }
    }
}

/// What [`Engine::upload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    /// Chunk issued, with this many input elements.
    Issued(ChunkId, usize),
    /// Every slot holds a chunk that has not been released yet.
    NoSlot,
    /// The I/O has no more input.
    Exhausted,
}

/// Counts of one [`Engine::run`].
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct RunCounts {
    /// Chunks that went through.
    pub chunks: u64,
    /// Input elements uploaded.
    pub elems_in: u64,
    /// Output elements downloaded.
    pub elems_out: u64,
    /// Host time blocked waiting for the GPU (the oldest chunk's fence), ms.
    pub wait_ms: f64,
}

#[derive(Debug)]
struct TimedStep {
    step: Step,
    lane: usize,
    name: Cow<'static, str>,
    start: GpuFence,
    end: GpuFence,
}

#[derive(Debug)]
struct EngineSlot<T: Element> {
    bufs: Vec<DeviceBuffer<T>>,
    in_len: usize,
    /// (buffer, length) of each output of the chunk in the slot.
    outs: ChunkOutputs,
    timed: Vec<TimedStep>,
}

#[derive(Debug)]
struct Timing {
    origin: GpuFence,
    /// The host clock when `origin` was recorded (the GPU reaches an idle
    /// lane's event within microseconds: host and GPU spans line up to that).
    host_origin: std::time::Instant,
    busy: BusyUnion,
    /// Compute end of the last `slots` retired chunks (see `retire`).
    recent_ends: VecDeque<f64>,
    /// Host waits for the GPU: (oldest chunk, start ms, end ms) since `host_origin`.
    waits: Vec<(ChunkId, f64, f64)>,
}

/// One GPU slot ring (see the [module docs](self)).
#[derive(Debug)]
pub struct Engine<T: Element> {
    gpu: Gpu,
    lanes: Vec<Lane>,
    slots: Vec<EngineSlot<T>>,
    ring: SlotRing<GpuFence>,
    config: EngineConfig,
    timing: Option<Timing>,
}

impl<T: Element> Engine<T> {
    /// Lanes and zeroed device buffers for `config`.
    pub fn new(gpu: &Gpu, config: EngineConfig) -> Result<Self, Error> {
        let _span = tracing::debug_span!(
            "prism.engine.new",
            slots = config.slots,
            capacity = config.capacity
        )
        .entered();
        if config.capacity == 0 {
            return Err(Error::ZeroLength {
                what: "engine slot capacity",
            });
        }
        if !(1..=MAX_BUFFERS_PER_SLOT).contains(&config.buffers_per_slot)
            || !(1..=2).contains(&config.compute_lanes)
        {
            return Err(Error::Config(
                "an engine has 1 to 16 buffers per slot and 1 or 2 compute lanes",
            ));
        }
        let ring = SlotRing::new(config.slots)?;
        let mut lanes = vec![
            Lane::with_purpose(gpu, StreamPurpose::Upload)?,
            Lane::with_purpose(gpu, StreamPurpose::Download)?,
        ];
        for _ in 0..config.compute_lanes {
            lanes.push(Lane::with_purpose(gpu, StreamPurpose::Compute)?);
        }
        let mut slots = Vec::with_capacity(config.slots);
        for _ in 0..config.slots {
            let mut bufs = Vec::with_capacity(config.buffers_per_slot);
            for _ in 0..config.buffers_per_slot {
                bufs.push(DeviceBuffer::zeroed(
                    &mut lanes[UPLOAD_LANE],
                    config.capacity,
                )?);
            }
            slots.push(EngineSlot {
                bufs,
                in_len: 0,
                outs: ChunkOutputs::new(),
                timed: Vec::new(),
            });
        }
        Ok(Self {
            gpu: gpu.clone(),
            lanes,
            slots,
            ring,
            config,
            timing: None,
        })
    }

    /// The GPU the engine runs on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Elements per device buffer.
    pub fn capacity(&self) -> usize {
        self.config.capacity
    }

    /// Number of slots.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Chunks issued and not yet retired.
    pub fn in_flight(&self) -> usize {
        self.ring.in_flight()
    }

    /// No chunk in flight.
    pub fn is_idle(&self) -> bool {
        self.ring.is_idle()
    }

    /// Snapshot of every slot.
    pub fn states(&self) -> Vec<SlotSnapshot> {
        self.ring.states()
    }

    /// Which slot and chunk the next `step` would use, if any is ready.
    pub fn next(&self, step: Step) -> Option<(SlotId, ChunkId)> {
        self.ring.next(step)
    }

    /// Engine lane `i` ([`UPLOAD_LANE`], [`DOWNLOAD_LANE`], compute lanes from
    /// [`COMPUTE_LANE`]), to queue extra work in order with it.
    pub fn lane_mut(&mut self, i: usize) -> Option<&mut Lane> {
        self.lanes.get_mut(i)
    }

    /// Number of lanes (2 + compute lanes).
    pub fn lane_count(&self) -> usize {
        self.lanes.len()
    }

    /// With no chunk in flight: the first compute lane and slot 0's device
    /// buffers, for one synchronous step on a single lane (no cross-lane
    /// waits: the lowest latency for small steps).
    pub fn idle_parts(&mut self) -> Option<(&mut Lane, &mut [DeviceBuffer<T>])> {
        if !self.ring.is_idle() {
            return None;
        }
        Some((&mut self.lanes[COMPUTE_LANE], &mut self.slots[0].bufs))
    }

    /// Starts counting chunks from 0 again (a new run). The engine must be
    /// idle: `NoSlotReady` otherwise.
    pub fn restart(&mut self) -> Result<(), Error> {
        if !self.ring.is_idle() {
            return Err(Error::NoSlotReady {
                step: Step::Upload,
                why: "chunks are still in flight; retire them first",
            });
        }
        self.ring = SlotRing::new(self.slots.len())?;
        Ok(())
    }

    /// Timed fences around every step from now on; spans are measured from
    /// this call.
    pub fn start_timing(&mut self) -> Result<(), Error> {
        let origin = self.lanes[UPLOAD_LANE].timed_fence()?;
        self.timing = Some(Timing {
            origin,
            host_origin: std::time::Instant::now(),
            busy: BusyUnion::default(),
            recent_ends: VecDeque::new(),
            waits: Vec::new(),
        });
        Ok(())
    }

    /// The host clock at the timing origin (GPU span times count from it).
    pub fn host_origin(&self) -> Option<std::time::Instant> {
        self.timing.as_ref().map(|t| t.host_origin)
    }

    /// The host's waits for the GPU since timing started: (oldest chunk,
    /// start ms, end ms), on the clock of the GPU spans.
    pub fn take_waits(&mut self) -> Vec<(ChunkId, f64, f64)> {
        self.timing
            .as_mut()
            .map_or_else(Vec::new, |t| std::mem::take(&mut t.waits))
    }

    /// Stops timing; returns the GPU time during which at least one chunk's
    /// kernels ran (the union over the compute lanes) of the chunks retired
    /// since timing started.
    pub fn stop_timing(&mut self) -> f64 {
        for s in &mut self.slots {
            s.timed.clear();
        }
        self.timing.take().map_or(0.0, |t| t.busy.total())
    }

    /// Whether spans are being timed.
    pub fn timed(&self) -> bool {
        self.timing.is_some()
    }

    /// Issues the next chunk's upload if a slot is free and `io` has input.
    pub fn upload<Io: ChunkIo<T>>(
        &mut self,
        io: &mut Io,
        io_slots: &mut IoSlots<Io::Slot>,
    ) -> Result<Upload, Io::Error> {
        let Some((slot, chunk)) = self.ring.next(Step::Upload) else {
            return Ok(Upload::NoSlot);
        };
        let timed = self.timing.is_some();
        let state = io_slots.get(slot.0, io, &self.gpu)?;
        let s = &mut self.slots[slot.0];
        let lane = &mut self.lanes[UPLOAD_LANE];
        let Some((len, rec)) = io.upload(lane, timed, state, &mut s.bufs[0], chunk)? else {
            return Ok(Upload::Exhausted);
        };
        let end = own_fence(lane, rec.end)?;
        s.in_len = len;
        s.outs = ChunkOutputs::one(0, len);
        s.timed.clear();
        if let Some(start) = rec.start {
            s.timed.push(TimedStep {
                step: Step::Upload,
                lane: UPLOAD_LANE,
                name: Cow::Borrowed("upload"),
                start,
                end: end.clone(),
            });
        }
        self.ring.issue(Step::Upload, slot, end)?;
        Ok(Upload::Issued(chunk, len))
    }

    /// Issues the kernels of the oldest uploaded chunk, if any; returns it.
    pub fn process<P: ChunkProcessor<T>>(
        &mut self,
        p: &mut P,
    ) -> Result<Option<ChunkId>, P::Error> {
        let Some((slot, chunk)) = self.ring.next(Step::Process) else {
            return Ok(None);
        };
        let lane_index = COMPUTE_LANE + (chunk.0 % self.config.compute_lanes as u64) as usize;
        let lane = &mut self.lanes[lane_index];
        let own = lane.stream_id();
        let s = &mut self.slots[slot.0];
        let mut spans = ComputeSpans {
            timed: self.timing.is_some(),
            spans: Vec::new(),
        };
        let mut launch = lane.launch();
        let outs = p.process(&mut launch, &mut s.bufs, s.in_len, chunk, &mut spans)?;
        let (capacity, bufs) = (self.config.capacity, s.bufs.len());
        if outs.0.is_empty() || outs.0.iter().any(|&(b, l)| l > capacity || b >= bufs) {
            return Err(Error::Config(
                "a processor reported no output, more output than the slot holds, or no such buffer",
            )
            .into());
        }
        // The step ends after its last kernel: that kernel's own fence (or,
        // with no kernel, the last timed fence); a processor that launched
        // nothing on this lane (or swapped its scope for another lane's)
        // gets one of ours.
        let last = launch
            .last_fence()
            .cloned()
            .or_else(|| spans.spans.last().map(|(_, _, end, _)| end.clone()))
            .filter(|f| f.stream() == own);
        drop(launch);
        let end = match last {
            Some(f) => f,
            None => lane.fence().map_err(Error::from)?,
        };
        s.outs = outs;
        for (name, start, end, branch) in spans.spans {
            s.timed.push(TimedStep {
                step: Step::Process,
                lane: match branch {
                    0 => lane_index,
                    b => BRANCH_LANE + b - 1,
                },
                name,
                start,
                end,
            });
        }
        self.ring.issue(Step::Process, slot, end)?;
        Ok(Some(chunk))
    }

    /// Issues the download of the oldest processed chunk, if any; returns it.
    pub fn download<Io: ChunkIo<T>>(
        &mut self,
        io: &mut Io,
        io_slots: &mut IoSlots<Io::Slot>,
    ) -> Result<Option<ChunkId>, Io::Error> {
        let Some((slot, chunk)) = self.ring.next(Step::Download) else {
            return Ok(None);
        };
        // One per chunk: the download step of a chunk that made no output
        // (no copy) included.
        let _nvtx = prism_stream::nvtx::Range::new("download");
        let timed = self.timing.is_some();
        let state = io_slots.get(slot.0, io, &self.gpu)?;
        let s = &mut self.slots[slot.0];
        if s.outs.total() == 0 {
            // Nothing to copy (a stage made no output for this chunk): the
            // download is done when processing is, so its fence stands in.
            let end = self
                .ring
                .fence(slot, Step::Process)
                .cloned()
                .ok_or(Error::Config("a processed chunk has no process fence"))?;
            self.ring.issue(Step::Download, slot, end)?;
            return Ok(Some(chunk));
        }
        let lane = &mut self.lanes[DOWNLOAD_LANE];
        // Every step of the chunk is ordered before its download, whatever
        // lanes the processor used: the downloads wait for the process
        // step's end (a processor that ran work on lanes of its own joins
        // them into that fence), not only for the writers of the outputs.
        if let Some(end) = self.ring.fence(slot, Step::Process) {
            lane.wait_for(end).map_err(Error::from)?;
        }
        let outs: Vec<(&DeviceBuffer<T>, usize)> =
            s.outs.0.iter().map(|&(b, l)| (&s.bufs[b], l)).collect();
        let rec = io.download_outputs(lane, timed, state, &outs)?;
        let end = own_fence(lane, rec.end)?;
        if let Some(start) = rec.start {
            s.timed.push(TimedStep {
                step: Step::Download,
                lane: DOWNLOAD_LANE,
                name: Cow::Borrowed("download"),
                start,
                end: end.clone(),
            });
        }
        self.ring.issue(Step::Download, slot, end)?;
        Ok(Some(chunk))
    }

    /// Observes completed fences (non-blocking); returns how many steps completed.
    pub fn poll(&mut self) -> Result<usize, Error> {
        Ok(self.ring.poll()?)
    }

    /// If the oldest chunk's download completed: hands it to
    /// `io.retire_outputs`, reports its spans (with timing on) and frees the
    /// slot. Outputs come in chunk order; returns the chunk and its output
    /// elements over every output.
    pub fn retire<Io: ChunkIo<T>>(
        &mut self,
        io: &mut Io,
        io_slots: &mut IoSlots<Io::Slot>,
        spans: &mut dyn FnMut(ChunkSpan),
    ) -> Result<Option<(ChunkId, usize)>, Io::Error> {
        self.ring.poll().map_err(Error::from)?;
        let Some((slot, chunk)) = self.ring.completed() else {
            return Ok(None);
        };
        let lens: Vec<usize> = self.slots[slot.0].outs.0.iter().map(|&(_, l)| l).collect();
        let len = lens.iter().sum();
        let state = io_slots.get(slot.0, io, &self.gpu)?;
        io.retire_outputs(state, chunk, &lens)?;
        self.ring.release(slot)?;
        self.retire_timing(slot, chunk, spans)?;
        Ok(Some((chunk, len)))
    }

    /// The chunk's steps completed (its download did, and every step is
    /// ordered before it): turn its timed fences into spans. Compute spans
    /// also go into a union that is settled below the earliest point a later
    /// chunk's kernels can start: chunk j's upload waits for every kernel of
    /// chunk j - slots (they use the slot's buffers), so once the last
    /// `slots` chunks retired, nothing later starts before the earliest of
    /// their compute ends.
    fn retire_timing(
        &mut self,
        slot: SlotId,
        chunk: ChunkId,
        spans: &mut dyn FnMut(ChunkSpan),
    ) -> Result<(), Error> {
        let Some(t) = &mut self.timing else {
            return Ok(());
        };
        let mut compute_end = f64::NEG_INFINITY;
        for s in self.slots[slot.0].timed.drain(..) {
            if let Probe::Failed(reason) = s.end.synchronize() {
                return Err(prism_stream::Error::ContextPoisoned { reason }.into());
            }
            let start_ms = f64::from(s.start.elapsed_ms_since(&t.origin)?);
            let end_ms = f64::from(s.end.elapsed_ms_since(&t.origin)?);
            if s.step == Step::Process {
                t.busy.add(start_ms, end_ms);
                compute_end = compute_end.max(end_ms);
            }
            spans(ChunkSpan {
                chunk,
                step: s.step,
                lane: s.lane,
                name: s.name,
                start_ms,
                end_ms,
            });
        }
        let n = self.slots.len();
        t.recent_ends.push_back(compute_end);
        if t.recent_ends.len() > n {
            t.recent_ends.pop_front();
        }
        if t.recent_ends.len() == n {
            let low = t.recent_ends.iter().copied().fold(f64::INFINITY, f64::min);
            t.busy.settle_before(low);
        }
        Ok(())
    }

    /// Blocks until the oldest chunk's last issued step completes. Returns
    /// false when nothing is in flight.
    pub fn wait_oldest(&mut self) -> Result<bool, Error> {
        let oldest = self
            .ring
            .states()
            .into_iter()
            .filter_map(|s| s.chunk.map(|c| (c, s.slot)))
            .min();
        let Some((chunk, slot)) = oldest else {
            return Ok(false);
        };
        let _nvtx = prism_stream::nvtx::Range::new("wait for the GPU");
        let started = std::time::Instant::now();
        let r = self.wait_slot(slot);
        if let Some(t) = &mut self.timing {
            let ms = |i: std::time::Instant| {
                i.saturating_duration_since(t.host_origin).as_secs_f64() * 1e3
            };
            t.waits
                .push((chunk, ms(started), ms(std::time::Instant::now())));
        }
        r.map(|()| true)
    }

    fn wait_slot(&mut self, slot: SlotId) -> Result<(), Error> {
        let fence = [Step::Download, Step::Process, Step::Upload]
            .into_iter()
            .find_map(|step| self.ring.fence(slot, step))
            .cloned();
        if let Some(f) = fence {
            if let Probe::Failed(reason) = f.synchronize() {
                self.gpu.poison(&reason);
                return Err(prism_stream::Error::ContextPoisoned { reason }.into());
            }
        }
        Ok(())
    }

    /// After an error: waits for every lane, then forgets the chunks in
    /// flight (their outputs are dropped) so the engine starts clean.
    pub fn abandon(&mut self) {
        for lane in &self.lanes {
            let _ = lane.synchronize();
        }
        for s in &mut self.slots {
            s.timed.clear();
        }
        if let Ok(ring) = SlotRing::new(self.slots.len()) {
            self.ring = ring;
        }
    }

    /// Issues whatever the ring allows: the next upload (while `io` has
    /// input and `more` is true), the oldest pending process and download.
    /// Returns (upload outcome, whether anything was issued).
    pub fn step<E, Io, P>(
        &mut self,
        io: &mut Io,
        io_slots: &mut IoSlots<Io::Slot>,
        p: &mut P,
        more: bool,
    ) -> Result<(Option<Upload>, bool), E>
    where
        E: From<Error>,
        Io: ChunkIo<T, Error = E>,
        P: ChunkProcessor<T, Error = E>,
    {
        let mut issued = false;
        let up = if more {
            let u = self.upload(io, io_slots)?;
            issued |= matches!(u, Upload::Issued(..));
            Some(u)
        } else {
            None
        };
        issued |= self.process(p)?.is_some();
        issued |= self.download(io, io_slots)?.is_some();
        Ok((up, issued))
    }

    /// Streams every chunk `io` gives through `p` until `io` is exhausted and
    /// every chunk retired, counting chunks from 0. On error, in-flight work
    /// drains ([`abandon`](Self::abandon)) before the error returns.
    pub fn run<E, Io, P>(
        &mut self,
        io: &mut Io,
        io_slots: &mut IoSlots<Io::Slot>,
        p: &mut P,
        spans: &mut dyn FnMut(ChunkSpan),
    ) -> Result<RunCounts, E>
    where
        E: From<Error>,
        Io: ChunkIo<T, Error = E>,
        P: ChunkProcessor<T, Error = E>,
    {
        self.restart()?;
        // A panic out of the I/O or the processor (user code) must not leave
        // chunks in flight for ever: drain, then let it go on.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.drive(io, io_slots, p, spans)
        }));
        match result {
            Ok(Ok(counts)) => Ok(counts),
            Ok(Err(e)) => {
                self.abandon();
                Err(e)
            }
            Err(payload) => {
                self.abandon();
                std::panic::resume_unwind(payload)
            }
        }
    }

    fn drive<E, Io, P>(
        &mut self,
        io: &mut Io,
        io_slots: &mut IoSlots<Io::Slot>,
        p: &mut P,
        spans: &mut dyn FnMut(ChunkSpan),
    ) -> Result<RunCounts, E>
    where
        E: From<Error>,
        Io: ChunkIo<T, Error = E>,
        P: ChunkProcessor<T, Error = E>,
    {
        let mut counts = RunCounts::default();
        let mut exhausted = false;
        loop {
            let (up, mut progressed) = self.step(io, io_slots, p, !exhausted)?;
            if up == Some(Upload::Exhausted) {
                exhausted = true;
            }
            if let Some(Upload::Issued(_, len)) = up {
                counts.elems_in += len as u64;
            }
            while let Some((_, len)) = self.retire(io, io_slots, spans)? {
                counts.chunks += 1;
                counts.elems_out += len as u64;
                progressed = true;
            }
            if exhausted && self.ring.is_idle() {
                return Ok(counts);
            }
            if !progressed {
                let t = std::time::Instant::now();
                self.wait_oldest()?;
                counts.wait_ms += t.elapsed().as_secs_f64() * 1e3;
            }
        }
    }
}

/// The end fence of a step queued on `lane`: `fence` itself when it is of
/// that lane (the ring settles a lane's steps by its stream order), else a
/// fresh one (an I/O that queued its work elsewhere).
fn own_fence(lane: &mut Lane, fence: GpuFence) -> Result<GpuFence, Error> {
    if fence.stream() == lane.stream_id() {
        Ok(fence)
    } else {
        Ok(lane.fence()?)
    }
}

/// The union of time intervals, kept bounded: intervals that end before a
/// point no later interval can start before are folded into a total.
#[derive(Debug, Default, Clone)]
pub(crate) struct BusyUnion {
    /// Disjoint intervals, sorted by start, not yet settled.
    open: Vec<(f64, f64)>,
    settled: f64,
}

impl BusyUnion {
    /// Adds the interval `start..end` (ms) to the union.
    pub fn add(&mut self, start: f64, end: f64) {
        let (mut s, mut e) = (start, end.max(start));
        self.open.retain(|&(os, oe)| {
            if os <= e && s <= oe {
                s = s.min(os);
                e = e.max(oe);
                false
            } else {
                true
            }
        });
        let at = self.open.partition_point(|&(os, _)| os < s);
        self.open.insert(at, (s, e));
    }

    /// Folds the intervals that end at or before `low` into the total: the
    /// caller promises that no interval added later starts before `low`.
    pub fn settle_before(&mut self, low: f64) {
        let keep = self.open.partition_point(|&(_, oe)| oe <= low);
        self.settled += self.open.drain(..keep).map(|(s, e)| e - s).sum::<f64>();
    }

    /// Open intervals held (the tests' check that it stays bounded).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.open.len()
    }

    /// Total ms covered by the intervals added.
    pub fn total(&self) -> f64 {
        self.settled + self.open.iter().map(|(s, e)| e - s).sum::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::BusyUnion;

    #[test]
    fn union_counts_overlaps_once() {
        let mut u = BusyUnion::default();
        for (s, e) in [(5.0, 7.0), (0.0, 2.0), (1.0, 3.0), (3.0, 4.0), (6.0, 6.5)] {
            u.add(s, e);
        }
        assert_eq!(u.total(), 3.0 + 1.0 + 2.0);
        assert_eq!(BusyUnion::default().total(), 0.0);
    }

    #[test]
    fn settled_union_stays_small_and_exact() {
        let mut u = BusyUnion::default();
        for k in 0..1_000_000u32 {
            let s = f64::from(k) * 0.5;
            u.add(s, s + 1.0);
            if k >= 4 {
                u.settle_before(f64::from(k - 4) * 0.5);
            }
            assert!(u.held() <= 8, "{} intervals held", u.held());
        }
        let exact = 999_999.0 * 0.5 + 1.0;
        assert!((u.total() - exact).abs() < 1e-6, "{} vs {exact}", u.total());
    }

    #[test]
    fn disjoint_intervals_settle_into_the_total() {
        let mut u = BusyUnion::default();
        for k in 0..10_000u32 {
            let s = f64::from(k) * 2.0;
            u.add(s, s + 1.0);
            u.settle_before(s - 4.0);
            assert!(u.held() <= 4);
        }
        assert!((u.total() - 10_000.0).abs() < 1e-9);
    }
}
