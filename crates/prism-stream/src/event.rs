//! Pooled CUDA events and the [`Fence`] handle built on them.
//!
//! Ordering events are created with `CU_EVENT_DISABLE_TIMING` (the cheap kind);
//! timed ones only where statistics ask for them. Events return to a pool when
//! the last [`Fence`] handle drops, so a steady-state pipeline creates none.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{result, CudaContext, DriverError};

use crate::context::{current_for_now, make_current};
use crate::error::{is_capture_error, DriverResultExt};
use crate::graph::Probe;
use crate::order::{Mark, StreamId, WaitClock};
use crate::Result;

/// A raw event handle. CUDA event handles may be used from any thread.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawEvent(pub(crate) sys::CUevent);
// SAFETY: CUevent is an opaque driver handle; the driver API is thread-safe and
// allows any thread with the context current to record, query or wait on it.
unsafe impl Send for RawEvent {}
// SAFETY: as above; shared references only pass the handle to driver calls.
unsafe impl Sync for RawEvent {}

/// Free events, by kind.
#[derive(Debug)]
pub(crate) struct EventPool {
    ctx: Arc<CudaContext>,
    plain: Mutex<Vec<RawEvent>>,
    timed: Mutex<Vec<RawEvent>>,
    /// Events created so far (pooled or held by fences).
    created: std::sync::atomic::AtomicUsize,
}

impl EventPool {
    pub(crate) fn new(ctx: Arc<CudaContext>) -> Arc<Self> {
        Arc::new(Self {
            ctx,
            plain: Mutex::new(Vec::new()),
            timed: Mutex::new(Vec::new()),
            created: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    pub(crate) fn take(&self, timed: bool) -> Result<RawEvent> {
        let pool = if timed { &self.timed } else { &self.plain };
        if let Some(e) = pool.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(e);
        }
        // Not cudarc's `bind_to_thread`: it would take (and fail with) an
        // error cudarc stashed for its own caller.
        make_current(self.ctx.cu_ctx()).call("cuCtxSetCurrent")?;
        let flags = if timed {
            sys::CUevent_flags::CU_EVENT_DEFAULT
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING
        };
        let e = RawEvent(result::event::create(flags).call("cuEventCreate")?);
        self.created
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(e)
    }

    /// Events this pool created (every one is pooled or held by a fence).
    pub(crate) fn created(&self) -> usize {
        self.created.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn put(&self, event: RawEvent, timed: bool) {
        let pool = if timed { &self.timed } else { &self.plain };
        pool.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    }

    /// Number of idle events held (for tests of the no-allocation steady state).
    pub(crate) fn idle(&self) -> usize {
        self.plain.lock().map(|v| v.len()).unwrap_or(0)
            + self.timed.lock().map(|v| v.len()).unwrap_or(0)
    }
}

impl Drop for EventPool {
    fn drop(&mut self) {
        if make_current(self.ctx.cu_ctx()).is_err() {
            return;
        }
        for pool in [&mut self.plain, &mut self.timed] {
            for e in pool.get_mut().unwrap_or_else(|p| p.into_inner()).drain(..) {
                // SAFETY: pooled events are not referenced by any fence (a fence
                // returns its event only when the last handle drops), so nothing
                // uses `e` after this.
                let _ = unsafe { result::event::destroy(e.0) };
            }
        }
    }
}

/// Marks a point in a stream's work: "everything enqueued before it".
/// Cloning shares the same event. Completion is cached once observed.
#[derive(Debug, Clone)]
pub struct Fence(Arc<FenceInner>);

#[derive(Debug)]
struct FenceInner {
    event: RawEvent,
    timed: bool,
    /// Position among the fences of its stream (see `order.rs`, rule 4).
    seq: u64,
    /// What the recording lane had waited for before this fence.
    implied: WaitClock,
    /// The stream it was recorded on.
    stream: StreamId,
    done: AtomicBool,
    pool: Arc<EventPool>,
}

impl Drop for FenceInner {
    fn drop(&mut self) {
        // Re-recording a pooled event is allowed even if the GPU has not reached
        // it yet: cuEventRecord replaces the captured work, and nothing waits on
        // this fence any more (no handle is left).
        self.pool.put(self.event, self.timed);
    }
}

fn describe(e: DriverError) -> String {
    e.to_string()
}

/// Runs `wait` (a blocking wait for prism's own work); if the driver
/// refuses it because a stream capture is in progress, runs it once more
/// with the calling thread's capture mode relaxed
/// (`cuThreadExchangeStreamCaptureMode`), then restores the mode. In
/// global mode a capture on any thread makes the driver refuse "potentially
/// unsafe" calls such as event and stream waits everywhere; a relaxed
/// thread may make them. prism's waits are safe ones: they wait for events
/// prism recorded outside any capture (a record a capture swallowed is
/// refused, rule 6 of `order.rs`) or for prism's own streams, which are
/// never captured. A wait that conflicts with a capture in substance (a
/// context synchronisation while a stream of that context is captured) is
/// still refused, and the error comes back.
pub(crate) fn relaxed_on_capture(
    mut wait: impl FnMut() -> std::result::Result<(), DriverError>,
) -> std::result::Result<(), DriverError> {
    match wait() {
        Err(e) if is_capture_error(&e) => {
            let mut mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
            // SAFETY: sets this thread's capture mode and writes the
            // previous one into `mode`, a valid out-parameter.
            if unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut mode) }
                != CUresult::CUDA_SUCCESS
            {
                return Err(e);
            }
            tracing::debug!("a stream capture refused a wait ({e}); waiting in relaxed mode");
            let again = wait();
            // SAFETY: as above; puts the thread's previous mode back.
            let _ = unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut mode) };
            again
        }
        other => other,
    }
}

impl Fence {
    /// Wraps an event just recorded on `stream` (only `order.rs` records).
    pub(crate) fn new(
        event: RawEvent,
        timed: bool,
        seq: u64,
        stream: StreamId,
        implied: WaitClock,
        pool: Arc<EventPool>,
    ) -> Self {
        Self(Arc::new(FenceInner {
            event,
            timed,
            seq,
            implied,
            stream,
            done: AtomicBool::new(false),
            pool,
        }))
    }

    /// The context the fence was recorded in.
    fn ctx(&self) -> &CudaContext {
        &self.0.pool.ctx
    }

    /// One `cuEventQuery`, made with the fence's own context current (and
    /// the caller's made current again after): a sticky error of whatever
    /// context the calling thread has current would otherwise answer for
    /// this fence's context. `Ok(true)` once complete (cached).
    fn query(&self) -> std::result::Result<bool, DriverError> {
        let _current = current_for_now(self.ctx().cu_ctx())?;
        // SAFETY: the event is alive while `self` holds the Arc.
        match unsafe { result::event::query(self.0.event.0) } {
            Ok(()) => {
                self.0.done.store(true, Ordering::Release);
                Ok(true)
            }
            Err(DriverError(CUresult::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Non-blocking: has the GPU passed this point? (`cuEventQuery`, with
    /// the fence's own context current.) A query the driver refuses because
    /// a stream capture is in progress is `NotReady`: nothing is known, and
    /// a later probe asks again.
    pub fn probe(&self) -> Probe {
        if self.0.done.load(Ordering::Acquire) {
            return Probe::Complete;
        }
        match self.query() {
            Ok(true) => Probe::Complete,
            Ok(false) => Probe::NotReady,
            Err(e) if is_capture_error(&e) => {
                tracing::debug!("a stream capture refused a fence query ({e}): not ready");
                Probe::NotReady
            }
            Err(e) => Probe::Failed(describe(e)),
        }
    }

    /// Records that the GPU passed this point without asking it: only for a
    /// fence known complete because a later fence of its stream completed
    /// (stream order). Marking an unfinished fence would skip waits it needs,
    /// hence crate-private.
    pub(crate) fn assume_complete(&self) {
        self.0.done.store(true, Ordering::Release);
    }

    /// Non-blocking completion check; a GPU error becomes `Err`
    /// (`ContextPoisoned`), and so does a query refused because a stream
    /// capture is in progress (`CaptureInProgress`: ask again later).
    pub fn is_complete(&self) -> Result<bool> {
        if self.0.done.load(Ordering::Acquire) {
            return Ok(true);
        }
        match self.query() {
            Ok(done) => Ok(done),
            Err(e) if is_capture_error(&e) => Err(crate::Error::CaptureInProgress {
                call: "cuEventQuery",
                source: e,
            }),
            Err(e) => Err(crate::Error::ContextPoisoned {
                reason: describe(e),
            }),
        }
    }

    /// Blocks the calling thread until the GPU passes this point. A wait
    /// refused because a stream capture is in progress is made again in
    /// relaxed capture mode (prism's fences are never captured), so it
    /// waits rather than fail; a refusal even then is `Failed`.
    pub fn synchronize(&self) -> Probe {
        match self.synchronize_raw() {
            Ok(()) => Probe::Complete,
            Err(e) => Probe::Failed(describe(e)),
        }
    }

    /// [`synchronize`](Self::synchronize) for callers that record the
    /// outcome (an op's status): a refusal because of a stream capture is
    /// `Err(CaptureInProgress)`, which settles nothing, and a GPU failure
    /// is `Ok(Probe::Failed)`.
    pub(crate) fn wait_checked(&self) -> Result<Probe> {
        match self.synchronize_raw() {
            Ok(()) => Ok(Probe::Complete),
            Err(e) if is_capture_error(&e) => Err(crate::Error::CaptureInProgress {
                call: "cuEventSynchronize",
                source: e,
            }),
            Err(e) => Ok(Probe::Failed(describe(e))),
        }
    }

    /// Blocks until the GPU passes this point, as an error: a GPU failure
    /// is `ContextPoisoned`, a wait a stream capture refused
    /// `CaptureInProgress` (for the handles that wait on one fence:
    /// `Readback`, `GraphLaunch`).
    pub(crate) fn wait(&self) -> Result<()> {
        match self.wait_checked()? {
            Probe::Failed(reason) => Err(crate::Error::ContextPoisoned { reason }),
            _ => Ok(()),
        }
    }

    /// [`synchronize`](Self::synchronize) with the driver's error, so
    /// callers can tell a sticky failure (see [`is_sticky`](crate::error::is_sticky)) from others.
    /// The wait is made with the fence's own context current, as in
    /// [`probe`](Self::probe), so a sticky error it reports is that
    /// context's, not the calling thread's.
    pub(crate) fn synchronize_raw(&self) -> std::result::Result<(), DriverError> {
        if self.0.done.load(Ordering::Acquire) {
            return Ok(());
        }
        let _current = current_for_now(self.ctx().cu_ctx())?;
        let event = self.0.event.0;
        // SAFETY: the event is alive while `self` holds the Arc.
        relaxed_on_capture(|| unsafe { result::event::synchronize(event) })?;
        self.0.done.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes the stream `raw` wait on the GPU for this fence
    /// (`cuStreamWaitEvent`). Only `order.rs` calls it, after deciding the
    /// wait is needed.
    pub(crate) fn gpu_wait(&self, raw: sys::CUstream) -> Result<()> {
        // SAFETY: the event is alive while `self` holds it; `raw` is a live
        // stream (the calling lane holds it). The event may belong to another
        // context: cuStreamWaitEvent allows that.
        unsafe {
            result::stream::wait_event(
                raw,
                self.0.event.0,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .call("cuStreamWaitEvent")
    }

    /// The stream this fence was recorded on.
    pub fn stream(&self) -> StreamId {
        self.0.stream
    }

    /// GPU milliseconds from `start` to `self`; both must be timed fences that completed.
    pub fn elapsed_ms_since(&self, start: &Fence) -> Result<f32> {
        // SAFETY: both events are alive (held) and were recorded; cuEventElapsedTime
        // reports an error (not UB) if either lacks timing or has not completed.
        unsafe { result::event::elapsed(start.0.event.0, self.0.event.0) }
            .call("cuEventElapsedTime")
    }

    /// True if both handles share one event.
    pub fn same_as(&self, other: &Fence) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Mark for Fence {
    fn stream(&self) -> StreamId {
        self.0.stream
    }
    fn seq(&self) -> u64 {
        self.0.seq
    }
    fn implied(&self) -> &WaitClock {
        &self.0.implied
    }
    fn known_done(&self) -> bool {
        self.0.done.load(Ordering::Acquire)
    }
    fn query_done(&self) -> bool {
        self.probe() == Probe::Complete
    }
}
