//! The GPU backend on prism-buffer's ring [`Engine`]: two device buffers per
//! slot (stages read one and write the other, so a stage may change the
//! length), two compute lanes that alternate per chunk, and the stage chain
//! as the engine's [`ChunkProcessor`]. The I/O modes are in `ring`.

use std::borrow::Cow;

use prism_buffer::engine::{
    ChunkSpan, ComputeSpans, BRANCH_LANE, COMPUTE_LANE, DOWNLOAD_LANE, UPLOAD_LANE,
};
use prism_buffer::ring::{ChunkId, Step};
use prism_buffer::{ChunkOutputs, ChunkProcessor, Engine, EngineConfig};
use prism_stream::{DeviceBuffer, Element, Gpu, Launch, PinnedBuffer};

use crate::error::{Error, Result};
use crate::guard;
use crate::stage::AnyStage;
use crate::stats::{PipelineStats, Span, SpanKind, Timeline};

/// A new engine for the pipeline: `slots` slots of `buffers` (2 for a
/// chain) `capacity`-element buffers, two compute lanes.
pub(crate) fn new_engine<T: Element>(
    gpu: &Gpu,
    slots: usize,
    capacity: usize,
    buffers: usize,
) -> Result<Engine<T>> {
    let _span = tracing::debug_span!("prism.pipeline.gpu_engine", slots, capacity).entered();
    Ok(Engine::new(
        gpu,
        EngineConfig {
            slots,
            capacity,
            buffers_per_slot: buffers,
            compute_lanes: 2,
        },
    )?)
}

/// The stages in `order`, run over one chunk (the engine's processor).
pub(crate) struct StageChain<'a, T: Element> {
    pub(crate) stages: &'a mut [Box<dyn AnyStage<T>>],
    pub(crate) order: &'a [usize],
    pub(crate) capacity: usize,
    /// Added to the engine's chunk ids in error reports (an
    /// `execute_iteration` session's ring restarts after a failure while
    /// its indices go on).
    pub(crate) base: u64,
    /// A multi-GPU run's numbering of this GPU's chunks (errors name it).
    pub(crate) global: Option<&'a GlobalIndex>,
    /// Captured chains to replay (`PipelineConfig::graphs`), if on.
    pub(crate) graphs: Option<&'a mut ChainGraphs>,
}

/// Chains captured most recently that a manager keeps (a run uses one per
/// slot and chunk length: full chunks, and the few lengths at the ends).
const CHAIN_GRAPHS_KEPT: usize = 32;

/// Stage chains captured as CUDA graphs, each for the two buffers of one
/// slot and one chunk length (`PipelineConfig::graphs`). A graph holds its
/// buffers' memory, so the manager clears them whenever the ring is
/// rebuilt (and whenever the stages, their order or the configuration
/// change, since a graph replays what it captured).
#[derive(Debug, Default)]
pub(crate) struct ChainGraphs {
    entries: std::collections::VecDeque<ChainGraph>,
    launches: u64,
    captures: u64,
    /// A capture of this chain was refused (a stage enqueued something a
    /// graph cannot hold): it runs as usual until the chain changes.
    refused: bool,
}

#[derive(Debug)]
struct ChainGraph {
    graph: prism_stream::CapturedGraph,
    len: usize,
}

impl ChainGraphs {
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.refused = false;
    }

    /// (launches, captures) so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.launches, self.captures)
    }
}

/// The run's numbers of one GPU's chunks in a multi-GPU run (its engine
/// numbers them 0, 1, 2, ...): set when a chunk is uploaded, kept for the
/// last few hundred chunks (far more than a ring holds).
#[derive(Debug, Default)]
pub(crate) struct GlobalIndex {
    /// (engine's number, run's number), newest last.
    known: std::cell::RefCell<std::collections::VecDeque<(u64, u64)>>,
    /// The run's numbers of chunks uploaded and not yet retired.
    in_flight: std::cell::RefCell<Vec<(u64, u64)>>,
}

impl GlobalIndex {
    const KEEP: usize = 512;

    pub(crate) fn set(&self, local: ChunkId, global: u64) {
        let mut m = self.known.borrow_mut();
        if m.len() >= Self::KEEP {
            m.pop_front();
        }
        m.push_back((local.0, global));
        self.in_flight.borrow_mut().push((local.0, global));
    }

    pub(crate) fn get(&self, local: ChunkId) -> Option<u64> {
        self.known
            .borrow()
            .iter()
            .rev()
            .find(|(l, _)| *l == local.0)
            .map(|&(_, g)| g)
    }

    /// The chunk left the ring.
    pub(crate) fn retired(&self, local: ChunkId) {
        self.in_flight.borrow_mut().retain(|(l, _)| *l != local.0);
    }

    /// The oldest chunk (the run's number) still in the ring.
    pub(crate) fn oldest(&self) -> Option<u64> {
        self.in_flight.borrow().iter().map(|&(_, g)| g).min()
    }

    /// The run's number of `local`, or `local` offset by `base` when unknown.
    pub(crate) fn or(this: Option<&Self>, local: ChunkId, base: u64) -> u64 {
        this.and_then(|g| g.get(local)).unwrap_or(base + local.0)
    }
}

impl<T: Element> ChunkProcessor<T> for StageChain<'_, T> {
    type Error = Error;

    fn process(
        &mut self,
        launch: &mut Launch<'_>,
        bufs: &mut [DeviceBuffer<T>],
        len: usize,
        chunk: ChunkId,
        spans: &mut ComputeSpans,
    ) -> Result<ChunkOutputs> {
        let replay = self.graphs.as_deref().is_some_and(|g| !g.refused)
            && self.order.iter().all(|&i| self.stages[i].capturable());
        if replay {
            // `None`: the capture was refused; run as usual below.
            if let Some((len, buf)) = self.process_graph(launch, bufs, len, chunk, spans)? {
                return Ok(ChunkOutputs::one(buf, len));
            }
        }
        let (len, buf) = self.process_direct(launch, bufs, len, chunk, spans)?;
        Ok(ChunkOutputs::one(buf, len))
    }
}

impl<T: Element> StageChain<'_, T> {
    /// The stages' lengths over a chunk of `len`: (output length, the
    /// buffer holding it), checked against the capacity, on the host.
    fn lengths(&self, len: usize, chunk: ChunkId) -> Result<(usize, usize)> {
        let (mut len, mut cur) = (len, 0usize);
        for &i in self.order {
            if len == 0 {
                break;
            }
            let index = GlobalIndex::or(self.global, chunk, self.base);
            let out_len = guard::output_len(&*self.stages[i], len, index)?;
            if out_len > self.capacity {
                return Err(Error::Config(
                    "a stage produced more elements than the pipeline planned for",
                ));
            }
            len = out_len;
            cur = 1 - cur;
        }
        Ok((len, cur))
    }

    /// The chunk's stages as one launch of the graph captured for this
    /// slot's buffers and this length (captured now if there is none).
    /// `None` when the capture was refused (the chain then runs as usual,
    /// from now on).
    fn process_graph(
        &mut self,
        launch: &mut Launch<'_>,
        bufs: &mut [DeviceBuffer<T>],
        len: usize,
        chunk: ChunkId,
        spans: &mut ComputeSpans,
    ) -> Result<Option<(usize, usize)>> {
        let out = self.lengths(len, chunk)?;
        if len == 0 || bufs.len() < 2 {
            return Ok(Some((len, 0)));
        }
        let graphs = self
            .graphs
            .as_deref_mut()
            .ok_or(Error::Config("no graphs"))?;
        let found = graphs
            .entries
            .iter()
            .position(|e| e.len == len && e.graph.uses(&bufs[0]) && e.graph.uses(&bufs[1]));
        let at = match found {
            Some(at) => at,
            None => {
                let (stages, order, global, base) =
                    (&mut *self.stages, self.order, self.global, self.base);
                let mut failed: Option<Error> = None;
                let captured = launch.capture(|c| {
                    let mut inner = StageChain {
                        stages: &mut *stages,
                        order,
                        capacity: usize::MAX,
                        base,
                        global,
                        graphs: None,
                    };
                    // Untimed inside the capture (a graph holds no fence).
                    let mut untimed = ComputeSpans::untimed();
                    match inner.process_direct(c, bufs, len, chunk, &mut untimed) {
                        Ok(_) => Ok(()),
                        Err(e) => {
                            failed = Some(e);
                            Err(prism_stream::Error::user("a stage failed while captured"))
                        }
                    }
                });
                let graphs = self
                    .graphs
                    .as_deref_mut()
                    .ok_or(Error::Config("no graphs"))?;
                let refused = |e: &Error| crate::resident::refusal(e).is_some();
                match (captured, failed) {
                    (Ok((graph, ())), _) => {
                        graphs.captures += 1;
                        if graphs.entries.len() >= CHAIN_GRAPHS_KEPT {
                            graphs.entries.pop_front();
                        }
                        graphs.entries.push_back(ChainGraph { graph, len });
                        graphs.entries.len() - 1
                    }
                    (Err(_), Some(e)) if !refused(&e) => return Err(e),
                    (Err(_), Some(_)) | (Err(prism_stream::Error::NotCapturable { .. }), None) => {
                        tracing::debug!("a stage chain could not be captured: it runs as usual");
                        graphs.refused = true;
                        return Ok(None);
                    }
                    (Err(e), None) => return Err(e.into()),
                }
            }
        };
        let graphs = self
            .graphs
            .as_deref_mut()
            .ok_or(Error::Config("no graphs"))?;
        let timed = spans.timed();
        let run = launch.launch_graph(&mut graphs.entries[at].graph, timed)?;
        graphs.launches += 1;
        if let (true, Some(start)) = (timed, run.start_fence()) {
            let names: Vec<&str> = self.order.iter().map(|&i| self.stages[i].name()).collect();
            spans.record(
                Cow::Owned(format!("graph: {}", names.join("+"))),
                start.clone(),
                run.fence().clone(),
            );
        }
        Ok(Some(out))
    }

    /// The chunk's stages, each queued as it comes.
    pub(crate) fn process_direct(
        &mut self,
        launch: &mut Launch<'_>,
        bufs: &mut [DeviceBuffer<T>],
        len: usize,
        chunk: ChunkId,
        spans: &mut ComputeSpans,
    ) -> Result<(usize, usize)> {
        let (mut len, mut cur) = (len, 0usize);
        for &i in self.order {
            if len == 0 {
                // A stage made no output: nothing is left to process.
                break;
            }
            let stage = &mut *self.stages[i];
            let _nvtx = prism_stream::nvtx::Range::new(stage.name());
            let index = GlobalIndex::or(self.global, chunk, self.base);
            let out_len = guard::output_len(stage, len, index)?;
            if out_len > self.capacity {
                return Err(Error::Config(
                    "a stage produced more elements than the pipeline planned for",
                ));
            }
            let (lo, hi) = bufs.split_at_mut(1);
            let (input, output) = if cur == 0 {
                (&lo[0], &mut hi[0])
            } else {
                (&hi[0], &mut lo[0])
            };
            let start = if spans.timed() {
                // Order both buffers first, so a timed start excludes waiting.
                launch.prepare_read(input)?;
                launch.prepare_write(output)?;
                Some(launch.timed_fence()?)
            } else {
                None
            };
            guard::run_stage(stage, index, |s| s.gpu(launch, input, output, len))?;
            if let Some(start) = start {
                let end = launch.timed_fence()?;
                spans.record(Cow::Owned(stage.name().to_owned()), start, end);
            }
            len = out_len;
            cur = 1 - cur;
        }
        Ok((len, cur))
    }
}

/// Adds a retired chunk's spans to the stats and, with tracing, the timeline.
pub(crate) fn record_span(
    stats: &mut PipelineStats,
    timeline: Option<&mut Timeline>,
    s: ChunkSpan,
) {
    let ms = s.end_ms - s.start_ms;
    let lane = match s.step {
        Step::Upload => {
            stats.upload_ms += ms;
            SpanKind::Upload
        }
        Step::Download => {
            stats.download_ms += ms;
            SpanKind::Download
        }
        Step::Process => {
            stats.add_stage_time(&s.name, ms);
            SpanKind::Compute
        }
    };
    if let Some(t) = timeline {
        t.spans.push(Span {
            chunk: s.chunk.0,
            stream: trace_stream(s.lane),
            lane,
            name: s.name.into_owned(),
            start_ms: s.start_ms,
            end_ms: s.end_ms,
        });
    }
}

/// The trace's stream numbering (0 upload, 1 and 3 compute, 2 download,
/// 6 and up a stage graph's branch lanes).
fn trace_stream(lane: usize) -> usize {
    match lane {
        UPLOAD_LANE => 0,
        DOWNLOAD_LANE => 2,
        l if l == COMPUTE_LANE => 1,
        l if l >= BRANCH_LANE => crate::stats::FIRST_BRANCH_STREAM + (l - BRANCH_LANE),
        _ => 3,
    }
}

/// Pinned staging kept between runs, so runs after the first allocate none.
#[derive(Debug)]
pub(crate) struct StagingCache<T: Element> {
    /// Write-combined (upload-only) buffers.
    inputs: Vec<PinnedBuffer<T>>,
    outputs: Vec<PinnedBuffer<T>>,
    descriptors: Vec<PinnedBuffer<u64>>,
}

impl<T: Element> Default for StagingCache<T> {
    fn default() -> Self {
        Self {
            inputs: Vec::new(),
            outputs: Vec::new(),
            descriptors: Vec::new(),
        }
    }
}

impl<T: Element> StagingCache<T> {
    pub(crate) fn input(&mut self, gpu: &Gpu, len: usize) -> Result<PinnedBuffer<T>> {
        take_or_make(
            &mut self.inputs,
            gpu,
            len,
            prism_stream::HostAllocFlags::UPLOAD_ONLY,
        )
    }

    pub(crate) fn output(&mut self, gpu: &Gpu, len: usize) -> Result<PinnedBuffer<T>> {
        take_or_make(
            &mut self.outputs,
            gpu,
            len,
            prism_stream::HostAllocFlags::DEFAULT,
        )
    }

    pub(crate) fn descriptors(&mut self, gpu: &Gpu, len: usize) -> Result<PinnedBuffer<u64>> {
        take_or_make(
            &mut self.descriptors,
            gpu,
            len,
            prism_stream::HostAllocFlags::DEFAULT,
        )
    }

    pub(crate) fn give_input(&mut self, b: PinnedBuffer<T>) {
        self.inputs.push(b);
    }

    pub(crate) fn give_output(&mut self, b: PinnedBuffer<T>) {
        self.outputs.push(b);
    }

    pub(crate) fn give_descriptors(&mut self, b: PinnedBuffer<u64>) {
        self.descriptors.push(b);
    }

    /// Frees everything (after a configuration change).
    pub(crate) fn clear(&mut self) {
        self.inputs.clear();
        self.outputs.clear();
        self.descriptors.clear();
    }
}

fn take_or_make<E: Element>(
    pool: &mut Vec<PinnedBuffer<E>>,
    gpu: &Gpu,
    len: usize,
    flags: prism_stream::HostAllocFlags,
) -> Result<PinnedBuffer<E>> {
    if let Some(i) = pool.iter().position(|b| b.len() >= len) {
        return Ok(pool.swap_remove(i));
    }
    Ok(PinnedBuffer::new(gpu, len.max(1), flags)?)
}
