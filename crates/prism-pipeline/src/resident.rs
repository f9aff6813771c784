//! `ResidentPipeline`: the design's iteration mode. A few phases (stages)
//! run again and again over state that stays on the GPU (a graph, a model,
//! a grid): nothing is uploaded per iteration, and each iteration reads
//! back a small range (a residual, a counter) that the host waits for, or
//! not.
//!
//! With graphs on (the default), the first iteration captures the ordered
//! stages and the read-back into one CUDA graph ([`Lane::capture`]) and
//! every later one launches it ([`CapturedGraph::launch`]): one driver call
//! per iteration, whatever the number of kernels. What would make the graph
//! stale makes it captured again: a stage added, a new order, a new
//! read-back, `&mut` access to the state (buffers may have been replaced),
//! or [`ResidentPipeline::invalidate_graph`]. [`GraphPolicy`] is that state
//! machine, with no GPU in it (proptested below).

use std::collections::VecDeque;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use prism_stream::nvtx::Range as NvtxRange;
use prism_stream::{
    CapturedGraph, DeviceBuffer, Element, Fence, Gpu, GraphLaunch, Lane, Launch, Probe, Readback,
    ReadbackKey, StreamPurpose,
};

use crate::error::{Error, Result, StageError};
use crate::guard::panic_message;
use crate::stats::ResidentStats;

/// How a [`ResidentPipeline`] runs its iterations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResidentConfig {
    /// Capture the iteration into a CUDA graph once and launch the graph
    /// afterwards (default on). The stage closures then run only when the
    /// graph is captured (see [`ResidentPipeline`]).
    pub graphs: bool,
    /// Time each iteration on the GPU with timed fences, for
    /// [`ResidentStats`] (default on).
    pub timing: bool,
}

impl Default for ResidentConfig {
    fn default() -> Self {
        Self {
            graphs: true,
            timing: true,
        }
    }
}

/// What the next iteration does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Capture a graph, then launch it.
    Capture,
    /// Launch the graph captured earlier.
    Replay,
    /// Call the stages, no graph.
    Direct,
}

/// Whether the captured graph still matches the pipeline: the state
/// machine behind graph replay, without a GPU.
///
/// A refusal (a stage did something a graph cannot hold) sticks until the
/// stages, their order or the read-back change, or the graph is
/// invalidated by hand; `&mut` access to the state alone does not lift it
/// (the same stages would be refused again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GraphPolicy {
    enabled: bool,
    /// A graph matching the stages, order, read-back and state exists.
    valid: bool,
    /// The last capture was refused and nothing that could change that
    /// happened since.
    refused: bool,
}

impl GraphPolicy {
    pub(crate) fn new(enabled: bool) -> Self {
        Self {
            enabled,
            valid: false,
            refused: false,
        }
    }

    pub(crate) fn plan(&self) -> Plan {
        if !self.enabled || self.refused {
            Plan::Direct
        } else if self.valid {
            Plan::Replay
        } else {
            Plan::Capture
        }
    }

    /// A stage was added, the order or the read-back changed, or the
    /// caller invalidated the graph: capture again (even after a refusal).
    pub(crate) fn stages_changed(&mut self) {
        self.valid = false;
        self.refused = false;
    }

    /// The state was handed out mutably: its buffers may have changed.
    pub(crate) fn state_changed(&mut self) {
        self.valid = false;
    }

    pub(crate) fn captured(&mut self) {
        self.valid = true;
        self.refused = false;
    }

    pub(crate) fn refused(&mut self) {
        self.valid = false;
        self.refused = true;
    }

    /// A capture failed for another reason (a stage error): try again
    /// next time.
    pub(crate) fn failed(&mut self) {
        self.valid = false;
    }
}

/// A stage: its name and the closure that queues its work.
type StageFn<S> = Box<dyn FnMut(&mut Launch<'_>, &mut S) -> Result<(), StageError> + Send>;

/// Picks the read-back range of an iteration from the state.
type ReadbackFn<S, R> = Box<dyn Fn(&S) -> (&DeviceBuffer<R>, Range<usize>) + Send>;

struct ResidentStage<S> {
    name: String,
    f: StageFn<S>,
}

/// A captured iteration and its read-back's key.
struct Captured<R> {
    graph: CapturedGraph,
    key: Option<ReadbackKey<R>>,
}

/// An iteration whose GPU time is not counted yet.
#[derive(Debug)]
enum Pending {
    /// A timed graph launch.
    Graph(GraphLaunch),
    /// An iteration without a graph: a timed fence before the stages,
    /// one after each stage (with its index), one at the end.
    Direct {
        start: Fence,
        stages: Vec<(usize, Fence)>,
        end: Fence,
    },
}

impl Pending {
    fn end(&self) -> &Fence {
        match self {
            Pending::Graph(g) => g.fence(),
            Pending::Direct { end, .. } => end,
        }
    }
}

/// Timed iterations kept unresolved at most; past this many the oldest is
/// waited for (so the GPU runs at most this many timed iterations behind).
const MAX_PENDING: usize = 64;

/// One queued iteration of a [`ResidentPipeline`]: its fence and, if the
/// pipeline has a read-back, its values. Holding it holds nothing else:
/// later iterations may be queued while it is pending, and each has its
/// own read-back slot.
#[derive(Debug)]
pub struct Iteration<R: Element> {
    index: u64,
    from_graph: bool,
    fence: Fence,
    readback: Option<Readback<R>>,
}

impl<R: Element> Iteration<R> {
    /// Its number (0 for the first call of `execute_iteration`; failed
    /// calls use a number too).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Whether it ran as a launch of a captured graph.
    pub fn from_graph(&self) -> bool {
        self.from_graph
    }

    /// The fence after its work (to order other lanes after it).
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// True once it completed on the GPU (never blocks).
    pub fn is_ready(&self) -> Result<bool> {
        Ok(self.fence.is_complete()?)
    }

    /// Its read-back values if it completed, without blocking (`Some`
    /// empty when it reads nothing back).
    pub fn try_get(&self) -> Result<Option<Vec<R>>> {
        match &self.readback {
            Some(r) => Ok(r.try_get()?),
            None => Ok(self.is_ready()?.then(Vec::new)),
        }
    }

    /// Blocks until it completed (this iteration only, not later ones) and
    /// returns its read-back values (empty when it reads nothing back).
    pub fn wait(self) -> Result<Vec<R>> {
        match self.readback {
            Some(r) => Ok(r.wait()?),
            None => match self.fence.synchronize() {
                Probe::Failed(reason) => {
                    Err(prism_stream::Error::ContextPoisoned { reason }.into())
                }
                _ => Ok(Vec::new()),
            },
        }
    }

    /// [`wait`](Self::wait) for the first value read back (a residual, a
    /// counter); [`Error::NoReadback`] when it reads nothing back.
    pub fn wait_value(self) -> Result<R> {
        let r = self.readback.ok_or(Error::NoReadback)?;
        Ok(r.wait_value()?)
    }

    /// The read-back itself (to await elsewhere), if any.
    pub fn into_readback(self) -> Option<Readback<R>> {
        self.readback
    }
}

/// The design's iteration mode: stages run again and again over state
/// kept on the GPU.
///
/// The state `S` (device buffers, and anything else) is built on the
/// pipeline's lane by `new`'s closure, for example
/// `DeviceBuffer::from_slice(lane, &graph.row_ptr)`. Each stage is a closure
/// that queues work on the pipeline's compute lane with the state
/// (`launch.kernel(&k).arg(&s.rank).arg_mut(&mut s.next)...`, prism's
/// kernels, `copy_dtod`, `fill`, outside work). [`execute_iteration`](Self::execute_iteration)
/// runs them once, in order, and returns at once with an [`Iteration`]
/// that holds the iteration's fence and the read-back chosen with
/// [`set_readback`](Self::set_readback) (element type `R`):
///
/// ```no_run
/// # use prism_pipeline::{ResidentConfig, ResidentPipeline};
/// # use prism_stream::{DeviceBuffer, Gpu};
/// # fn main() -> prism_pipeline::Result<()> {
/// # let gpu = Gpu::open(0)?;
/// struct State { x: DeviceBuffer<f32>, change: DeviceBuffer<f32> }
/// let mut p = ResidentPipeline::new(&gpu, ResidentConfig::default(), |lane| {
///     Ok(State {
///         x: DeviceBuffer::from_slice(lane, &vec![1.0f32; 1 << 20])?,
///         change: DeviceBuffer::zeroed(lane, 1)?,
///     })
/// })?;
/// p.add_stage("step", |launch, s: &mut State| {
///     let n = s.x.len();
///     launch.fma_chain_in_place(&mut s.x, n, 0.5, 0.0, 1)?; // your kernels here
///     launch.copy_dtod(&s.x, 0, &mut s.change, 0, 1)?;
///     Ok(())
/// });
/// p.set_readback(|s: &State| (&s.change, 0..1));
/// for _ in 0..100 {
///     if p.execute_iteration()?.wait_value()? < 1e-6 {
///         break;
///     }
/// }
/// println!("{}", p.get_stats());
/// # Ok(()) }
/// ```
///
/// A caller that does not want to stall keeps the `Iteration` and reads it
/// after queueing the next ones: iterations are independent, each with its
/// own read-back slot.
///
/// # Graphs
///
/// With [`ResidentConfig::graphs`] on, the first iteration captures the
/// ordered stages and the read-back into a CUDA graph and later ones
/// launch it: one driver call per iteration. **A graph replays the same
/// kernels with the same arguments on the same buffers**: the stage
/// closures run only when the graph is captured, and scalar parameters
/// (`value(n)`, a damping factor, an iteration number) are captured by
/// value. The graph is captured again at the next iteration after
/// [`add_stage`](Self::add_stage), [`set_order`](Self::set_order),
/// [`set_readback`](Self::set_readback) or [`state_mut`](Self::state_mut)
/// (which may replace buffers), and after [`invalidate_graph`](Self::invalidate_graph),
/// for stages whose parameters changed in ways prism cannot see. If a
/// stage queues something a graph cannot hold (a timed fence, a wait, an
/// upload from pageable memory: `prism_stream::Error::NotCapturable`), the
/// capture is discarded and the pipeline runs without a graph (this
/// iteration calls the stages twice: once for the refused capture, whose
/// work never runs, once for real), recorded in the stats
/// (`capture_refusals`, `refusal`); it tries again after the stages, their
/// order or the read-back change, or `invalidate_graph`. Other errors are
/// returned.
///
/// # Errors
///
/// A stage's error (or panic) is [`Error::ResidentStage`], naming the
/// stage and iteration. Without a graph the stages before it were queued
/// and run, so the state is as they left it; during a capture nothing ran.
pub struct ResidentPipeline<S, R: Element = f32> {
    gpu: Gpu,
    config: ResidentConfig,
    /// The compute lane: the state is built, and every iteration queued, here.
    lane: Lane,
    /// The lane of `read_value` (made on first use), so a read waits for
    /// the value's last writer only, not for every queued iteration.
    reader: Option<Lane>,
    state: S,
    stages: Vec<ResidentStage<S>>,
    /// Indices into `stages`, in the order they run.
    order: Vec<usize>,
    /// Whether `set_order` chose the order (else `add_stage` appends).
    ordered: bool,
    readback: Option<ReadbackFn<S, R>>,
    policy: GraphPolicy,
    graph: Option<Captured<R>>,
    /// The number of the next iteration.
    next: u64,
    pending: VecDeque<Pending>,
    stats: ResidentStats,
}

impl<S, R: Element> std::fmt::Debug for ResidentPipeline<S, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
        f.debug_struct("ResidentPipeline")
            .field("device", &self.stats.device)
            .field("config", &self.config)
            .field("stages", &names)
            .field("order", &self.order)
            .field("readback", &self.readback.is_some())
            .field("graph", &self.policy.plan())
            .finish()
    }
}

impl<S, R: Element> ResidentPipeline<S, R> {
    /// A pipeline on `gpu` whose state `init` builds on the pipeline's
    /// compute lane (uploads queued there are ordered before every
    /// iteration). An error of `init` is [`Error::ResidentInit`].
    pub fn new(
        gpu: &Gpu,
        config: ResidentConfig,
        init: impl FnOnce(&mut Lane) -> std::result::Result<S, StageError>,
    ) -> Result<Self> {
        let _span = tracing::debug_span!("prism.pipeline.resident.new").entered();
        let mut lane = Lane::new(gpu)?;
        let state = init(&mut lane).map_err(|source| Error::ResidentInit { source })?;
        Ok(Self {
            gpu: gpu.clone(),
            config,
            lane,
            reader: None,
            state,
            stages: Vec::new(),
            order: Vec::new(),
            ordered: false,
            readback: None,
            policy: GraphPolicy::new(config.graphs),
            graph: None,
            next: 0,
            pending: VecDeque::new(),
            stats: ResidentStats {
                device: gpu.info().name.clone(),
                timed: config.timing,
                ..Default::default()
            },
        })
    }

    /// The GPU it runs on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The configuration.
    pub fn config(&self) -> &ResidentConfig {
        &self.config
    }

    /// Adds a stage named `name`, run after the earlier ones (once
    /// `set_order` chose an order, only an order that names it runs it);
    /// returns its index. `f` queues the
    /// stage's work on the launch scope it is given, with the state; with
    /// graphs on it is called when the iteration is captured, not at every
    /// iteration (see [Graphs](Self#graphs)). The next iteration captures
    /// a new graph.
    pub fn add_stage(
        &mut self,
        name: impl Into<String>,
        f: impl FnMut(&mut Launch<'_>, &mut S) -> Result<(), StageError> + Send + 'static,
    ) -> usize {
        self.stages.push(ResidentStage {
            name: name.into(),
            f: Box::new(f),
        });
        let index = self.stages.len() - 1;
        if !self.ordered {
            self.order.push(index);
        }
        self.invalidate_stages();
        index
    }

    /// Runs only `order`'s stages, in that order (checked as
    /// [`PipelineStageManager::set_order`](crate::PipelineStageManager::set_order)
    /// checks it). The next iteration captures a new graph.
    pub fn set_order(&mut self, order: &[usize]) -> Result<()> {
        crate::check_order(order, self.stages.len())?;
        self.order = order.to_vec();
        self.ordered = true;
        self.invalidate_stages();
        Ok(())
    }

    /// The stages' names, in the order they run.
    pub fn stage_names(&self) -> Vec<&str> {
        self.order
            .iter()
            .map(|&i| self.stages[i].name.as_str())
            .collect()
    }

    /// Each iteration reads back `buffer[range]` of the state, as `f`
    /// picks them, after its stages (one small copy into a pinned slot; a
    /// graph holds it as a node). The next iteration captures a new graph.
    pub fn set_readback(
        &mut self,
        f: impl Fn(&S) -> (&DeviceBuffer<R>, Range<usize>) + Send + 'static,
    ) {
        self.readback = Some(Box::new(f));
        self.invalidate_stages();
    }

    /// Makes the next iteration capture a new graph (for a stage whose
    /// parameters changed: a graph replays the values it captured). Also
    /// lifts a refusal: the next iteration tries to capture again.
    pub fn invalidate_graph(&mut self) {
        self.invalidate_stages();
    }

    fn invalidate_stages(&mut self) {
        self.policy.stages_changed();
        self.graph = None;
    }

    /// The state (to read its buffers with a lane, say).
    pub fn state(&self) -> &S {
        &self.state
    }

    /// The state, mutably. The graph is dropped and the next iteration
    /// captures a new one, since buffers may be replaced through this.
    pub fn state_mut(&mut self) -> &mut S {
        self.policy.state_changed();
        self.graph = None;
        &mut self.state
    }

    /// Reads the one value `f(state)[index]`, blocking until it has
    /// arrived: the copy runs on a lane of its own after the value's last
    /// writer (the iterations that wrote the buffer, not later ones), and
    /// the host waits for that copy only.
    pub fn read_value<T: Element>(
        &mut self,
        f: impl Fn(&S) -> &DeviceBuffer<T>,
        index: usize,
    ) -> Result<T> {
        let reader = match &mut self.reader {
            Some(l) => l,
            empty => empty.insert(Lane::with_purpose(&self.gpu, StreamPurpose::Download)?),
        };
        Ok(reader.read_value(f(&self.state), index)?)
    }

    /// Blocks until every queued iteration has completed, and counts their
    /// GPU times.
    pub fn synchronize(&mut self) -> Result<()> {
        let fence = self.lane.fence()?;
        if let Probe::Failed(reason) = fence.synchronize() {
            return Err(prism_stream::Error::ContextPoisoned { reason }.into());
        }
        self.resolve(0);
        Ok(())
    }

    /// The state, once the GPU is done with it (the graph, which also
    /// holds its buffers, is dropped first).
    pub fn into_state(mut self) -> Result<S> {
        self.graph = None;
        self.synchronize()?;
        Ok(self.state)
    }

    /// Statistics since creation or the last `reset_stats`; the GPU times
    /// of iterations that completed since the last call are counted now
    /// (iterations still running are counted by a later call).
    pub fn get_stats(&mut self) -> &ResidentStats {
        self.resolve(usize::MAX);
        &self.stats
    }

    /// Clears the statistics (iterations queued before are not timed).
    pub fn reset_stats(&mut self) {
        self.pending.clear();
        self.stats = ResidentStats {
            device: std::mem::take(&mut self.stats.device),
            timed: self.config.timing,
            ..Default::default()
        };
    }

    /// Counts the GPU time of completed timed iterations, oldest first; while
    /// more than `keep` are pending, waits for the oldest.
    fn resolve(&mut self, keep: usize) {
        while let Some(front) = self.pending.front() {
            let done = match front.end().probe() {
                Probe::Complete => true,
                Probe::NotReady if self.pending.len() > keep => {
                    !matches!(front.end().synchronize(), Probe::Failed(_))
                }
                Probe::NotReady => break,
                Probe::Failed(_) => false,
            };
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            if done {
                self.count(p);
            }
            // A failed fence: its iteration's time is lost (the context is
            // poisoned; the next call that queues work reports it).
        }
    }

    fn count(&mut self, p: Pending) {
        let total = match &p {
            Pending::Graph(g) => g.gpu_ms().and_then(|r| r.ok()),
            Pending::Direct { start, end, .. } => end.elapsed_ms_since(start).ok(),
        };
        let Some(total) = total else { return };
        self.stats.gpu_ms += f64::from(total);
        self.stats.timed_iterations += 1;
        if let Pending::Direct { start, stages, .. } = &p {
            let mut prev = start;
            for (i, mark) in stages {
                if let Ok(ms) = mark.elapsed_ms_since(prev) {
                    let name = &self.stages[*i].name;
                    self.stats.add_stage_time(name, f64::from(ms));
                }
                prev = mark;
            }
        }
    }

    /// Queues one iteration: the stages in order over the state, then the
    /// read-back; returns at once (it waits only when more than 64 timed
    /// iterations are still running, for the oldest). With graphs on, the
    /// first call (and the first after a change) captures the graph, later
    /// ones launch it. [`Error::NoStages`] when there is no stage.
    pub fn execute_iteration(&mut self) -> Result<Iteration<R>> {
        let _nvtx = NvtxRange::new("execute_iteration");
        let index = self.next;
        let _span =
            tracing::trace_span!("prism.pipeline.resident.execute_iteration", index).entered();
        if self.order.is_empty() {
            return Err(Error::NoStages);
        }
        self.next += 1;
        let mut plan = self.policy.plan();
        if plan == Plan::Capture {
            let started = Instant::now();
            let captured = self.capture(index);
            self.stats.capture_ms += started.elapsed().as_secs_f64() * 1e3;
            match captured {
                Ok(()) => {
                    self.policy.captured();
                    self.stats.captures += 1;
                }
                Err(e) => match refusal(&e) {
                    Some(reason) => {
                        tracing::debug!(%reason, "capture refused: running without a graph");
                        self.policy.refused();
                        self.stats.capture_refusals += 1;
                        self.stats.refusal = Some(reason);
                        plan = Plan::Direct;
                    }
                    None => {
                        self.policy.failed();
                        return Err(e);
                    }
                },
            }
        }
        let started = Instant::now();
        let iteration = match plan {
            Plan::Capture | Plan::Replay => self.launch_graph(index, plan == Plan::Replay)?,
            Plan::Direct => self.run_direct(index)?,
        };
        self.stats.iterations += 1;
        if iteration.from_graph && plan == Plan::Replay {
            self.stats.replayed += 1;
        }
        if self.pending.len() > MAX_PENDING {
            self.resolve(MAX_PENDING);
        }
        self.stats.host_ms += started.elapsed().as_secs_f64() * 1e3;
        Ok(iteration)
    }

    /// Captures the ordered stages and the read-back into a new graph.
    fn capture(&mut self, index: u64) -> Result<()> {
        let _span = tracing::debug_span!("prism.pipeline.resident.capture", index).entered();
        let _nvtx = NvtxRange::new("capture");
        // The old graph goes first (it may hold buffers the state replaced).
        self.graph = None;
        let Self {
            lane,
            stages,
            order,
            state,
            readback,
            ..
        } = self;
        let mut failed: Option<Error> = None;
        let captured = lane.capture(|c| {
            for &i in order.iter() {
                if let Err(e) = call_stage(&mut stages[i], c, state, index) {
                    failed = Some(e);
                    return Err(prism_stream::Error::user(
                        "a stage failed while it was being captured",
                    ));
                }
            }
            match readback {
                Some(f) => {
                    let (buf, range) = f(state);
                    c.read_back(buf, range.start, range.len()).map(Some)
                }
                None => Ok(None),
            }
        });
        match captured {
            Ok((graph, key)) => {
                self.graph = Some(Captured { graph, key });
                Ok(())
            }
            Err(e) => Err(failed.take().unwrap_or(Error::Stream(e))),
        }
    }

    /// Launches the captured graph.
    fn launch_graph(&mut self, index: u64, replay: bool) -> Result<Iteration<R>> {
        let captured = self
            .graph
            .as_mut()
            .ok_or(Error::Config("no captured graph to launch"))?;
        let _nvtx = NvtxRange::new(if replay {
            "graph launch"
        } else {
            "first graph launch"
        });
        let mut run = if self.config.timing {
            captured.graph.launch_timed(&mut self.lane)?
        } else {
            captured.graph.launch(&mut self.lane)?
        };
        let readback = match captured.key {
            Some(key) => Some(run.read_back(key)?),
            None => None,
        };
        let fence = run.fence().clone();
        if self.config.timing {
            self.pending.push_back(Pending::Graph(run));
        }
        Ok(Iteration {
            index,
            from_graph: true,
            fence,
            readback,
        })
    }

    /// Calls the stages on the lane (timed fences between them with
    /// timing on), then queues the read-back.
    fn run_direct(&mut self, index: u64) -> Result<Iteration<R>> {
        let timing = self.config.timing;
        let Self {
            lane,
            stages,
            order,
            state,
            readback,
            pending,
            ..
        } = self;
        let mut launch = lane.launch();
        let start = if timing {
            Some(launch.timed_fence()?)
        } else {
            None
        };
        let mut marks = Vec::new();
        for &i in order.iter() {
            call_stage(&mut stages[i], &mut launch, state, index)?;
            if timing {
                marks.push((i, launch.timed_fence()?));
            }
        }
        let readback = match readback {
            Some(f) => {
                let (buf, range) = f(state);
                Some(launch.read_async(buf, range.start, range.len())?)
            }
            None => None,
        };
        let fence = if timing {
            launch.timed_fence()?
        } else {
            match (&readback, launch.last_fence()) {
                (Some(r), _) => r.fence().clone(),
                (None, Some(f)) => f.clone(),
                (None, None) => lane.fence()?,
            }
        };
        if let Some(start) = start {
            pending.push_back(Pending::Direct {
                start,
                stages: marks,
                end: fence.clone(),
            });
        }
        Ok(Iteration {
            index,
            from_graph: false,
            fence,
            readback,
        })
    }
}

/// Calls one stage: an error or a panic is [`Error::ResidentStage`].
fn call_stage<S>(
    stage: &mut ResidentStage<S>,
    launch: &mut Launch<'_>,
    state: &mut S,
    iteration: u64,
) -> Result<()> {
    let _nvtx = NvtxRange::new(&stage.name);
    let outcome = catch_unwind(AssertUnwindSafe(|| (stage.f)(launch, state)));
    let source: StageError = match outcome {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => e,
        Err(payload) => format!("panicked: {}", panic_message(&*payload)).into(),
    };
    Err(Error::ResidentStage {
        stage: stage.name.clone(),
        iteration,
        source,
    })
}

/// Why a capture was refused, if `e` is a refusal: prism-stream's
/// `NotCapturable`, returned by prism itself or by a stage (anywhere in
/// its error's source chain).
pub(crate) fn refusal(e: &Error) -> Option<String> {
    let first: &(dyn std::error::Error + 'static) = match e {
        Error::Stream(s) => s,
        Error::ResidentStage { source, .. } | Error::Stage { source, .. } => &**source,
        _ => return None,
    };
    std::iter::successors(Some(first), |e| e.source()).find_map(|e| {
        match e.downcast_ref::<prism_stream::Error>() {
            Some(s @ prism_stream::Error::NotCapturable { .. }) => Some(s.to_string()),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What can happen to a pipeline between and during iterations.
    #[derive(Debug, Clone, Copy)]
    enum Event {
        AddStage,
        SetOrder,
        SetReadback,
        StateMut,
        Invalidate,
        /// An iteration; a capture it makes ends as given.
        Iterate(Outcome),
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Outcome {
        Captured,
        Refused,
        Failed,
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            1 => Just(Event::AddStage),
            1 => Just(Event::SetOrder),
            1 => Just(Event::SetReadback),
            1 => Just(Event::StateMut),
            1 => Just(Event::Invalidate),
            8 => prop_oneof![
                6 => Just(Outcome::Captured),
                1 => Just(Outcome::Refused),
                1 => Just(Outcome::Failed),
            ]
            .prop_map(Event::Iterate),
        ]
    }

    /// The reference: version numbers instead of flags. A graph is current
    /// when it was captured at the pipeline's current version; a refusal
    /// holds while the stage version (stages, order, read-back,
    /// invalidation) is the one it happened at.
    #[derive(Debug, Default)]
    struct Model {
        version: u64,
        stage_version: u64,
        captured_at: Option<u64>,
        refused_at: Option<u64>,
    }

    impl Model {
        fn plan(&self, enabled: bool) -> Plan {
            if !enabled || self.refused_at == Some(self.stage_version) {
                Plan::Direct
            } else if self.captured_at == Some(self.version) {
                Plan::Replay
            } else {
                Plan::Capture
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// The policy's plan for every iteration equals the reference's,
        /// and the counts add up: with no refusal and no failure, an
        /// iteration replays exactly when nothing changed since the last
        /// capture.
        #[test]
        fn graph_policy_matches_the_version_model(
            enabled in any::<bool>(),
            events in proptest::collection::vec(event(), 0..80),
        ) {
            let mut policy = GraphPolicy::new(enabled);
            let mut model = Model::default();
            let (mut iterations, mut captures, mut replays, mut direct) = (0u64, 0u64, 0u64, 0u64);
            for e in events {
                match e {
                    Event::AddStage | Event::SetOrder | Event::SetReadback | Event::Invalidate => {
                        policy.stages_changed();
                        model.version += 1;
                        model.stage_version += 1;
                    }
                    Event::StateMut => {
                        policy.state_changed();
                        model.version += 1;
                    }
                    Event::Iterate(outcome) => {
                        let plan = policy.plan();
                        prop_assert_eq!(plan, model.plan(enabled), "{:?}", model);
                        match plan {
                            Plan::Capture => match outcome {
                                Outcome::Captured => {
                                    policy.captured();
                                    model.captured_at = Some(model.version);
                                    captures += 1;
                                    iterations += 1;
                                }
                                Outcome::Refused => {
                                    policy.refused();
                                    model.captured_at = None;
                                    model.refused_at = Some(model.stage_version);
                                    direct += 1;
                                    iterations += 1;
                                }
                                Outcome::Failed => {
                                    policy.failed();
                                    model.captured_at = None;
                                }
                            },
                            Plan::Replay => {
                                replays += 1;
                                iterations += 1;
                            }
                            Plan::Direct => {
                                direct += 1;
                                iterations += 1;
                            }
                        }
                    }
                }
                prop_assert_eq!(policy.plan(), model.plan(enabled));
            }
            prop_assert_eq!(iterations, captures + replays + direct);
            if !enabled {
                prop_assert_eq!(captures + replays, 0);
            }
        }
    }

    #[test]
    fn a_pipeline_and_its_iterations_can_move_to_another_thread() {
        fn send<T: Send>() {}
        send::<ResidentPipeline<prism_stream::DeviceBuffer<f32>, u32>>();
        send::<Iteration<f32>>();
    }

    #[test]
    fn a_refusal_holds_until_the_stages_change_but_not_for_state_changes() {
        let mut p = GraphPolicy::new(true);
        assert_eq!(p.plan(), Plan::Capture);
        p.captured();
        assert_eq!(p.plan(), Plan::Replay);
        p.state_changed();
        assert_eq!(p.plan(), Plan::Capture);
        p.refused();
        assert_eq!(p.plan(), Plan::Direct);
        p.state_changed();
        assert_eq!(p.plan(), Plan::Direct, "the same stages would be refused");
        p.stages_changed();
        assert_eq!(p.plan(), Plan::Capture);
        p.failed();
        assert_eq!(p.plan(), Plan::Capture, "a failed capture is tried again");
        assert_eq!(GraphPolicy::new(false).plan(), Plan::Direct);
    }

    #[test]
    fn refusals_are_found_in_a_stage_error_chain_and_nothing_else_is() {
        let not_capturable = || prism_stream::Error::NotCapturable {
            what: "a timed fence",
            reason: "test",
        };
        assert!(refusal(&Error::Stream(not_capturable())).is_some());
        let stage = |source: StageError| Error::ResidentStage {
            stage: "s".into(),
            iteration: 0,
            source,
        };
        assert!(refusal(&stage(Box::new(not_capturable()))).is_some());
        // Wrapped by the user's own error type.
        #[derive(Debug)]
        struct Wrap(prism_stream::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "wrapped")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        assert!(refusal(&stage(Box::new(Wrap(not_capturable())))).is_some());
        assert!(refusal(&stage("plain failure".into())).is_none());
        assert!(refusal(&stage(Box::new(prism_stream::Error::NoDevice))).is_none());
        assert!(refusal(&Error::NoStages).is_none());
    }
}
