//! One pipeline over several GPUs: [`MultiGpuPipeline`].
//!
//! Each GPU has its own [`PipelineStageManager`] (ring, streams, device
//! buffers, staging, host threads, stage instances). A run is the single
//! manager's run (`ring`), spread over them: a GPU *pulls* the next chunk when a
//! slot of its ring frees, so each takes chunks at the rate it finishes
//! them. Outputs land in input order whatever the mode: slices and pinned
//! buffers by position, items by their own outputs, a stream's sink
//! through in-order delivery. The first failure stops the run: the feed
//! stops, the other GPUs drain what they have in flight, and the error
//! names the GPU and chunk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use prism_buffer::engine::RunCounts;
use prism_stream::nvtx::Range;
use prism_stream::{Element, Gpu, PinnedBuffer};

use crate::error::{Error, Result};
use crate::plan::ChunkPlan;
use crate::ring::sched::Feed;
use crate::ring::{self, Devices, Driven, Failure, FedItems, ItemsIo, Numbered, StreamRun};
use crate::source::StreamCounts;
use crate::source::{Sink, Source};
use crate::stage::Stage;
use crate::stats::{MultiGpuStats, PipelineStats, Timeline};
use crate::{Backend, PipelineConfig, PipelineStageManager};

/// A pipeline over several GPUs of one host (see the module docs of
/// `multi`): the same stages, inputs and outputs as a
/// [`PipelineStageManager`], with every GPU pulling chunks as it has room.
///
/// ```no_run
/// use prism_pipeline::{Backend, Fma, MultiGpuPipeline, PipelineConfig};
/// # fn main() -> prism_pipeline::Result<()> {
/// let mut p = MultiGpuPipeline::<f32>::new(Backend::AllGpus, PipelineConfig::auto())?;
/// p.add_stage(Fma { a: 1.0001, b: 0.5, iters: 16 }); // cloned for every GPU
/// let input = vec![1.0f32; 1 << 24];
/// let mut output = vec![0.0f32; input.len()];
/// p.run(&input, &mut output)?;
/// println!("{:?}", p.get_stats().chunks_per_gpu());
/// # Ok(()) }
/// ```
pub struct MultiGpuPipeline<T: Element> {
    devices: Vec<PipelineStageManager<T>>,
    config: PipelineConfig,
    stats: MultiGpuStats,
}

impl<T: Element> std::fmt::Debug for MultiGpuPipeline<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gpus: Vec<usize> = self.ordinals();
        f.debug_struct("MultiGpuPipeline")
            .field("gpus", &gpus)
            .field("config", &self.config)
            .finish()
    }
}

/// Every GPU's stats from before a run.
type Saved = Vec<PipelineStats>;

impl<T: Element> MultiGpuPipeline<T> {
    /// A pipeline over `Backend::AllGpus` (or `Auto`): every GPU of the
    /// host; `Backend::Gpu`: GPU 0 alone. `Backend::Host` is not a GPU
    /// backend (`Unsupported`); no driver or no GPU is a typed error.
    pub fn new(backend: Backend, config: PipelineConfig) -> Result<Self> {
        let ordinals: Vec<usize> = match backend {
            Backend::AllGpus | Backend::Auto => (0..prism_stream::device_count()?).collect(),
            Backend::Gpu => vec![0],
            Backend::Host => {
                return Err(Error::Unsupported {
                    stage: "MultiGpuPipeline".into(),
                    backend: "host",
                })
            }
        };
        if ordinals.is_empty() {
            return Err(prism_stream::Error::NoDevice.into());
        }
        Self::with_ordinals(&ordinals, config)
    }

    /// A pipeline over the GPUs with these ordinals (each once).
    pub fn with_ordinals(ordinals: &[usize], config: PipelineConfig) -> Result<Self> {
        check_distinct(ordinals.iter().copied())?;
        let gpus = ordinals
            .iter()
            .map(|&o| Gpu::open(o))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Self::with_gpus(&gpus, config)
    }

    /// A pipeline over these open GPUs (each device once). The
    /// configuration's `host_threads` are shared out among the GPUs.
    pub fn with_gpus(gpus: &[Gpu], config: PipelineConfig) -> Result<Self> {
        config.check::<T>()?;
        if gpus.is_empty() {
            return Err(Error::Config("a multi-GPU pipeline needs at least one GPU"));
        }
        check_distinct(gpus.iter().map(|g| g.info().ordinal))?;
        let per_gpu = per_gpu(&config, gpus.len());
        let devices = gpus
            .iter()
            .map(|g| PipelineStageManager::with_gpu(g, per_gpu.clone()))
            .collect::<Result<Vec<_>>>()?;
        let stats = MultiGpuStats {
            devices: devices.iter().map(|d| d.get_stats().clone()).collect(),
            ..Default::default()
        };
        Ok(Self {
            devices,
            config,
            stats,
        })
    }

    /// The GPUs, in the order given.
    pub fn gpus(&self) -> Vec<&Gpu> {
        self.devices.iter().filter_map(|d| d.gpu()).collect()
    }

    fn ordinals(&self) -> Vec<usize> {
        self.gpus().iter().map(|g| g.info().ordinal).collect()
    }

    /// Each GPU's own manager (its stats, timeline and configuration).
    pub fn managers(&self) -> &[PipelineStageManager<T>] {
        &self.devices
    }

    /// The configuration (before the host threads are shared out).
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// Changes the configuration on every GPU (checked as `new` checks
    /// it; `host_threads` shared out as in `with_gpus`).
    pub fn set_config(&mut self, config: PipelineConfig) -> Result<()> {
        config.check::<T>()?;
        let per_gpu = per_gpu(&config, self.devices.len());
        for d in &mut self.devices {
            d.set_config(per_gpu.clone())?;
        }
        self.config = config;
        Ok(())
    }

    /// Adds a stage, cloned for every GPU; returns its index.
    pub fn add_stage<S: Stage<T> + Clone + 'static>(&mut self, stage: S) -> usize {
        let mut index = 0;
        for d in &mut self.devices[1..] {
            d.add_stage(stage.clone());
        }
        if let Some(d) = self.devices.first_mut() {
            index = d.add_stage(stage);
        }
        index
    }

    /// Adds a stage made for each GPU by `make` (for stages that hold
    /// per-device state, such as a module loaded into that GPU's context).
    pub fn add_stage_with<S: Stage<T> + 'static>(
        &mut self,
        mut make: impl FnMut(&Gpu) -> S,
    ) -> usize {
        let mut index = 0;
        for d in &mut self.devices {
            let stage = match d.gpu() {
                Some(g) => make(g),
                None => continue,
            };
            index = d.add_stage(stage);
        }
        index
    }

    /// The stage at `index` on the GPU at position `gpu` (in
    /// [`gpus`](Self::gpus) order), if it is an `S`: each GPU has its own
    /// instance (see [`PipelineStageManager::stage`]).
    pub fn stage<S: Stage<T> + 'static>(&self, gpu: usize, index: usize) -> Option<&S> {
        self.devices.get(gpu)?.stage(index)
    }

    /// [`stage`](Self::stage), mutably.
    pub fn stage_mut<S: Stage<T> + 'static>(&mut self, gpu: usize, index: usize) -> Option<&mut S> {
        self.devices.get_mut(gpu)?.stage_mut(index)
    }

    /// As [`PipelineStageManager::set_order`], on every GPU.
    pub fn set_order(&mut self, order: &[usize]) -> Result<()> {
        for d in &mut self.devices {
            d.set_order(order)?;
        }
        Ok(())
    }

    /// Output elements of a whole input of `n` elements.
    pub fn total_output_len(&self, n: usize) -> usize {
        self.devices[0].total_output_len(n)
    }

    /// Statistics since creation or the last `reset_stats`: combined and
    /// per GPU.
    pub fn get_stats(&self) -> &MultiGpuStats {
        &self.stats
    }

    /// Clears every GPU's statistics and the combined ones.
    pub fn reset_stats(&mut self) {
        for d in &mut self.devices {
            d.reset_stats();
        }
        self.stats = MultiGpuStats {
            devices: self.devices.iter().map(|d| d.get_stats().clone()).collect(),
            ..Default::default()
        };
    }

    /// Each GPU's timeline of the last run made with `trace` on.
    pub fn timelines(&self) -> Vec<&Timeline> {
        self.devices.iter().map(|d| d.timeline()).collect()
    }

    /// The last traced run as one Chrome trace: one process per GPU, on
    /// one clock.
    pub fn to_chrome_trace(&self) -> serde_json::Value {
        Timeline::merged_chrome_trace(&self.timelines())
    }

    /// Writes [`to_chrome_trace`](Self::to_chrome_trace) to `path`.
    pub fn write_chrome_trace(&self, path: impl AsRef<std::path::Path>) -> std::io::Result<()> {
        let text = serde_json::to_string(&self.to_chrome_trace()).map_err(std::io::Error::other)?;
        std::fs::write(path, text)
    }

    /// Every GPU's checks and ring (as a single-GPU run's), with the same
    /// chunk size on all; returns the stage order.
    fn begin(
        &mut self,
        lengths: Option<(usize, usize)>,
        batched: bool,
        adaptive: Option<Option<usize>>,
    ) -> Result<Vec<usize>> {
        let mut order = Vec::new();
        for d in &mut self.devices {
            order = d.begin_run(lengths, batched, adaptive)?;
        }
        Ok(order)
    }

    /// Every GPU's stats from before a run, for [`fail`](Self::fail).
    fn save(&self) -> Saved {
        self.devices.iter().map(|d| d.get_stats().clone()).collect()
    }

    /// The error of a failed run: the stats from before it are put back
    /// (it adds nothing anywhere), and a GPU's failure names the GPU and
    /// chunk (`Error::Device`).
    fn fail(&mut self, saved: Saved, failure: Failure) -> Error {
        self.restore(saved);
        let Failure {
            device,
            error,
            oldest,
        } = failure;
        let Some(i) = device else {
            return error;
        };
        // A sink's failure is the caller's, not a GPU's (and the GPU that
        // delivered it may not be the one that made it).
        if matches!(error, Error::Sink { .. } | Error::SinkPanicked { .. }) {
            return error;
        }
        // An error that names no chunk is reported with the oldest chunk
        // this GPU had in flight (the run's numbering).
        let chunk = error.chunk().or(oldest);
        Error::Device {
            ordinal: self.ordinals()[i],
            chunk,
            source: Box::new(error),
        }
    }

    /// Puts back the stats from before a run that is not to count.
    fn restore(&mut self, saved: Saved) {
        for (d, s) in self.devices.iter_mut().zip(saved) {
            d.stats = s;
            d.effective = None;
        }
    }

    /// Adds a successful run to every GPU's stats and the combined stats.
    fn finish(&mut self, started: Instant, counts: &[(RunCounts, u64)]) {
        for (d, (c, items)) in self.devices.iter_mut().zip(counts) {
            d.finish_run(started, c.chunks, *items, c.elems_in, c.elems_out);
        }
        let elem = std::mem::size_of::<T>() as u64;
        let s = &mut self.stats;
        s.runs += 1;
        s.wall_ms += started.elapsed().as_secs_f64() * 1e3;
        for (c, items) in counts {
            s.chunks += c.chunks;
            s.items += items;
            s.bytes_in += c.elems_in * elem;
            s.bytes_out += c.elems_out * elem;
        }
        s.timed = self.config.timing;
        s.devices = self.devices.iter().map(|d| d.get_stats().clone()).collect();
    }

    /// Each GPU's counts of a run with no items.
    fn no_items(counts: Vec<RunCounts>) -> Vec<(RunCounts, u64)> {
        counts.into_iter().map(|c| (c, 0)).collect()
    }

    /// Runs `run` over every GPU with full chunks of `chunk` elements over
    /// `n` (a multi-GPU run does not ramp), then adds it to the stats, or
    /// puts them back and reports the failure.
    fn spread(
        &mut self,
        started: Instant,
        n: usize,
        chunk: usize,
        run: impl FnOnce(Devices<'_, T>, ChunkPlan) -> Driven<Vec<RunCounts>>,
    ) -> Result<()> {
        let plan = ChunkPlan::new(n, chunk, false);
        let saved = self.save();
        match run(Devices::multi(&mut self.devices), plan) {
            Ok(counts) => {
                self.finish(started, &Self::no_items(counts));
                Ok(())
            }
            Err(f) => Err(self.fail(saved, f)),
        }
    }

    /// Streams `input` through the stages into `output` (which must hold
    /// [`total_output_len`](Self::total_output_len)`(input.len())`
    /// elements), chunks spread over the GPUs; each GPU stages its chunks
    /// through its own pinned memory with its share of the host threads.
    pub fn run(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let _span = tracing::debug_span!("prism.multi.run", n = input.len()).entered();
        let _nvtx = Range::new("multi.run");
        let total = Some(std::mem::size_of_val(input));
        let order = self.begin(Some((input.len(), output.len())), false, Some(total))?;
        let started = Instant::now();
        let chunk = self.devices[0].chunk_elems();
        self.spread(started, input.len(), chunk, |devices, plan| {
            ring::run_slices(devices, &order, plan, input, output)
        })
    }

    /// Streams a pinned input into a pinned output with no staging, chunks
    /// spread over the GPUs. With several GPUs both buffers must be
    /// portable ([`HostAllocFlags::PORTABLE`](prism_stream::HostAllocFlags::PORTABLE))
    /// unless they belong to the GPU's own context. Host reads of `output`
    /// wait for the last download.
    pub fn run_pinned(
        &mut self,
        input: &PinnedBuffer<T>,
        output: &mut PinnedBuffer<T>,
    ) -> Result<()> {
        let _span = tracing::debug_span!("prism.multi.run_pinned", n = input.len()).entered();
        let _nvtx = Range::new("multi.run_pinned");
        self.check_portable(&[("input", input), ("output", output)])?;
        let total = Some(input.len() * std::mem::size_of::<T>());
        let order = self.begin(Some((input.len(), output.len())), false, Some(total))?;
        let started = Instant::now();
        let chunk = self.devices[0].chunk_elems();
        self.spread(started, input.len(), chunk, |devices, plan| {
            ring::run_pinned(devices, &order, plan, input, output)
        })
    }

    /// `NotPortable` for a buffer that every GPU cannot reach: one neither
    /// portable nor of that GPU's own context.
    fn check_portable(&self, bufs: &[(&'static str, &PinnedBuffer<T>)]) -> Result<()> {
        for g in self.gpus() {
            for &(what, b) in bufs {
                let owner = b.gpu();
                if !b.flags().portable && !owner.same_context(g) {
                    return Err(Error::NotPortable {
                        what,
                        owner: owner.info().ordinal,
                    });
                }
            }
        }
        Ok(())
    }

    /// Streams items, each with its own output of the same length, spread
    /// over the GPUs (many items per chunk, as
    /// [`PipelineStageManager::run_items`]; every stage elementwise).
    /// Returns the item count. An item longer than a chunk, or with an
    /// output of another length, stops the input there: the items before
    /// it are processed, and the run reports it.
    pub fn run_items<'a, I>(&mut self, items: I) -> Result<u64>
    where
        I: IntoIterator<Item = (&'a [T], &'a mut [T])>,
        I::IntoIter: Send,
    {
        let _span = tracing::debug_span!("prism.multi.run_items").entered();
        let _nvtx = Range::new("multi.run_items");
        self.begin(None, true, Some(None))?;
        let order = self.devices[0].order();
        let started = Instant::now();
        let chunk = self.devices[0].chunk_elems();
        let feed = Feed::new(items.into_iter());
        let input_error: Mutex<Option<Error>> = Mutex::new(None);
        let batches = AtomicU64::new(0);
        let taken = AtomicU64::new(0);
        let saved = self.save();
        let devices = Devices::multi(&mut self.devices);
        let driven = ring::drive(devices, &|| feed.stop(), &|_, d, global| {
            let (mut run, cache, pool) = d.gpu_parts(&order)?;
            run.global = Some(global);
            let fed = FedItems {
                feed: &feed,
                chunk,
                error: &input_error,
                taken: &taken,
            };
            let mut io = Numbered {
                inner: ItemsIo {
                    items: fed.peekable(),
                    chunk,
                    pool,
                    next_item: 0,
                    outputs: Default::default(),
                    cache,
                },
                next: &batches,
                global,
            };
            let (r, slots) = run.drive(&mut io);
            for s in slots.into_made() {
                s.staged.recycle(io.inner.cache);
            }
            let items = io.inner.next_item as u64;
            r.map(|c| (c, items))
        });
        let counts = driven.map_err(|f| self.fail(saved.clone(), f))?;
        if let Some(e) = into_inner(input_error) {
            // As a single-GPU run: an item it refuses fails the run, which
            // adds nothing to the stats (the items before it were processed).
            self.restore(saved);
            return Err(e);
        }
        self.finish(started, &counts);
        Ok(taken.load(Ordering::Relaxed))
    }

    /// Streams everything `source` gives through the stages into `sink`,
    /// chunk by chunk, spread over the GPUs; the sink receives the chunks
    /// in input order (a GPU whose chunk is not next parks a copy of it,
    /// at most one per ring slot of all GPUs, and goes on). Errors as
    /// [`PipelineStageManager::run_stream`], wrapped in [`Error::Device`].
    pub fn run_stream<S, K>(&mut self, source: S, sink: K) -> Result<StreamCounts>
    where
        S: Source<T> + Send,
        K: Sink<T> + Send,
    {
        let _span = tracing::debug_span!("prism.multi.run_stream").entered();
        let _nvtx = Range::new("multi.run_stream");
        let order = self.begin(None, false, Some(None))?;
        let started = Instant::now();
        let chunk = self.devices[0].chunk_elems();
        let window: usize = self.devices.iter().map(|d| d.slots()).sum();
        let run = StreamRun::new(source, sink, chunk, window);
        let saved = self.save();
        let devices = Devices::multi(&mut self.devices);
        let driven = ring::drive(devices, &|| run.stop(), &|_, d, global| {
            run.device(d, global, &order)
        });
        let counts = driven.map_err(|f| self.fail(saved, f))?;
        self.finish(started, &Self::no_items(counts.clone()));
        let (delivered, failed) = run.finish();
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(StreamCounts {
            chunks: delivered,
            elements_in: counts.iter().map(|c| c.elems_in).sum(),
            elements_out: counts.iter().map(|c| c.elems_out).sum(),
        })
    }
}

fn into_inner<X>(m: Mutex<X>) -> X {
    m.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// `config` for each of `gpus` GPUs: the host threads shared out.
fn per_gpu(config: &PipelineConfig, gpus: usize) -> PipelineConfig {
    PipelineConfig {
        host_threads: (config.host_threads / gpus.max(1)).max(1),
        ..config.clone()
    }
}

/// Each device once: `DuplicateGpu` names the first repeated ordinal.
fn check_distinct(ordinals: impl Iterator<Item = usize>) -> Result<()> {
    let mut seen = Vec::new();
    for o in ordinals {
        if seen.contains(&o) {
            return Err(Error::DuplicateGpu { ordinal: o });
        }
        seen.push(o);
    }
    Ok(())
}

impl<T: Element> MultiGpuPipeline<T> {
    /// Streams a pinned input through a stage graph into pinned outputs
    /// (one per graph output), chunks spread over the GPUs as
    /// [`run_pinned`](Self::run_pinned) does. `graphs` holds one graph per
    /// GPU, in the order of [`gpus`](Self::gpus), all of one shape (every
    /// GPU needs its own stages: their device state and modules are its
    /// own); build them with the same code for each GPU. With several GPUs
    /// the buffers must be portable unless they belong to the GPU's own
    /// context.
    pub fn run_graph_pinned(
        &mut self,
        graphs: &mut [crate::StageGraph<T>],
        input: &PinnedBuffer<T>,
        outputs: &mut [&mut PinnedBuffer<T>],
    ) -> Result<()> {
        let _span = tracing::debug_span!("prism.multi.run_graph_pinned", n = input.len()).entered();
        let _nvtx = Range::new("multi.run_graph_pinned");
        self.check_graphs(graphs)?;
        let mut bufs = vec![("input", input)];
        bufs.extend(outputs.iter().map(|o| ("output", &**o)));
        self.check_portable(&bufs)?;
        let lens: Vec<usize> = outputs.iter().map(|o| o.len()).collect();
        let runs = self.begin_graphs(graphs, input.len(), &lens)?;
        let started = Instant::now();
        // A graph's chunks are the configuration's (`graph_chunk_elems`),
        // never an adaptive chain run's choice.
        let chunk = runs[0].chunk;
        self.spread(started, input.len(), chunk, |devices, plan| {
            ring::run_graph_pinned(devices, graphs, &runs, plan, input, outputs)
        })
    }

    /// Streams pageable `input` through a stage graph into pageable
    /// outputs (one per graph output, each as long as
    /// [`PipelineStageManager::graph_output_lens`] says), chunks spread
    /// over the GPUs; each GPU stages its chunks through its own pinned
    /// memory with its share of the host threads. `graphs` as for
    /// [`run_graph_pinned`](Self::run_graph_pinned).
    pub fn run_graph(
        &mut self,
        graphs: &mut [crate::StageGraph<T>],
        input: &[T],
        outputs: &mut [&mut [T]],
    ) -> Result<()> {
        let _span = tracing::debug_span!("prism.multi.run_graph", n = input.len()).entered();
        let _nvtx = Range::new("multi.run_graph");
        self.check_graphs(graphs)?;
        let lens: Vec<usize> = outputs.iter().map(|o| o.len()).collect();
        let runs = self.begin_graphs(graphs, input.len(), &lens)?;
        let started = Instant::now();
        let chunk = runs[0].chunk;
        self.spread(started, input.len(), chunk, |devices, plan| {
            ring::run_graph_slices(devices, graphs, &runs, plan, input, outputs)
        })
    }

    /// Streams a tagged source through a stage graph, chunks spread over
    /// the GPUs: every output's sink (`sinks[i]` for output `i`) receives
    /// each chunk's part with the chunk's metadata, in input order (a GPU
    /// whose chunk is not next parks a copy, at most one per ring slot of
    /// all GPUs, and goes on). `graphs` as for
    /// [`run_graph_pinned`](Self::run_graph_pinned). Errors as
    /// [`PipelineStageManager::run_graph_stream`], a GPU's wrapped in
    /// [`Error::Device`].
    pub fn run_graph_stream<M, S, K>(
        &mut self,
        graphs: &mut [crate::StageGraph<T>],
        source: S,
        sinks: &mut [K],
    ) -> Result<StreamCounts>
    where
        M: Send,
        S: crate::TaggedSource<T, M> + Send,
        K: crate::TaggedSink<T, M> + Send,
    {
        let _span = tracing::debug_span!("prism.multi.run_graph_stream").entered();
        let _nvtx = Range::new("multi.run_graph_stream");
        self.check_graphs(graphs)?;
        let runs = self
            .devices
            .iter_mut()
            .zip(graphs.iter())
            .map(|(d, g)| d.begin_graph_stream(g, sinks.len()))
            .collect::<Result<Vec<_>>>()?;
        let started = Instant::now();
        let window: usize = self.devices.iter().map(|d| d.slots()).sum();
        let tagged = ring::TaggedRun::new(source, sinks, runs[0].chunk, window);
        let graphs: Vec<Mutex<&mut crate::StageGraph<T>>> =
            graphs.iter_mut().map(Mutex::new).collect();
        let saved = self.save();
        let devices = Devices::multi(&mut self.devices);
        let driven = ring::drive(devices, &|| tagged.stop(), &|i, d, global| {
            tagged.device(d, global, &graphs[i], &runs[i])
        });
        let counts = driven.map_err(|f| self.fail(saved, f))?;
        self.finish(started, &Self::no_items(counts.clone()));
        let (delivered, failed) = tagged.finish();
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(StreamCounts {
            chunks: delivered,
            elements_in: counts.iter().map(|c| c.elems_in).sum(),
            elements_out: counts.iter().map(|c| c.elems_out).sum(),
        })
    }

    /// Every GPU's checks and ring for a graph run over `n` elements into
    /// destinations of `lens` (as a single GPU's `begin_graph`); the
    /// graphs passed [`check_graphs`](Self::check_graphs).
    fn begin_graphs(
        &mut self,
        graphs: &[crate::StageGraph<T>],
        n: usize,
        lens: &[usize],
    ) -> Result<Vec<crate::dag::GraphRun>> {
        self.devices
            .iter_mut()
            .zip(graphs)
            .map(|(d, g)| d.begin_graph(g, n, lens))
            .collect()
    }

    /// One graph per GPU, all of one shape.
    fn check_graphs(&self, graphs: &[crate::StageGraph<T>]) -> Result<()> {
        if graphs.len() != self.devices.len() {
            return Err(Error::GraphsPerGpu {
                expected: self.devices.len(),
                actual: graphs.len(),
            });
        }
        if graphs.iter().any(|g| !g.same_shape(&graphs[0])) {
            return Err(Error::Config(
                "the GPUs' graphs differ in shape (nodes, their names and inputs, outputs, or concurrent_branches)",
            ));
        }
        Ok(())
    }
}
