//! One pipeline over several GPUs: [`MultiGpuPipeline`].
//!
//! Each GPU has its own [`PipelineStageManager`] (ring, streams, device
//! buffers, staging, host threads, stage instances). A run spreads its
//! chunks over them through `sched`: a GPU *pulls* the next chunk when a
//! slot of its ring frees, so each takes chunks at the rate it finishes
//! them. Outputs land in input order whatever the mode: slices and pinned
//! buffers by position, items by their own outputs, a stream's sink
//! through in-order delivery. The first failure stops the run: the feed
//! stops, the other GPUs drain what they have in flight, and the error
//! names the GPU and chunk.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use prism_buffer::engine::{Recorded, RunCounts};
use prism_buffer::ring::ChunkId;
use prism_buffer::ChunkIo;
use prism_stream::nvtx::Range;
use prism_stream::{DeviceBuffer, Element, Gpu, Lane, PinnedBuffer};

use crate::copy::{par_copy_one, CopyPool};
use crate::error::{Error, Result};
use crate::gpu::{GlobalIndex, StagingCache};
use crate::guard;
use crate::io::{download_staged, ItemsIo, Staged};
use crate::runs::StreamCounts;
use crate::sched::{first_failure, lock, on_devices, FailOrder, Feed, InOrder};
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

/// What one GPU's part of a run reports: its counts and items.
type DeviceResult = Result<(RunCounts, u64)>;

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

    /// Runs `work` on every GPU at once (the first on this thread); `stop`
    /// ends the run for all when one fails. Returns each GPU's counts (and
    /// items) and the stats from before the run, for [`finish`](Self::finish)
    /// or [`restore`](Self::restore); a failed run has restored them
    /// already (it adds nothing anywhere) and returns the first failure,
    /// naming the GPU and chunk.
    fn drive_all(
        &mut self,
        stop: &(dyn Fn() + Sync),
        work: &(dyn Fn(usize, &mut PipelineStageManager<T>, &GlobalIndex) -> DeviceResult + Sync),
    ) -> Result<(Vec<(RunCounts, u64)>, Saved)> {
        let saved: Vec<PipelineStats> =
            self.devices.iter().map(|d| d.get_stats().clone()).collect();
        let failed = FailOrder::default();
        let ordinals = self.ordinals();
        let results = on_devices(&mut self.devices, stop, &|i, d| {
            let _span = tracing::debug_span!("prism.multi.gpu", gpu = i).entered();
            let _nvtx = Range::fmt(format_args!("multi.gpu {i}"));
            let global = GlobalIndex::default();
            // An error is reported with the oldest chunk this GPU had in
            // flight (the run's numbering), for errors that name none.
            let r = work(i, d, &global).map_err(|e| (e, global.oldest()));
            if r.is_err() {
                failed.push(i);
            }
            r
        });
        match first_failure(results, &failed.take()) {
            Ok(counts) => Ok((counts, saved)),
            Err((i, (e, oldest))) => {
                self.restore(saved);
                // A sink's failure is the caller's, not a GPU's (and the
                // GPU that delivered it may not be the one that made it).
                if matches!(e, Error::Sink { .. } | Error::SinkPanicked { .. }) {
                    return Err(e);
                }
                let chunk = e.chunk().or(oldest);
                Err(Error::Device {
                    ordinal: ordinals[i],
                    chunk,
                    source: Box::new(e),
                })
            }
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
        let mut pieces = Vec::with_capacity(input.len().div_ceil(chunk.max(1)));
        let mut rest = output;
        for c in input.chunks(chunk) {
            let n = self.devices[0].output_len(c.len());
            let (dst, tail) = std::mem::take(&mut rest)
                .split_at_mut_checked(n)
                .ok_or(Error::Config("output shorter than the stages produce"))?;
            rest = tail;
            pieces.push((c, dst));
        }
        let feed = Feed::new(pieces.into_iter());
        let (counts, _) = self.drive_all(&|| feed.stop(), &|_, d, global| {
            let capacity = d.output_len(chunk).max(chunk);
            let (mut run, cache, pool) = d.gpu_parts(&order)?;
            run.global = Some(global);
            let mut io = FedSliceIo {
                feed: &feed,
                chunk,
                capacity,
                pool,
                cache,
                global,
                outputs: VecDeque::new(),
            };
            let (r, slots) = run.drive(&mut io);
            for s in slots.into_made() {
                s.recycle(io.cache);
            }
            r.map(|c| (c, 0))
        })?;
        self.finish(started, &counts);
        Ok(())
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
        for g in self.gpus() {
            for (what, owner, portable) in [
                ("input", input.gpu(), input.flags().portable),
                ("output", output.gpu(), output.flags().portable),
            ] {
                if !portable && !owner.same_context(g) {
                    return Err(Error::NotPortable {
                        what,
                        owner: owner.info().ordinal,
                    });
                }
            }
        }
        let total = Some(input.len() * std::mem::size_of::<T>());
        let order = self.begin(Some((input.len(), output.len())), false, Some(total))?;
        let started = Instant::now();
        let chunk = self.devices[0].chunk_elems();
        let mut pieces = Vec::new();
        let (mut at, mut out_at) = (0usize, 0usize);
        while at < input.len() {
            let len = chunk.min(input.len() - at);
            let out_len = self.devices[0].output_len(len);
            pieces.push(Piece {
                at,
                len,
                out_at,
                out_len,
            });
            at += len;
            out_at += out_len;
        }
        let feed = Feed::new(pieces.into_iter());
        let output = Mutex::new(output);
        let (counts, _) = self.drive_all(&|| feed.stop(), &|_, d, global| {
            let (mut run, _, _) = d.gpu_parts(&order)?;
            run.global = Some(global);
            let mut io = FedPinnedIo {
                feed: &feed,
                input,
                output: &output,
                global,
                to_download: VecDeque::new(),
            };
            run.drive(&mut io).0.map(|c| (c, 0))
        })?;
        self.finish(started, &counts);
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
        let (counts, saved) = self.drive_all(&|| feed.stop(), &|_, d, global| {
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
        })?;
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
        let feed = Feed::new(source);
        let out: InOrder<K, Vec<T>> = InOrder::new(sink, window);
        let source_error: Mutex<Option<Error>> = Mutex::new(None);
        let stop = || {
            feed.stop();
            out.stop();
        };
        let (counts, _) = self.drive_all(&stop, &|_, d, global| {
            let capacity = d.capacity(&order);
            let (mut run, cache, _) = d.gpu_parts(&order)?;
            run.global = Some(global);
            let mut io = FedStreamIo {
                feed: &feed,
                out: &out,
                chunk,
                capacity,
                cache,
                global,
                failed: &source_error,
            };
            let (r, slots) = run.drive(&mut io);
            for s in slots.into_made() {
                io.cache.give_output(s.input);
                io.cache.give_output(s.output);
            }
            r.map(|c| (c, 0))
        })?;
        self.finish(started, &counts);
        let delivered = out.delivered();
        if let Some(e) = into_inner(source_error) {
            return Err(e);
        }
        Ok(StreamCounts {
            chunks: delivered,
            elements_in: counts.iter().map(|(c, _)| c.elems_in).sum(),
            elements_out: counts.iter().map(|(c, _)| c.elems_out).sum(),
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

/// One chunk of a pageable run, as a GPU pulls it: its input and where
/// its output goes; staged through the GPU's own pinned memory.
struct FedSliceIo<'a, 'c, T: Element, I> {
    feed: &'c Feed<I>,
    chunk: usize,
    capacity: usize,
    pool: &'c CopyPool,
    cache: &'c mut StagingCache<T>,
    global: &'c GlobalIndex,
    /// Outputs of this GPU's chunks in flight, oldest first.
    outputs: VecDeque<&'a mut [T]>,
}

impl<'a, T: Element, I: Iterator<Item = (&'a [T], &'a mut [T])>> ChunkIo<T>
    for FedSliceIo<'a, '_, T, I>
{
    type Slot = Staged<T>;
    type Error = Error;

    fn make_slot(&mut self, gpu: &Gpu) -> Result<Staged<T>> {
        Staged::make(self.cache, gpu, self.chunk, self.capacity)
    }

    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Staged<T>,
        dev: &mut DeviceBuffer<T>,
        chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>> {
        let Some((k, (input, out))) = self.feed.pull(|it, _| Ok::<_, Error>(it.next()))? else {
            return Ok(None);
        };
        let _nvtx = Range::new("upload");
        self.global.set(chunk, k);
        self.outputs.push_back(out);
        self.pool.label(k, "staging copy in");
        // The slot was released, so the previous upload from it completed.
        {
            let _nvtx = Range::new("staging copy in");
            par_copy_one(
                &mut slot.input.as_mut_slice()?[..input.len()],
                input,
                self.pool,
            );
        }
        let rec = lane.copy_htod_timed(&slot.input, 0, dev, 0, input.len(), timed)?;
        Ok(Some((input.len(), rec.into())))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Staged<T>,
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        download_staged(lane, timed, &mut slot.output, dev, len)
    }

    fn retire(&mut self, slot: &mut Staged<T>, chunk: ChunkId, len: usize) -> Result<()> {
        let out = self
            .outputs
            .pop_front()
            .ok_or(Error::Config("chunk outputs out of step"))?;
        if out.len() != len {
            return Err(Error::Config(
                "a stage produced another length than output_len said",
            ));
        }
        let k = GlobalIndex::or(Some(self.global), chunk, 0);
        self.pool.label(k, "staging copy out");
        {
            let _nvtx = Range::new("staging copy out");
            par_copy_one(out, &slot.output.as_slice()?[..len], self.pool);
        }
        self.global.retired(chunk);
        Ok(())
    }
}

/// Where one chunk of a pinned run comes from and goes to.
#[derive(Debug, Clone, Copy)]
struct Piece {
    at: usize,
    len: usize,
    out_at: usize,
    out_len: usize,
}

/// Chunks of a pinned run as a GPU pulls them: copied straight from the
/// shared input and into the shared output (each download enqueued under
/// the output's lock; the ordering module tracks each chunk's byte range,
/// so GPUs writing different chunks never wait for each other).
struct FedPinnedIo<'a, 'o, T: Element> {
    feed: &'a Feed<std::vec::IntoIter<Piece>>,
    input: &'a PinnedBuffer<T>,
    output: &'a Mutex<&'o mut PinnedBuffer<T>>,
    global: &'a GlobalIndex,
    /// This GPU's chunks uploaded and not yet downloaded, oldest first.
    to_download: VecDeque<Piece>,
}

impl<T: Element> ChunkIo<T> for FedPinnedIo<'_, '_, T> {
    type Slot = ();
    type Error = Error;

    fn make_slot(&mut self, _gpu: &Gpu) -> Result<()> {
        Ok(())
    }

    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        _slot: &mut (),
        dev: &mut DeviceBuffer<T>,
        chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>> {
        let Some((k, p)) = self.feed.pull(|it, _| Ok::<_, Error>(it.next()))? else {
            return Ok(None);
        };
        let _nvtx = Range::new("upload");
        self.global.set(chunk, k);
        self.to_download.push_back(p);
        let rec = lane.copy_htod_timed(self.input, p.at, dev, 0, p.len, timed)?;
        Ok(Some((p.len, rec.into())))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        _slot: &mut (),
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        let p = self
            .to_download
            .pop_front()
            .ok_or(Error::Config("chunk outputs out of step"))?;
        if p.out_len != len {
            return Err(Error::Config(
                "a stage produced another length than output_len said",
            ));
        }
        let mut out = lock(self.output);
        let rec = lane.copy_dtoh_timed(dev, 0, &mut out, p.out_at, len, timed)?;
        Ok(rec.into())
    }

    fn retire(&mut self, _slot: &mut (), chunk: ChunkId, _len: usize) -> Result<()> {
        self.global.retired(chunk);
        Ok(())
    }
}

/// A GPU's view of the shared items: takes the next item from the feed,
/// checking it first (the run's item numbers in errors).
struct FedItems<'f, I> {
    feed: &'f Feed<I>,
    chunk: usize,
    /// The first bad item ends the input; the run reports it.
    error: &'f Mutex<Option<Error>>,
    taken: &'f AtomicU64,
}

impl<'a, 'f, T: Element, I: Iterator<Item = (&'a [T], &'a mut [T])>> Iterator for FedItems<'f, I> {
    type Item = (&'a [T], &'a mut [T]);

    fn next(&mut self) -> Option<Self::Item> {
        let chunk = self.chunk;
        let pulled = self.feed.pull(|it, k| {
            let Some((input, out)) = it.next() else {
                return Ok(None);
            };
            if input.len() != out.len() {
                return Err(Error::OutputLength {
                    expected: input.len(),
                    actual: out.len(),
                });
            }
            if input.len() > chunk {
                return Err(Error::ItemTooLong {
                    item: k as usize,
                    len: input.len(),
                    chunk,
                });
            }
            Ok(Some((input, out)))
        });
        match pulled {
            Ok(Some((_, item))) => {
                self.taken.fetch_add(1, Ordering::Relaxed);
                Some(item)
            }
            Ok(None) => None,
            Err(e) => {
                lock(self.error).get_or_insert(e);
                None
            }
        }
    }
}

/// Numbers a GPU's chunks in the run's order of uploads (items batched by
/// several GPUs have no other common numbering).
struct Numbered<'c, Io> {
    inner: Io,
    next: &'c AtomicU64,
    global: &'c GlobalIndex,
}

impl<T: Element, Io: ChunkIo<T, Error = Error>> ChunkIo<T> for Numbered<'_, Io> {
    type Slot = Io::Slot;
    type Error = Error;

    fn make_slot(&mut self, gpu: &Gpu) -> Result<Io::Slot> {
        self.inner.make_slot(gpu)
    }

    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Io::Slot,
        dev: &mut DeviceBuffer<T>,
        chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>> {
        let r = self.inner.upload(lane, timed, slot, dev, chunk)?;
        if r.is_some() {
            self.global
                .set(chunk, self.next.fetch_add(1, Ordering::Relaxed));
        }
        Ok(r)
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Io::Slot,
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        self.inner.download(lane, timed, slot, dev, len)
    }

    fn retire(&mut self, slot: &mut Io::Slot, chunk: ChunkId, len: usize) -> Result<()> {
        self.inner.retire(slot, chunk, len)?;
        self.global.retired(chunk);
        Ok(())
    }
}

/// A stream's chunks as a GPU pulls them: the source fills the GPU's own
/// pinned slot (under the feed's lock, in input order); outputs reach the
/// sink in input order through [`InOrder`].
struct FedStreamIo<'a, T: Element, S, K> {
    feed: &'a Feed<S>,
    out: &'a InOrder<K, Vec<T>>,
    chunk: usize,
    capacity: usize,
    cache: &'a mut StagingCache<T>,
    global: &'a GlobalIndex,
    /// The source's failure: no more input for any GPU; the chunks before
    /// it still reach the sink, then the run reports it.
    failed: &'a Mutex<Option<Error>>,
}

impl<T: Element, S: Source<T>, K: Sink<T>> ChunkIo<T> for FedStreamIo<'_, T, S, K> {
    type Slot = Staged<T>;
    type Error = Error;

    fn make_slot(&mut self, gpu: &Gpu) -> Result<Staged<T>> {
        // Both host-readable (a source may read what it wrote).
        Ok(Staged {
            input: self.cache.output(gpu, self.chunk)?,
            output: self.cache.output(gpu, self.capacity)?,
        })
    }

    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Staged<T>,
        dev: &mut DeviceBuffer<T>,
        chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>> {
        let dst = &mut slot.input.as_mut_slice()?[..self.chunk];
        let pulled = self
            .feed
            .pull(|source, k| guard::fill(source, dst, k).map(|n| (n > 0).then_some(n)));
        let (k, len) = match pulled {
            Ok(Some(x)) => x,
            Ok(None) => return Ok(None),
            Err(e) => {
                lock(self.failed).get_or_insert(e);
                return Ok(None);
            }
        };
        let _nvtx = Range::new("upload");
        self.global.set(chunk, k);
        let rec = lane.copy_htod_timed(&slot.input, 0, dev, 0, len, timed)?;
        Ok(Some((len, rec.into())))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut Staged<T>,
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        download_staged(lane, timed, &mut slot.output, dev, len)
    }

    fn retire(&mut self, slot: &mut Staged<T>, chunk: ChunkId, len: usize) -> Result<()> {
        let k = self
            .global
            .get(chunk)
            .ok_or(Error::Config("a chunk's number was lost"))?;
        let data = &slot.output.as_slice()?[..len];
        let delivered = self.out.deliver(
            k,
            |sink| guard::accept(sink, k, data),
            || Ok(data.to_vec()),
            &|sink, i, v: Vec<T>| guard::accept(sink, i, &v),
        );
        // `None`: another GPU failed and the run stopped; this chunk is
        // not delivered.
        delivered.unwrap_or(Ok(()))?;
        self.global.retired(chunk);
        Ok(())
    }
}

/// Where one chunk of a multi-GPU graph run comes from and where each of
/// its outputs goes.
#[derive(Debug, Clone)]
struct GraphPiece {
    at: usize,
    len: usize,
    /// (offset, length) in each output.
    outs: Vec<(usize, usize)>,
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
        if graphs.len() != self.devices.len() {
            return Err(Error::GraphsPerGpu {
                expected: self.devices.len(),
                actual: graphs.len(),
            });
        }
        if graphs.iter().any(|g| !g.same_shape(&graphs[0])) {
            return Err(Error::Config(
                "the GPUs' graphs differ in shape (nodes, their names and inputs, or outputs)",
            ));
        }
        for g in self.gpus() {
            let mut bufs = vec![("input", input.gpu(), input.flags().portable)];
            for o in outputs.iter() {
                bufs.push(("output", o.gpu(), o.flags().portable));
            }
            for (what, owner, portable) in bufs {
                if !portable && !owner.same_context(g) {
                    return Err(Error::NotPortable {
                        what,
                        owner: owner.info().ordinal,
                    });
                }
            }
        }
        let lens: Vec<usize> = outputs.iter().map(|o| o.len()).collect();
        let mut runs = Vec::with_capacity(self.devices.len());
        for (d, g) in self.devices.iter_mut().zip(graphs.iter()) {
            runs.push(d.begin_graph(g, input.len(), &lens)?);
        }
        let started = Instant::now();
        let chunk = runs[0].chunk;
        let mut pieces = Vec::new();
        let mut at = 0usize;
        let mut out_at = vec![0usize; lens.len()];
        while at < input.len() {
            let len = chunk.min(input.len() - at);
            let node_lens = graphs[0].lengths(&runs[0].plan, len, pieces.len() as u64)?;
            let outs: Vec<(usize, usize)> = graphs[0]
                .output_lens(&node_lens)
                .into_iter()
                .zip(out_at.iter_mut())
                .map(|(l, o)| {
                    let r = (*o, l);
                    *o += l;
                    r
                })
                .collect();
            pieces.push(GraphPiece { at, len, outs });
            at += len;
        }
        let feed = Feed::new(pieces.into_iter());
        let outputs = Mutex::new(outputs);
        let graphs: Vec<Mutex<&mut crate::StageGraph<T>>> =
            graphs.iter_mut().map(Mutex::new).collect();
        let runs = &runs;
        let (counts, _) = self.drive_all(&|| feed.stop(), &|i, d, global| {
            let mut graph = lock(&graphs[i]);
            let run = &runs[i];
            let (mut driver, _, _) = d.graph_parts()?;
            driver.global = Some(global);
            let mut io = FedGraphPinnedIo {
                feed: &feed,
                input,
                outputs: &outputs,
                global,
                to_download: VecDeque::new(),
            };
            let mut p = crate::dag::GraphChain {
                graph: &mut **graph,
                plan: &run.plan,
                capacity: run.capacity,
                global: Some(global),
            };
            driver.drive(&mut io, &mut p).0.map(|c| (c, 0))
        })?;
        self.finish(started, &counts);
        Ok(())
    }
}

/// Chunks of a multi-GPU graph run as a GPU pulls them: uploaded from the
/// shared input, each output downloaded into its place in the shared
/// outputs (under their lock; the ordering module tracks byte ranges, so
/// GPUs writing different chunks never wait for each other).
struct FedGraphPinnedIo<'a, 'o, 'p, T: Element> {
    feed: &'a Feed<std::vec::IntoIter<GraphPiece>>,
    input: &'a PinnedBuffer<T>,
    outputs: &'a Mutex<&'o mut [&'p mut PinnedBuffer<T>]>,
    global: &'a GlobalIndex,
    to_download: VecDeque<GraphPiece>,
}

impl<T: Element> ChunkIo<T> for FedGraphPinnedIo<'_, '_, '_, T> {
    type Slot = ();
    type Error = Error;

    fn make_slot(&mut self, _gpu: &Gpu) -> Result<()> {
        Ok(())
    }

    fn upload(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        _slot: &mut (),
        dev: &mut DeviceBuffer<T>,
        chunk: ChunkId,
    ) -> Result<Option<(usize, Recorded)>> {
        let Some((k, p)) = self.feed.pull(|it, _| Ok::<_, Error>(it.next()))? else {
            return Ok(None);
        };
        let _nvtx = Range::new("upload");
        self.global.set(chunk, k);
        let rec = lane.copy_htod_timed(self.input, p.at, dev, 0, p.len, timed)?;
        let len = p.len;
        self.to_download.push_back(p);
        Ok(Some((len, rec.into())))
    }

    fn download(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        slot: &mut (),
        dev: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<Recorded> {
        self.download_outputs(lane, timed, slot, &[(dev, len)])
    }

    fn download_outputs(
        &mut self,
        lane: &mut Lane,
        timed: bool,
        _slot: &mut (),
        outs: &[(&DeviceBuffer<T>, usize)],
    ) -> Result<Recorded> {
        // A chunk whose outputs are all empty has no download step (the
        // engine skips it): its piece is dropped here.
        while self
            .to_download
            .front()
            .is_some_and(|p| p.outs.iter().all(|&(_, l)| l == 0))
        {
            self.to_download.pop_front();
        }
        let p = self
            .to_download
            .pop_front()
            .ok_or(Error::Config("chunk outputs out of step"))?;
        if p.outs.len() != outs.len() || p.outs.iter().zip(outs).any(|(a, b)| a.1 != b.1) {
            return Err(Error::Config(
                "a graph node produced another length than output_len said",
            ));
        }
        let mut dsts = lock(self.outputs);
        let targets = dsts
            .iter_mut()
            .map(|b| &mut **b)
            .zip(p.outs.iter().map(|&(at, _)| at));
        crate::dag::download_into(lane, timed, outs, targets)
    }

    fn retire(&mut self, _slot: &mut (), chunk: ChunkId, _len: usize) -> Result<()> {
        self.global.retired(chunk);
        Ok(())
    }

    fn retire_outputs(&mut self, _slot: &mut (), chunk: ChunkId, _lens: &[usize]) -> Result<()> {
        self.global.retired(chunk);
        Ok(())
    }
}
