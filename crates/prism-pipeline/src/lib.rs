//! prism-pipeline: compose stages and stream data through them.
//!
//! A [`PipelineStageManager`] holds [`Stage`]s in an order and runs data
//! through them in chunks: on the GPU, upload of one chunk, the stages of
//! another and the download of a third run at once on three streams, over a
//! ring of slots ([`prism_buffer::SlotRing`], states driven by CUDA events);
//! on the host backend, a worker thread with bounded hand-over. Output order
//! equals input order, memory stays bounded by the ring, and every run adds
//! to [`PipelineStats`] (per-step times, the bound, overlap efficiency) and,
//! with tracing on, a [`Timeline`] that exports as a Chrome trace.
//!
//! Inputs: a pageable slice ([`run`](PipelineStageManager::run), staged
//! through pinned memory by several threads), pinned buffers
//! ([`run_pinned`](PipelineStageManager::run_pinned), no staging), or items
//! that arrive one by one, each with its own output
//! ([`run_items`](PipelineStageManager::run_items), batched many per chunk).

#![forbid(unsafe_code)]

mod copy;
mod error;
mod gpu;
mod host;
mod io;
pub mod stage;
mod stats;

use std::time::Instant;

use prism_stream::{Element, Gpu, ManagedGpuContext, PinnedBuffer};

pub use error::{Error, Result, StageError};
pub use host::AsyncPipelineCoordinator;
pub use stage::{Clamp, Fma, GpuFn, GroupSum, HostFn, Stage};
pub use stats::{BackendKind, Lane, PipelineStats, Span, StageTime, Timeline};

use gpu::GpuEngine;
use io::{ItemsIo, PinnedIo, PinnedItemsIo, SliceIo};

/// Which backend a manager runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// GPU 0; an error if there is none.
    Gpu,
    /// CPU threads.
    Host,
    /// GPU 0 if a driver and device are present, else the host.
    Auto,
}

/// Tuning of a streaming run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineConfig {
    /// Bytes of input per chunk (default 64 MiB).
    pub chunk_bytes: usize,
    /// Slots in the ring: chunks in flight at once (2..=8, default 3).
    pub slots: usize,
    /// Record timed CUDA events around every step, for the stats (default on).
    pub timing: bool,
    /// Keep the last run's spans as a [`Timeline`] (needs timing; default off).
    pub trace: bool,
    /// Host threads for copies between pageable memory and pinned staging.
    pub host_threads: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            chunk_bytes: 64 << 20,
            slots: 3,
            timing: true,
            trace: false,
            host_threads: cores.clamp(1, 8),
        }
    }
}

/// Stages in an order, and the machinery to stream data through them.
pub struct PipelineStageManager<T: Element> {
    stages: Vec<Box<dyn Stage<T>>>,
    /// Indices into `stages`; empty means insertion order.
    order: Vec<usize>,
    config: PipelineConfig,
    backend: BackendKind,
    gpu: Option<Gpu>,
    engine: Option<GpuEngine<T>>,
    stats: PipelineStats,
    timeline: Timeline,
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
        let gpu = match backend {
            Backend::Host => None,
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
        if !(prism_buffer::MIN_SLOTS..=prism_buffer::MAX_SLOTS).contains(&config.slots) {
            return Err(Error::Config("slots must be between 2 and 8"));
        }
        if config.chunk_bytes < std::mem::size_of::<T>() {
            return Err(Error::Config("chunk_bytes must hold at least one element"));
        }
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
            stats,
            timeline: Timeline::default(),
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

    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// Changes the configuration; the GPU ring is rebuilt on the next run.
    pub fn set_config(&mut self, config: PipelineConfig) -> Result<()> {
        if !(prism_buffer::MIN_SLOTS..=prism_buffer::MAX_SLOTS).contains(&config.slots) {
            return Err(Error::Config("slots must be between 2 and 8"));
        }
        self.config = config;
        self.engine = None;
        Ok(())
    }

    /// Adds a stage (run after the earlier ones unless `set_order` says
    /// otherwise); returns its index.
    pub fn add_stage(&mut self, stage: impl Stage<T> + 'static) -> usize {
        self.stages.push(Box::new(stage));
        self.engine = None;
        self.stages.len() - 1
    }

    /// Runs only `order`'s stages, in that order. Unknown or repeated indices
    /// and an empty order are errors.
    pub fn set_order(&mut self, order: &[usize]) -> Result<()> {
        if order.is_empty() {
            return Err(Error::NoStages);
        }
        for (k, &i) in order.iter().enumerate() {
            if i >= self.stages.len() {
                return Err(Error::UnknownStage {
                    index: i,
                    count: self.stages.len(),
                });
            }
            if order[..k].contains(&i) {
                return Err(Error::RepeatedStage { index: i });
            }
        }
        self.order = order.to_vec();
        self.engine = None;
        Ok(())
    }

    fn order(&self) -> Vec<usize> {
        if self.order.is_empty() {
            (0..self.stages.len()).collect()
        } else {
            self.order.clone()
        }
    }

    /// Elements the stages make from `input_len` elements.
    pub fn output_len(&self, input_len: usize) -> usize {
        self.order()
            .iter()
            .fold(input_len, |len, &i| self.stages[i].output_len(len))
    }

    fn chunk_elems(&self) -> usize {
        (self.config.chunk_bytes / std::mem::size_of::<T>()).max(1)
    }

    /// Output elements of a whole input of `n` elements cut into chunks.
    pub fn total_output_len(&self, n: usize) -> usize {
        let c = self.chunk_elems();
        let full = n / c;
        let rest = n % c;
        full * self.output_len(c) + if rest > 0 { self.output_len(rest) } else { 0 }
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

    fn engine(&mut self, order: &[usize]) -> Result<&mut GpuEngine<T>> {
        let chunk = self.chunk_elems();
        // Largest buffer any stage of the chain needs for a full chunk.
        let mut capacity = chunk;
        let mut len = chunk;
        for &i in order {
            len = self.stages[i].output_len(len);
            capacity = capacity.max(len);
        }
        let rebuild = self
            .engine
            .as_ref()
            .is_none_or(|e| e.capacity() != capacity || e.slot_count() != self.config.slots);
        if rebuild {
            self.engine = None; // free the old ring first
            let gpu = self
                .gpu
                .as_ref()
                .ok_or(Error::Config("no GPU on this manager"))?;
            self.engine = Some(GpuEngine::new(gpu, self.config.slots, capacity)?);
        }
        self.engine.as_mut().ok_or(Error::Config("no GPU engine"))
    }

    /// What every run checks first: the stages support the backend, the
    /// output fits (`(input, output)` lengths, when given), items mode has
    /// only elementwise stages; then the ring is allocated, outside the timed
    /// part. Returns the stage order.
    fn begin_run(
        &mut self,
        lengths: Option<(usize, usize)>,
        batched_items: bool,
    ) -> Result<Vec<usize>> {
        let order = self.order();
        self.check_stages(&order)?;
        if let Some((input, output)) = lengths {
            let expected = self.total_output_len(input);
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

    fn gpu_run(&mut self, io: &mut dyn gpu::Io<T>, order: &[usize]) -> Result<gpu::RunCounts> {
        let timed = self.config.timing;
        let trace = self.config.trace && timed;
        // Size (or reuse) the ring while the stages are in place: sizing reads them.
        self.engine(order)?;
        let mut timeline = Timeline::default();
        // The fields are borrowed, not moved out: a stage that panics leaves
        // the manager whole.
        let result = match self.engine.as_mut() {
            Some(e) => e.run(
                &mut self.stages,
                order,
                io,
                timed,
                &mut self.stats,
                trace.then_some(&mut timeline),
            ),
            None => Err(Error::Config("no GPU engine")),
        };
        if trace && result.is_ok() {
            self.timeline = timeline;
        }
        result
    }

    fn finish_run(
        &mut self,
        started: Instant,
        chunks: u64,
        items: u64,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        self.stats.runs += 1;
        self.stats.chunks += chunks;
        self.stats.items += items;
        self.stats.bytes_in += bytes_in;
        if self.backend == BackendKind::Gpu {
            self.stats.bytes_out += bytes_out;
        }
        self.stats.wall_ms += started.elapsed().as_secs_f64() * 1e3;
        self.stats.timed = self.config.timing || self.backend == BackendKind::Host;
    }

    /// Streams `input` through the stages into `output` (which must hold
    /// exactly [`total_output_len`](Self::total_output_len)`(input.len())`
    /// elements). Empty input is a valid run of zero chunks.
    pub fn run(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let _span = tracing::debug_span!("prism.pipeline.run", n = input.len()).entered();
        let order = self.begin_run(Some((input.len(), output.len())), false)?;
        let started = Instant::now();
        let elem = std::mem::size_of::<T>() as u64;
        if input.is_empty() {
            self.finish_run(started, 0, 0, 0, 0);
            return Ok(());
        }
        let chunk = self.chunk_elems();
        match self.backend {
            BackendKind::Gpu => {
                let mut io = SliceIo {
                    input,
                    output,
                    chunk,
                    capacity: self.output_len(chunk).max(chunk),
                    threads: self.config.host_threads,
                    next_in: 0,
                    next_out: 0,
                };
                let counts = self.gpu_run(&mut io, &order)?;
                self.finish_run(
                    started,
                    counts.chunks,
                    0,
                    counts.elems_in * elem,
                    counts.elems_out * elem,
                );
            }
            BackendKind::Host => {
                let coordinator = AsyncPipelineCoordinator::new(self.config.slots)?;
                let mut next_out = 0;
                let mut stats = std::mem::take(&mut self.stats);
                let r = coordinator.run(
                    &mut self.stages,
                    &order,
                    input.chunks(chunk),
                    |_, out| {
                        output[next_out..next_out + out.len()].copy_from_slice(out);
                        next_out += out.len();
                        Ok(())
                    },
                    &mut stats,
                );
                self.stats = stats;
                let chunks = r?;
                self.finish_run(started, chunks, 0, input.len() as u64 * elem, 0);
            }
        }
        Ok(())
    }

    /// Streams a pinned input into a pinned output with no staging copies
    /// (GPU backend only). Host reads of `output` wait for the last download.
    pub fn run_pinned(
        &mut self,
        input: &PinnedBuffer<T>,
        output: &mut PinnedBuffer<T>,
    ) -> Result<()> {
        let _span = tracing::debug_span!("prism.pipeline.run_pinned", n = input.len()).entered();
        if self.backend != BackendKind::Gpu {
            return Err(Error::Unsupported {
                stage: "run_pinned".into(),
                backend: "host",
            });
        }
        let order = self.begin_run(Some((input.len(), output.len())), false)?;
        let started = Instant::now();
        let mut io = PinnedIo {
            input,
            output,
            chunk: self.chunk_elems(),
            next_in: 0,
            next_out: 0,
        };
        let counts = self.gpu_run(&mut io, &order)?;
        let elem = std::mem::size_of::<T>() as u64;
        self.finish_run(
            started,
            counts.chunks,
            0,
            counts.elems_in * elem,
            counts.elems_out * elem,
        );
        Ok(())
    }

    /// Streams items that arrive one by one, each with its own output slice
    /// of the same length. On the GPU many items share one chunk (gathered
    /// into pinned staging, one copy and one launch per stage, scattered
    /// back), so every stage must be elementwise. Returns the item count.
    pub fn run_items<'a, I>(&mut self, items: I) -> Result<u64>
    where
        I: IntoIterator<Item = (&'a [T], &'a mut [T])>,
        I::IntoIter: Send,
    {
        let order = self.begin_run(None, true)?;
        let started = Instant::now();
        let elem = std::mem::size_of::<T>() as u64;
        let chunk = self.chunk_elems();
        match self.backend {
            BackendKind::Gpu => {
                let mut io = ItemsIo {
                    items: items.into_iter().peekable(),
                    chunk,
                    threads: self.config.host_threads,
                    next_item: 0,
                    outputs: Default::default(),
                    first_out: 0,
                };
                let counts = self.gpu_run(&mut io, &order)?;
                let n = io.next_item as u64;
                self.finish_run(
                    started,
                    counts.chunks,
                    n,
                    counts.elems_in * elem,
                    counts.elems_out * elem,
                );
                Ok(n)
            }
            BackendKind::Host => {
                let coordinator = AsyncPipelineCoordinator::new(self.config.slots)?;
                let (inputs, mut outputs): (Vec<&[T]>, Vec<&mut [T]>) = items.into_iter().unzip();
                if let Some(k) = inputs
                    .iter()
                    .zip(&outputs)
                    .position(|(i, o)| i.len() != o.len())
                {
                    return Err(Error::OutputLength {
                        expected: inputs[k].len(),
                        actual: outputs[k].len(),
                    });
                }
                let bytes_in: u64 = inputs.iter().map(|i| i.len() as u64 * elem).sum();
                let mut stats = std::mem::take(&mut self.stats);
                let r = coordinator.run(
                    &mut self.stages,
                    &order,
                    inputs.into_iter(),
                    |k, out| {
                        outputs[k as usize].copy_from_slice(out);
                        Ok(())
                    },
                    &mut stats,
                );
                self.stats = stats;
                let n = r?;
                self.finish_run(started, n, n, bytes_in, 0);
                Ok(n)
            }
        }
    }

    /// Streams items that live in the caller's own pinned buffers, each with
    /// its own pinned output (GPU backend only). Many items share one chunk:
    /// one zero-copy kernel gathers them over the bus into the device, the
    /// stages run once per chunk, and one zero-copy kernel scatters the
    /// results back: no host copy, no per-item copy. Every stage must be
    /// elementwise. Returns the item count.
    pub fn run_items_pinned<'a, I>(&mut self, items: I) -> Result<u64>
    where
        I: IntoIterator<Item = (&'a PinnedBuffer<T>, &'a mut PinnedBuffer<T>)>,
    {
        if self.backend != BackendKind::Gpu {
            return Err(Error::Unsupported {
                stage: "run_items_pinned".into(),
                backend: "host",
            });
        }
        let order = self.begin_run(None, true)?;
        let started = Instant::now();
        let mut io = PinnedItemsIo {
            items: items.into_iter().peekable(),
            chunk: self.chunk_elems(),
            next_item: 0,
            outputs: Default::default(),
        };
        let counts = self.gpu_run(&mut io, &order)?;
        let n = io.next_item as u64;
        let elem = std::mem::size_of::<T>() as u64;
        self.finish_run(
            started,
            counts.chunks,
            n,
            counts.elems_in * elem,
            counts.elems_out * elem,
        );
        Ok(n)
    }

    /// Runs one chunk through every stage and returns its output (waits for it).
    pub fn execute_iteration(&mut self, chunk: &[T]) -> Result<Vec<T>> {
        if chunk.len() > self.chunk_elems() {
            return Err(Error::Config(
                "execute_iteration takes at most one chunk (PipelineConfig::chunk_bytes)",
            ));
        }
        let mut out = match chunk.first() {
            Some(&v) => vec![v; self.output_len(chunk.len())],
            None => Vec::new(),
        };
        self.run(chunk, &mut out)?;
        Ok(out)
    }

    /// Statistics accumulated since creation or the last `reset_stats`.
    pub fn get_stats(&self) -> &PipelineStats {
        &self.stats
    }

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
}

/// `ManagedGpuContext::create_pipeline_manager()`, as an extension trait
/// (prism-stream sits below this crate).
pub trait GpuPipelineExt {
    /// A GPU manager on this context's device; fails when streams are disabled.
    fn create_pipeline_manager<T: Element>(
        &self,
        config: PipelineConfig,
    ) -> Result<PipelineStageManager<T>>;
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
}
