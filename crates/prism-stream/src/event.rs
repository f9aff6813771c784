//! Pooled CUDA events and the [`Fence`] handle built on them.
//!
//! Ordering events are created with `CU_EVENT_DISABLE_TIMING` (the cheap kind);
//! timed ones only where statistics ask for them. Events return to a pool when
//! the last [`Fence`] handle drops, so a steady-state pipeline creates none.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{result, CudaContext, CudaStream, DriverError};

use crate::error::DriverResultExt;
use crate::graph::Probe;
use crate::Result;

/// A raw event handle. CUDA event handles may be used from any thread.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawEvent(pub(crate) sys::CUevent);
// SAFETY: CUevent is an opaque driver handle; the driver API is thread-safe and
// allows any thread with the context current to record, query or wait on it.
unsafe impl Send for RawEvent {}
// SAFETY: as above; shared references only pass the handle to driver calls.
unsafe impl Sync for RawEvent {}

/// Global fence sequence: fences recorded later on one stream have larger numbers.
static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

/// Entries a [`WaitClock`] keeps; the oldest is forgotten when full
/// (forgetting only costs a redundant wait, never a missing one).
const CLOCK_ENTRIES: usize = 8;

/// A vector clock: what one stream is already ordered after. Per source
/// stream, the largest fence sequence number it waited on, directly or
/// through the fences it waited on (each fence carries the clock its stream
/// had when it was recorded). A wait on a fence the clock covers is skipped.
///
/// Assumes fences on one stream are recorded by one thread at a time, as the
/// coordinator and the pipeline do (work on a stream shared by threads
/// without external ordering is unordered anyway). `Copy` and fixed-size, so
/// carrying one per fence allocates nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct WaitClock {
    entries: [(usize, u64); CLOCK_ENTRIES],
    len: usize,
}

impl WaitClock {
    fn covers(&self, stream: usize, seq: u64) -> bool {
        self.entries[..self.len]
            .iter()
            .any(|&(s, q)| s == stream && q >= seq)
    }

    fn note(&mut self, stream: usize, seq: u64) {
        if let Some(e) = self.entries[..self.len]
            .iter_mut()
            .find(|(s, _)| *s == stream)
        {
            e.1 = e.1.max(seq);
        } else if self.len < CLOCK_ENTRIES {
            self.entries[self.len] = (stream, seq);
            self.len += 1;
        } else if let Some(oldest) = self.entries.iter_mut().min_by_key(|(_, q)| *q) {
            *oldest = (stream, seq);
        }
    }

    fn merge(&mut self, other: &WaitClock) {
        for &(s, q) in &other.entries[..other.len] {
            self.note(s, q);
        }
    }
}

/// Free events, by kind.
#[derive(Debug)]
pub(crate) struct EventPool {
    ctx: Arc<CudaContext>,
    plain: Mutex<Vec<RawEvent>>,
    timed: Mutex<Vec<RawEvent>>,
}

impl EventPool {
    pub(crate) fn new(ctx: Arc<CudaContext>) -> Arc<Self> {
        Arc::new(Self {
            ctx,
            plain: Mutex::new(Vec::new()),
            timed: Mutex::new(Vec::new()),
        })
    }

    fn take(&self, timed: bool) -> Result<RawEvent> {
        let pool = if timed { &self.timed } else { &self.plain };
        if let Some(e) = pool.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(e);
        }
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        let flags = if timed {
            sys::CUevent_flags::CU_EVENT_DEFAULT
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING
        };
        Ok(RawEvent(
            result::event::create(flags).call("cuEventCreate")?,
        ))
    }

    fn put(&self, event: RawEvent, timed: bool) {
        let pool = if timed { &self.timed } else { &self.plain };
        pool.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    }

    /// Records a pooled event on `stream` and returns the fence for it.
    /// `implied` is what `stream` is already ordered after (its wait clock).
    pub(crate) fn record(
        self: &Arc<Self>,
        stream: &CudaStream,
        timed: bool,
        implied: &WaitClock,
    ) -> Result<Fence> {
        let event = self.take(timed)?;
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `event` is a live event of this pool's context (created above
        // or returned to the pool by a dropped fence, never destroyed while pooled)
        // and `stream` is a live stream of the same context (it is borrowed).
        let recorded = unsafe { result::event::record(event.0, stream.cu_stream()) };
        if let Err(e) = recorded {
            self.put(event, timed);
            return Err(e).call("cuEventRecord");
        }
        Ok(Fence(Arc::new(FenceInner {
            event,
            timed,
            seq,
            implied: *implied,
            stream: stream.cu_stream() as usize,
            done: AtomicBool::new(false),
            pool: Arc::clone(self),
        })))
    }

    /// Number of idle events held (for tests of the no-allocation steady state).
    pub(crate) fn idle(&self) -> usize {
        self.plain.lock().map(|v| v.len()).unwrap_or(0)
            + self.timed.lock().map(|v| v.len()).unwrap_or(0)
    }
}

impl Drop for EventPool {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
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
    /// Position in recording order (see [`WaitClock`]).
    seq: u64,
    /// What the recording stream had waited for before this fence.
    implied: WaitClock,
    /// The stream it was recorded on (as an address, for same-stream checks).
    stream: usize,
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

impl Fence {
    /// Non-blocking: has the GPU passed this point? (`cuEventQuery`)
    pub fn probe(&self) -> Probe {
        if self.0.done.load(Ordering::Acquire) {
            return Probe::Complete;
        }
        // SAFETY: the event is alive while `self` holds the Arc.
        match unsafe { result::event::query(self.0.event.0) } {
            Ok(()) => {
                self.0.done.store(true, Ordering::Release);
                Probe::Complete
            }
            Err(DriverError(CUresult::CUDA_ERROR_NOT_READY)) => Probe::NotReady,
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

    /// Non-blocking completion check; a GPU error becomes `Err`.
    pub fn is_complete(&self) -> Result<bool> {
        match self.probe() {
            Probe::Complete => Ok(true),
            Probe::NotReady => Ok(false),
            Probe::Failed(reason) => Err(crate::Error::ContextPoisoned { reason }),
        }
    }

    /// Blocks the calling thread until the GPU passes this point.
    pub fn synchronize(&self) -> Probe {
        if self.0.done.load(Ordering::Acquire) {
            return Probe::Complete;
        }
        // SAFETY: the event is alive while `self` holds the Arc.
        match unsafe { result::event::synchronize(self.0.event.0) } {
            Ok(()) => {
                self.0.done.store(true, Ordering::Release);
                Probe::Complete
            }
            Err(e) => Probe::Failed(describe(e)),
        }
    }

    /// Makes `stream` wait on the GPU for this fence (`cuStreamWaitEvent`);
    /// free when the fence is known complete or was recorded on `stream` itself.
    pub fn gpu_wait(&self, stream: &CudaStream) -> Result<()> {
        if self.0.stream == stream.cu_stream() as usize || self.0.done.load(Ordering::Acquire) {
            return Ok(());
        }
        // SAFETY: both handles are alive (borrowed / held) and of one context.
        unsafe {
            result::stream::wait_event(
                stream.cu_stream(),
                self.0.event.0,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .call("cuStreamWaitEvent")
    }

    /// Like [`gpu_wait`](Self::gpu_wait), also skipping fences `clock` (the
    /// waits already issued on `stream`) implies.
    pub fn gpu_wait_clocked(&self, stream: &CudaStream, clock: &mut WaitClock) -> Result<()> {
        let src = self.0.stream;
        if src == stream.cu_stream() as usize
            || self.0.done.load(Ordering::Acquire)
            || clock.covers(src, self.0.seq)
        {
            return Ok(());
        }
        self.gpu_wait(stream)?;
        clock.note(src, self.0.seq);
        clock.merge(&self.0.implied);
        Ok(())
    }

    /// The stream this fence was recorded on, as an address.
    pub(crate) fn stream_key(&self) -> usize {
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

#[cfg(test)]
mod tests {
    use super::WaitClock;

    #[test]
    fn clock_covers_older_fences_of_a_stream_only() {
        let mut c = WaitClock::default();
        c.note(1, 10);
        assert!(c.covers(1, 10) && c.covers(1, 3));
        assert!(!c.covers(1, 11) && !c.covers(2, 1));
        let mut implied = WaitClock::default();
        implied.note(2, 7);
        c.merge(&implied);
        assert!(c.covers(2, 7) && !c.covers(2, 8));
    }

    #[test]
    fn full_clock_forgets_the_oldest_entry_only() {
        let mut c = WaitClock::default();
        for s in 0..8 {
            c.note(s, 100 + s as u64);
        }
        c.note(99, 5);
        assert!(
            !c.covers(0, 100),
            "the oldest entry should have been forgotten"
        );
        assert!(c.covers(99, 5) && (1..8).all(|s| c.covers(s, 100 + s as u64)));
    }
}
