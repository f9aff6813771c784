//! CUDA events. Ordering events are created with `CU_EVENT_DISABLE_TIMING`
//! (the cheap kind); timed ones only where statistics ask for them. An
//! [`Event`] goes back to its [`EventPool`] when it drops, so a
//! steady-state pipeline creates none.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{result, CudaContext, CudaStream, DriverError};

use super::ctx::{current_for_now, make_current, relaxed_on_capture};
use crate::error::DriverResultExt;

/// A raw event handle. CUDA event handles may be used from any thread.
#[derive(Debug, Clone, Copy)]
struct Handle(sys::CUevent);
// SAFETY: CUevent is an opaque driver handle; the driver API is thread-safe and
// allows any thread with the context current to record, query or wait on it.
unsafe impl Send for Handle {}
// SAFETY: as above; shared references only pass the handle to driver calls.
unsafe impl Sync for Handle {}

/// Free events of one context, by kind. It destroys only the events it
/// holds, when it drops, and every [`Event`] taken from it holds it: so an
/// event is alive for as long as its `Event` exists.
#[derive(Debug)]
pub(crate) struct EventPool {
    ctx: Arc<CudaContext>,
    plain: Mutex<Vec<Handle>>,
    timed: Mutex<Vec<Handle>>,
    /// Events created so far (pooled or held).
    created: AtomicUsize,
}

impl EventPool {
    pub(crate) fn new(ctx: Arc<CudaContext>) -> Arc<Self> {
        Arc::new(Self {
            ctx,
            plain: Mutex::new(Vec::new()),
            timed: Mutex::new(Vec::new()),
            created: AtomicUsize::new(0),
        })
    }

    /// An idle event of the kind asked for, or a new one (`cuEventCreate`).
    pub(crate) fn take(self: &Arc<Self>, timed: bool) -> crate::Result<Event> {
        let pool = if timed { &self.timed } else { &self.plain };
        let idle = pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let handle = match idle {
            Some(h) => h,
            None => {
                // Not cudarc's `bind_to_thread`: it would take (and fail
                // with) an error cudarc stashed for its own caller.
                make_current(self.ctx.cu_ctx()).call("cuCtxSetCurrent")?;
                let flags = if timed {
                    sys::CUevent_flags::CU_EVENT_DEFAULT
                } else {
                    sys::CUevent_flags::CU_EVENT_DISABLE_TIMING
                };
                let h = Handle(result::event::create(flags).call("cuEventCreate")?);
                self.created.fetch_add(1, Ordering::Relaxed);
                h
            }
        };
        Ok(Event {
            handle,
            timed,
            discard: false,
            pool: Arc::clone(self),
        })
    }

    /// Events this pool created (every one is pooled or held by an `Event`).
    pub(crate) fn created(&self) -> usize {
        self.created.load(Ordering::Relaxed)
    }

    /// Number of idle events held (for tests of the no-allocation steady state).
    pub(crate) fn idle(&self) -> usize {
        self.plain.lock().map(|v| v.len()).unwrap_or(0)
            + self.timed.lock().map(|v| v.len()).unwrap_or(0)
    }

    fn put(&self, handle: Handle, timed: bool) {
        let pool = if timed { &self.timed } else { &self.plain };
        pool.lock().unwrap_or_else(|p| p.into_inner()).push(handle);
    }
}

impl Drop for EventPool {
    fn drop(&mut self) {
        if make_current(self.ctx.cu_ctx()).is_err() {
            return;
        }
        for pool in [&mut self.plain, &mut self.timed] {
            for e in pool.get_mut().unwrap_or_else(|p| p.into_inner()).drain(..) {
                // SAFETY: pooled events are held by no `Event` (one returns
                // its handle only when it drops), so nothing uses `e` after.
                let _ = unsafe { result::event::destroy(e.0) };
            }
        }
    }
}

/// One CUDA event of a pool's context, alive while this value exists; it
/// goes back to the pool when dropped.
#[derive(Debug)]
pub(crate) struct Event {
    handle: Handle,
    timed: bool,
    /// Destroy rather than pool on drop (a record a capture may still hold).
    discard: bool,
    pool: Arc<EventPool>,
}

impl Drop for Event {
    fn drop(&mut self) {
        if self.discard {
            // SAFETY: nothing else holds this event; cuEventDestroy defers the
            // release until any capture that references it lets go.
            let _ = unsafe { result::event::destroy(self.handle.0) };
        } else {
            // Re-recording a pooled event is allowed even if the GPU has not
            // reached it yet: cuEventRecord replaces the captured work, and
            // nothing waits on this event any more (no handle is left).
            self.pool.put(self.handle, self.timed);
        }
    }
}

impl Event {
    /// The context the event belongs to.
    pub(crate) fn ctx(&self) -> &Arc<CudaContext> {
        &self.pool.ctx
    }

    /// `cuEventRecord` on `stream` (an event of another context than the
    /// stream's is the driver's error, not UB).
    pub(crate) fn record(&self, stream: &CudaStream) -> Result<(), DriverError> {
        // SAFETY: the event is alive (this value exists) and `stream` holds
        // a live stream for the call.
        unsafe { result::event::record(self.handle.0, stream.cu_stream()) }
    }

    /// One `cuEventQuery`, made with the event's own context current (and
    /// the caller's made current again after): a sticky error of whatever
    /// context the calling thread has current would otherwise answer for
    /// this event. `Ok(true)` once complete, `Ok(false)` while not.
    pub(crate) fn query(&self) -> Result<bool, DriverError> {
        let _current = current_for_now(self.ctx().cu_ctx())?;
        // SAFETY: the event is alive (this value exists).
        match unsafe { result::event::query(self.handle.0) } {
            Ok(()) => Ok(true),
            Err(DriverError(CUresult::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `cuEventSynchronize` with the event's own context current (as
    /// [`query`](Self::query)), in relaxed capture mode if a capture
    /// elsewhere refuses it.
    pub(crate) fn synchronize(&self) -> Result<(), DriverError> {
        let _current = current_for_now(self.ctx().cu_ctx())?;
        let event = self.handle.0;
        // SAFETY: the event is alive (this value exists).
        relaxed_on_capture(|| unsafe { result::event::synchronize(event) })
    }

    /// `cuStreamWaitEvent`: `stream`'s later work waits on the GPU for this
    /// event. The event may belong to another context: the driver allows it.
    pub(crate) fn gpu_wait(&self, stream: &CudaStream) -> Result<(), DriverError> {
        // SAFETY: the event is alive (this value exists) and `stream` holds a
        // live stream for the call.
        unsafe {
            result::stream::wait_event(
                stream.cu_stream(),
                self.handle.0,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
    }

    /// `cuEventElapsedTime` from `start` to `self`, in milliseconds (the
    /// driver reports an error, not UB, if either lacks timing or has not
    /// completed).
    pub(crate) fn elapsed_ms_since(&self, start: &Event) -> Result<f32, DriverError> {
        // SAFETY: both events are alive (both values exist).
        unsafe { result::event::elapsed(start.handle.0, self.handle.0) }
    }

    /// Drops the event without pooling it: destroyed, because a graph
    /// capture may still reference its record.
    pub(crate) fn discard(mut self) {
        self.discard = true;
    }
}
