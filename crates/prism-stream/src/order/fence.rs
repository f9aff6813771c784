//! The [`Fence`]: a point in one stream's work, on a pooled CUDA event
//! (`raw::Event`), with what the ordering rules need to know of it (its
//! stream, its place among that stream's fences, what its lane had waited
//! for) and its completion, cached once observed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::{CudaStream, DriverError};

use super::{Mark, StreamId, WaitClock};
use crate::error::{is_capture_error, DriverResultExt};
use crate::graph::Probe;
use crate::raw::Event;
use crate::Result;

/// Marks a point in a stream's work: "everything enqueued before it".
/// Cloning shares the same event. Completion is cached once observed.
#[derive(Debug, Clone)]
pub struct Fence(Arc<FenceInner>);

#[derive(Debug)]
struct FenceInner {
    /// Goes back to its pool when the last handle drops.
    event: Event,
    /// Position among the fences of its stream (rule 4 of `order`).
    seq: u64,
    /// What the recording lane had waited for before this fence.
    implied: WaitClock,
    /// The stream it was recorded on.
    stream: StreamId,
    done: AtomicBool,
}

fn describe(e: DriverError) -> String {
    e.to_string()
}

impl Fence {
    /// Wraps an event just recorded on `stream` (recorded only by the lane, `lane.rs`, and by
    /// `fence_foreign`).
    pub(crate) fn new(event: Event, seq: u64, stream: StreamId, implied: WaitClock) -> Self {
        Self(Arc::new(FenceInner {
            event,
            seq,
            implied,
            stream,
            done: AtomicBool::new(false),
        }))
    }

    /// One `cuEventQuery` (with the fence's own context current: see
    /// `raw::Event::query`). `Ok(true)` once complete (cached).
    fn query(&self) -> std::result::Result<bool, DriverError> {
        let done = self.0.event.query()?;
        if done {
            self.0.done.store(true, Ordering::Release);
        }
        Ok(done)
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
        self.0.event.synchronize()?;
        self.0.done.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes `stream` wait on the GPU for this fence (`cuStreamWaitEvent`;
    /// the fence may belong to another context). Only the ordering layer
    /// calls it, after deciding the wait is needed.
    pub(crate) fn gpu_wait(&self, stream: &CudaStream) -> Result<()> {
        self.0.event.gpu_wait(stream).call("cuStreamWaitEvent")
    }

    /// The stream this fence was recorded on.
    pub fn stream(&self) -> StreamId {
        self.0.stream
    }

    /// GPU milliseconds from `start` to `self`; both must be timed fences that completed.
    pub fn elapsed_ms_since(&self, start: &Fence) -> Result<f32> {
        self.0
            .event
            .elapsed_ms_since(&start.0.event)
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
