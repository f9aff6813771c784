//! [`AsyncCoordinator`]: uploads, kernels and downloads on three dedicated
//! streams, ordered by CUDA events on the GPU, observed by `cuEventQuery`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{result, CudaStream};

use crate::context::Gpu;
use crate::copy::{copy_dtoh, copy_htod};
use crate::error::check_len;
use crate::error::DriverResultExt;
use crate::event::{Fence, WaitClock};
use crate::graph::{Completion, OpGraph, OpId, OpStatus, Probe};
use crate::kernels::{Launch, LaunchScratch};
use crate::memory::{lock, DeviceBuffer, Element, HostAllocFlags, PinnedBuffer};
use crate::stream::{StreamPool, StreamPurpose};
use crate::{Error, Result};

const UP: usize = 0;
const COMPUTE: usize = 1;
const DOWN: usize = 2;

/// Queues operations on an upload, a compute and a download stream.
///
/// Every op gets an [`OpId`] and a completion event. Dependencies (op ids)
/// become `cuStreamWaitEvent` calls: the host never blocks to order work.
/// Buffers additionally order themselves: an op that writes a buffer waits
/// (on the GPU) for every earlier use of it, one that reads it for its last
/// writer. `poll` never blocks; `wait` blocks on one op's event only.
#[derive(Debug)]
pub struct AsyncCoordinator {
    gpu: Gpu,
    upload: Arc<CudaStream>,
    compute: Arc<CudaStream>,
    download: Arc<CudaStream>,
    graph: OpGraph<Fence>,
    /// Waits already issued on the upload, compute and download streams.
    clocks: [WaitClock; 3],
    /// Pinned staging for uploads from pageable memory, reused once idle.
    staging: Vec<PinnedBuffer<u8>>,
    /// Use lists of the last compute scope, reused by the next.
    scratch: LaunchScratch,
    _pool: StreamPool,
}

impl AsyncCoordinator {
    /// Creates the three streams on `gpu`.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let pool = StreamPool::new(gpu, 1)?;
        Ok(Self {
            gpu: gpu.clone(),
            upload: Arc::clone(pool.acquire(StreamPurpose::Upload).cuda_stream()),
            compute: Arc::clone(pool.acquire(StreamPurpose::Compute).cuda_stream()),
            download: Arc::clone(pool.acquire(StreamPurpose::Download).cuda_stream()),
            graph: OpGraph::new(),
            clocks: Default::default(),
            staging: Vec::new(),
            scratch: LaunchScratch::default(),
            _pool: pool,
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn upload_stream(&self) -> &Arc<CudaStream> {
        &self.upload
    }

    pub fn compute_stream(&self) -> &Arc<CudaStream> {
        &self.compute
    }

    pub fn download_stream(&self) -> &Arc<CudaStream> {
        &self.download
    }

    /// Ops queued and not yet observed complete.
    pub fn pending(&self) -> usize {
        self.graph.pending_len()
    }

    /// Validates `deps`, then makes stream `which` (0 upload, 1 compute,
    /// 2 download) wait on the GPU for those still pending.
    fn begin(&mut self, deps: &[OpId], which: usize) -> Result<()> {
        self.gpu.check_usable()?;
        self.gpu.bind()?;
        let stream = [&self.upload, &self.compute, &self.download][which];
        let clock = &mut self.clocks[which];
        self.graph
            .check_deps(deps, |fence| fence.gpu_wait_clocked(stream, clock))
    }

    /// Copies all of `src` into the front of `dst` on the upload stream.
    pub fn queue_upload<T: Element>(
        &mut self,
        src: &PinnedBuffer<T>,
        dst: &mut DeviceBuffer<T>,
        deps: &[OpId],
    ) -> Result<OpId> {
        self.queue_upload_n(src, dst, src.len(), deps)
    }

    /// Copies `src[..n]` into `dst[..n]` on the upload stream.
    pub fn queue_upload_n<T: Element>(
        &mut self,
        src: &PinnedBuffer<T>,
        dst: &mut DeviceBuffer<T>,
        n: usize,
        deps: &[OpId],
    ) -> Result<OpId> {
        let _span = tracing::trace_span!("prism.queue_upload", n).entered();
        self.begin(deps, UP)?;
        let fence = copy_htod(&self.upload, &mut self.clocks[UP], src, dst, n)?;
        Ok(self.graph.insert_on(UP, "upload", fence))
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
        check_len("upload destination", src.len(), dst.len())?;
        let bytes = std::mem::size_of_val(src);
        let idx = self.staging_buffer(bytes)?;
        let staging = &mut self.staging[idx];
        // SAFETY: T is plain data (Element: DeviceRepr + Copy), so viewing the
        // slice as its bytes is valid; the view lives only for this copy.
        let raw = unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<u8>(), bytes) };
        staging.as_mut_slice()?[..bytes].copy_from_slice(raw);
        self.begin(deps, UP)?;
        let du = Arc::clone(&dst.uses);
        lock(&du).order_write(&self.upload, &mut self.clocks[UP])?;
        let staging = &self.staging[idx];
        // SAFETY: staging is pinned, holds `bytes` initialised bytes and is kept
        // until its recorded use completes (reused only when idle, waited in Drop);
        // dst holds >= src.len() elements (checked) and is ordered and tracked.
        let host = unsafe { std::slice::from_raw_parts(staging.raw() as *const u8, bytes) };
        // SAFETY: see above.
        unsafe { result::memcpy_htod_async(dst.device_ptr(), host, self.upload.cu_stream()) }
            .call("cuMemcpyHtoDAsync")?;
        let fence = self
            .gpu
            .fence_after(&self.upload, &self.clocks[UP], false)?;
        lock(&staging.uses).add_read(&fence);
        lock(&du).set_write(&fence);
        Ok(self.graph.insert_on(UP, "upload (staged)", fence))
    }

    fn staging_buffer(&mut self, bytes: usize) -> Result<usize> {
        for (i, s) in self.staging.iter().enumerate() {
            if s.len() >= bytes && s.is_idle()? {
                return Ok(i);
            }
        }
        let size = bytes.next_power_of_two().max(1 << 20);
        self.staging.push(PinnedBuffer::new(
            &self.gpu,
            size,
            HostAllocFlags::UPLOAD_ONLY,
        )?);
        Ok(self.staging.len() - 1)
    }

    /// Runs `launch` to enqueue kernels on the compute stream after `deps`.
    /// Kernels launched through [`Launch`]'s methods also order and record the
    /// buffers they use; an error from `launch` queues nothing further.
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
        self.begin(deps, COMPUTE)?;
        let mut scope = Launch::with_scratch(
            &self.gpu,
            &self.compute,
            std::mem::take(&mut self.clocks[COMPUTE]),
            std::mem::take(&mut self.scratch),
        );
        let launched = launch(&mut scope);
        let fence = self.gpu.fence_after(&self.compute, scope.clock(), false);
        match (launched, fence) {
            (Ok(()), Ok(fence)) => {
                (self.clocks[COMPUTE], self.scratch) = scope.finish_reuse(&fence);
                Ok(self.graph.insert_on(COMPUTE, name, fence))
            }
            // Waits issued before a failed launch stay issued; forget the clock
            // (it may be missing them) rather than skip a wait later.
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }

    /// Fills all of `dst` from the front of `src` on the download stream.
    pub fn queue_download<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        dst: &mut PinnedBuffer<T>,
        deps: &[OpId],
    ) -> Result<OpId> {
        let n = dst.len();
        self.queue_download_n(src, dst, n, deps)
    }

    /// Copies `src[..n]` into `dst[..n]` on the download stream.
    pub fn queue_download_n<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        dst: &mut PinnedBuffer<T>,
        n: usize,
        deps: &[OpId],
    ) -> Result<OpId> {
        let _span = tracing::trace_span!("prism.queue_download", n).entered();
        self.begin(deps, DOWN)?;
        let fence = copy_dtoh(&self.download, &mut self.clocks[DOWN], src, dst, n)?;
        Ok(self.graph.insert_on(DOWN, "download", fence))
    }

    /// Non-blocking: the ops observed finished since the last poll, in op
    /// order, including those `wait`, `wait_timeout` or `synchronize_all`
    /// saw finish (from the first poll on: a coordinator that is never
    /// polled keeps no list for it). Costs about one `cuEventQuery` per
    /// stream with pending ops, plus one per bisection step on a stream that
    /// is part-way through (see [`OpGraph::poll`]). A failed op (kernel
    /// fault, failed copy) comes back with `result: Err` and makes the
    /// context unusable for further queueing.
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

    /// Blocks until `op` completes (waits on its event only).
    pub fn wait(&mut self, op: OpId) -> Result<()> {
        if let Some(f) = self.graph.fence(op).cloned() {
            let outcome = f.synchronize();
            self.graph.finish(op, outcome)?;
        }
        self.outcome(op)
    }

    /// Like [`wait`](Self::wait), giving up after `timeout` with `Error::Timeout`.
    pub fn wait_timeout(&mut self, op: OpId, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut nap = Duration::from_micros(10);
        while let Some(f) = self.graph.fence(op).cloned() {
            let outcome = f.probe();
            if outcome != Probe::NotReady {
                self.graph.finish(op, outcome)?;
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

    /// Blocks until every queued op has finished; the first failure is the error.
    pub fn synchronize_all(&mut self) -> Result<()> {
        let pending: Vec<(OpId, Fence)> = self
            .graph
            .pending_fences()
            .map(|(id, f)| (id, f.clone()))
            .collect();
        let mut first_err = None;
        for (id, f) in pending {
            let outcome = f.synchronize();
            self.graph.finish(id, outcome)?;
            if let Err(e) = self.outcome(id) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
