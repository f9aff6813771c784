//! CUDA graphs: a lane's work captured once ([`Lane::capture`]) and
//! launched again and again ([`CapturedGraph::launch`]).
//!
//! While a lane captures, its launch scope's ops (kernels, copies between
//! device buffers, memsets, outside work) are recorded, not run: the
//! ordering module checks their context and buffers but issues no wait and
//! records no fence (`Lane::enqueue_scoped`). The graph keeps every device
//! allocation it uses alive (they are shared, `Arc`), with the access and
//! byte range each op made, and each launch goes through `Lane::enqueue`
//! with all of them: ordered after their conflicting earlier uses, fenced
//! on each before `launch` returns, like one big op. Inside the graph,
//! stream order orders the ops (a capture is one stream's work).
//!
//! Host memory cannot be captured (the graph's launches would write it
//! while safe code reads it). Values come back through read-back nodes
//! ([`Capture::read_back`]): each launch points them at a pinned slot of
//! the graph's pool that no [`Readback`] holds and whose last copy
//! completed (the slot of the previous launch when it came back, so a loop
//! that reads each launch's values changes nothing; otherwise the node is
//! re-pointed with `cuGraphExecMemcpyNodeSetParams`), and hands that slot
//! out in the launch's [`Readback`].

use std::any::TypeId;
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::{result, DriverError};

use crate::context::Gpu;
use crate::copy::range_bytes;
use crate::error::DriverResultExt;
use crate::kernels::Launch;
use crate::lane::{CaptureState, CapturedRead, CapturedUse, Lane};
use crate::memory::SlotPool;
use crate::memory::{DeviceBuffer, Element, PinnedBuffer, Tracked};
use crate::order::Fence;
use crate::order::{Access, Used};
use crate::readback::Readback;
use crate::{Error, Result};

static NEXT_GRAPH: AtomicU64 = AtomicU64::new(1);

/// The scope a capture hands its closure: a [`Launch`] (through `Deref`)
/// whose ops are recorded into the graph, plus [`read_back`](Self::read_back).
#[derive(Debug)]
pub struct Capture<'l> {
    launch: Launch<'l>,
    graph: u64,
}

impl<'l> std::ops::Deref for Capture<'l> {
    type Target = Launch<'l>;
    fn deref(&self) -> &Launch<'l> {
        &self.launch
    }
}

impl std::ops::DerefMut for Capture<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.launch
    }
}

/// Names one read-back of a captured graph; [`GraphLaunch::read_back`]
/// takes each launch's values with it.
#[derive(Debug)]
pub struct ReadbackKey<T> {
    index: usize,
    graph: u64,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for ReadbackKey<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for ReadbackKey<T> {}

impl Capture<'_> {
    /// Records a copy of `buf[at..at + n]` into a pinned slot of the
    /// graph's: every launch of the graph reads the range back (after the
    /// graph's earlier work on it, in stream order), and
    /// [`GraphLaunch::read_back`] with the returned key gives that launch's
    /// values.
    pub fn read_back<T: Element>(
        &mut self,
        buf: &DeviceBuffer<T>,
        at: usize,
        n: usize,
    ) -> Result<ReadbackKey<T>> {
        let (off, bytes) = range_bytes::<T>("graph read-back", at, n, buf.len())?;
        let pool = self.launch.lane_mut().slot_pool();
        let slot = self.launch.copy_into_slot(&pool, buf, off, bytes)?;
        let state = self
            .launch
            .lane_mut()
            .capture
            .as_mut()
            .ok_or(Error::NotCapturable {
                what: "a read-back",
                reason: "the lane is not capturing",
            })?;
        state.reads.push(CapturedRead {
            slot,
            bytes,
            n,
            ty: TypeId::of::<T>(),
        });
        Ok(ReadbackKey {
            index: state.reads.len() - 1,
            graph: self.graph,
            _t: PhantomData,
        })
    }
}

impl Launch<'_> {
    /// [`Lane::capture`] on this scope's lane (a stage or op that records
    /// its own graph). The scope's ops before it are queued as usual.
    pub fn capture<R>(
        &mut self,
        record: impl FnOnce(&mut Capture<'_>) -> Result<R>,
    ) -> Result<(CapturedGraph, R)> {
        self.lane_mut().capture(record)
    }

    /// [`CapturedGraph::launch`] (or `launch_timed`) on this scope's lane,
    /// as one op of the scope (its fence becomes the scope's last).
    pub fn launch_graph(&mut self, graph: &mut CapturedGraph, timed: bool) -> Result<GraphLaunch> {
        if self.is_capturing() {
            return Err(Error::NotCapturable {
                what: "a graph launch",
                reason: "graphs are launched outside a capture",
            });
        }
        let run = graph.launch_inner(self.lane_mut(), timed)?;
        self.set_last(run.fence.clone());
        Ok(run)
    }
}

impl Lane {
    /// Captures the work `record` queues on this lane into a CUDA graph,
    /// without running it, and returns the graph (with what `record`
    /// returned). Inside, the [`Capture`] scope takes the ops of a
    /// [`Launch`] (prism's kernels, your kernels, `copy_dtod`, `fill`,
    /// outside work such as a cuBLAS call) and [`Capture::read_back`];
    /// fences, waits, host memory and uploads from pageable memory are
    /// refused (`NotCapturable`). The capture uses the relaxed mode, so
    /// other threads' CUDA calls are not disturbed.
    ///
    /// The graph does the same work at every [`CapturedGraph::launch`]:
    /// the same kernels with the same arguments on the same buffers
    /// (which it keeps alive). Capture again when any of that changes.
    pub fn capture<R>(
        &mut self,
        record: impl FnOnce(&mut Capture<'_>) -> Result<R>,
    ) -> Result<(CapturedGraph, R)> {
        let _span = tracing::debug_span!("prism.capture").entered();
        self.gpu().check_usable()?;
        if self.capture.is_some() {
            return Err(Error::NotCapturable {
                what: "a capture",
                reason: "this lane is capturing already",
            });
        }
        if !self.holds_stream_alone() {
            // Another lane's ops on the shared stream would be captured
            // instead of run, behind that lane's back.
            return Err(Error::NotCapturable {
                what: "a capture on a stream other lanes share (a pooled stream)",
                reason: "their work would be recorded into this graph instead of running; capture on a lane of its own (Lane::new)",
            });
        }
        self.gpu().bind()?;
        let raw = self.raw_stream();
        // SAFETY: `raw` is this lane's live stream, of the bound context;
        // relaxed mode leaves other threads' calls alone.
        unsafe {
            result::stream::begin_capture(
                raw,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            )
        }
        .call("cuStreamBeginCapture")?;
        self.capture = Some(Box::new(CaptureState {
            uses: Vec::new(),
            reads: Vec::new(),
        }));
        let id = NEXT_GRAPH.fetch_add(1, Ordering::Relaxed);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let mut scope = Capture {
                launch: self.launch(),
                graph: id,
            };
            record(&mut scope)
        }));
        // Whatever happened, the lane leaves capture mode and the stream's
        // capture ends before anything else runs on it.
        let state = self.capture.take();
        // SAFETY: the stream is capturing (begun above, on this thread).
        let ended = unsafe { result::stream::end_capture(raw) };
        let discard = |g: &std::result::Result<sys::CUgraph, DriverError>| {
            if let Ok(g) = g {
                // SAFETY: a graph the capture just made, used by nothing.
                let _ = unsafe { result::graph::destroy(*g) };
            }
        };
        let value = match outcome {
            Err(panic) => {
                discard(&ended);
                resume_unwind(panic)
            }
            Ok(Err(e)) => {
                discard(&ended);
                return Err(e);
            }
            Ok(Ok(v)) => v,
        };
        let graph = ended.call("cuStreamEndCapture")?;
        let state = state.ok_or(Error::NotCapturable {
            what: "a capture",
            reason: "its state went missing",
        })?;
        let pool = self.slot_pool();
        let g = CapturedGraph::instantiate(self.gpu(), graph, *state, id, pool)?;
        Ok((g, value))
    }
}

/// A read-back node of an instantiated graph.
#[derive(Debug)]
struct GraphRead {
    node: sys::CUgraphNode,
    params: sys::CUDA_MEMCPY3D,
    /// The destination is recorded by its device address (`dstDevice`:
    /// unified or device memory type), not `dstHost`.
    unified: bool,
    /// The slot the node points at now, if the graph holds it.
    slot: Option<PinnedBuffer<u8>>,
    /// The host address the node points at now.
    target: *mut u8,
    bytes: usize,
    n: usize,
    ty: TypeId,
}

/// A CUDA graph captured from a lane ([`Lane::capture`]): launched on any
/// lane of its context as one op, ordered after the earlier uses of every
/// buffer it uses and fenced on each of them. It keeps those buffers'
/// memory alive while it exists.
#[derive(Debug)]
pub struct CapturedGraph {
    gpu: Gpu,
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    uses: Vec<CapturedUse>,
    reads: Vec<GraphRead>,
    pool: Arc<SlotPool>,
    id: u64,
    launches: u64,
    repoints: u64,
}

// SAFETY: the graph and exec handles are driver objects usable from any
// thread with their context bound (every driver call here binds it first);
// the read nodes' parameters hold host addresses of slots the graph owns,
// only passed to the driver. `launch` takes `&mut self`, so no two threads
// use the exec at once through this handle.
unsafe impl Send for CapturedGraph {}
// SAFETY: `&self` methods read plain fields only; no driver call.
unsafe impl Sync for CapturedGraph {}

impl CapturedGraph {
    fn instantiate(
        gpu: &Gpu,
        graph: sys::CUgraph,
        state: CaptureState,
        id: u64,
        pool: Arc<SlotPool>,
    ) -> Result<Self> {
        // SAFETY: `graph` is the capture's graph, valid until destroyed.
        let exec =
            match unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) } {
                Ok(e) => e,
                Err(e) => {
                    // SAFETY: as above; nothing else holds it.
                    let _ = unsafe { result::graph::destroy(graph) };
                    return Err(Error::Driver {
                        call: "cuGraphInstantiate",
                        source: e,
                    });
                }
            };
        let mut g = Self {
            gpu: gpu.clone(),
            graph,
            exec,
            uses: state.uses,
            reads: Vec::new(),
            pool,
            id,
            launches: 0,
            repoints: 0,
        };
        if !state.reads.is_empty() {
            let nodes = g.memcpy_nodes()?;
            for r in state.reads {
                let at = r.slot.raw();
                let mapped = r.slot.mapped().unwrap_or(at as u64);
                // The driver records the destination as host memory
                // (`dstHost`) or, page-locked memory being mapped, by its
                // device address (`dstDevice`, the same under UVA).
                let (node, params, unified) = nodes
                    .iter()
                    .find_map(|&(node, p)| {
                        if !p.dstHost.is_null() && p.dstHost.cast::<u8>() == at {
                            Some((node, p, false))
                        } else if p.dstDevice != 0
                            && (p.dstDevice == mapped || p.dstDevice == at as u64)
                        {
                            Some((node, p, true))
                        } else {
                            None
                        }
                    })
                    .ok_or(Error::NotCapturable {
                        what: "a read-back",
                        reason: "its copy is not in the captured graph",
                    })?;
                g.reads.push(GraphRead {
                    node,
                    params,
                    unified,
                    slot: Some(r.slot),
                    target: at,
                    bytes: r.bytes,
                    n: r.n,
                    ty: r.ty,
                });
            }
        }
        Ok(g)
    }

    /// The graph's memcpy nodes with their parameters.
    fn memcpy_nodes(&self) -> Result<Vec<(sys::CUgraphNode, sys::CUDA_MEMCPY3D)>> {
        let mut count = 0usize;
        // SAFETY: a null array asks for the count only.
        unsafe { sys::cuGraphGetNodes(self.graph, std::ptr::null_mut(), &mut count) }
            .result()
            .call("cuGraphGetNodes")?;
        let mut nodes = vec![std::ptr::null_mut(); count];
        // SAFETY: `nodes` has room for `count` handles.
        unsafe { sys::cuGraphGetNodes(self.graph, nodes.as_mut_ptr(), &mut count) }
            .result()
            .call("cuGraphGetNodes")?;
        let mut out = Vec::new();
        for node in nodes.into_iter().take(count) {
            let mut ty = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            // SAFETY: `node` is a node of this graph; the call writes `ty`.
            unsafe { sys::cuGraphNodeGetType(node, &mut ty) }
                .result()
                .call("cuGraphNodeGetType")?;
            if ty != sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY {
                continue;
            }
            let mut p = std::mem::MaybeUninit::<sys::CUDA_MEMCPY3D>::uninit();
            // SAFETY: a memcpy node of this graph; the call fills every
            // field of `p` on success (not all-zero: an enum field has no
            // zero value).
            unsafe { sys::cuGraphMemcpyNodeGetParams(node, p.as_mut_ptr()) }
                .result()
                .call("cuGraphMemcpyNodeGetParams")?;
            // SAFETY: the driver initialised it (the call succeeded).
            let p = unsafe { p.assume_init() };
            out.push((node, p));
        }
        Ok(out)
    }

    /// Launches the graph on `lane` (a lane of the graph's context), as one
    /// op over every buffer it uses: after their conflicting earlier uses,
    /// fenced on each before this returns. The [`GraphLaunch`] holds this
    /// launch's fence and read-backs.
    pub fn launch(&mut self, lane: &mut Lane) -> Result<GraphLaunch> {
        self.launch_inner(lane, false)
    }

    /// [`launch`](Self::launch) with timed fences around it
    /// ([`GraphLaunch::gpu_ms`]).
    pub fn launch_timed(&mut self, lane: &mut Lane) -> Result<GraphLaunch> {
        self.launch_inner(lane, true)
    }

    fn launch_inner(&mut self, lane: &mut Lane, timed: bool) -> Result<GraphLaunch> {
        if !self.gpu.same(lane.gpu()) {
            return Err(Error::WrongContext {
                what: "captured graph",
            });
        }
        lane.gpu().check_usable()?;
        lane.gpu().bind()?;
        // Every read node gets a slot no Readback holds.
        for r in &mut self.reads {
            if r.slot.is_some() {
                continue;
            }
            let slot = match self.pool.take_at(r.target) {
                Some(s) => s,
                None => self.pool.take(&self.gpu, r.bytes)?,
            };
            if slot.raw() != r.target {
                let mut p = r.params;
                if r.unified {
                    p.dstDevice = slot.mapped().unwrap_or(slot.raw() as u64);
                } else {
                    p.dstHost = slot.raw().cast();
                }
                // SAFETY: `node` is a memcpy node of the graph `exec` was
                // made from; `p` is its parameters with the host
                // destination moved to another page-locked slot of at least
                // `bytes` bytes (same kind of memory, same context), which
                // the graph holds until the launch hands it out.
                let set = unsafe {
                    sys::cuGraphExecMemcpyNodeSetParams(
                        self.exec,
                        r.node,
                        &p,
                        self.gpu.cuda_context().cu_ctx(),
                    )
                }
                .result();
                if let Err(e) = set {
                    self.pool.put(slot);
                    return Err(Error::Driver {
                        call: "cuGraphExecMemcpyNodeSetParams",
                        source: e,
                    });
                }
                r.params = p;
                r.target = slot.raw();
                self.repoints += 1;
            }
            r.slot = Some(slot);
        }
        let mut uses: Vec<Used<'_>> = self
            .uses
            .iter()
            .map(|c| Used {
                cell: &c.alloc.uses,
                gpu: &c.alloc.gpu,
                access: c.access,
                extent: c.extent,
                portable: false,
                what: c.what,
                keep: Some(&c.alloc),
            })
            .collect();
        for r in &self.reads {
            if let Some(slot) = &r.slot {
                uses.push(slot.used_range(Access::Write, "graph read-back slot", 0, r.bytes));
            }
        }
        // `enqueue` refuses buffers left in an unknown state (`stuck`).
        let exec = self.exec;
        let (start, end, ()) = lane.enqueue(&uses, timed, |stream| {
            // SAFETY: `exec` is this graph's executable, of the lane's
            // context (checked above); every buffer it touches is alive
            // (the graph holds their allocations and read slots) and
            // ordered by this enqueue, which fences each before returning.
            unsafe { sys::cuGraphLaunch(exec, stream) }
                .result()
                .call("cuGraphLaunch")
        })?;
        drop(uses);
        self.launches += 1;
        let reads = self
            .reads
            .iter_mut()
            .map(|r| (r.slot.take(), r.n, r.ty))
            .collect();
        Ok(GraphLaunch {
            start,
            fence: end,
            reads,
            graph: self.id,
            pool: Arc::clone(&self.pool),
        })
    }

    /// True when the graph uses `buf` (holds its allocation).
    pub fn uses<T: Element>(&self, buf: &DeviceBuffer<T>) -> bool {
        self.uses.iter().any(|c| Arc::ptr_eq(&c.alloc, buf.alloc()))
    }

    /// Launches so far.
    pub fn launches(&self) -> u64 {
        self.launches
    }

    /// Launches that had to re-point a read-back node at another slot
    /// (because the previous launch's values were still held).
    pub fn repoints(&self) -> u64 {
        self.repoints
    }

    /// The GPU (context) the graph belongs to.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Buffers the graph uses (and keeps alive).
    pub fn buffers(&self) -> usize {
        self.uses.len()
    }
}

impl Drop for CapturedGraph {
    fn drop(&mut self) {
        if self.gpu.bind().is_err() {
            return;
        }
        // SAFETY: the exec and graph are this handle's, destroyed once. An
        // exec still running is freed by the driver when it completes; the
        // buffers and slots it uses are released after this (fields drop
        // after `drop`), each waiting for its recorded uses, which include
        // every launch.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
}

/// One launch of a [`CapturedGraph`]: its fence and its read-backs.
#[derive(Debug)]
pub struct GraphLaunch {
    start: Option<Fence>,
    fence: Fence,
    reads: Vec<(Option<PinnedBuffer<u8>>, usize, TypeId)>,
    graph: u64,
    pool: Arc<SlotPool>,
}

impl GraphLaunch {
    /// The fence after the launch's work.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// The timed fence before the launch's work (after its waits), if it
    /// was launched timed.
    pub fn start_fence(&self) -> Option<&Fence> {
        self.start.as_ref()
    }

    /// The launch's GPU time, once it completed, if it was launched with
    /// [`CapturedGraph::launch_timed`].
    pub fn gpu_ms(&self) -> Option<Result<f32>> {
        self.start.as_ref().map(|s| self.fence.elapsed_ms_since(s))
    }

    /// This launch's values of the read-back `key` (once: the slot goes
    /// with the [`Readback`]). A key of another graph is `WrongScope`; a
    /// second take is `Unsupported`.
    pub fn read_back<T: Element>(&mut self, key: ReadbackKey<T>) -> Result<Readback<T>> {
        if key.graph != self.graph {
            return Err(Error::WrongScope {
                what: "read-back key",
                scope: "captured graph",
            });
        }
        let (slot, n, ty) = self.reads.get_mut(key.index).ok_or(Error::WrongScope {
            what: "read-back key",
            scope: "captured graph",
        })?;
        if *ty != TypeId::of::<T>() {
            return Err(Error::WrongScope {
                what: "read-back key (of another element type)",
                scope: "captured graph",
            });
        }
        let slot = slot.take().ok_or(Error::Unsupported {
            what: "taking one launch's read-back twice",
            instead: "keep the Readback from the first take",
        })?;
        Ok(Readback::new(
            slot,
            self.fence.clone(),
            *n,
            Arc::clone(&self.pool),
        ))
    }

    /// Blocks until the launch's work is done (its fence only).
    pub fn wait(&self) -> Result<()> {
        self.fence.wait()
    }
}

impl Drop for GraphLaunch {
    fn drop(&mut self) {
        for (slot, _, _) in &mut self.reads {
            if let Some(s) = slot.take() {
                self.pool.put(s);
            }
        }
    }
}
