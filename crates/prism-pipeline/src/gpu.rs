//! The GPU backend: a ring of slots (two device buffers each, for stages
//! that read one and write the other), three streams, and a [`SlotRing`]
//! whose states follow the CUDA events recorded at the end of every step.
//!
//! The host issues upload, stages and download of different chunks without
//! waiting between them: every buffer's use tracking makes the GPU order
//! them. The host blocks only when every slot is in flight, on the oldest
//! chunk's download event.

use std::sync::Arc;

use prism_buffer::{SlotRing, Step};
use prism_stream::cudarc::driver::CudaStream;
use prism_stream::{
    DeviceBuffer, Element, Fence, Gpu, Launch, PinnedBuffer, Probe, StreamPool, StreamPurpose,
    WaitClock,
};

use crate::error::{Error, Result};
use crate::stage::Stage;
use crate::stats::{Lane, PipelineStats, Span, Timeline};

pub(crate) const UP: usize = 0;
pub(crate) const COMPUTE: usize = 1;
/// A second compute stream: chunks alternate between the two, so one chunk's
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
}

/// What an I/O mode gets to queue a copy.
pub(crate) struct CopyCx<'a> {
    pub(crate) gpu: &'a Gpu,
    pub(crate) stream: &'a Arc<CudaStream>,
    pub(crate) clock: &'a mut WaitClock,
    pub(crate) timed: bool,
}

/// Where chunks come from and go to.
pub(crate) trait Io<T: Element> {
    /// Queues the upload of chunk `chunk` into `dev`; `Ok(None)` once the input is exhausted.
    fn upload(
        &mut self,
        cx: CopyCx<'_>,
        io: &mut SlotIo<T>,
        dev: &mut DeviceBuffer<T>,
        chunk: u64,
    ) -> Result<Option<(usize, Option<Fence>, Fence)>>;
    /// Queues the download of `dev[..out_len]`.
    fn download(
        &mut self,
        cx: CopyCx<'_>,
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

struct TimedStep {
    chunk: u64,
    /// Index into the engine's streams.
    stream: usize,
    lane: Lane,
    name: String,
    start: Fence,
    end: Fence,
}

#[derive(Debug)]
pub(crate) struct GpuEngine<T: Element> {
    pub(crate) gpu: Gpu,
    /// Upload, compute, download, second compute.
    streams: [Arc<CudaStream>; 4],
    clocks: [WaitClock; 4],
    slots: Vec<Slot<T>>,
    /// Elements per device buffer.
    capacity: usize,
    _pool: StreamPool,
}

impl<T: Element> GpuEngine<T> {
    pub(crate) fn new(gpu: &Gpu, slots: usize, capacity: usize) -> Result<Self> {
        let _span = tracing::debug_span!("prism.pipeline.gpu_engine", slots, capacity).entered();
        // One upload, two compute (alternating per chunk), one download stream;
        // counts must be at least 1, so one auxiliary stream exists and stays idle.
        let pool = StreamPool::with_counts(gpu, [1, 2, 1, 1])?;
        let (up, c1, c2, down) = (
            pool.acquire(StreamPurpose::Upload),
            pool.acquire(StreamPurpose::Compute),
            pool.acquire(StreamPurpose::Compute),
            pool.acquire(StreamPurpose::Download),
        );
        let streams = [
            Arc::clone(up.cuda_stream()),
            Arc::clone(c1.cuda_stream()),
            Arc::clone(down.cuda_stream()),
            Arc::clone(c2.cuda_stream()),
        ];
        let slots = (0..slots)
            .map(|_| {
                Ok(Slot {
                    a: DeviceBuffer::new(gpu, capacity)?,
                    b: DeviceBuffer::new(gpu, capacity)?,
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
                })
            })
            .collect::<Result<Vec<_>, prism_stream::Error>>()?;
        Ok(Self {
            gpu: gpu.clone(),
            streams,
            clocks: Default::default(),
            slots,
            capacity,
            _pool: pool,
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
        let origin = if timed {
            Some(self.gpu.timed_fence(&self.streams[UP])?)
        } else {
            None
        };
        let mut steps = Vec::new();
        let result = self.drive(stages, order, io, timed, &mut steps);
        if result.is_err() {
            // Let in-flight work drain so buffers and the next run start clean.
            for s in &self.streams {
                let _ = s.synchronize();
            }
            return result;
        }
        if let Some(origin) = origin {
            let mut spans = Vec::with_capacity(steps.len());
            let mut compute: Vec<(f64, f64)> = Vec::new();
            for s in steps {
                if let Probe::Failed(reason) = s.end.synchronize() {
                    return Err(prism_stream::Error::ContextPoisoned { reason }.into());
                }
                let start_ms = f64::from(s.start.elapsed_ms_since(&origin)?);
                let end_ms = f64::from(s.end.elapsed_ms_since(&origin)?);
                let ms = end_ms - start_ms;
                match s.lane {
                    Lane::Upload => stats.upload_ms += ms,
                    Lane::Download => stats.download_ms += ms,
                    Lane::Compute => {
                        stats.add_stage_time(&s.name, ms);
                        compute.push((start_ms, end_ms));
                    }
                }
                spans.push(Span {
                    chunk: s.chunk,
                    stream: s.stream,
                    lane: s.lane,
                    name: s.name,
                    start_ms,
                    end_ms,
                });
            }
            stats.compute_busy_ms += union_ms(&mut compute);
            if let Some(t) = timeline {
                t.spans = spans;
            }
        }
        result
    }

    fn drive(
        &mut self,
        stages: &mut [Box<dyn Stage<T>>],
        order: &[usize],
        io: &mut dyn Io<T>,
        timed: bool,
        steps: &mut Vec<TimedStep>,
    ) -> Result<RunCounts> {
        let mut ring: SlotRing<Fence> = SlotRing::new(self.slots.len())?;
        let mut counts = RunCounts::default();
        let mut exhausted = false;
        loop {
            let mut progressed = false;
            if !exhausted {
                if let Some((slot, chunk)) = ring.next(Step::Upload) {
                    let s = &mut self.slots[slot.0];
                    let cx = CopyCx {
                        gpu: &self.gpu,
                        stream: &self.streams[UP],
                        clock: &mut self.clocks[UP],
                        timed,
                    };
                    match io.upload(cx, &mut s.io, &mut s.a, chunk.0)? {
                        None => exhausted = true,
                        Some((len, start, end)) => {
                            s.in_len = len;
                            counts.elems_in += len as u64;
                            if let Some(start) = start {
                                steps.push(TimedStep {
                                    chunk: chunk.0,
                                    stream: UP,
                                    lane: Lane::Upload,
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
                let fence = self.process(slot.0, chunk.0, stages, order, timed, steps)?;
                counts.elems_out += self.slots[slot.0].out_len as u64;
                ring.issue(Step::Process, slot, fence)?;
                progressed = true;
            }
            if let Some((slot, chunk)) = ring.next(Step::Download) {
                let s = &mut self.slots[slot.0];
                let dev = if s.out_in_a { &s.a } else { &s.b };
                let cx = CopyCx {
                    gpu: &self.gpu,
                    stream: &self.streams[DOWN],
                    clock: &mut self.clocks[DOWN],
                    timed,
                };
                let (start, end) = io.download(cx, &mut s.io, dev, s.out_len)?;
                if let Some(start) = start {
                    steps.push(TimedStep {
                        chunk: chunk.0,
                        stream: DOWN,
                        lane: Lane::Download,
                        name: "download".into(),
                        start,
                        end: end.clone(),
                    });
                }
                ring.issue(Step::Download, slot, end)?;
                progressed = true;
            }
            ring.poll()?;
            while let Some((slot, _)) = ring.completed() {
                let s = &mut self.slots[slot.0];
                io.retire(&mut s.io, s.out_len)?;
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
        steps: &mut Vec<TimedStep>,
    ) -> Result<Fence> {
        let which = if chunk.is_multiple_of(2) {
            COMPUTE
        } else {
            COMPUTE2
        };
        let stream = &self.streams[which];
        let s = &mut self.slots[slot];
        let mut launch =
            Launch::with_clock(&self.gpu, stream, std::mem::take(&mut self.clocks[which]));
        let (mut len, mut in_a) = (s.in_len, true);
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
            // Order both buffers first, so a timed start excludes waiting.
            launch.reads(input)?;
            launch.writes(output)?;
            let start = if timed {
                Some(self.gpu.timed_fence(stream)?)
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
                let end = self.gpu.timed_fence(stream)?;
                steps.push(TimedStep {
                    chunk,
                    stream: which,
                    lane: Lane::Compute,
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
        let fence = self.gpu.fence_after(stream, launch.clock(), false)?;
        self.clocks[which] = launch.finish(&fence);
        Ok(fence)
    }
}

/// Total length of the union of `[start, end]` intervals.
fn union_ms(intervals: &mut [(f64, f64)]) -> f64 {
    intervals.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut current: Option<(f64, f64)> = None;
    for &(s, e) in intervals.iter() {
        current = match current {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    total + current.map_or(0.0, |(s, e)| e - s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn union_counts_overlaps_once() {
        let mut v = vec![(5.0, 7.0), (0.0, 2.0), (1.0, 3.0), (3.0, 4.0), (6.0, 6.5)];
        assert_eq!(super::union_ms(&mut v), 3.0 + 1.0 + 2.0);
        assert_eq!(super::union_ms(&mut []), 0.0);
    }
}
