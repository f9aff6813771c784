//! The lane: the one path by which prism queues GPU work on a stream.
//! [`Lane::enqueue`] applies the rules of [`order`](crate::order) to every
//! copy, kernel, memset and fence: it checks the context (rule 5), issues
//! the waits the op needs (rules 1 and 2), runs it, records its end fence
//! in stream order (rule 4) and notes that fence on every buffer it used,
//! on every path (rule 3). While a lane captures a CUDA graph, ops are
//! recorded into the graph instead ([`Lane::enqueue_scoped`], `CaptureState`).

use std::any::TypeId;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaStream};

use crate::context::Gpu;
use crate::error::DriverResultExt;
use crate::memory::{PinnedBuffer, SlotPool};
use crate::order::{
    claim_uses, lock, order_after, Access, DeviceAlloc, Extent, Fence, StreamId, Used, WaitClock,
};
use crate::raw::stream_synchronize;
use crate::{Error, Result};

/// One buffer the captured work uses: the union of its ops' ranges, a
/// write if any op wrote it.
#[derive(Debug)]
pub(crate) struct CapturedUse {
    pub(crate) alloc: Arc<DeviceAlloc>,
    pub(crate) access: Access,
    pub(crate) extent: Extent,
    pub(crate) what: &'static str,
}

/// A read-back recorded in the capture: the slot its node copies into.
#[derive(Debug)]
pub(crate) struct CapturedRead {
    pub(crate) slot: PinnedBuffer<u8>,
    pub(crate) bytes: usize,
    pub(crate) n: usize,
    pub(crate) ty: TypeId,
}

/// What a lane records while it captures (`Lane::capture` holds it in the
/// lane; `Lane::enqueue_scoped` adds to it; `capture.rs` reads it).
#[derive(Debug)]
pub(crate) struct CaptureState {
    pub(crate) uses: Vec<CapturedUse>,
    pub(crate) reads: Vec<CapturedRead>,
}

impl CaptureState {
    /// Adds an op's buffers (their allocations: the caller checked each
    /// use is a device buffer's).
    pub(crate) fn note(&mut self, uses: &[Used<'_>]) {
        for u in uses {
            let Some(alloc) = u.keep else { continue };
            u.cell.mark_in_graph();
            match self.uses.iter_mut().find(|c| Arc::ptr_eq(&c.alloc, alloc)) {
                Some(c) => {
                    if u.access == Access::Write {
                        c.access = Access::Write;
                    }
                    c.extent = c.extent.hull(&u.extent);
                }
                None => self.uses.push(CapturedUse {
                    alloc: Arc::clone(alloc),
                    access: u.access,
                    extent: u.extent,
                    what: u.what,
                }),
            }
        }
    }
}

/// One CUDA stream prism queues on (made by prism, or adopted from a cudarc
/// user, who gave up every other handle to it), shared by every lane on it.
#[derive(Debug)]
pub(crate) struct StreamCore {
    pub(crate) id: StreamId,
    pub(crate) gpu: Gpu,
    pub(crate) cu: Arc<CudaStream>,
    /// Sequence number of the last fence recorded on this stream; the lock
    /// is held across `cuEventRecord` (rule 4).
    last_seq: Mutex<u64>,
}

impl StreamCore {
    /// A new non-blocking stream (never the legacy default stream).
    pub(crate) fn new(gpu: &Gpu, priority: i32) -> Result<Arc<Self>> {
        gpu.check_usable()?;
        let cu = gpu
            .cuda_context()
            .new_stream_with_priority(priority)
            .call("cuStreamCreateWithPriority")?;
        Ok(Arc::new(Self {
            id: StreamId::fresh(),
            gpu: gpu.clone(),
            cu,
            last_seq: Mutex::new(0),
        }))
    }

    /// A stream made by someone else (a cudarc user's) that prism now holds
    /// alone (the caller checked that no other handle to it exists). Its id
    /// is fresh, as for a stream prism made.
    pub(crate) fn adopt(gpu: &Gpu, cu: Arc<CudaStream>) -> Arc<Self> {
        Arc::new(Self {
            id: StreamId::fresh(),
            gpu: gpu.clone(),
            cu,
            last_seq: Mutex::new(0),
        })
    }

    fn raw(&self) -> sys::CUstream {
        self.cu.cu_stream()
    }
}

/// A handle to one CUDA stream through which prism queues work: copies,
/// kernel launch scopes ([`Lane::launch`]), memsets and fences. It carries
/// what the stream is already ordered after, so it skips waits that are
/// implied, and it is used through `&mut self`, so one thread at a time
/// queues through it. Not `Clone`: every lane has its own ordering state;
/// lanes from a [`StreamPool`](crate::StreamPool) may share a stream, which
/// stays sound (and costs at most a redundant wait).
#[derive(Debug)]
pub struct Lane {
    core: Arc<StreamCore>,
    clock: WaitClock,
    /// Set while [`Lane::capture`] records the lane's work into a CUDA
    /// graph: ops are then captured, not run, and neither ordered nor
    /// fenced here (the graph's launches are).
    pub(crate) capture: Option<Box<CaptureState>>,
    /// Pinned slots for small read-backs (`read_async`), made on first use.
    pub(crate) slots: Option<Arc<SlotPool>>,
}

impl Lane {
    pub(crate) fn on(core: Arc<StreamCore>) -> Self {
        Self {
            core,
            clock: WaitClock::default(),
            capture: None,
            slots: None,
        }
    }

    /// A lane on a stream prism now holds alone (see [`StreamCore::adopt`]).
    pub(crate) fn adopt(gpu: &Gpu, cu: Arc<CudaStream>) -> Self {
        Self::on(StreamCore::adopt(gpu, cu))
    }

    /// The lane's stream, if no other lane shares it; the lane is consumed,
    /// so prism queues nothing more there (fences already recorded on it
    /// keep their meaning). Otherwise the lane comes back.
    pub(crate) fn into_stream(self) -> std::result::Result<Arc<CudaStream>, Box<Self>> {
        let Self {
            core,
            clock,
            capture,
            slots,
        } = self;
        match Arc::try_unwrap(core) {
            Ok(core) => Ok(core.cu),
            Err(core) => Err(Box::new(Self {
                core,
                clock,
                capture,
                slots,
            })),
        }
    }

    /// The GPU this lane's stream belongs to.
    pub fn gpu(&self) -> &Gpu {
        &self.core.gpu
    }

    /// The stream's process-unique id.
    pub fn stream_id(&self) -> StreamId {
        self.core.id
    }

    /// The raw cudarc stream, for work prism does not see (profiling
    /// markers, the user's own `CudaSlice`s, a host-side hold in a test).
    ///
    /// # Safety
    ///
    /// Work enqueued on the raw stream is invisible to prism's ordering.
    /// It must not read or write memory of a prism buffer unless the caller
    /// orders it against every other use and keeps the buffer alive and
    /// otherwise untouched until it completes. Queue prism buffers' work
    /// through the lane instead ([`Lane::launch`] and
    /// [`Launch::kernel`](crate::Launch::kernel) for one's own kernels).
    pub unsafe fn cuda_stream(&self) -> &Arc<CudaStream> {
        &self.core.cu
    }

    /// Records a fence (timing disabled) after everything queued so far.
    pub fn fence(&mut self) -> Result<Fence> {
        self.core.gpu.check_usable()?;
        self.not_capturing("a fence")?;
        self.record(false)
    }

    /// Records a timed fence (for [`Fence::elapsed_ms_since`]).
    pub fn timed_fence(&mut self) -> Result<Fence> {
        self.core.gpu.check_usable()?;
        self.not_capturing("a timed fence")?;
        self.record(true)
    }

    /// Makes this lane's later work wait (on the GPU) for `fence`, unless
    /// that is implied already. Fences of other devices are allowed.
    pub fn wait_for(&mut self, fence: &Fence) -> Result<()> {
        self.not_capturing("a wait for a fence")?;
        let core = &self.core;
        order_after(&mut self.clock, core.id, fence, |f| f.gpu_wait(&core.cu))
    }

    /// Refuses what a capture cannot hold: fences are recorded and waits
    /// issued by the graph's launches, not inside it.
    fn not_capturing(&self, what: &'static str) -> Result<()> {
        if self.capture.is_some() {
            return Err(Error::NotCapturable {
                what,
                reason: "the graph's launches are ordered and fenced as a whole; queue it outside the capture",
            });
        }
        Ok(())
    }

    /// Blocks the calling thread until everything queued on the stream is
    /// done. Waits through the driver (`cuStreamSynchronize`), not
    /// cudarc's `synchronize`, which returns an error cudarc stashed in the
    /// context object without waiting; a wait refused because a stream
    /// capture elsewhere is in progress is made again in relaxed capture
    /// mode (a lane never waits for its own stream while capturing it: the
    /// capture holds the lane).
    pub fn synchronize(&self) -> Result<()> {
        self.core.gpu.bind()?;
        stream_synchronize(&self.core.cu).call("cuStreamSynchronize")
    }

    /// Records a fence with this lane's clock (rule 4). The caller checked
    /// that the context is usable.
    fn record(&self, timed: bool) -> Result<Fence> {
        let event = self.core.gpu.0.events.take(timed)?;
        let mut last = self.core.last_seq.lock().unwrap_or_else(|p| p.into_inner());
        // On failure the event goes back to the pool (it marks nothing).
        event.record(&self.core.cu).call("cuEventRecord")?;
        *last += 1;
        let seq = *last;
        drop(last);
        Ok(Fence::new(event, seq, self.core.id, self.clock))
    }

    /// Issues the waits an op with these uses needs (rule 1) and nothing
    /// else. Harmless to call early: a timed start fence recorded after it
    /// then measures the op, not the time it spent waiting.
    pub(crate) fn order(&mut self, uses: &[Used<'_>]) -> Result<()> {
        self.not_capturing("an ordering wait")?;
        self.check_context(uses)?;
        let core = &self.core;
        for u in uses {
            let cell = lock(u.cell);
            if cell.stuck {
                return Err(Error::ContextPoisoned {
                    reason: format!("{} is in an unknown state after a failed GPU call", u.what),
                });
            }
            for dep in cell.deps(u.access, u.extent) {
                // Even a fence of a context that reported a fault is waited
                // for: its queued work may still run (memory.rs,
                // `writer_pending`); a wait the driver refuses fails the op.
                order_after(&mut self.clock, core.id, dep, |f| f.gpu_wait(&core.cu))?;
            }
        }
        Ok(())
    }

    fn check_context(&self, uses: &[Used<'_>]) -> Result<()> {
        match uses
            .iter()
            .find(|u| !u.portable && !u.gpu.same(&self.core.gpu))
        {
            Some(u) => Err(Error::WrongContext { what: u.what }),
            None => Ok(()),
        }
    }

    /// The one path by which prism queues GPU work (rules 1-5): checks the
    /// context, orders the op after the uses it conflicts with, records a
    /// timed start fence if asked, runs `op` (which enqueues on the raw
    /// stream it is given), records the end fence and notes it on every
    /// buffer, whether or not `op` succeeded.
    pub(crate) fn enqueue<R>(
        &mut self,
        uses: &[Used<'_>],
        timed: bool,
        op: impl FnOnce(sys::CUstream) -> Result<R>,
    ) -> Result<(Option<Fence>, Fence, R)> {
        self.core.gpu.check_usable()?;
        self.not_capturing("an op with its own fence")?;
        self.core.gpu.bind()?;
        // Rule 7: no conflicting op of another thread comes between this
        // op's ordering and its note (released when this returns).
        let _claims = claim_uses(uses)?;
        self.order(uses)?;
        let start = if timed {
            Some(self.record(true)?)
        } else {
            None
        };
        let outcome = op(self.core.raw());
        let end = match self.record(timed) {
            Ok(end) => end,
            Err(e) => {
                // The op may be queued with no fence to track it: wait until
                // the stream is idle, so nothing it uses is touched early.
                // If even that fails, nobody can tell when the GPU is done
                // with the buffers: they are never touched or freed again.
                if let Err(sync) = self.synchronize() {
                    // A stream capture's refusal is no GPU failure: the
                    // context stays usable, the buffers are locked.
                    if !matches!(sync, Error::CaptureInProgress { .. }) {
                        self.core.gpu.poison(&format!("{sync} (after {e})"));
                    }
                    for u in uses {
                        lock(u.cell).stuck = true;
                    }
                }
                return Err(outcome.err().unwrap_or(e));
            }
        };
        for u in uses {
            lock(u.cell).note(u.access, u.extent, &end);
        }
        outcome.map(|r| (start, end, r))
    }
}

impl Lane {
    /// [`enqueue`](Self::enqueue) for the ops of a launch scope: outside a
    /// capture, exactly that (the end fence comes back); while the lane is
    /// capturing a CUDA graph ([`Lane::capture`]), the op is recorded into
    /// the graph instead of running: its context and buffers are checked
    /// as for any op, no wait is issued and no fence recorded, and the
    /// buffers' allocations go into the graph, which orders and fences all
    /// of them at every launch (rule 1 holds per launch; stream order holds
    /// inside the graph, which is one stream's work). Host memory cannot be
    /// captured: the graph's launches would write it while safe code reads
    /// it (`NotCapturable`).
    pub(crate) fn enqueue_scoped<R>(
        &mut self,
        uses: &[Used<'_>],
        op: impl FnOnce(sys::CUstream) -> Result<R>,
    ) -> Result<(Option<Fence>, R)> {
        if self.capture.is_none() {
            let (_, end, r) = self.enqueue(uses, false, op)?;
            return Ok((Some(end), r));
        }
        self.core.gpu.check_usable()?;
        self.check_context(uses)?;
        for u in uses {
            if u.keep.is_none() {
                return Err(Error::NotCapturable {
                    what: u.what,
                    reason: "host memory in a graph would be written by its launches while safe code reads it (read device results back with Capture::read_back), and a library handle's workspace would be used by the graph after the handle is gone",
                });
            }
            if lock(u.cell).stuck {
                return Err(Error::ContextPoisoned {
                    reason: format!("{} is in an unknown state after a failed GPU call", u.what),
                });
            }
        }
        self.core.gpu.bind()?;
        let r = op(self.core.raw());
        if let Some(cap) = self.capture.as_mut() {
            // Noted even when the op failed: the capture may hold part of it.
            cap.note(uses);
        }
        r.map(|r| (None, r))
    }

    /// True when no other lane queues on this lane's stream.
    pub(crate) fn holds_stream_alone(&self) -> bool {
        Arc::strong_count(&self.core) == 1
    }

    /// The raw stream, for the capture and outside-work modules (which
    /// order their work through this lane).
    pub(crate) fn raw_stream(&self) -> sys::CUstream {
        self.core.raw()
    }

    /// The cudarc stream, for the capture and outside-work modules.
    pub(crate) fn core_stream(&self) -> &Arc<CudaStream> {
        &self.core.cu
    }
}
