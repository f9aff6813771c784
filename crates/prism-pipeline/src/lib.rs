//! prism-pipeline: compose stages and stream data through them.
//!
//! A [`PipelineStageManager`] holds [`Stage`]s in an order and runs data
//! through them in chunks: on the GPU, the upload of one chunk, the stages
//! of another and the download of a third run at once on their own lanes,
//! over prism-buffer's ring [`prism_buffer::Engine`] (slot states
//! driven by CUDA events); on the host backend, the manager's host
//! threads, several chunks at once, with bounded hand-over. Output order equals input order, memory stays bounded
//! by the ring, and every run adds to [`PipelineStats`] (per-step times, the
//! bound, overlap efficiency) and, with tracing on, a [`Timeline`] that
//! exports as a Chrome trace. For Nsight Systems, every run and every
//! chunk's steps (`upload`, each stage by name, `download`, staging copies,
//! waits) are NVTX ranges in the domain `prism` ([`prism_stream::nvtx`];
//! free when no tool listens).
//!
//! Inputs:
//! - a pageable slice ([`run`](PipelineStageManager::run), staged through
//!   pinned memory by several threads) or pinned buffers
//!   ([`run_pinned`](PipelineStageManager::run_pinned), no staging);
//! - items that arrive one by one, each with its own output
//!   ([`run_items`](PipelineStageManager::run_items),
//!   [`run_items_pinned`](PipelineStageManager::run_items_pinned)), batched
//!   many per chunk;
//! - a stream of any length from a [`Source`] to a [`Sink`]
//!   ([`run_stream`](PipelineStageManager::run_stream));
//! - one chunk at a time, as the design's loop has it:
//!   [`execute_iteration`](PipelineStageManager::execute_iteration) submits
//!   a chunk and returns the outputs of chunks that finished, without
//!   waiting for its own; [`flush`](PipelineStageManager::flush) drains the
//!   rest; [`execute_iteration_blocking`](PipelineStageManager::execute_iteration_blocking)
//!   is one synchronous round trip.
//!
//! And data that stays on the GPU: a [`ResidentPipeline`] runs a few
//! stages again and again over state kept in device memory (the design's
//! iteration mode), each iteration captured once into a CUDA graph and
//! replayed, with a small read-back (a residual) per iteration that the
//! host may wait for or not. A streamed [`Stage`] may own device buffers
//! too (weights, an accumulator), found again after a run with
//! [`PipelineStageManager::stage`].
//!
//! # Modules
//!
//! | module | owns |
//! | --- | --- |
//! | `lib` | [`PipelineStageManager`], [`PipelineConfig`], [`Backend`] |
//! | `stage` | [`Stage`] and the built-in stages |
//! | `dag`, `dag_stream` | [`StageGraph`], its plan and processor; [`TaggedSource`], [`TaggedSink`] |
//! | `runs`, `graph_runs`, `iterate` | whole runs of a chain and of a graph; `execute_iteration` |
//! | `ring` | the one driver of prism-buffer's engine and every chunk I/O mode (pageable, pinned, items, streams, graphs), one GPU or several |
//! | `multi` | [`MultiGpuPipeline`] |
//! | `host` | the host backend ([`AsyncPipelineCoordinator`]) |
//! | `resident` | [`ResidentPipeline`] |
//! | `source`, `broadcast_io` | [`Source`], [`Sink`]; adapters to broadcast rings |
//! | `file` | [`FileSource`] (direct I/O, optional read-ahead thread), [`FileSink`] (direct I/O), [`read_bound`] |
//! | `stats` | [`PipelineStats`], [`Timeline`] |
//! | `gpu`, `guard`, `copy`, `plan` | the chain as a processor; user code caught as errors; host copy threads; chunk plans |
//! | `error` | [`Error`] |

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod broadcast_io;
mod copy;
mod dag;
mod dag_stream;
mod device;
mod error;
#[cfg(unix)]
pub mod file;
mod gpu;
mod graph_runs;
mod guard;
mod host;
mod iterate;
mod multi;
mod plan;
mod resident;
mod ring;
mod runs;
pub mod source;
pub mod stage;
mod stats;

use prism_buffer::Engine;
use prism_stream::{Element, Gpu, ManagedGpuContext};

pub use broadcast_io::{from_broadcast, to_broadcast, BroadcastSink, BroadcastSource};
pub use dag::{GpuJoinBody, GpuJoinFn, HostJoinFn, Join, NodeId, StageGraph};
pub use dag_stream::{tagged_sink, tagged_source, TaggedFn, TaggedSink, TaggedSource};
pub use error::{Error, Result, StageError};
#[cfg(unix)]
pub use file::{
    from_file, read_bound, to_file, DiskBound, FileError, FileOptions, FileSink, FileSource,
    FileStats, IoMode,
};
pub use host::AsyncPipelineCoordinator;
pub use multi::MultiGpuPipeline;

pub use resident::{Iteration, ResidentConfig, ResidentPipeline};
#[doc(hidden)]
pub use ring::{PinnedItemsCopy, PinnedItemsPaths};
pub use source::{
    fill_with, from_iter, from_read, sink_fn, to_write, BoxError, ChunkOutput, Sink, Source,
    StreamCounts,
};
pub use stage::{Clamp, Fma, GpuFn, GroupSum, HostFn, Stage};
pub use stats::{
    BackendKind, MultiGpuStats, PipelineStats, ResidentStats, Span, SpanKind, StageTime, Timeline,
};

use gpu::StagingCache;
use plan::ChunkPlan;

/// Which backend a manager runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// GPU 0; an error if there is none.
    Gpu,
    /// CPU threads.
    Host,
    /// GPU 0 if a driver and device are present, else the host.
    Auto,
    /// Every GPU of the host, for a [`MultiGpuPipeline`] (a
    /// `PipelineStageManager` runs on one GPU and refuses it).
    AllGpus,
}

/// Tuning of a streaming run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineConfig {
    /// Bytes of input per chunk (default 16 MiB).
    pub chunk_bytes: usize,
    /// Slots in the ring: chunks in flight at once (2..=8, default 3).
    pub slots: usize,
    /// Record timed CUDA events around every step, for the stats (default on).
    pub timing: bool,
    /// Keep the last run's spans as a [`Timeline`] (needs timing; default off).
    pub trace: bool,
    /// Host threads (a pool kept by the manager; default: every core): on
    /// the GPU they copy between pageable memory and pinned staging; on the
    /// host backend they run the stages, several chunks at once.
    pub host_threads: usize,
    /// Ramp chunk sizes at both ends of a GPU run over a slice or pinned
    /// buffer (a quarter chunk, then a half, and smaller ones at the end; see
    /// [`PipelineStageManager::chunk_plan`]; only when every stage is elementwise:
    /// chunk boundaries then do not change the output). Default on.
    pub ramp: bool,
    /// Let each GPU run of elementwise stages pick its own chunk size and
    /// ring depth (see [`PipelineConfig::auto`]); off by default, so that
    /// sizes set by hand are kept.
    pub adaptive: bool,
    /// Run each chunk's stages as a CUDA graph, captured once per slot and
    /// chunk length and replayed (less host time per chunk: it pays with
    /// many stages or small chunks). Only for stages that say they enqueue
    /// the same work for every chunk of a length ([`Stage::capturable`]:
    /// prism's `Fma`, `Clamp`, `GroupSum`); a chain with any other stage
    /// runs as usual. Whole runs only (`run`, `run_pinned`, `run_items*`,
    /// `run_stream`), not `execute_iteration`. With timing on, the stats
    /// and the trace show the chain as one span, `graph: STAGE+STAGE`.
    /// Default off.
    pub graphs: bool,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            chunk_bytes: 16 << 20,
            slots: 3,
            timing: true,
            trace: false,
            host_threads: cores.max(1),
            ramp: true,
            adaptive: false,
            graphs: false,
        }
    }
}

impl PipelineConfig {
    /// The default configuration with [`adaptive`](Self::adaptive) on: each
    /// GPU run whose stages are all elementwise (so chunk boundaries cannot
    /// change its output) uses 16 MiB chunks, or an eighth of its input
    /// when that is smaller (down to 4 MiB), and 4 slots, whatever
    /// `chunk_bytes` and `slots` say. Sweeps on an H200 (PCIe Gen5, 16
    /// cores, 2026-11-27; docs/BENCHMARKS.md) found that within 3 % of the
    /// best fixed configuration on pinned, pageable and compute-bound runs
    /// (pageable staging gains most: 0.91 to 0.97 of the host-copy bound,
    /// against 0.79 to 0.85 with 64 MiB chunks).
    ///
    /// The choice holds for that run only (the configuration itself does
    /// not change) and shows in the stats (`chunk_bytes`, `slots`,
    /// `adaptive`). Runs whose stages are not all elementwise, and
    /// `execute_iteration`, use `chunk_bytes` and `slots`. The choice is
    /// made before the run starts; it does not yet adjust from the run's
    /// own measured copy and kernel times.
    pub fn auto() -> Self {
        Self {
            adaptive: true,
            ..Self::default()
        }
    }

    /// The same with [`trace`](Self::trace) set.
    pub fn with_trace(self, trace: bool) -> Self {
        Self { trace, ..self }
    }

    /// (chunk bytes, slots) the adaptive configuration picks for a run
    /// over `total_bytes` (when known).
    pub(crate) fn choose(total_bytes: Option<usize>) -> (usize, usize) {
        const MIB: usize = 1 << 20;
        let chunk = total_bytes.map_or(16 * MIB, |t| (t / 8).clamp(4 * MIB, 16 * MIB));
        (chunk, 4)
    }
}

impl PipelineConfig {
    /// The checks every configuration passes (`new`, `with_gpu`, `set_config`).
    fn check<T>(&self) -> Result<()> {
        if !(prism_buffer::MIN_SLOTS..=prism_buffer::MAX_SLOTS).contains(&self.slots) {
            return Err(Error::Config("slots must be between 2 and 8"));
        }
        if std::mem::size_of::<T>() == 0 {
            return Err(Error::Config("elements must not be zero-sized"));
        }
        if self.chunk_bytes < std::mem::size_of::<T>() {
            return Err(Error::Config("chunk_bytes must hold at least one element"));
        }
        if !self.chunk_bytes.is_multiple_of(std::mem::size_of::<T>()) {
            return Err(Error::Config(
                "chunk_bytes must be a multiple of the element size",
            ));
        }
        if self.chunk_bytes > isize::MAX as usize {
            return Err(Error::Config(
                "chunk_bytes must be at most isize::MAX (no allocation is larger)",
            ));
        }
        if self.host_threads == 0 {
            return Err(Error::Config("host_threads must be at least 1"));
        }
        Ok(())
    }
}

/// Stages in an order, and the machinery to stream data through them.
pub struct PipelineStageManager<T: Element> {
    stages: Vec<Box<dyn stage::AnyStage<T>>>,
    /// Indices into `stages`; empty means insertion order.
    order: Vec<usize>,
    config: PipelineConfig,
    backend: BackendKind,
    gpu: Option<Gpu>,
    /// The GPU ring, reused until the chunk capacity or slot count changes.
    engine: Option<Engine<T>>,
    /// Pinned staging kept between runs.
    cache: StagingCache<T>,
    /// Stage chains captured as CUDA graphs (`PipelineConfig::graphs`);
    /// cleared whenever the stages, their order, the configuration or the
    /// ring change.
    graphs: gpu::ChainGraphs,
    /// The host threads that copy between pageable memory and staging.
    copy_pool: copy::CopyPool,
    /// An `execute_iteration` session with chunks in flight.
    iter: Option<iterate::Session<T>>,
    /// (chunk elements, slots) the adaptive configuration chose for the
    /// run in progress; `None`: the configuration's own.
    effective: Option<(usize, usize)>,
    stats: PipelineStats,
    timeline: Timeline,
    /// How `run_items_pinned` moves items (`None`: the environment's
    /// choice, else batched copies with the kernels as fallback).
    items_copy: Option<ring::PinnedItemsCopy>,
    /// What the last `run_items_pinned` really used.
    items_paths: ring::PinnedItemsPaths,
    /// Stage graphs' branch lanes, kept between runs.
    branch_lanes: dag::BranchLanes,
    /// `run_device`'s lane and scratch buffers.
    device: device::DeviceRuns<T>,
}

impl<T: Element> std::fmt::Debug for PipelineStageManager<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.stages.iter().map(|s| s.name()).collect();
        f.debug_struct("PipelineStageManager")
            .field("stages", &names)
            .field("order", &self.order)
            .field("backend", &self.backend)
            .field("config", &self.config)
            .finish()
    }
}

impl<T: Element> PipelineStageManager<T> {
    /// A manager on `backend`; `Auto` picks the GPU when one is usable.
    pub fn new(backend: Backend, config: PipelineConfig) -> Result<Self> {
        config.check::<T>()?;
        let gpu = match backend {
            Backend::Host => None,
            Backend::AllGpus => return Err(Error::Config(
                "Backend::AllGpus is for MultiGpuPipeline; a PipelineStageManager runs on one GPU",
            )),
            Backend::Gpu => Some(Gpu::open(0)?),
            Backend::Auto => match Gpu::open(0) {
                Ok(g) => Some(g),
                Err(prism_stream::Error::DriverNotFound | prism_stream::Error::NoDevice) => None,
                Err(e) => return Err(e.into()),
            },
        };
        Self::build(gpu, config)
    }

    /// A GPU manager on an open device.
    pub fn with_gpu(gpu: &Gpu, config: PipelineConfig) -> Result<Self> {
        Self::build(Some(gpu.clone()), config)
    }

    fn build(gpu: Option<Gpu>, config: PipelineConfig) -> Result<Self> {
        config.check::<T>()?;
        let copy_pool = copy::CopyPool::new(config.host_threads);
        let backend = if gpu.is_some() {
            BackendKind::Gpu
        } else {
            BackendKind::Host
        };
        let stats = PipelineStats {
            backend: Some(backend),
            device: gpu
                .as_ref()
                .map(|g| g.info().name.clone())
                .unwrap_or_default(),
            ..Default::default()
        };
        Ok(Self {
            stages: Vec::new(),
            order: Vec::new(),
            config,
            backend,
            gpu,
            engine: None,
            cache: StagingCache::default(),
            graphs: gpu::ChainGraphs::default(),
            copy_pool,
            effective: None,
            iter: None,
            stats,
            timeline: Timeline::default(),
            items_copy: None,
            items_paths: ring::PinnedItemsPaths::default(),
            branch_lanes: dag::BranchLanes::default(),
            device: device::DeviceRuns::default(),
        })
    }

    /// The GPU this manager runs on (`None` on the host backend).
    pub fn gpu(&self) -> Option<&Gpu> {
        self.gpu.as_ref()
    }

    /// The backend this manager runs on.
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// The configuration.
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// Changes the configuration (checked as `new` checks it); the GPU ring
    /// is rebuilt on the next run. `IterationPending` while
    /// `execute_iteration` chunks are in flight.
    pub fn set_config(&mut self, config: PipelineConfig) -> Result<()> {
        config.check::<T>()?;
        self.close_idle_session()?;
        if config.host_threads != self.config.host_threads {
            self.copy_pool = copy::CopyPool::new(config.host_threads);
        }
        self.config = config;
        self.graphs.clear();
        self.engine = None;
        self.cache.clear();
        Ok(())
    }

    /// Adds a stage (run after the earlier ones unless `set_order` says
    /// otherwise); returns its index. Chunks already submitted with
    /// `execute_iteration` were processed by the stages of their time.
    pub fn add_stage(&mut self, stage: impl Stage<T> + 'static) -> usize {
        self.graphs.clear();
        self.stages.push(Box::new(stage));
        self.stages.len() - 1
    }

    /// Runs only `order`'s stages, in that order. Unknown or repeated indices
    /// and an empty order are errors.
    pub fn set_order(&mut self, order: &[usize]) -> Result<()> {
        check_order(order, self.stages.len())?;
        self.graphs.clear();
        self.order = order.to_vec();
        Ok(())
    }

    /// The stage at `index` (as `add_stage` returned it), if it is an `S`:
    /// to read what a stage keeps, such as device buffers it owns (see
    /// [`Stage`]'s "Resident state"). `None` for an unknown index or another
    /// type.
    pub fn stage<S: Stage<T> + 'static>(&self, index: usize) -> Option<&S> {
        self.stages.get(index)?.as_any().downcast_ref()
    }

    /// The stage at `index`, mutably, if it is an `S`: to change its
    /// parameters or its buffers between runs (a read of its buffers needs
    /// only [`stage`](Self::stage) and a lane). `None` for an unknown index
    /// or another type.
    pub fn stage_mut<S: Stage<T> + 'static>(&mut self, index: usize) -> Option<&mut S> {
        // The stage may change what it enqueues: captured chains go.
        self.graphs.clear();
        self.stages.get_mut(index)?.as_any_mut().downcast_mut()
    }

    fn order(&self) -> Vec<usize> {
        if self.order.is_empty() {
            (0..self.stages.len()).collect()
        } else {
            self.order.clone()
        }
    }

    /// Elements the stages make from one chunk of `input_len` elements:
    /// each stage's `output_len` of the one before, and 0 once a stage
    /// makes none (a chunk that a stage empties skips the later stages and
    /// comes back empty: a stage is never called with no elements). A panic
    /// in a stage's `output_len` reaches the caller here; a run reports it
    /// as [`Error::StagePanicked`].
    pub fn output_len(&self, input_len: usize) -> usize {
        let mut len = input_len;
        for &i in &self.order() {
            if len == 0 {
                break;
            }
            len = self.stages[i].output_len(len);
        }
        len
    }

    /// [`output_len`](Self::output_len) over `order`, with a panic in a
    /// stage's `output_len` as `StagePanicked` (naming chunk `chunk`).
    fn checked_output_len(&self, order: &[usize], input_len: usize, chunk: u64) -> Result<usize> {
        self.walk_lengths(order, input_len, chunk)
            .map(|(len, _)| len)
    }

    /// The lengths through `order` from `input_len`, as a run meets them:
    /// each stage's `output_len` of the one before (a panic is
    /// `StagePanicked`, naming chunk `chunk`) until a stage makes none.
    /// Returns the last length and the largest one (the input's included).
    fn walk_lengths(
        &self,
        order: &[usize],
        input_len: usize,
        chunk: u64,
    ) -> Result<(usize, usize)> {
        let (mut len, mut largest) = (input_len, input_len);
        for &i in order {
            if len == 0 {
                break;
            }
            len = guard::output_len(&*self.stages[i], len, chunk)?;
            largest = largest.max(len);
        }
        Ok((len, largest))
    }

    fn chunk_elems(&self) -> usize {
        match self.effective {
            Some((chunk, _)) => chunk,
            None => (self.config.chunk_bytes / std::mem::size_of::<T>().max(1)).max(1),
        }
    }

    /// How a GPU run over `n` elements (a slice or pinned buffer) is cut
    /// into chunks with the current stages and configuration: each chunk's
    /// length, in order.
    pub fn chunk_plan(&self, n: usize) -> Vec<usize> {
        self.plan(&self.order(), n).collect()
    }

    pub(crate) fn plan(&self, order: &[usize], n: usize) -> ChunkPlan {
        let ramp = self.config.ramp && self.boundaries_free(order);
        ChunkPlan::new(n, self.chunk_elems(), ramp)
    }

    /// True when no stage of `order` can tell where chunks begin
    /// (elementwise, as many elements out as in): chunk sizes may then
    /// change freely (ramps, the adaptive configuration).
    fn boundaries_free(&self, order: &[usize]) -> bool {
        let c = self.chunk_elems();
        order.iter().all(|&i| {
            let s = &self.stages[i];
            s.elementwise() && guard::keeps_length(&**s, c)
        })
    }

    /// Ring depth of the run in progress.
    fn slots(&self) -> usize {
        self.effective.map_or(self.config.slots, |(_, slots)| slots)
    }

    /// What the adaptive configuration picks for a GPU run of `order` over
    /// `total_bytes`: `None` when it is off, on the host backend, or when a
    /// stage could tell where chunks begin.
    fn adaptive_choice(
        &self,
        order: &[usize],
        total_bytes: Option<usize>,
    ) -> Option<(usize, usize)> {
        if !self.config.adaptive || self.backend != BackendKind::Gpu {
            return None;
        }
        if !self.boundaries_free(order) {
            return None;
        }
        let (chunk, slots) = PipelineConfig::choose(total_bytes);
        Some(((chunk / std::mem::size_of::<T>().max(1)).max(1), slots))
    }

    /// Output elements of a whole input of `n` elements cut into chunks
    /// (saturating at `usize::MAX`, which no buffer reaches). A panic in a
    /// stage's `output_len` reaches the caller here; a run reports it as
    /// [`Error::StagePanicked`].
    pub fn total_output_len(&self, n: usize) -> usize {
        let c = self.chunk_elems();
        let (full, rest) = (n / c, n % c);
        let rest_out = if rest > 0 { self.output_len(rest) } else { 0 };
        full.saturating_mul(self.output_len(c))
            .saturating_add(rest_out)
    }

    /// [`total_output_len`](Self::total_output_len) for a run's checks: a
    /// panic in a stage's `output_len` is `StagePanicked`, a total past
    /// `usize::MAX` an error.
    fn checked_total_output_len(&self, order: &[usize], n: usize) -> Result<usize> {
        let c = self.chunk_elems();
        let (full, rest) = (n / c, n % c);
        let per_full = if full > 0 {
            self.checked_output_len(order, c, 0)?
        } else {
            0
        };
        let rest_out = if rest > 0 {
            self.checked_output_len(order, rest, full as u64)?
        } else {
            0
        };
        full.checked_mul(per_full)
            .and_then(|f| f.checked_add(rest_out))
            .ok_or(Error::Config("the stages' output length overflows usize"))
    }

    fn check_stages(&self, order: &[usize]) -> Result<()> {
        if order.is_empty() {
            return Err(Error::NoStages);
        }
        for &i in order {
            let s = &self.stages[i];
            let ok = match self.backend {
                BackendKind::Gpu => s.has_gpu(),
                BackendKind::Host => s.has_host(),
            };
            if !ok {
                return Err(Error::Unsupported {
                    stage: s.name().to_owned(),
                    backend: if self.backend == BackendKind::Gpu {
                        "GPU"
                    } else {
                        "host"
                    },
                });
            }
        }
        Ok(())
    }

    /// Largest buffer any stage of the chain needs for a full chunk.
    fn capacity(&self, order: &[usize]) -> Result<usize> {
        self.walk_lengths(order, self.chunk_elems(), 0)
            .map(|(_, largest)| largest)
    }

    /// The GPU ring for `order`, (re)built when its capacity or slot count
    /// changed (the pinned staging goes with it).
    fn engine(&mut self, order: &[usize]) -> Result<()> {
        let capacity = self.capacity(order)?;
        self.ensure_engine(capacity, 2)
    }

    /// The GPU ring with at least `capacity` elements and `buffers` device
    /// buffers per slot, (re)built when it has fewer or the slot count
    /// changed (the pinned staging goes with it).
    pub(crate) fn ensure_engine(&mut self, capacity: usize, buffers: usize) -> Result<()> {
        let rebuild = self.engine.as_ref().is_none_or(|e| {
            e.capacity() < capacity
                || e.slot_count() != self.slots()
                || e.config().buffers_per_slot < buffers
        });
        if rebuild {
            self.close_idle_session()?;
            self.graphs.clear(); // they hold the old ring's buffers
            self.engine = None; // free the old ring first
            self.cache.clear();
            let gpu = self
                .gpu
                .as_ref()
                .ok_or(Error::Config("no GPU on this manager"))?;
            self.engine = Some(gpu::new_engine(
                gpu,
                self.slots(),
                capacity,
                buffers.max(2),
            )?);
        }
        Ok(())
    }

    /// What every run checks first: the stages support the backend, the
    /// output fits (`(input, output)` lengths, when given), items mode has
    /// only elementwise stages, no `execute_iteration` chunk is in flight;
    /// then the ring is allocated, outside the timed part. Returns the
    /// stage order.
    fn begin_run(
        &mut self,
        lengths: Option<(usize, usize)>,
        batched_items: bool,
        adaptive: Option<Option<usize>>,
    ) -> Result<Vec<usize>> {
        self.effective = None;
        let order = self.order();
        self.check_stages(&order)?;
        self.close_idle_session()?;
        // Copies of an earlier failed run are not this run's.
        let _ = self.copy_pool.take_ms();
        // For this run only (`finish_run` and the next run clear it).
        self.effective = adaptive.and_then(|total| self.adaptive_choice(&order, total));
        if let Some((input, output)) = lengths {
            let expected = self.checked_total_output_len(&order, input)?;
            if output != expected {
                return Err(Error::OutputLength {
                    expected,
                    actual: output,
                });
            }
        }
        if batched_items {
            if let Some(&i) = order.iter().find(|&&i| !self.stages[i].elementwise()) {
                return Err(Error::Unsupported {
                    stage: self.stages[i].name().to_owned(),
                    backend: "batched-items (not elementwise)",
                });
            }
        }
        if self.backend == BackendKind::Gpu {
            self.engine(&order)?;
        }
        Ok(order)
    }

    fn finish_run(
        &mut self,
        started: std::time::Instant,
        chunks: u64,
        items: u64,
        elems_in: u64,
        elems_out: u64,
    ) {
        let elem = std::mem::size_of::<T>() as u64;
        self.stats.runs += 1;
        self.stats.chunks += chunks;
        self.stats.items += items;
        self.stats.bytes_in += elems_in * elem;
        if self.backend == BackendKind::Gpu {
            self.stats.bytes_out += elems_out * elem;
        }
        self.stats.wall_ms += started.elapsed().as_secs_f64() * 1e3;
        self.stats.host_copy_ms += self.copy_pool.take_ms();
        self.stats.chunk_bytes = self.chunk_elems() * std::mem::size_of::<T>();
        self.stats.slots = self.slots();
        self.stats.adaptive = self.effective.is_some();
        self.effective = None;
        self.stats.timed = self.config.timing || self.backend == BackendKind::Host;
    }

    /// Statistics accumulated since creation or the last `reset_stats`.
    pub fn get_stats(&self) -> &PipelineStats {
        &self.stats
    }

    /// Clears the statistics (keeping the backend and device).
    pub fn reset_stats(&mut self) {
        let PipelineStats {
            backend, device, ..
        } = std::mem::take(&mut self.stats);
        self.stats = PipelineStats {
            backend,
            device,
            ..Default::default()
        };
    }

    /// Spans of the last run made with `trace` (and `timing`) on.
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// Benchmarks and tests: how `run_items_pinned` moves items (`None`:
    /// the environment variable `PRISM_PINNED_ITEMS_COPY` = `auto`,
    /// `batched` or `kernels`, else `Auto`).
    #[doc(hidden)]
    pub fn set_pinned_items_copy(&mut self, mode: Option<PinnedItemsCopy>) {
        self.items_copy = mode;
    }

    /// Benchmarks and tests: the chunks the last `run_items_pinned` moved
    /// by batched copies and by the zero-copy kernels, each way.
    #[doc(hidden)]
    pub fn pinned_items_paths(&self) -> PinnedItemsPaths {
        self.items_paths
    }
}

/// The checks of a stage order over `count` stages: not empty, every index
/// known, none twice (`set_order` of every pipeline).
pub(crate) fn check_order(order: &[usize], count: usize) -> Result<()> {
    if order.is_empty() {
        return Err(Error::NoStages);
    }
    for (k, &i) in order.iter().enumerate() {
        if i >= count {
            return Err(Error::UnknownStage { index: i, count });
        }
        if order[..k].contains(&i) {
            return Err(Error::RepeatedStage { index: i });
        }
    }
    Ok(())
}

/// `ManagedGpuContext::create_pipeline_manager()` and
/// `create_resident_pipeline()`, as an extension trait (prism-stream sits
/// below this crate).
pub trait GpuPipelineExt {
    /// A GPU manager on this context's device; fails when streams are disabled.
    fn create_pipeline_manager<T: Element>(
        &self,
        config: PipelineConfig,
    ) -> Result<PipelineStageManager<T>>;

    /// A [`ResidentPipeline`] on this context's device, its state built by
    /// `init` ([`ResidentPipeline::new`]); fails when streams are disabled.
    fn create_resident_pipeline<S, R: Element>(
        &self,
        config: ResidentConfig,
        init: impl FnOnce(&mut prism_stream::Lane) -> std::result::Result<S, StageError>,
    ) -> Result<ResidentPipeline<S, R>>;
}

impl GpuPipelineExt for ManagedGpuContext {
    fn create_pipeline_manager<T: Element>(
        &self,
        config: PipelineConfig,
    ) -> Result<PipelineStageManager<T>> {
        if !self.streams_enabled() {
            return Err(prism_stream::Error::StreamsDisabled {
                what: "pipeline manager",
            }
            .into());
        }
        PipelineStageManager::with_gpu(self.gpu(), config)
    }

    fn create_resident_pipeline<S, R: Element>(
        &self,
        config: ResidentConfig,
        init: impl FnOnce(&mut prism_stream::Lane) -> std::result::Result<S, StageError>,
    ) -> Result<ResidentPipeline<S, R>> {
        if !self.streams_enabled() {
            return Err(prism_stream::Error::StreamsDisabled {
                what: "resident pipeline",
            }
            .into());
        }
        ResidentPipeline::new(self.gpu(), config, init)
    }
}
