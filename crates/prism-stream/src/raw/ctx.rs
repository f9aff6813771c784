//! The calling thread's current context, and blocking waits that a stream
//! capture elsewhere would refuse.

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{result, CudaStream, DriverError};

use crate::error::is_capture_error;

/// Makes `ctx` current on the calling thread (cheap when it already is),
/// through the driver: not cudarc's `bind_to_thread`, which first takes an
/// error cudarc stashed in its context object and returns it without
/// binding anything.
pub(crate) fn make_current(ctx: sys::CUcontext) -> Result<(), DriverError> {
    if result::ctx::get_current()? != Some(ctx) {
        // SAFETY: callers pass the handle of a live context (held through
        // the cudarc context object that created or retained it).
        unsafe { result::ctx::set_current(ctx) }?;
    }
    Ok(())
}

/// Makes `ctx` current on the calling thread until the guard drops, then
/// makes current again whatever was current before (no context, or
/// another one). Driver calls that report a context's sticky error report
/// the *current* context's: a query of one context's event made while a
/// dead context is current fails with the dead one's error. Uses the
/// driver directly, not cudarc's `bind_to_thread`, which would first take
/// (and return) an error cudarc stashed in its context object.
pub(crate) fn current_for_now(ctx: sys::CUcontext) -> Result<CurrentGuard, DriverError> {
    let before = result::ctx::get_current()?;
    if before == Some(ctx) {
        return Ok(CurrentGuard { restore: None });
    }
    // SAFETY: callers pass the handle of a live context (held through the
    // cudarc context object that created or retained it).
    unsafe { result::ctx::set_current(ctx) }?;
    Ok(CurrentGuard {
        restore: Some(before.unwrap_or(std::ptr::null_mut())),
    })
}

/// See [`current_for_now`].
#[must_use]
pub(crate) struct CurrentGuard {
    /// The context to make current again (null: none), if it changed.
    restore: Option<sys::CUcontext>,
}

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        if let Some(before) = self.restore {
            // SAFETY: `before` was current on this thread when the guard
            // was made (a context a thread has current is not destroyed
            // under it), or null, which leaves no context current.
            let _ = unsafe { result::ctx::set_current(before) };
        }
    }
}

/// Runs `wait` (a blocking wait for prism's own work); if the driver
/// refuses it because a stream capture is in progress, runs it once more
/// with the calling thread's capture mode relaxed
/// (`cuThreadExchangeStreamCaptureMode`), then restores the mode. In
/// global mode a capture on any thread makes the driver refuse "potentially
/// unsafe" calls such as event and stream waits everywhere; a relaxed
/// thread may make them. prism's waits are safe ones: they wait for events
/// prism recorded outside any capture (a record a capture swallowed is
/// refused, rule 6 of `order`) or for prism's own streams, which are
/// never captured. A wait that conflicts with a capture in substance (a
/// context synchronisation while a stream of that context is captured) is
/// still refused, and the error comes back.
pub(crate) fn relaxed_on_capture(
    mut wait: impl FnMut() -> Result<(), DriverError>,
) -> Result<(), DriverError> {
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

/// `cuCtxSynchronize` of the calling thread's current context, called
/// directly (cudarc's `synchronize` returns an error cudarc stashed in its
/// context object without waiting), in relaxed capture mode if a capture
/// elsewhere refuses it.
pub(crate) fn ctx_synchronize() -> Result<(), DriverError> {
    relaxed_on_capture(result::ctx::synchronize)
}

/// `cuStreamSynchronize` of `stream`, called directly (not cudarc's
/// `synchronize`, which returns an error cudarc stashed in the context
/// object without waiting), in relaxed capture mode if a capture elsewhere
/// refuses it. The stream's context must be current.
pub(crate) fn stream_synchronize(stream: &CudaStream) -> Result<(), DriverError> {
    let raw = stream.cu_stream();
    // SAFETY: `raw` is a live stream: `stream` holds it for this call.
    relaxed_on_capture(|| unsafe { result::stream::synchronize(raw) })
}

/// The current context's stream priorities: (least, greatest).
pub(crate) fn stream_priority_range() -> Result<(i32, i32), DriverError> {
    result::stream::get_priority_range()
}

/// The context a stream belongs to (`cuStreamGetCtx`).
///
/// # Safety
///
/// `stream` is a live stream handle (not one of the default-stream
/// constants, which belong to whichever context is current).
pub(crate) unsafe fn stream_context(stream: sys::CUstream) -> Result<sys::CUcontext, DriverError> {
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: the caller's contract; the call only writes the out-parameter.
    let r = unsafe { sys::cuStreamGetCtx(stream, &mut ctx) };
    if r == CUresult::CUDA_SUCCESS {
        Ok(ctx)
    } else {
        Err(DriverError(r))
    }
}
