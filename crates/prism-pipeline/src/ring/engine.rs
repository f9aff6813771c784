//! The one driver of the ring engine: a run's chunks through one GPU
//! ([`GpuRun`], [`Driver`]), on every device of a run at once ([`drive`])
//! or on one device on the calling thread ([`drive_one`]).

use prism_buffer::engine::{ChunkSpan, IoSlots, RunCounts};
use prism_buffer::{ChunkIo, ChunkProcessor, Engine};
use prism_stream::nvtx::Range;
use prism_stream::Element;

use super::sched::{first_failure, on_devices, FailOrder};
use crate::copy::CopyPool;
use crate::error::{Error, Result};
use crate::gpu::{record_span, GlobalIndex, StageChain, StagingCache};
use crate::stage::AnyStage;
use crate::stats::{PipelineStats, Span, SpanKind, Timeline};
use crate::PipelineStageManager;

/// Everything one GPU run needs, borrowed from the manager field by field.
pub(crate) struct GpuRun<'a, T: Element> {
    pub(crate) engine: &'a mut Engine<T>,
    pub(crate) stages: &'a mut [Box<dyn AnyStage<T>>],
    pub(crate) order: &'a [usize],
    pub(crate) capacity: usize,
    pub(crate) timing: bool,
    pub(crate) trace: bool,
    pub(crate) stats: &'a mut PipelineStats,
    pub(crate) timeline: &'a mut Timeline,
    /// The host threads (their staging copies go into the trace).
    pub(crate) pool: &'a CopyPool,
    /// A multi-GPU run's numbering of this GPU's chunks.
    pub(crate) global: Option<&'a GlobalIndex>,
    /// Captured stage chains, when `PipelineConfig::graphs` is on.
    pub(crate) graphs: Option<&'a mut crate::gpu::ChainGraphs>,
}

impl<T: Element> GpuRun<'_, T> {
    /// Streams every chunk of `io` through the engine; returns the counts
    /// and the slot states (for their staging to be recycled).
    pub(crate) fn drive<Io: ChunkIo<T, Error = Error>>(
        self,
        io: &mut Io,
    ) -> (Result<RunCounts>, IoSlots<Io::Slot>) {
        let counts_before = self.graphs.as_deref().map(|g| g.counts());
        let mut chain = StageChain {
            stages: self.stages,
            order: self.order,
            capacity: self.capacity,
            base: 0,
            global: self.global,
            graphs: self.graphs,
        };
        let mut driver = Driver {
            engine: self.engine,
            timing: self.timing,
            trace: self.trace,
            stats: self.stats,
            timeline: self.timeline,
            pool: self.pool,
            global: self.global,
        };
        let (result, slots) = driver.drive(io, &mut chain);
        if result.is_ok() {
            if let (Some((l0, c0)), Some(g)) = (counts_before, chain.graphs.as_deref()) {
                let (l1, c1) = g.counts();
                driver.stats.graph_launches += l1 - l0;
                driver.stats.graph_captures += c1 - c0;
            }
        }
        (result, slots)
    }
}

/// The engine of a GPU run and where its times go: drives any processor
/// (a stage chain, a stage graph) over any I/O.
pub(crate) struct Driver<'a, T: Element> {
    pub(crate) engine: &'a mut Engine<T>,
    pub(crate) timing: bool,
    pub(crate) trace: bool,
    pub(crate) stats: &'a mut PipelineStats,
    pub(crate) timeline: &'a mut Timeline,
    pub(crate) pool: &'a CopyPool,
    pub(crate) global: Option<&'a GlobalIndex>,
}

impl<T: Element> Driver<'_, T> {
    /// Streams every chunk of `io` through `p`; returns the counts and the
    /// slot states. A run's step times go into the stats only if it succeeds.
    pub(crate) fn drive<Io, P>(
        &mut self,
        io: &mut Io,
        p: &mut P,
    ) -> (Result<RunCounts>, IoSlots<Io::Slot>)
    where
        Io: ChunkIo<T, Error = Error>,
        P: ChunkProcessor<T, Error = Error>,
    {
        let mut slots = IoSlots::new(self.engine.slot_count());
        if self.timing {
            if let Err(e) = self.engine.start_timing() {
                return (Err(e.into()), slots);
            }
        }
        let mut fresh = Timeline {
            device: self.engine.gpu().info().name.clone(),
            ..Timeline::default()
        };
        let (trace, global) = (self.trace, self.global);
        self.pool.record(trace);
        // This run's step times, added to the stats only if it succeeds (a
        // failed run adds nothing, as it adds no wall time).
        let mut steps = PipelineStats::default();
        let result = {
            let mut spans = |mut s: ChunkSpan| {
                s.chunk.0 = GlobalIndex::or(global, s.chunk, 0);
                let tl = if trace { Some(&mut fresh) } else { None };
                record_span(&mut steps, tl, s);
            };
            self.engine.run(io, &mut slots, p, &mut spans)
        };
        let copies = self.pool.take_spans();
        if trace {
            add_host_spans(&mut fresh, self.engine, copies, global);
            fresh.origin = self.engine.host_origin();
        }
        let busy = if self.timing {
            self.engine.stop_timing()
        } else {
            0.0
        };
        if let Ok(c) = &result {
            let stats = &mut *self.stats;
            stats.upload_ms += steps.upload_ms;
            stats.download_ms += steps.download_ms;
            for st in &steps.stages {
                stats.add_stage_time(&st.name, st.ms);
            }
            stats.compute_busy_ms += busy;
            stats.host_wait_ms += c.wait_ms;
        }
        if trace && result.is_ok() {
            *self.timeline = fresh;
        }
        (result, slots)
    }
}

/// The host's staging copies and waits as spans on the GPU spans' clock.
fn add_host_spans<T: Element>(
    timeline: &mut Timeline,
    engine: &mut Engine<T>,
    copies: Vec<(u64, &'static str, std::time::Instant, std::time::Instant)>,
    global: Option<&GlobalIndex>,
) {
    let Some(origin) = engine.host_origin() else {
        return;
    };
    let ms = |i: std::time::Instant| i.saturating_duration_since(origin).as_secs_f64() * 1e3;
    for (chunk, what, start, end) in copies {
        timeline.spans.push(Span {
            chunk,
            stream: 4,
            lane: SpanKind::HostCopy,
            name: what.to_owned(),
            start_ms: ms(start),
            end_ms: ms(end),
        });
    }
    for (chunk, start_ms, end_ms) in engine.take_waits() {
        timeline.spans.push(Span {
            chunk: GlobalIndex::or(global, chunk, 0),
            stream: 5,
            lane: SpanKind::HostWait,
            name: "wait for the GPU".to_owned(),
            start_ms,
            end_ms,
        });
    }
}

impl<T: Element> PipelineStageManager<T> {
    /// Borrows what a GPU run needs.
    pub(crate) fn gpu_parts<'a>(
        &'a mut self,
        order: &'a [usize],
    ) -> Result<(GpuRun<'a, T>, &'a mut StagingCache<T>, &'a CopyPool)> {
        let capacity = self.capacity(order)?;
        let timing = self.config.timing;
        let trace = self.config.trace && timing;
        let graphs_on = self.config.graphs;
        let engine = self.engine.as_mut().ok_or(Error::Config("no GPU engine"))?;
        Ok((
            GpuRun {
                engine,
                stages: &mut self.stages,
                order,
                capacity,
                timing,
                trace,
                stats: &mut self.stats,
                timeline: &mut self.timeline,
                pool: &self.copy_pool,
                global: None,
                graphs: graphs_on.then_some(&mut self.graphs),
            },
            &mut self.cache,
            &self.copy_pool,
        ))
    }
    /// Borrows what a GPU graph run needs.
    pub(crate) fn graph_parts(&mut self) -> Result<GraphParts<'_, T>> {
        let timing = self.config.timing;
        let trace = self.config.trace && timing;
        let engine = self.engine.as_mut().ok_or(Error::Config("no GPU engine"))?;
        Ok(GraphParts {
            driver: Driver {
                engine,
                timing,
                trace,
                stats: &mut self.stats,
                timeline: &mut self.timeline,
                pool: &self.copy_pool,
                global: None,
            },
            cache: &mut self.cache,
            pool: &self.copy_pool,
            branches: &mut self.branch_lanes,
        })
    }
}

/// What a GPU graph run borrows from its manager.
pub(crate) struct GraphParts<'a, T: Element> {
    pub(crate) driver: Driver<'a, T>,
    pub(crate) cache: &'a mut StagingCache<T>,
    pub(crate) pool: &'a CopyPool,
    /// The branch lanes of the graph's processor (kept between runs).
    pub(crate) branches: &'a mut crate::dag::BranchLanes,
}

/// A run that failed: on which device (`None`: before any device
/// started), the error, and the oldest chunk (the run's number) that
/// device had in flight, for errors that name none.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) device: Option<usize>,
    pub(crate) error: Error,
    pub(crate) oldest: Option<u64>,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Self {
            device: None,
            error,
            oldest: None,
        }
    }
}

impl Failure {
    /// The error as a single GPU reports it (not wrapped: only a
    /// `MultiGpuPipeline` names the device).
    pub(crate) fn into_error(self) -> Error {
        self.error
    }
}

/// What a driven run returns: every device's result, or the failure.
pub(crate) type Driven<R> = std::result::Result<R, Failure>;

/// The work of one device for one run: the device's index, its manager,
/// and its numbering of the run's chunks.
pub(crate) type DeviceWork<'w, T, R> =
    dyn Fn(usize, &mut PipelineStageManager<T>, &GlobalIndex) -> Result<R> + 'w;

/// The devices of a run: a manager's own GPU ([`one`](Self::one)), or a
/// `MultiGpuPipeline`'s ([`multi`](Self::multi)), whose work on each GPU
/// is a tracing span and an NVTX range `multi.gpu {i}`.
pub(crate) struct Devices<'d, T: Element> {
    pub(crate) list: &'d mut [PipelineStageManager<T>],
    multi: bool,
}

impl<'d, T: Element> Devices<'d, T> {
    /// One manager's GPU: the multi-device engine with one device.
    pub(crate) fn one(device: &'d mut PipelineStageManager<T>) -> Self {
        Self {
            list: std::slice::from_mut(device),
            multi: false,
        }
    }

    /// A `MultiGpuPipeline`'s GPUs.
    pub(crate) fn multi(list: &'d mut [PipelineStageManager<T>]) -> Self {
        Self { list, multi: true }
    }

    /// The first device (every device runs the same stages and chunk size).
    pub(crate) fn first(&self) -> Result<&PipelineStageManager<T>> {
        self.list.first().ok_or(Error::Config("a run needs a GPU"))
    }
}

/// [`DeviceWork`] that several threads may call at once.
pub(crate) type SyncWork<'w, T, R> =
    dyn Fn(usize, &mut PipelineStageManager<T>, &GlobalIndex) -> Result<R> + Sync + 'w;

/// Runs `work` on device `i` with a fresh numbering of its chunks; an
/// error comes back with the oldest chunk it had in flight.
fn on_device<T: Element, R>(
    i: usize,
    d: &mut PipelineStageManager<T>,
    work: &DeviceWork<'_, T, R>,
) -> std::result::Result<R, (Error, Option<u64>)> {
    let global = GlobalIndex::default();
    work(i, d, &global).map_err(|e| (e, global.oldest()))
}

/// Runs `work` on every device at once, the first on this thread (one
/// device: this thread alone); `stop` ends the run for all when one
/// fails. Returns each device's result, or the first failure (in time).
pub(crate) fn drive<T: Element, R: Send>(
    devices: Devices<'_, T>,
    stop: &(dyn Fn() + Sync),
    work: &SyncWork<'_, T, R>,
) -> Driven<Vec<R>> {
    let failed = FailOrder::default();
    let multi = devices.multi;
    let results = on_devices(devices.list, stop, &|i, d| {
        let _span = multi.then(|| tracing::debug_span!("prism.multi.gpu", gpu = i).entered());
        let _nvtx = multi.then(|| Range::fmt(format_args!("multi.gpu {i}")));
        let r = on_device(i, d, work);
        if r.is_err() {
            failed.push(i);
        }
        r
    });
    first_failure(results, &failed.take()).map_err(|(i, (error, oldest))| Failure {
        device: Some(i),
        error,
        oldest,
    })
}

/// [`drive`] for one device on this thread, for work that is not `Sync`
/// (a stream whose source or sink is not `Send`).
pub(crate) fn drive_one<T: Element, R>(
    device: &mut PipelineStageManager<T>,
    work: &DeviceWork<'_, T, R>,
) -> Driven<R> {
    on_device(0, device, work).map_err(|(error, oldest)| Failure {
        device: Some(0),
        error,
        oldest,
    })
}
