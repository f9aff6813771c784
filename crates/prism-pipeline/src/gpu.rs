//! The GPU backend: a ring of slots (two device buffers each, for stages
//! that read one and write the other), four lanes, and a [`SlotRing`] whose
//! states follow the CUDA events recorded at the end of every step.
//!
//! The host issues upload, stages and download of different chunks without
//! waiting between them: the lanes order every buffer's uses on the GPU.
//! The host blocks only when every slot is in flight, on the oldest chunk's
//! download event. With timing on, a chunk's timed fences are turned into
//! times when it retires, so a run holds events for the chunks in flight only.

use std::collections::VecDeque;

use prism_buffer::{SlotRing, Step};
use prism_stream::{DeviceBuffer, Element, Fence, Gpu, Lane, PinnedBuffer, Probe, StreamPurpose};

use crate::error::{Error, Result};
use crate::stage::Stage;
use crate::stats::{BusyUnion, Lane as SpanLane, PipelineStats, Span, Timeline};

pub(crate) const UP: usize = 0;
pub(crate) const COMPUTE: usize = 1;
/// A second compute lane: chunks alternate between the two, so one chunk's
/// kernels can fill the SMs another leaves idle at its tail.
pub(crate) const COMPUTE2: usize = 3;
pub(crate) const DOWN: usize = 2;

/// Pinned staging and item bookkeeping of one slot, for the I/O modes that need them.
#[derive(Debug)]
pub(crate) struct SlotIo<T: Element> {
    pub(crate) staging_in: Option<PinnedBuffer<T>>,
    pub(crate) staging_out: Option<PinnedBuffer<T>>,
    /// (item index, offset, length) of the items batched in this slot's chunk.
    pub(crate) items: Vec<(usize, usize, usize)>,
    /// Zero-copy gather/scatter descriptors (pinned items).
    pub(crate) desc_in: Option<PinnedBuffer<u64>>,
    pub(crate) desc_out: Option<PinnedBuffer<u64>>,
}

#[derive(Debug)]
struct Slot<T: Element> {
    a: DeviceBuffer<T>,
    b: DeviceBuffer<T>,
    io: SlotIo<T>,
    in_len: usize,
    out_len: usize,
    out_in_a: bool,
    /// Timed fences of the chunk in this slot, resolved when it retires.
    timed: Vec<TimedStep>,
}

/// Where chunks come from and go to. Copies go through the lane they are
/// given; `timed` asks for a timed start fence and a timed end fence.
pub(crate) trait Io<T: Element> {
    /// Queues the upload of chunk `chunk` into `dev`; `Ok(None)` once the input is exhausted.
    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        io: &mut SlotIo<T>,
        dev: &mut DeviceBuffer<T>,
        chunk: u64,
    ) -> Result<Option<(usize, Option<Fence>, Fence)>>;
    /// Queues the download of `dev[..out_len]`.
    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        io: &mut SlotIo<T>,
        dev: &DeviceBuffer<T>,
        out_len: usize,
    ) -> Result<(Option<Fence>, Fence)>;
    /// The chunk's download completed: deliver its output.
    fn retire(&mut self, io: &mut SlotIo<T>, out_len: usize) -> Result<()>;
}

/// Counts of one run.
#[derive(Debug, Default)]
pub(crate) struct RunCounts {
    pub(crate) chunks: u64,
    pub(crate) elems_in: u64,
    pub(crate) elems_out: u64,
}

#[derive(Debug)]
struct TimedStep {
    /// Index of the engine lane it ran on.
    lane: usize,
    kind: SpanLane,
    name: String,
    start: Fence,
    end: Fence,
}

/// What a timed run accumulates as chunks retire.
struct RunTiming<'t> {
    origin: Fence,
    stats: &'t mut PipelineStats,
    timeline: Option<&'t mut Timeline>,
    busy: BusyUnion,
    /// Compute end of the last `slots` retired chunks (see `retire_timing`).
    recent_ends: VecDeque<f64>,
}

#[derive(Debug)]
pub(crate) struct GpuEngine<T: Element> {
    pub(crate) gpu: Gpu,
    /// Upload, compute, download, second compute.
    lanes: [Lane; 4],
    slots: Vec<Slot<T>>,
    /// Elements per device buffer.
    capacity: usize,
}

impl<T: Element> GpuEngine<T> {
    pub(crate) fn new(gpu: &Gpu, slots: usize, capacity: usize) -> Result<Self> {
        let _span = tracing::debug_span!("prism.pipeline.gpu_engine", slots, capacity).entered();
        let mut lanes = [
            Lane::with_purpose(gpu, StreamPurpose::Upload)?,
            Lane::with_purpose(gpu, StreamPurpose::Compute)?,
            Lane::with_purpose(gpu, StreamPurpose::Download)?,
            Lane::with_purpose(gpu, StreamPurpose::Compute)?,
        ];
        let slots = (0..slots)
            .map(|_| {
                Ok(Slot {
                    a: DeviceBuffer::zeroed(&mut lanes[UP], capacity)?,
                    b: DeviceBuffer::zeroed(&mut lanes[UP], capacity)?,
                    io: SlotIo {
                        staging_in: None,
                        staging_out: None,
                        items: Vec::new(),
                        desc_in: None,
                        desc_out: None,
                    },
                    in_len: 0,
                    out_len: 0,
                    out_in_a: true,
                    timed: Vec::new(),
                })
            })
            .collect::<Result<Vec<_>, prism_stream::Error>>()?;
        Ok(Self {
            gpu: gpu.clone(),
            lanes,
            slots,
            capacity,
        })
    }

    pub(crate) fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Streams every chunk `io` gives through `order`'s stages.
    pub(crate) fn run(
        &mut self,
        stages: &mut [Box<dyn Stage<T>>],
        order: &[usize],
        io: &mut dyn Io<T>,
        timed: bool,
        stats: &mut PipelineStats,
        timeline: Option<&mut Timeline>,
    ) -> Result<RunCounts> {
        let mut timing = if timed {
            Some(RunTiming {
                origin: self.lanes[UP].timed_fence()?,
                stats,
                timeline,
                busy: BusyUnion::default(),
                recent_ends: VecDeque::new(),
            })
        } else {
            None
        };
        if let Some(t) = timing.as_mut().and_then(|t| t.timeline.as_deref_mut()) {
            t.spans.clear();
        }
        let result = self.drive(stages, order, io, timed, &mut timing);
        for s in &mut self.slots {
            s.timed.clear();
        }
        if result.is_err() {
            // Let in-flight work drain so buffers and the next run start clean.
            for lane in &self.lanes {
                let _ = lane.synchronize();
            }
            return result;
        }
        if let Some(t) = timing {
            t.stats.compute_busy_ms += t.busy.total();
        }
        result
    }

    fn drive(
        &mut self,
        stages: &mut [Box<dyn Stage<T>>],
        order: &[usize],
        io: &mut dyn Io<T>,
        timed: bool,
        timing: &mut Option<RunTiming<'_>>,
    ) -> Result<RunCounts> {
        let mut ring: SlotRing<Fence> = SlotRing::new(self.slots.len())?;
        let mut counts = RunCounts::default();
        let mut exhausted = false;
        loop {
            let mut progressed = false;
            if !exhausted {
                if let Some((slot, chunk)) = ring.next(Step::Upload) {
                    let s = &mut self.slots[slot.0];
                    match io.upload(&mut self.lanes[UP], timed, &mut s.io, &mut s.a, chunk.0)? {
                        None => exhausted = true,
                        Some((len, start, end)) => {
                            s.in_len = len;
                            counts.elems_in += len as u64;
                            if let Some(start) = start {
                                s.timed.push(TimedStep {
                                    lane: UP,
                                    kind: SpanLane::Upload,
                                    name: "upload".into(),
                                    start,
                                    end: end.clone(),
                                });
                            }
                            ring.issue(Step::Upload, slot, end)?;
                            progressed = true;
                        }
                    }
                }
            }
            if let Some((slot, chunk)) = ring.next(Step::Process) {
                let fence = self.process(slot.0, chunk.0, stages, order, timed)?;
                counts.elems_out += self.slots[slot.0].out_len as u64;
                ring.issue(Step::Process, slot, fence)?;
                progressed = true;
            }
            if let Some((slot, _)) = ring.next(Step::Download) {
                let s = &mut self.slots[slot.0];
                let dev = if s.out_in_a { &s.a } else { &s.b };
                let (start, end) =
                    io.download(&mut self.lanes[DOWN], timed, &mut s.io, dev, s.out_len)?;
                if let Some(start) = start {
                    s.timed.push(TimedStep {
                        lane: DOWN,
                        kind: SpanLane::Download,
                        name: "download".into(),
                        start,
                        end: end.clone(),
                    });
                }
                ring.issue(Step::Download, slot, end)?;
                progressed = true;
            }
            ring.poll()?;
            let n_slots = self.slots.len();
            while let Some((slot, chunk)) = ring.completed() {
                let s = &mut self.slots[slot.0];
                io.retire(&mut s.io, s.out_len)?;
                if let Some(t) = timing.as_mut() {
                    retire_timing(t, chunk.0, &mut s.timed, n_slots)?;
                }
                ring.release(slot)?;
                counts.chunks += 1;
                progressed = true;
            }
            if exhausted && ring.is_idle() {
                return Ok(counts);
            }
            if !progressed {
                // Every slot is in flight with its download issued: wait for the oldest.
                let oldest = ring
                    .states()
                    .into_iter()
                    .filter_map(|s| s.chunk.map(|c| (c, s.slot)))
                    .min();
                if let Some(f) = oldest.and_then(|(_, slot)| ring.fence(slot, Step::Download)) {
                    if let Probe::Failed(reason) = f.synchronize() {
                        self.gpu.poison(&reason);
                        return Err(prism_stream::Error::ContextPoisoned { reason }.into());
                    }
                }
            }
        }
    }

    /// Enqueues every stage for the chunk in `slot`; returns the end fence.
    fn process(
        &mut self,
        slot: usize,
        chunk: u64,
        stages: &mut [Box<dyn Stage<T>>],
        order: &[usize],
        timed: bool,
    ) -> Result<Fence> {
        let which = if chunk.is_multiple_of(2) {
            COMPUTE
        } else {
            COMPUTE2
        };
        let s = &mut self.slots[slot];
        let own = self.lanes[which].stream_id();
        let mut launch = self.lanes[which].launch();
        let (mut len, mut in_a) = (s.in_len, true);
        let mut end_fence = None;
        for &i in order {
            let stage = &mut stages[i];
            let out_len = stage.output_len(len);
            if out_len > self.capacity {
                return Err(Error::Config(
                    "a stage produced more elements than the pipeline planned for",
                ));
            }
            let (input, output) = if in_a {
                (&s.a, &mut s.b)
            } else {
                (&s.b, &mut s.a)
            };
            let start = if timed {
                // Order both buffers first, so a timed start excludes waiting.
                launch.prepare_read(input)?;
                launch.prepare_write(output)?;
                Some(launch.timed_fence()?)
            } else {
                None
            };
            stage
                .gpu(&mut launch, input, output, len)
                .map_err(|source| Error::Stage {
                    stage: stage.name().to_owned(),
                    chunk,
                    source,
                })?;
            if let Some(start) = start {
                let end = launch.timed_fence()?;
                end_fence = Some(end.clone());
                s.timed.push(TimedStep {
                    lane: which,
                    kind: SpanLane::Compute,
                    name: stage.name().to_owned(),
                    start,
                    end,
                });
            }
            len = out_len;
            in_a = !in_a;
        }
        s.out_len = len;
        s.out_in_a = in_a;
        // The step ends after its last kernel: the last timed end fence, or
        // the last kernel's own fence. A chain that launched nothing records
        // one, and so does a stage that swapped the scope for another lane's
        // (the ring's fences must be of this lane).
        let last = end_fence
            .or_else(|| launch.last_fence().cloned())
            .filter(|f| f.stream() == own);
        drop(launch);
        match last {
            Some(f) => Ok(f),
            None => Ok(self.lanes[which].fence()?),
        }
    }
}

/// Turns a retiring chunk's timed fences into stats and spans. Its steps
/// completed (its download did, and every step is ordered before it, the
/// last stage's timed end fence included). Compute spans go into a union
/// that is settled below the earliest point a later chunk's compute can
/// start: chunk j's upload waits for every stage of chunk j - slots (they
/// all use the slot's buffers), so once the last `slots` chunks retired, no
/// later compute starts before the earliest of their compute ends.
fn retire_timing(
    t: &mut RunTiming<'_>,
    chunk: u64,
    steps: &mut Vec<TimedStep>,
    slots: usize,
) -> Result<()> {
    let mut compute_end = f64::NEG_INFINITY;
    for s in steps.drain(..) {
        if let Probe::Failed(reason) = s.end.synchronize() {
            return Err(prism_stream::Error::ContextPoisoned { reason }.into());
        }
        let start_ms = f64::from(s.start.elapsed_ms_since(&t.origin)?);
        let end_ms = f64::from(s.end.elapsed_ms_since(&t.origin)?);
        let ms = end_ms - start_ms;
        match s.kind {
            SpanLane::Upload => t.stats.upload_ms += ms,
            SpanLane::Download => t.stats.download_ms += ms,
            SpanLane::Compute => {
                t.stats.add_stage_time(&s.name, ms);
                t.busy.add(start_ms, end_ms);
                compute_end = compute_end.max(end_ms);
            }
        }
        if let Some(tl) = t.timeline.as_deref_mut() {
            tl.spans.push(Span {
                chunk,
                stream: s.lane,
                lane: s.kind,
                name: s.name,
                start_ms,
                end_ms,
            });
        }
    }
    t.recent_ends.push_back(compute_end);
    if t.recent_ends.len() > slots {
        t.recent_ends.pop_front();
    }
    if t.recent_ends.len() == slots {
        let low = t.recent_ends.iter().copied().fold(f64::INFINITY, f64::min);
        t.busy.settle_before(low);
    }
    Ok(())
}
