//! Stage graphs: one input feeding several branches, joins with several
//! inputs, several outputs and taps, run chunk by chunk on the same ring
//! engine as a chain ([`PipelineStageManager::run_graph`](crate::PipelineStageManager::run_graph),
//! [`run_graph_pinned`](crate::PipelineStageManager::run_graph_pinned)) or on
//! the host backend.
//!
//! A [`StageGraph`] is built front to back: every node names nodes made
//! before it, so a graph is acyclic by construction, and node order is a
//! topological order. On the GPU each slot of the ring holds the chunk's
//! input and one device buffer per value alive at once (given out by
//! liveness over that order, not one per edge: a branch's buffer is reused
//! once its last reader ran, an output's is kept until it is downloaded).
//! A chunk read by several branches is read in place by each, with no
//! copy. Every output is downloaded into its own destination, in output
//! order, after the chunk's kernels. What owns the ordering is unchanged:
//! every kernel goes through the chunk's `Launch`, every copy through a
//! lane (prism-stream's `lane.rs`).
//!
//! Independent branches of one chunk run concurrently: each node gets a
//! *track* (the first reader of a node continues its track, every other
//! reader starts one, up to [`MAX_TRACKS`]); track 0 is the chunk's
//! compute lane, the others lanes of the run's processor. The ordering
//! module orders every buffer use whatever the lane (a node waits for the
//! nodes it reads, a reused buffer for its earlier readers), and the
//! chunk's compute lane joins the other tracks before its process step
//! ends, so the engine's download and slot reuse see the whole chunk. To
//! keep branches from waiting on each other's buffers, a freed buffer is
//! reused by a node only when every use of it is already ordered before
//! that node (an ancestor, or earlier on the same track); otherwise the
//! node gets a buffer of its own, while the slot has fewer than 16. With
//! [`StageGraph::concurrent_branches`]`(false)` every node runs on the
//! chunk's lane in node order and buffers are the liveness minimum.

use std::any::Any;
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};

use prism_buffer::engine::ComputeSpans;
use prism_buffer::ring::ChunkId;
use prism_buffer::{ChunkOutputs, ChunkProcessor};
use prism_stream::nvtx::Range;
use prism_stream::{DeviceBuffer, Element, Fence, Lane, Launch};

use crate::error::{Error, Result, StageError};
use crate::guard;
use crate::plan::ChunkPlan;
use crate::stage::{AnyStage, Stage};

/// A node of a [`StageGraph`]: the graph's input, a stage or a join. Valid
/// only on the graph that made it (another graph's is
/// [`Error::UnknownNode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId {
    graph: u64,
    index: usize,
}

impl NodeId {
    /// The node's position in its graph (0 is the input).
    pub fn index(&self) -> usize {
        self.index
    }
}

/// A node with several inputs (a join): it reads `inputs[i][..lens[i]]`
/// and writes `output_len(lens)` elements. Like a [`Stage`], implement the
/// forms it supports.
pub trait Join<T: Element>: Send + Sync {
    /// The name in stats, traces and errors.
    fn name(&self) -> &str;

    /// Elements produced from inputs of `lens` elements. The default asks
    /// for inputs of one length and makes as many elements.
    fn output_len(&self, lens: &[usize]) -> std::result::Result<usize, StageError> {
        match lens.split_first() {
            Some((&first, rest)) if rest.iter().all(|&l| l == first) => Ok(first),
            _ => Err(format!("inputs of different lengths {lens:?}").into()),
        }
    }

    /// True when element i of the output depends only on element i of
    /// each input (and the output is as long as the inputs).
    fn elementwise(&self) -> bool {
        false
    }

    /// Whether [`gpu`](Self::gpu) is implemented.
    fn has_gpu(&self) -> bool {
        false
    }

    /// Whether [`host`](Self::host) is implemented.
    fn has_host(&self) -> bool {
        false
    }

    /// Enqueues the join on `launch`: `inputs[i][..lens[i]]` → `output[..output_len(lens)]`.
    fn gpu(
        &mut self,
        launch: &mut Launch<'_>,
        inputs: &[&DeviceBuffer<T>],
        lens: &[usize],
        output: &mut DeviceBuffer<T>,
    ) -> std::result::Result<(), StageError> {
        let _ = (launch, inputs, lens, output);
        Err(format!("join {} has no GPU implementation", self.name()).into())
    }

    /// Computes the join on the host: `output.len() == output_len(lens)`
    /// and the join writes every element of it. Called on the manager's
    /// threads, for several chunks at once.
    fn host(&self, inputs: &[&[T]], output: &mut [T]) -> std::result::Result<(), StageError> {
        let _ = (inputs, output);
        Err(format!("join {} has no host implementation", self.name()).into())
    }
}

/// A join as a graph stores it (found again by type, as stages are).
trait AnyJoin<T: Element>: Join<T> {
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<T: Element, J: Join<T> + 'static> AnyJoin<T> for J {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A GPU join from a closure: `f(launch, inputs, lens, output)`; the
/// output is as long as the inputs, which must agree.
pub struct GpuJoinFn<T, F> {
    name: String,
    elementwise: bool,
    f: std::sync::Mutex<F>,
    _t: std::marker::PhantomData<fn(T)>,
}

impl<T, F> std::fmt::Debug for GpuJoinFn<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuJoinFn")
            .field("name", &self.name)
            .finish()
    }
}

/// The closure of a [`GpuJoinFn`].
pub trait GpuJoinBody<T: Element>:
    FnMut(
        &mut Launch<'_>,
        &[&DeviceBuffer<T>],
        &[usize],
        &mut DeviceBuffer<T>,
    ) -> std::result::Result<(), StageError>
    + Send
{
}

impl<T: Element, F> GpuJoinBody<T> for F where
    F: FnMut(
            &mut Launch<'_>,
            &[&DeviceBuffer<T>],
            &[usize],
            &mut DeviceBuffer<T>,
        ) -> std::result::Result<(), StageError>
        + Send
{
}

impl<T: Element, F: GpuJoinBody<T>> GpuJoinFn<T, F> {
    /// A join named `name` running `f`; `elementwise` says whether output
    /// i depends on element i of each input only.
    pub fn new(name: impl Into<String>, elementwise: bool, f: F) -> Self {
        Self {
            name: name.into(),
            elementwise,
            f: std::sync::Mutex::new(f),
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: Element, F: GpuJoinBody<T>> Join<T> for GpuJoinFn<T, F> {
    fn name(&self) -> &str {
        &self.name
    }
    fn elementwise(&self) -> bool {
        self.elementwise
    }
    fn has_gpu(&self) -> bool {
        true
    }
    fn gpu(
        &mut self,
        launch: &mut Launch<'_>,
        inputs: &[&DeviceBuffer<T>],
        lens: &[usize],
        output: &mut DeviceBuffer<T>,
    ) -> std::result::Result<(), StageError> {
        // `&mut self`: the mutex is never locked (it only makes the join
        // `Sync` without asking the closure to be).
        let f = self
            .f
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(launch, inputs, lens, output)
    }
}

/// A host join from a closure `f(inputs, output)`; the output is as long
/// as the inputs, which must agree.
pub struct HostJoinFn<T, F> {
    name: String,
    elementwise: bool,
    f: F,
    _t: std::marker::PhantomData<fn(T)>,
}

impl<T, F> std::fmt::Debug for HostJoinFn<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostJoinFn")
            .field("name", &self.name)
            .finish()
    }
}

impl<T: Element, F> HostJoinFn<T, F>
where
    F: Fn(&[&[T]], &mut [T]) -> std::result::Result<(), StageError> + Send + Sync,
{
    /// A join named `name` running `f`; `elementwise` as for [`GpuJoinFn`].
    pub fn new(name: impl Into<String>, elementwise: bool, f: F) -> Self {
        Self {
            name: name.into(),
            elementwise,
            f,
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: Element, F> Join<T> for HostJoinFn<T, F>
where
    F: Fn(&[&[T]], &mut [T]) -> std::result::Result<(), StageError> + Send + Sync,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn elementwise(&self) -> bool {
        self.elementwise
    }
    fn has_host(&self) -> bool {
        true
    }
    fn host(&self, inputs: &[&[T]], output: &mut [T]) -> std::result::Result<(), StageError> {
        (self.f)(inputs, output)
    }
}

enum Op<T: Element> {
    Input,
    Stage(Box<dyn AnyStage<T>>),
    Join(Box<dyn AnyJoin<T>>),
}

struct Node<T: Element> {
    op: Op<T>,
    /// Indices of the nodes read, all smaller than this node's.
    inputs: Vec<usize>,
    /// Unique within the graph (stats, traces, errors).
    name: String,
}

static NEXT_GRAPH: AtomicU64 = AtomicU64::new(1);

/// A directed acyclic graph of stages over one input: fan-out (several
/// nodes read one node, in place), joins (a node reading several), any
/// number of outputs (an output on an inner node is a tap). Run it with
/// [`PipelineStageManager::run_graph`](crate::PipelineStageManager::run_graph) (pageable),
/// [`run_graph_pinned`](crate::PipelineStageManager::run_graph_pinned) (pinned,
/// no staging). A chain is the graph whose every node reads the one before.
///
/// ```
/// use prism_pipeline::{Backend, Clamp, Fma, PipelineConfig, PipelineStageManager, StageGraph};
///
/// let mut g = StageGraph::<f32>::new();
/// let x = g.input();
/// let a = g.stage(x, Fma { a: 2.0, b: 1.0, iters: 1 })?;
/// let b = g.stage(x, Clamp { lo: 0.0, hi: 0.5 })?;
/// g.output(a)?;
/// g.output(b)?;
/// let mut m = PipelineStageManager::<f32>::new(Backend::Auto, PipelineConfig::default())?;
/// let input = vec![0.25f32; 1 << 20];
/// let (mut out_a, mut out_b) = (vec![0.0; 1 << 20], vec![0.0; 1 << 20]);
/// m.run_graph(&mut g, &input, &mut [&mut out_a[..], &mut out_b[..]])?;
/// assert_eq!((out_a[0], out_b[0]), (1.5, 0.25));
/// # Ok::<(), prism_pipeline::Error>(())
/// ```
pub struct StageGraph<T: Element> {
    id: u64,
    nodes: Vec<Node<T>>,
    outputs: Vec<usize>,
    /// Independent branches on lanes of their own (the default).
    concurrent: bool,
}

/// The most tracks (lanes) a chunk of a stage graph runs on at once on the
/// GPU: its compute lane and up to seven branch lanes (nodes past that
/// share them, round robin).
pub(crate) const MAX_TRACKS: usize = 8;

impl<T: Element> std::fmt::Debug for StageGraph<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<(&str, &[usize])> = self
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.inputs.as_slice()))
            .collect();
        f.debug_struct("StageGraph")
            .field("nodes", &nodes)
            .field("outputs", &self.outputs)
            .finish()
    }
}

impl<T: Element> Default for StageGraph<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Element> StageGraph<T> {
    /// A graph with only its input node.
    pub fn new() -> Self {
        Self {
            id: NEXT_GRAPH.fetch_add(1, Ordering::Relaxed),
            nodes: vec![Node {
                op: Op::Input,
                inputs: Vec::new(),
                name: "input".to_owned(),
            }],
            outputs: Vec::new(),
            concurrent: true,
        }
    }

    /// Whether independent branches of a chunk run concurrently on the GPU
    /// (the default): on lanes of their own, with a buffer of their own
    /// where reusing one would make a branch wait for another (see
    /// [`buffers_per_slot`](Self::buffers_per_slot)). With `false`, every
    /// node of a chunk runs on the chunk's lane in node order and a slot
    /// holds the fewest buffers. The host backend runs nodes in node order
    /// either way.
    pub fn concurrent_branches(&mut self, on: bool) -> &mut Self {
        self.concurrent = on;
        self
    }

    /// A chain: `stages` one after the other, the last one the output.
    pub fn chain<I, S>(stages: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Stage<T> + 'static,
    {
        let mut g = Self::new();
        let mut at = g.input();
        for s in stages {
            at = g.stage(at, s)?;
        }
        g.output(at)?;
        Ok(g)
    }

    /// The graph's input: each chunk as it was uploaded.
    pub fn input(&self) -> NodeId {
        NodeId {
            graph: self.id,
            index: 0,
        }
    }

    fn check(&self, node: NodeId) -> Result<usize> {
        if node.graph != self.id || node.index >= self.nodes.len() {
            return Err(Error::UnknownNode {
                index: node.index,
                nodes: self.nodes.len(),
            });
        }
        Ok(node.index)
    }

    fn push(&mut self, op: Op<T>, inputs: Vec<usize>, name: &str) -> NodeId {
        let taken = |n: &str| self.nodes.iter().any(|x| x.name == n);
        let mut unique = name.to_owned();
        let mut k = 0usize;
        while taken(&unique) {
            unique = match k {
                0 => format!("{name} (node {})", self.nodes.len()),
                _ => format!("{name} (node {}.{k})", self.nodes.len()),
            };
            k += 1;
        }
        let name = unique;
        self.nodes.push(Node { op, inputs, name });
        NodeId {
            graph: self.id,
            index: self.nodes.len() - 1,
        }
    }

    /// A stage reading `from`. Several stages may read one node (fan-out,
    /// in place: no copy).
    pub fn stage(&mut self, from: NodeId, stage: impl Stage<T> + 'static) -> Result<NodeId> {
        let from = self.check(from)?;
        let name = stage.name().to_owned();
        Ok(self.push(Op::Stage(Box::new(stage)), vec![from], &name))
    }

    /// A join reading `from` (one or more nodes, in that order; a node
    /// may appear more than once).
    pub fn join(&mut self, from: &[NodeId], join: impl Join<T> + 'static) -> Result<NodeId> {
        if from.is_empty() {
            return Err(Error::Config("a join reads at least one node"));
        }
        let inputs = from.iter().map(|&n| self.check(n)).collect::<Result<_>>()?;
        let name = join.name().to_owned();
        Ok(self.push(Op::Join(Box::new(join)), inputs, &name))
    }

    /// Makes `node` an output (a tap, when other nodes read it too);
    /// returns the output's index: the position of its destination in a
    /// run's outputs. A node may be an output more than once.
    pub fn output(&mut self, node: NodeId) -> Result<usize> {
        let i = self.check(node)?;
        self.outputs.push(i);
        Ok(self.outputs.len() - 1)
    }

    /// True when `other` has the same nodes (names, kinds and inputs),
    /// outputs and [`concurrent_branches`](Self::concurrent_branches)
    /// setting: the same graph built for another GPU.
    pub fn same_shape(&self, other: &StageGraph<T>) -> bool {
        let kind = |op: &Op<T>| match op {
            Op::Input => 0,
            Op::Stage(_) => 1,
            Op::Join(_) => 2,
        };
        self.outputs == other.outputs
            && self.concurrent == other.concurrent
            && self.nodes.len() == other.nodes.len()
            && self.nodes.iter().zip(&other.nodes).all(|(a, b)| {
                a.name == b.name && a.inputs == b.inputs && kind(&a.op) == kind(&b.op)
            })
    }

    /// Nodes, the input included.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Outputs declared.
    pub fn output_count(&self) -> usize {
        self.outputs.len()
    }

    /// A node's name as stats and traces show it (unique in the graph).
    pub fn name(&self, node: NodeId) -> Result<&str> {
        let i = self.check(node)?;
        Ok(&self.nodes[i].name)
    }

    /// The stage or join of `node` if it is an `S`.
    pub fn node<S: 'static>(&self, node: NodeId) -> Option<&S> {
        let i = self.check(node).ok()?;
        match &self.nodes[i].op {
            Op::Stage(s) => s.as_any().downcast_ref(),
            Op::Join(j) => j.as_any().downcast_ref(),
            Op::Input => None,
        }
    }

    /// The stage or join of `node`, mutably, if it is an `S`.
    pub fn node_mut<S: 'static>(&mut self, node: NodeId) -> Option<&mut S> {
        let i = self.check(node).ok()?;
        match &mut self.nodes[i].op {
            Op::Stage(s) => s.as_any_mut().downcast_mut(),
            Op::Join(j) => j.as_any_mut().downcast_mut(),
            Op::Input => None,
        }
    }

    /// Which nodes an output depends on (the others are never run).
    fn live(&self) -> Vec<bool> {
        let mut live = vec![false; self.nodes.len()];
        for &o in &self.outputs {
            live[o] = true;
        }
        for i in (0..self.nodes.len()).rev() {
            if live[i] {
                for &p in &self.nodes[i].inputs {
                    live[p] = true;
                }
            }
        }
        live
    }

    /// Checks the graph can run on `backend` and plans its buffers.
    pub(crate) fn plan(&self, gpu: bool) -> Result<Plan> {
        if self.outputs.is_empty() {
            return Err(Error::NoOutputs);
        }
        let live = self.live();
        for (_, n) in self.nodes.iter().enumerate().filter(|&(i, _)| live[i]) {
            let ok = match &n.op {
                Op::Input => true,
                Op::Stage(s) => {
                    if gpu {
                        s.has_gpu()
                    } else {
                        s.has_host()
                    }
                }
                Op::Join(j) => {
                    if gpu {
                        j.has_gpu()
                    } else {
                        j.has_host()
                    }
                }
            };
            if !ok {
                return Err(Error::Unsupported {
                    stage: n.name.clone(),
                    backend: if gpu { "GPU" } else { "host" },
                });
            }
        }
        let plan = self.allocate(live, gpu && self.concurrent);
        if gpu {
            fits_a_slot(plan.buffers)?;
        }
        Ok(plan)
    }

    /// Device buffers a ring slot of a GPU run holds for this graph (more
    /// than 16 is [`Error::GraphTooWide`]: a GPU run refuses it, the host
    /// backend has no slots and runs it). At least one per value alive at
    /// once (the input, branches not yet read by all their readers,
    /// outputs not yet downloaded), given out by liveness in node order: a
    /// chain needs 2 however long it is; `k` independent one-stage
    /// branches with their own outputs need `k + 1`. With
    /// [`concurrent_branches`](Self::concurrent_branches) on (the default),
    /// a branch also gets a buffer of its own where reusing a freed one
    /// would make it wait for another branch, while the slot has fewer
    /// than 16 (`k` branches of two stages each: `2k + 1` instead of `k + 1`).
    pub fn buffers_per_slot(&self) -> Result<usize> {
        if self.outputs.is_empty() {
            return Err(Error::NoOutputs);
        }
        fits_a_slot(self.allocate(self.live(), self.concurrent).buffers)
    }

    /// The track of every live node (see the module's doc): a node
    /// continues the track of the first of its inputs it is the first
    /// reader of, else starts a new one (round robin over the branch
    /// tracks once there are [`MAX_TRACKS`]). All 0 when not concurrent.
    fn tracks(&self, live: &[bool], concurrent: bool) -> (Vec<usize>, usize) {
        let n = self.nodes.len();
        let mut track = vec![0usize; n];
        if !concurrent {
            return (track, 1);
        }
        // Whether a node's track was continued by a reader already.
        let mut continued = vec![false; n];
        let (mut tracks, mut next) = (1usize, 1usize);
        for i in (1..n).filter(|&i| live[i]) {
            let first = self.nodes[i].inputs.iter().find(|&&p| !continued[p]);
            track[i] = match first {
                Some(&p) => {
                    continued[p] = true;
                    track[p]
                }
                None if tracks < MAX_TRACKS => {
                    tracks += 1;
                    tracks - 1
                }
                None => {
                    let t = next;
                    next = next % (MAX_TRACKS - 1) + 1;
                    t
                }
            };
        }
        (track, tracks)
    }

    /// Gives every live node a slot buffer, by liveness (and, when
    /// concurrent, so that branches need not wait for each other's).
    fn allocate(&self, live: Vec<bool>, concurrent: bool) -> Plan {
        // Last reader of each node; outputs live to the end.
        let n = self.nodes.len();
        let mut last = vec![0usize; n];
        for (i, node) in self.nodes.iter().enumerate().filter(|&(i, _)| live[i]) {
            for &p in &node.inputs {
                last[p] = last[p].max(i);
            }
        }
        for &o in &self.outputs {
            last[o] = usize::MAX;
        }
        let (track, tracks) = self.tracks(&live, concurrent);
        // Only a concurrent plan asks what is ordered before what.
        let m = if concurrent { n } else { 0 };
        // ancestors[i]: a bit per node ordered before node i through the
        // graph's edges (i waits for its inputs, transitively).
        let words = m.div_ceil(64);
        let mut ancestors = vec![vec![0u64; words]; m];
        // readers[v]: the live nodes that read node v.
        let mut readers: Vec<Vec<usize>> = vec![Vec::new(); m];
        for (i, node) in self.nodes.iter().enumerate().take(m) {
            for &p in &node.inputs {
                let (before, at) = ancestors.split_at_mut(i);
                at[0][p / 64] |= 1 << (p % 64);
                for (w, &a) in at[0].iter_mut().zip(&before[p]) {
                    *w |= a;
                }
                if live[i] {
                    readers[p].push(i);
                }
            }
        }
        // The node whose value each buffer holds.
        let mut holder: Vec<usize> = vec![0];
        // A node may write `b` without waiting for another track: the
        // value it held and every reader of it are ordered before `i`.
        let ordered_before = |b: usize, i: usize, holder: &[usize]| {
            let h = holder[b];
            let done =
                |x: usize| ancestors[i][x / 64] & (1 << (x % 64)) != 0 || track[x] == track[i];
            done(h) && readers[h].iter().all(|&r| done(r))
        };
        let mut buf = vec![usize::MAX; n];
        buf[0] = 0;
        let mut free: Vec<usize> = Vec::new();
        let mut count = 1usize;
        let release = |at: usize, buf: &[usize], free: &mut Vec<usize>| {
            for (p, &l) in last.iter().enumerate() {
                if l == at && live[p] {
                    free.push(buf[p]);
                }
            }
        };
        // The input dies after its last reader like any node (a node no
        // one reads dies at once).
        if last[0] == 0 {
            release(0, &buf, &mut free);
        }
        for i in 1..n {
            if !live[i] {
                continue;
            }
            // Inputs are still held here (their last use is >= i), so the
            // buffer given is none of them.
            let max = prism_buffer::engine::MAX_BUFFERS_PER_SLOT;
            let pick = if concurrent {
                match free.iter().rposition(|&b| ordered_before(b, i, &holder)) {
                    Some(k) => Some(free.remove(k)),
                    None if count < max => None,
                    None => free.pop(),
                }
            } else {
                free.pop()
            };
            let b = pick.unwrap_or_else(|| {
                count += 1;
                holder.push(i);
                count - 1
            });
            holder[b] = i;
            buf[i] = b;
            release(i, &buf, &mut free);
        }
        Plan {
            live,
            buf,
            buffers: count,
            track,
            tracks,
        }
    }

    /// Every live node's length over a chunk of `len` input elements
    /// (0 for dead nodes). Every live node is asked, even one with an
    /// empty input (a join may make output from its other inputs); a node
    /// whose own length is 0 is not run.
    pub(crate) fn lengths(&self, plan: &Plan, len: usize, chunk: u64) -> Result<Vec<usize>> {
        let mut lens = vec![0usize; self.nodes.len()];
        lens[0] = len;
        for (i, node) in self.nodes.iter().enumerate().skip(1) {
            if !plan.live[i] {
                continue;
            }
            lens[i] = match &node.op {
                Op::Input => len,
                Op::Stage(s) => guard::output_len(&**s, lens[node.inputs[0]], chunk)?,
                Op::Join(j) => {
                    let ins: Vec<usize> = node.inputs.iter().map(|&p| lens[p]).collect();
                    join_len(&**j, &node.name, &ins, chunk)?
                }
            };
        }
        Ok(lens)
    }

    /// True when no live node can tell where chunks begin (every one
    /// elementwise and length-preserving): chunks may then vary (ramps).
    /// A stage whose `output_len` panics here is taken as not free (the
    /// run then asks it again, caught, and reports the panic).
    pub(crate) fn boundaries_free(&self, plan: &Plan, chunk: usize) -> bool {
        self.nodes.iter().enumerate().all(|(i, n)| {
            !plan.live[i]
                || match &n.op {
                    Op::Input => true,
                    Op::Stage(s) => s.elementwise() && guard::keeps_length(&**s, chunk),
                    Op::Join(j) => j.elementwise(),
                }
        })
    }

    /// Cuts `input` into `chunks` and every output into the parts each
    /// chunk makes (by the nodes' lengths), in chunk order.
    pub(crate) fn cut<'a>(
        &self,
        plan: &Plan,
        chunks: ChunkPlan,
        input: &'a [T],
        outputs: &'a mut [&mut [T]],
    ) -> Result<Vec<ChunkParts<'a, T>>> {
        let mut parts: Vec<ChunkParts<'a, T>> = Vec::new();
        let mut rests: Vec<&'a mut [T]> = outputs.iter_mut().map(|o| &mut **o).collect();
        let mut at = 0usize;
        for len in chunks {
            let lens = self.output_lens(&self.lengths(plan, len, parts.len() as u64)?);
            let mut outs = Vec::with_capacity(lens.len());
            for (rest, l) in rests.iter_mut().zip(lens) {
                let (head, tail) =
                    std::mem::take(rest)
                        .split_at_mut_checked(l)
                        .ok_or(Error::Config(
                            "an output is shorter than the graph produces",
                        ))?;
                *rest = tail;
                outs.push(head);
            }
            let src = input
                .get(at..at + len)
                .ok_or(Error::Config("the input is shorter than its chunks"))?;
            parts.push((src, outs));
            at += len;
        }
        Ok(parts)
    }

    /// The outputs' lengths over a chunk.
    pub(crate) fn output_lens(&self, lens: &[usize]) -> Vec<usize> {
        self.outputs.iter().map(|&o| lens[o]).collect()
    }

    /// Runs one chunk's nodes on the host: `input` → every output's part
    /// (`outs[i]`, exactly as long as output i's length for this chunk).
    pub(crate) fn run_host_chunk(
        &self,
        plan: &Plan,
        input: &[T],
        outs: &mut [&mut [T]],
        chunk: u64,
        times: &NodeTimes,
    ) -> Result<()> {
        let lens = self.lengths(plan, input.len(), chunk)?;
        if outs.len() != self.outputs.len()
            || self
                .outputs
                .iter()
                .zip(outs.iter())
                .any(|(&o, d)| d.len() != lens[o])
        {
            return Err(Error::Config(
                "a graph output's length changed during the run",
            ));
        }
        // A node that is an output is computed straight into the first
        // destination that lists it (no copy); the others into vectors.
        let mut first_out: Vec<Option<usize>> = vec![None; self.nodes.len()];
        for (k, &o) in self.outputs.iter().enumerate() {
            if o != 0 && first_out[o].is_none() {
                first_out[o] = Some(k);
            }
        }
        let mut vals: Vec<Option<Vec<T>>> = (0..self.nodes.len()).map(|_| None).collect();
        for (i, node) in self.nodes.iter().enumerate().skip(1) {
            if !plan.live[i] || lens[i] == 0 {
                continue;
            }
            let mut own = match first_out[i] {
                Some(k) => Err(std::mem::take(&mut outs[k])),
                None => Ok(prism_stream::zeroed_vec::<T>(lens[i])),
            };
            let out: &mut [T] = match &mut own {
                Ok(v) => v,
                Err(d) => d,
            };
            let get = |p: usize| -> &[T] {
                match (p, first_out[p]) {
                    (0, _) => input,
                    (_, Some(k)) => &outs[k][..],
                    _ => vals[p].as_deref().unwrap_or(&[]),
                }
            };
            let t = std::time::Instant::now();
            let r = match &node.op {
                Op::Input => Ok(()),
                Op::Stage(s) => {
                    let src = get(node.inputs[0]);
                    guard::run_host_stage(&**s, chunk, |s| s.host(src, out))
                }
                Op::Join(j) => {
                    let ins: Vec<&[T]> = node.inputs.iter().map(|&p| get(p)).collect();
                    guard::run_named(&node.name, chunk, || j.host(&ins, out))
                }
            };
            times.add(i, t.elapsed().as_secs_f64() * 1e3);
            match own {
                Ok(v) => vals[i] = Some(v),
                Err(d) => {
                    if let Some(k) = first_out[i] {
                        outs[k] = d;
                    }
                }
            }
            r?;
        }
        // Outputs listed again, and outputs of the input itself: copies.
        for k in 0..self.outputs.len() {
            let o = self.outputs[k];
            if o != 0 && first_out[o] == Some(k) {
                continue;
            }
            match (o, first_out[o]) {
                (0, _) => outs[k].copy_from_slice(input),
                // The first destination listing the node comes before `k`.
                (_, Some(f)) if f < k => {
                    let (head, tail) = outs.split_at_mut(k);
                    tail[0].copy_from_slice(head[f]);
                }
                _ => {
                    let v = vals[o].as_deref().unwrap_or(&[]);
                    if v.len() != outs[k].len() {
                        return Err(Error::Config("a graph output was not computed"));
                    }
                    outs[k].copy_from_slice(v);
                }
            }
        }
        Ok(())
    }
}

/// A join's output length; its error or panic names the join and chunk.
fn join_len<T: Element>(
    j: &dyn AnyJoin<T>,
    name: &str,
    lens: &[usize],
    chunk: u64,
) -> Result<usize> {
    let mut len = 0;
    guard::run_named(name, chunk, || {
        len = j.output_len(lens)?;
        Ok(())
    })?;
    Ok(len)
}

/// `buffers` per ring slot fit one (at most `MAX_BUFFERS_PER_SLOT`).
fn fits_a_slot(buffers: usize) -> Result<usize> {
    let max = prism_buffer::engine::MAX_BUFFERS_PER_SLOT;
    if buffers > max {
        return Err(Error::GraphTooWide { buffers, max });
    }
    Ok(buffers)
}

/// Host time per node of a host-backend graph run, added up over the
/// chunks the host threads run at once, then into the stats by node name.
pub(crate) struct NodeTimes(Vec<std::sync::Mutex<f64>>);

impl NodeTimes {
    pub(crate) fn new<T: Element>(graph: &StageGraph<T>) -> Self {
        Self(
            (0..graph.node_count())
                .map(|_| std::sync::Mutex::new(0.0))
                .collect(),
        )
    }

    fn add(&self, node: usize, ms: f64) {
        if let Some(m) = self.0.get(node) {
            *m.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += ms;
        }
    }

    /// Each node that ran (the input excluded) as a stage line of `stats`.
    pub(crate) fn into_stats<T: Element>(
        self,
        graph: &StageGraph<T>,
        stats: &mut crate::stats::PipelineStats,
    ) {
        for (node, t) in graph.nodes.iter().zip(self.0).skip(1) {
            let ms = t
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if ms > 0.0 {
                stats.add_stage_time(&node.name, ms);
            }
        }
    }
}

/// Which nodes run, the slot buffer each writes (given out by liveness)
/// and the track each runs on.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) live: Vec<bool>,
    pub(crate) buf: Vec<usize>,
    /// Buffers per slot.
    pub(crate) buffers: usize,
    /// Each node's track: 0 the chunk's compute lane, `k > 0` the
    /// processor's branch lane `k - 1`.
    pub(crate) track: Vec<usize>,
    /// Tracks a chunk uses (1: every node on the chunk's lane).
    pub(crate) tracks: usize,
}

/// A graph as the engine's processor: one chunk's nodes on the chunk's
/// lane and, for independent branches, on lanes of its own (made on the
/// first chunk, on the chunk's GPU).
pub(crate) struct GraphChain<'a, T: Element> {
    graph: &'a mut StageGraph<T>,
    plan: &'a Plan,
    capacity: usize,
    /// A multi-GPU run's numbering of this GPU's chunks (errors name it).
    global: Option<&'a crate::gpu::GlobalIndex>,
    branches: &'a mut BranchLanes,
}

/// A manager's branch lanes for stage graphs, one set per chunk parity (as
/// the engine alternates chunks between two compute lanes, so a chunk's
/// branches do not queue behind the previous chunk's): track `k > 0` of
/// chunk `c` runs on set `c % 2`, lane `k - 1`. Made on the GPU of the
/// first chunk that needs them and kept between runs (a manager has one GPU).
#[derive(Debug, Default)]
pub(crate) struct BranchLanes([Vec<Lane>; 2]);

impl<'a, T: Element> GraphChain<'a, T> {
    pub(crate) fn new(
        graph: &'a mut StageGraph<T>,
        plan: &'a Plan,
        capacity: usize,
        global: Option<&'a crate::gpu::GlobalIndex>,
        branches: &'a mut BranchLanes,
    ) -> Self {
        Self {
            graph,
            plan,
            capacity,
            global,
            branches,
        }
    }
}

impl<T: Element> ChunkProcessor<T> for GraphChain<'_, T> {
    type Error = Error;

    fn process(
        &mut self,
        launch: &mut Launch<'_>,
        bufs: &mut [DeviceBuffer<T>],
        len: usize,
        chunk: ChunkId,
        spans: &mut ComputeSpans,
    ) -> Result<ChunkOutputs> {
        let index = crate::gpu::GlobalIndex::or(self.global, chunk, 0);
        let lens = self.graph.lengths(self.plan, len, index)?;
        if lens.iter().any(|&l| l > self.capacity) {
            return Err(Error::Config(
                "a graph node produced more elements than the pipeline planned for",
            ));
        }
        if bufs.len() < self.plan.buffers {
            return Err(Error::Config(
                "the ring has fewer buffers than the graph needs",
            ));
        }
        let plan = self.plan;
        // A chunk being captured into a CUDA graph stays on its lane.
        let concurrent = plan.tracks > 1 && !launch.is_capturing();
        let branches = &mut self.branches.0[(chunk.0 % 2) as usize];
        if concurrent {
            while branches.len() + 1 < plan.tracks {
                branches.push(Lane::new(launch.gpu())?);
            }
        }
        // The last fence of each branch track this chunk used.
        let mut ends: Vec<Option<Fence>> = vec![None; plan.tracks];
        let queued = Self::queue_nodes(
            self.graph, plan, &lens, chunk, index, concurrent, launch, branches, bufs, spans,
            &mut ends,
        );
        if let Err(e) = queued {
            // A node failed: what the branch lanes already queued must not
            // outlive the step (the engine drains only its own lanes).
            for lane in branches.iter().take(plan.tracks.saturating_sub(1)) {
                let _ = lane.synchronize();
            }
            return Err(e);
        }
        // Join the branch tracks into the chunk's lane, so the step's end
        // (the engine's process fence) covers every node.
        let mut joined = false;
        for end in ends.iter().flatten() {
            launch.wait_for(end)?;
            joined = true;
        }
        if joined {
            launch.fence()?;
        }
        let mut outs = ChunkOutputs::new();
        for &o in &self.graph.outputs {
            outs.push(plan.buf[o], lens[o]);
        }
        Ok(outs)
    }
}

impl<T: Element> GraphChain<'_, T> {
    /// Queues every node of one chunk on its track, noting each branch
    /// track's last fence in `ends`.
    #[allow(clippy::too_many_arguments)]
    fn queue_nodes(
        graph: &mut StageGraph<T>,
        plan: &Plan,
        lens: &[usize],
        chunk: ChunkId,
        index: u64,
        concurrent: bool,
        launch: &mut Launch<'_>,
        branches: &mut [Lane],
        bufs: &mut [DeviceBuffer<T>],
        spans: &mut ComputeSpans,
        ends: &mut [Option<Fence>],
    ) -> Result<()> {
        for (i, node) in graph.nodes.iter_mut().enumerate().skip(1) {
            if !plan.live[i] || lens[i] == 0 {
                continue;
            }
            let track = if concurrent { plan.track[i] } else { 0 };
            // The trace's branch lane: each parity's lanes apart.
            let lane = match track {
                0 => 0,
                t => (chunk.0 % 2) as usize * (MAX_TRACKS - 1) + t,
            };
            let step = NodeStep {
                node,
                plan,
                i,
                lens,
                index,
                lane,
            };
            if track == 0 {
                step.run(launch, bufs, spans)?;
            } else {
                let mut scope = branches[track - 1].launch();
                let end = step.run(&mut scope, bufs, spans)?;
                // A node that queued nothing keeps the track's last fence.
                if let Some(f) = end.or_else(|| scope.last_fence().cloned()) {
                    ends[track] = Some(f);
                }
            }
        }
        Ok(())
    }
}

/// One node of one chunk, on the launch scope of its track.
struct NodeStep<'n, T: Element> {
    node: &'n mut Node<T>,
    plan: &'n Plan,
    i: usize,
    lens: &'n [usize],
    index: u64,
    /// For the trace: 0 the chunk's lane, else the branch lane's number.
    lane: usize,
}

impl<T: Element> NodeStep<'_, T> {
    /// Queues the node; returns its timed end fence (with timing on).
    fn run(
        self,
        launch: &mut Launch<'_>,
        bufs: &mut [DeviceBuffer<T>],
        spans: &mut ComputeSpans,
    ) -> Result<Option<Fence>> {
        let Self {
            node,
            plan,
            i,
            lens,
            index,
            lane,
        } = self;
        let _nvtx = Range::new(&node.name);
        let out_at = plan.buf[i];
        // The node's output buffer mutably, the others shared: the plan
        // never gives a node a buffer one of its inputs holds.
        let mut out: Option<&mut DeviceBuffer<T>> = None;
        let mut shared: Vec<Option<&DeviceBuffer<T>>> = Vec::with_capacity(bufs.len());
        for (j, b) in bufs.iter_mut().enumerate() {
            if j == out_at {
                shared.push(None);
                out = Some(b);
            } else {
                shared.push(Some(&*b));
            }
        }
        let output = out.ok_or(Error::Config("a graph node has no buffer"))?;
        let inputs: Vec<&DeviceBuffer<T>> = node
            .inputs
            .iter()
            .map(|&p| shared[plan.buf[p]].ok_or(Error::Config("a node reads its own buffer")))
            .collect::<Result<_>>()?;
        let in_lens: Vec<usize> = node.inputs.iter().map(|&p| lens[p]).collect();
        let start = if spans.timed() {
            // Order every buffer first, so a timed start excludes waiting.
            for b in &inputs {
                launch.prepare_read(b)?;
            }
            launch.prepare_write(output)?;
            Some(launch.timed_fence()?)
        } else {
            None
        };
        match &mut node.op {
            Op::Input => {}
            Op::Stage(s) => {
                let (input, n) = (inputs[0], in_lens[0]);
                guard::run_stage(&mut **s, index, |s| s.gpu(launch, input, output, n))?;
            }
            Op::Join(j) => {
                guard::run_named(&node.name, index, || {
                    j.gpu(launch, &inputs, &in_lens, output)
                })?;
            }
        }
        match start {
            Some(start) => {
                let end = launch.timed_fence()?;
                spans.record_branch(lane, Cow::Owned(node.name.clone()), start, end.clone());
                Ok(Some(end))
            }
            None => Ok(None),
        }
    }
}

/// Every destination was written to its end (a node whose `output_len`
/// answered differently during the run than before it leaves a gap).
pub(crate) fn filled(written: &[usize], lens: &[usize]) -> Result<()> {
    match written.iter().zip(lens).position(|(w, l)| w != l) {
        None => Ok(()),
        Some(output) => Err(Error::GraphOutputLength {
            output,
            expected: written[output],
            actual: lens[output],
        }),
    }
}

/// One chunk of a whole graph run: its input and its part of each output.
pub(crate) type ChunkParts<'a, T> = (&'a [T], Vec<&'a mut [T]>);

/// What a graph run checked and planned before its clock starts.
pub(crate) struct GraphRun {
    pub(crate) plan: Plan,
    pub(crate) chunks: ChunkPlan,
    pub(crate) chunk: usize,
    pub(crate) capacity: usize,
}

impl<T: Element> crate::PipelineStageManager<T> {
    /// Elements each output of `graph` receives from an input of `n`
    /// elements cut into this manager's chunks (what a run's output
    /// destinations must hold).
    pub fn graph_output_lens(&self, graph: &StageGraph<T>, n: usize) -> Result<Vec<usize>> {
        let plan = graph.plan(self.backend == crate::BackendKind::Gpu)?;
        self.planned_output_lens(graph, &plan, n)
    }

    /// [`graph_output_lens`](Self::graph_output_lens) for a graph already planned.
    fn planned_output_lens(
        &self,
        graph: &StageGraph<T>,
        plan: &Plan,
        n: usize,
    ) -> Result<Vec<usize>> {
        let mut total = vec![0usize; graph.output_count()];
        // Chunks of one length give one answer: each length is asked once.
        let mut first = 0u64;
        for (len, count) in self.graph_chunks(graph, plan, n).runs() {
            let lens = graph.lengths(plan, len, first)?;
            for (t, l) in total.iter_mut().zip(graph.output_lens(&lens)) {
                *t = l
                    .checked_mul(count)
                    .and_then(|l| t.checked_add(l))
                    .ok_or(Error::Config("an output's length overflows usize"))?;
            }
            first += count as u64;
        }
        Ok(total)
    }

    /// Elements per chunk of a graph run: the configuration's (the
    /// adaptive choice is for chains; a failed chain run's choice never
    /// leaks into a graph's lengths).
    pub(crate) fn graph_chunk_elems(&self) -> usize {
        (self.config.chunk_bytes / std::mem::size_of::<T>().max(1)).max(1)
    }

    fn graph_chunks(&self, graph: &StageGraph<T>, plan: &Plan, n: usize) -> ChunkPlan {
        let chunk = self.graph_chunk_elems();
        let ramp = self.config.ramp && graph.boundaries_free(plan, chunk);
        ChunkPlan::new(n, chunk, ramp)
    }

    /// The checks every graph run makes before its clock starts: the
    /// graph runs on this backend, one destination per output, each as
    /// long as the output; then the ring is allocated.
    pub(crate) fn begin_graph(
        &mut self,
        graph: &StageGraph<T>,
        n: usize,
        out_lens: &[usize],
    ) -> Result<GraphRun> {
        self.begin_graph_with(graph, out_lens.len(), Some((n, out_lens)))
    }

    /// The checks of a stream graph run (no lengths are known ahead): the
    /// graph runs on this backend, one sink per output; then the ring.
    pub(crate) fn begin_graph_stream(
        &mut self,
        graph: &StageGraph<T>,
        sinks: usize,
    ) -> Result<GraphRun> {
        self.begin_graph_with(graph, sinks, None)
    }

    /// Both: `whole` is a whole run's input length and its destinations'
    /// lengths (a stream has none).
    fn begin_graph_with(
        &mut self,
        graph: &StageGraph<T>,
        outputs: usize,
        whole: Option<(usize, &[usize])>,
    ) -> Result<GraphRun> {
        self.effective = None;
        self.close_idle_session()?;
        let _ = self.copy_pool.take_ms();
        let gpu = self.backend == crate::BackendKind::Gpu;
        let plan = graph.plan(gpu)?;
        if outputs != graph.output_count() {
            return Err(Error::OutputCount {
                expected: graph.output_count(),
                actual: outputs,
            });
        }
        if let Some((n, out_lens)) = whole {
            let expected = self.planned_output_lens(graph, &plan, n)?;
            if let Some(output) = expected.iter().zip(out_lens).position(|(e, a)| e != a) {
                return Err(Error::GraphOutputLength {
                    output,
                    expected: expected[output],
                    actual: out_lens[output],
                });
            }
        }
        let chunk = self.graph_chunk_elems();
        let full = graph.lengths(&plan, chunk, 0)?;
        let capacity = full.iter().copied().max().unwrap_or(chunk).max(chunk);
        if gpu {
            self.ensure_engine(capacity, plan.buffers)?;
        }
        let chunks = match whole {
            Some((n, _)) => self.graph_chunks(graph, &plan, n),
            None => ChunkPlan::new(0, chunk, false),
        };
        Ok(GraphRun {
            plan,
            chunks,
            chunk,
            capacity,
        })
    }

    /// The host backend: chunks on the manager's threads, several at once;
    /// each output's part of every chunk written in place. Returns the
    /// chunks run. The first failing chunk's error is returned.
    pub(crate) fn run_graph_host(
        &mut self,
        graph: &StageGraph<T>,
        run: &GraphRun,
        input: &[T],
        outputs: &mut [&mut [T]],
    ) -> Result<u64> {
        use rayon::prelude::*;
        let parts = graph.cut(&run.plan, run.chunks.clone(), input, outputs)?;
        let times = NodeTimes::new(graph);
        let plan = &run.plan;
        let work = |(c, (src, mut outs)): (usize, ChunkParts<'_, T>)| {
            graph.run_host_chunk(plan, src, &mut outs, c as u64, &times)
        };
        let results: Vec<Result<()>> = match self.copy_pool.pool() {
            Some(pool) => pool.install(|| parts.into_par_iter().enumerate().map(work).collect()),
            None => parts.into_iter().enumerate().map(work).collect(),
        };
        let chunks = results.len() as u64;
        // The first failure in chunk order.
        results.into_iter().collect::<Result<Vec<()>>>()?;
        times.into_stats(graph, &mut self.stats);
        Ok(chunks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::Fma;
    use proptest::prelude::*;

    const FMA: Fma = Fma {
        a: 1.0,
        b: 0.0,
        iters: 1,
    };

    fn sum() -> impl Join<f32> {
        HostJoinFn::new("sum", true, |ins: &[&[f32]], out: &mut [f32]| {
            for (i, o) in out.iter_mut().enumerate() {
                *o = ins.iter().map(|x| x[i]).sum();
            }
            Ok(())
        })
    }

    /// A graph from a shape: `(inputs of node i + 1)`, outputs.
    fn build(shape: &[Vec<usize>], outputs: &[usize]) -> StageGraph<f32> {
        let mut g = StageGraph::new();
        let mut ids = vec![g.input()];
        for inputs in shape {
            let from: Vec<NodeId> = inputs.iter().map(|&p| ids[p]).collect();
            let id = match from.as_slice() {
                [one] => g.stage(*one, FMA),
                many => g.join(many, sum()),
            };
            ids.push(id.unwrap());
        }
        for &o in outputs {
            g.output(ids[o]).unwrap();
        }
        g
    }

    /// Values alive at once at their most (what one lane needs).
    fn max_alive<T: Element>(g: &StageGraph<T>, live: &[bool]) -> usize {
        let n = g.nodes.len();
        let needed = |v: usize, i: usize| {
            live[v]
                && (v == i
                    || g.outputs.contains(&v)
                    || (v + 1..n).any(|r| r >= i && live[r] && g.nodes[r].inputs.contains(&v)))
        };
        (0..n)
            .filter(|&i| live[i])
            .map(|i| (0..=i).filter(|&v| needed(v, i)).count())
            .max()
            .unwrap_or(1)
    }

    /// The plan never overwrites a value still needed, and (concurrent,
    /// with room left) never makes a node wait for another track's use.
    fn check_plan<T: Element>(
        g: &StageGraph<T>,
        concurrent: bool,
    ) -> std::result::Result<(), String> {
        let live = g.live();
        let plan = g.allocate(live.clone(), concurrent);
        let n = g.nodes.len();
        let alive = max_alive(g, &live);
        if !concurrent && plan.buffers != alive {
            return Err(format!(
                "one lane: {} buffers, {alive} alive at once",
                plan.buffers
            ));
        }
        let cap = alive.max(MAX_BUFFERS_PER_SLOT_FOR_TESTS);
        if concurrent && !(alive <= plan.buffers && plan.buffers <= cap) {
            return Err(format!(
                "concurrent: {} buffers, {alive} alive at once",
                plan.buffers
            ));
        }
        if plan.tracks == 0 || plan.tracks > MAX_TRACKS || (!concurrent && plan.tracks != 1) {
            return Err(format!("{} tracks", plan.tracks));
        }
        let live = &live;
        let readers = |v: usize| (0..n).filter(move |&r| live[r] && g.nodes[r].inputs.contains(&v));
        // What each buffer holds as the nodes run in order.
        let mut held: Vec<Option<usize>> = vec![None; plan.buffers];
        if plan.buf[0] != 0 {
            return Err("the input is not in buffer 0".into());
        }
        held[0] = Some(0);
        for i in (1..n).filter(|&i| live[i]) {
            let b = plan.buf[i];
            if b >= plan.buffers || plan.track[i] >= plan.tracks {
                return Err(format!("node {i}: buffer {b}, track {}", plan.track[i]));
            }
            if let Some(v) = held[b] {
                if g.outputs.contains(&v) || readers(v).any(|r| r >= i) {
                    return Err(format!(
                        "node {i} overwrites node {v}'s value in buffer {b}"
                    ));
                }
                // Every use of the old value is ordered before i: an
                // ancestor or earlier on i's track (else i would wait for
                // another branch), unless the slot was full.
                let before = |x: usize| plan.track[x] == plan.track[i] || ancestor(g, x, i);
                if concurrent
                    && plan.buffers < MAX_BUFFERS_PER_SLOT_FOR_TESTS
                    && !(before(v) && readers(v).all(before))
                {
                    return Err(format!(
                        "node {i} reuses node {v}'s buffer {b} across tracks"
                    ));
                }
            }
            held[b] = Some(i);
        }
        Ok(())
    }

    const MAX_BUFFERS_PER_SLOT_FOR_TESTS: usize = prism_buffer::engine::MAX_BUFFERS_PER_SLOT;

    /// `x` is ordered before `i` by the graph's edges.
    fn ancestor<T: Element>(g: &StageGraph<T>, x: usize, i: usize) -> bool {
        let mut stack = g.nodes[i].inputs.clone();
        let mut seen = vec![false; g.nodes.len()];
        while let Some(p) = stack.pop() {
            if p == x {
                return true;
            }
            if !std::mem::replace(&mut seen[p], true) {
                stack.extend(&g.nodes[p].inputs);
            }
        }
        false
    }

    #[test]
    fn one_stage_branches_each_get_a_track_and_share_nothing() {
        for k in 1..=10usize {
            let shape: Vec<Vec<usize>> = (0..k).map(|_| vec![0]).collect();
            let outputs: Vec<usize> = (1..=k).collect();
            let g = build(&shape, &outputs);
            let plan = g.allocate(g.live(), true);
            assert_eq!(plan.buffers, k + 1, "{k} branches");
            assert_eq!(plan.tracks, k.min(MAX_TRACKS), "{k} branches");
            let one = g.allocate(g.live(), false);
            assert_eq!((one.buffers, one.tracks), (k + 1, 1));
        }
    }

    #[test]
    fn two_stage_branches_get_buffers_of_their_own_only_when_concurrent() {
        let k = 4;
        let mut shape = Vec::new();
        let mut outputs = Vec::new();
        for _ in 0..k {
            shape.push(vec![0]);
            shape.push(vec![shape.len()]);
            outputs.push(shape.len());
        }
        let mut g = build(&shape, &outputs);
        assert_eq!(g.buffers_per_slot().unwrap(), 2 * k + 1);
        g.concurrent_branches(false);
        // A1 and A2 in two, each later branch's first stage in the buffer
        // the one before freed, the last branch's second in the input's.
        assert_eq!(g.buffers_per_slot().unwrap(), k + 1);
        check_plan(&g, true).unwrap();
        check_plan(&g, false).unwrap();
    }

    #[test]
    fn a_reader_continues_its_input_track_past_the_last_track() {
        // k two-stage branches built breadth first: every first stage,
        // then every second stage; past MAX_TRACKS first stages share
        // tracks, and each second stage still runs on its first's.
        for k in [3, 8, 9, 12] {
            let mut shape: Vec<Vec<usize>> = (0..k).map(|_| vec![0]).collect();
            shape.extend((1..=k).map(|f| vec![f]));
            let outputs: Vec<usize> = (k + 1..=2 * k).collect();
            let g = build(&shape, &outputs);
            let plan = g.allocate(g.live(), true);
            assert_eq!(plan.tracks, k.min(MAX_TRACKS), "{k} branches");
            for f in 1..=k {
                assert_eq!(plan.track[f + k], plan.track[f], "{k} branches, branch {f}");
            }
            check_plan(&g, true).unwrap();
        }
    }

    #[test]
    fn a_chain_stays_on_one_track_in_two_buffers() {
        let shape: Vec<Vec<usize>> = (0..12).map(|i| vec![i]).collect();
        let g = build(&shape, &[12]);
        let plan = g.allocate(g.live(), true);
        assert_eq!((plan.buffers, plan.tracks), (2, 1));
        assert!(plan.track.iter().all(|&t| t == 0));
    }

    fn shapes() -> impl Strategy<Value = (Vec<Vec<usize>>, Vec<usize>)> {
        (1usize..24).prop_flat_map(|count| {
            let nodes: Vec<_> = (1..=count)
                .map(|i| {
                    prop_oneof![
                        3 => (0..i).prop_map(|p| vec![p]),
                        1 => proptest::collection::vec(0..i, 2..4),
                    ]
                })
                .collect();
            (nodes, proptest::collection::vec(0..=count, 1..8))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn plans_never_overwrite_a_needed_value((shape, outputs) in shapes()) {
            let g = build(&shape, &outputs);
            for concurrent in [true, false] {
                if let Err(e) = check_plan(&g, concurrent) {
                    return Err(TestCaseError::fail(format!("{e} (concurrent: {concurrent}; {g:?})")));
                }
            }
        }
    }
}
