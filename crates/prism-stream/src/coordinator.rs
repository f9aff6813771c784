//! [`AsyncCoordinator`]: uploads, kernels and downloads on three dedicated
//! lanes, ordered by CUDA events on the GPU, observed by `cuEventQuery`.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use crate::context::Gpu;
use crate::error::check_len;
use crate::future::OpFuture;
use crate::graph::{Completion, OpGraph, OpId, OpStatus, Probe};
use crate::kernels::Launch;
use crate::lane::Lane;
use crate::memory::{DeviceBuffer, Element, HostAllocFlags, PinnedBuffer};
use crate::order::Fence;
use crate::stream::StreamPurpose;
use crate::{Error, Result};

const UP: usize = 0;
const COMPUTE: usize = 1;
const DOWN: usize = 2;

/// Idle staging buffers kept for later pageable uploads, and the most bytes
/// they may hold together; busy ones are bounded by the uploads in flight.
const STAGING_KEPT: usize = 4;
const STAGING_KEPT_BYTES: usize = 256 << 20;

/// Queues operations on an upload, a compute and a download lane.
///
/// Every op gets an [`OpId`] (tied to this coordinator) and a completion
/// fence. Dependencies (op ids) become `cuStreamWaitEvent` calls: the host
/// never blocks to order work. Buffers additionally order themselves: an op
/// that writes a buffer waits (on the GPU) for every earlier use of it, one
/// that reads it for its last writer. `poll` never blocks; `wait` blocks on
/// one op's event only. Memory stays bounded by the work in flight: finished
/// ops leave the table (also when they are never polled).
///
/// Each call that queues or waits is an NVTX range ([`crate::nvtx`]):
/// `queue_upload`, `queue_upload_slice`, `queue_compute: <op name>`,
/// `queue_download`, `wait`, `wait_timeout`, `synchronize_all`.
#[derive(Debug)]
pub struct AsyncCoordinator {
    gpu: Gpu,
    lanes: [Lane; 3],
    graph: OpGraph<Fence>,
    /// Pinned staging for uploads from pageable memory, reused once idle.
    staging: Vec<PinnedBuffer<u8>>,
}

impl AsyncCoordinator {
    /// Creates the three streams on `gpu`.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        Ok(Self {
            gpu: gpu.clone(),
            lanes: [
                Lane::with_purpose(gpu, StreamPurpose::Upload)?,
                Lane::with_purpose(gpu, StreamPurpose::Compute)?,
                Lane::with_purpose(gpu, StreamPurpose::Download)?,
            ],
            graph: OpGraph::new(),
            staging: Vec::new(),
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The upload, compute and download lanes (shared: for their ids and,
    /// through the unsafe [`Lane::cuda_stream`], for work prism does not see).
    pub fn lanes(&self) -> [&Lane; 3] {
        [&self.lanes[UP], &self.lanes[COMPUTE], &self.lanes[DOWN]]
    }

    /// Ops queued and not yet observed complete.
    pub fn pending(&self) -> usize {
        self.graph.pending_len()
    }

    /// Ops whose name and status the table still holds (diagnostics: bounded
    /// by the ops in flight, however many were queued).
    pub fn retained_ops(&self) -> usize {
        self.graph.retained_len()
    }

    /// A zeroed device buffer of `len` elements (the memset is queued on the
    /// upload lane; later ops on any lane are ordered after it).
    pub fn zeroed<T: Element>(&mut self, len: usize) -> Result<DeviceBuffer<T>> {
        DeviceBuffer::zeroed(&mut self.lanes[UP], len)
    }

    /// Validates `deps`, then makes lane `which` wait on the GPU for those
    /// still pending.
    fn begin(&mut self, deps: &[OpId], which: usize) -> Result<()> {
        self.gpu.check_usable()?;
        let lane = &mut self.lanes[which];
        self.graph.check_deps(deps, |fence| lane.wait_for(fence))
    }

    /// Records the op; now and then settles finished ops so the table stays
    /// bounded by the work in flight even if the caller never polls.
    fn insert(&mut self, which: usize, name: Cow<'static, str>, fence: Fence) -> OpId {
        let id = self.graph.insert_on(which, name, fence);
        if self.graph.needs_sweep() {
            let failures = self.graph.sweep(Fence::probe, Fence::assume_complete);
            self.note_failures(&failures);
        }
        id
    }

    /// Copies all of `src` into the front of `dst` on the upload lane.
    pub fn queue_upload<T: Element>(
        &mut self,
        src: &PinnedBuffer<T>,
        dst: &mut DeviceBuffer<T>,
        deps: &[OpId],
    ) -> Result<OpId> {
        self.queue_upload_n(src, dst, src.len(), deps)
    }

    /// Copies `src[..n]` into `dst[..n]` on the upload lane.
    pub fn queue_upload_n<T: Element>(
        &mut self,
        src: &PinnedBuffer<T>,
        dst: &mut DeviceBuffer<T>,
        n: usize,
        deps: &[OpId],
    ) -> Result<OpId> {
        let _span = tracing::trace_span!("prism.queue_upload", n).entered();
        let _nvtx = crate::nvtx::Range::new("queue_upload");
        self.begin(deps, UP)?;
        let fence = self.lanes[UP].copy_htod(src, 0, dst, 0, n)?;
        Ok(self.insert(UP, Cow::Borrowed("upload"), fence))
    }

    /// Uploads from pageable memory: the data is copied into pinned staging
    /// owned by the coordinator (so `src` is free again on return), then copied
    /// asynchronously. Costs one host memcpy; never silently synchronous.
    pub fn queue_upload_slice<T: Element>(
        &mut self,
        src: &[T],
        dst: &mut DeviceBuffer<T>,
        deps: &[OpId],
    ) -> Result<OpId> {
        let _nvtx = crate::nvtx::Range::new("queue_upload_slice");
        check_len("upload source", src.len(), usize::MAX)?;
        check_len("upload destination", src.len(), dst.len())?;
        let bytes = std::mem::size_of_val(src);
        let idx = self.staging_buffer(bytes)?;
        self.staging[idx].as_mut_slice()?[..bytes].copy_from_slice(crate::as_bytes(src));
        self.begin(deps, UP)?;
        let fence = self.lanes[UP].htod_bytes(&self.staging[idx], dst, bytes)?;
        Ok(self.insert(UP, Cow::Borrowed("upload (staged)"), fence))
    }

    /// An idle staging buffer of at least `bytes` (the smallest that fits),
    /// or a new one.
    fn staging_buffer(&mut self, bytes: usize) -> Result<usize> {
        let mut pick: Option<usize> = None;
        for (i, s) in self.staging.iter().enumerate() {
            if s.len() >= bytes
                && pick.is_none_or(|p| s.len() < self.staging[p].len())
                && s.is_idle()?
            {
                pick = Some(i);
            }
        }
        if let Some(p) = pick {
            return Ok(p);
        }
        let size = bytes.next_power_of_two().max(1 << 20);
        self.staging.push(PinnedBuffer::new(
            &self.gpu,
            size,
            HostAllocFlags::UPLOAD_ONLY,
        )?);
        Ok(self.staging.len() - 1)
    }

    /// Frees idle staging past 4 buffers or 256 MiB (smallest kept first),
    /// so one large pageable upload does not keep its staging for ever.
    /// Called by [`synchronize_all`](Self::synchronize_all): freeing pinned
    /// memory makes the driver synchronise the whole device, so only a call
    /// that blocks anyway does it.
    pub fn trim_staging(&mut self) -> Result<()> {
        let mut idle = Vec::new();
        for (i, s) in self.staging.iter().enumerate() {
            if s.is_idle()? {
                idle.push((s.len(), i));
            }
        }
        idle.sort_unstable();
        let (mut kept, mut kept_bytes) = (0, 0);
        let mut keep = vec![true; self.staging.len()];
        for (len, i) in idle {
            if kept < STAGING_KEPT && kept_bytes + len <= STAGING_KEPT_BYTES {
                kept += 1;
                kept_bytes += len;
            } else {
                keep[i] = false;
            }
        }
        let mut k = 0;
        self.staging.retain(|_| {
            k += 1;
            keep[k - 1]
        });
        Ok(())
    }

    /// Held staging buffers and their bytes (diagnostics).
    pub fn staging_held(&self) -> (usize, usize) {
        (
            self.staging.len(),
            self.staging.iter().map(|s| s.len()).sum(),
        )
    }

    /// Runs `launch` to enqueue kernels on the compute lane after `deps`.
    /// Each kernel launched through [`Launch`] (and each outside-work block,
    /// [`Launch::outside`]) orders and fences the buffers it uses as it is
    /// queued, so an error from `launch` (or a panic) leaves no use
    /// unrecorded; the op is then not created. The closure's own errors
    /// go through [`Error::user`] and come back as `Error::User` naming
    /// the op.
    pub fn queue_compute<F>(
        &mut self,
        name: impl Into<Cow<'static, str>>,
        deps: &[OpId],
        launch: F,
    ) -> Result<OpId>
    where
        F: FnOnce(&mut Launch<'_>) -> Result<()>,
    {
        let name = name.into();
        let _span = tracing::trace_span!("prism.queue_compute", name = &*name).entered();
        let _nvtx = crate::nvtx::Range::fmt(format_args!("queue_compute: {name}"));
        self.begin(deps, COMPUTE)?;
        let own = self.lanes[COMPUTE].stream_id();
        let mut scope = self.lanes[COMPUTE].launch();
        launch(&mut scope).map_err(|e| match e {
            // The user's own error (`Error::user`), named after the op.
            Error::User { op, source } if op.is_empty() => Error::User {
                op: format!("queue_compute: {name}"),
                source,
            },
            e => e,
        })?;
        let last = scope.last_fence().cloned();
        // The last launch's fence is after the dependency waits and every
        // kernel of the scope. A scope that launched nothing records one, and
        // so does a closure that swapped the scope for one on another lane:
        // the op's fence must be of the compute lane, whose ops `wait` and
        // `poll` settle by stream order.
        let fence = match last.filter(|f| f.stream() == own) {
            Some(f) => f,
            None => self.lanes[COMPUTE].fence()?,
        };
        Ok(self.insert(COMPUTE, name, fence))
    }

    /// Sets all of `buf` to `value` on the compute lane (a memset; see
    /// [`Lane::fill`] for the values a memset can write).
    pub fn queue_fill<T: Element>(
        &mut self,
        buf: &mut DeviceBuffer<T>,
        value: T,
        deps: &[OpId],
    ) -> Result<OpId> {
        let _nvtx = crate::nvtx::Range::new("queue_fill");
        self.begin(deps, COMPUTE)?;
        let n = buf.len();
        let fence = self.lanes[COMPUTE].fill(buf, 0, n, value)?;
        Ok(self.insert(COMPUTE, Cow::Borrowed("fill"), fence))
    }

    /// Copies `src[..n]` into `dst[..n]` on the GPU (device to device), on
    /// the compute lane.
    pub fn queue_copy<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        dst: &mut DeviceBuffer<T>,
        n: usize,
        deps: &[OpId],
    ) -> Result<OpId> {
        let _nvtx = crate::nvtx::Range::new("queue_copy");
        self.begin(deps, COMPUTE)?;
        let fence = self.lanes[COMPUTE].copy_dtod(src, 0, dst, 0, n)?;
        Ok(self.insert(COMPUTE, Cow::Borrowed("device copy"), fence))
    }

    /// Reads `src[at..at + n]` back on the download lane, after `deps`,
    /// without blocking: the [`Readback`](crate::Readback) waits for this
    /// copy only. The op's id orders later ops after the copy.
    pub fn queue_read<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        at: usize,
        n: usize,
        deps: &[OpId],
    ) -> Result<(OpId, crate::Readback<T>)> {
        let _nvtx = crate::nvtx::Range::new("queue_read");
        self.begin(deps, DOWN)?;
        let read = self.lanes[DOWN].read_async(src, at, n)?;
        let id = self.insert(DOWN, Cow::Borrowed("read-back"), read.fence().clone());
        Ok((id, read))
    }

    /// Fills all of `dst` from the front of `src` on the download lane.
    pub fn queue_download<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        dst: &mut PinnedBuffer<T>,
        deps: &[OpId],
    ) -> Result<OpId> {
        let n = dst.len();
        self.queue_download_n(src, dst, n, deps)
    }

    /// Copies `src[..n]` into `dst[..n]` on the download lane.
    pub fn queue_download_n<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        dst: &mut PinnedBuffer<T>,
        n: usize,
        deps: &[OpId],
    ) -> Result<OpId> {
        let _span = tracing::trace_span!("prism.queue_download", n).entered();
        let _nvtx = crate::nvtx::Range::new("queue_download");
        self.begin(deps, DOWN)?;
        let fence = self.lanes[DOWN].copy_dtoh(src, 0, dst, 0, n)?;
        Ok(self.insert(DOWN, Cow::Borrowed("download"), fence))
    }

    /// Non-blocking: the ops observed finished since the last poll, in op
    /// order, including those `wait`, `wait_timeout` or `synchronize_all`
    /// saw finish (from the first poll on: a coordinator that is never
    /// polled keeps no list for it). Costs about one `cuEventQuery` per
    /// stream with pending ops, plus one per bisection step on a stream that
    /// is part-way through (see [`OpGraph::poll`]). A failed op (kernel
    /// fault, failed copy) comes back with `result: Err` and makes the
    /// context unusable for further queueing. A query the driver refuses
    /// while a stream capture is in progress is no failure: the op stays
    /// pending ([`Fence::probe`]).
    pub fn poll(&mut self) -> Vec<Completion> {
        // Ops settled by stream order (a later op of their stream finished)
        // have their fences marked done, so later checks skip the driver.
        let done = self.graph.poll_with(Fence::probe, Fence::assume_complete);
        self.note_failures(&done);
        done
    }

    fn note_failures(&self, done: &[Completion]) {
        if let Some(reason) = done.iter().find_map(|c| c.result.as_ref().err()) {
            self.gpu.poison(reason);
        }
    }

    /// Status of `op` as last observed (call `poll` to refresh).
    pub fn status(&self, op: OpId) -> Result<OpStatus> {
        self.graph.status(op).cloned()
    }

    /// A future that resolves when `op` completes: `Ok(())`, or
    /// [`Error::OpFailed`] when it failed on the GPU (marking the context
    /// unusable, as [`wait`](Self::wait) does). An op already finished
    /// gives a future that resolves at once with its recorded outcome. The
    /// future holds the op's fence, not the coordinator (`Send + 'static`),
    /// and blocks no thread: one shared thread polls every awaited fence
    /// (see [`OpFuture`]). It does not update the op table; the next
    /// [`poll`](Self::poll) reports the op without another driver query.
    ///
    /// Fails with [`Error::UnknownOp`] or [`Error::ForeignOp`] for an id
    /// this coordinator did not hand out.
    pub fn op_future(&self, op: OpId) -> Result<OpFuture> {
        let status = self.graph.status(op)?;
        let name = self.graph.name(op).unwrap_or_default().to_owned();
        if let Some(fence) = self.graph.fence(op) {
            return Ok(OpFuture::pending(op, name, self.gpu.clone(), fence.clone()));
        }
        let outcome = match status {
            OpStatus::Failed(reason) => Err(reason.clone()),
            _ => Ok(()),
        };
        Ok(OpFuture::finished(op, name, self.gpu.clone(), outcome))
    }

    /// Blocks until `op` completes (waits on its event only). Earlier ops
    /// of the same lane are settled with it. A wait the driver refuses
    /// because a stream capture is in progress (see [`Fence::synchronize`])
    /// is `CaptureInProgress` and leaves the op pending.
    pub fn wait(&mut self, op: OpId) -> Result<()> {
        let _nvtx = crate::nvtx::Range::new("wait");
        if let Some(f) = self.graph.fence(op).cloned() {
            let outcome = f.wait_checked()?;
            self.graph
                .finish_with(op, outcome, Fence::assume_complete)?;
        }
        self.outcome(op)
    }

    /// Like [`wait`](Self::wait), giving up after `timeout` with `Error::Timeout`.
    pub fn wait_timeout(&mut self, op: OpId, timeout: Duration) -> Result<()> {
        let _nvtx = crate::nvtx::Range::new("wait_timeout");
        let start = Instant::now();
        let mut nap = Duration::from_micros(10);
        while let Some(f) = self.graph.fence(op).cloned() {
            let outcome = f.probe();
            if outcome != Probe::NotReady {
                self.graph
                    .finish_with(op, outcome, Fence::assume_complete)?;
                break;
            }
            if start.elapsed() >= timeout {
                return Err(Error::Timeout {
                    op,
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(nap.min(timeout.saturating_sub(start.elapsed())));
            nap = (nap * 2).min(Duration::from_millis(1));
        }
        self.outcome(op)
    }

    fn outcome(&self, op: OpId) -> Result<()> {
        match self.graph.status(op)? {
            OpStatus::Failed(reason) => {
                self.gpu.poison(reason);
                Err(Error::OpFailed {
                    op,
                    name: self.graph.name(op).unwrap_or_default().to_owned(),
                    reason: reason.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Blocks until every queued op has finished; the first failure is the
    /// error. A wait refused because a stream capture is in progress ends
    /// the call with `CaptureInProgress`, leaving that op and the later
    /// ones pending.
    pub fn synchronize_all(&mut self) -> Result<()> {
        let _nvtx = crate::nvtx::Range::new("synchronize_all");
        let pending: Vec<(OpId, Fence)> = self
            .graph
            .pending_fences()
            .map(|(id, f)| (id, f.clone()))
            .collect();
        let mut first_err = None;
        for (id, f) in pending {
            let outcome = f.wait_checked()?;
            self.graph.finish(id, outcome)?;
            if let Err(e) = self.outcome(id) {
                first_err.get_or_insert(e);
            }
        }
        if first_err.is_none() {
            self.trim_staging()?;
        }
        first_err.map_or(Ok(()), Err)
    }
}
