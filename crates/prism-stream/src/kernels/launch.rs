//! The [`Launch`] scope on a [`Lane`] and its generic machinery: waits and
//! fences, [`Launch::enqueue`] (one op, ordered and fenced through
//! [`Lane::enqueue_scoped`]) and [`Launch::run`], which runs one of
//! prism's kernels through the launcher or the PTX by the GPU's
//! [`KernelSource`]; and the turning of a launcher's status code or a
//! driver launch's result into an [`Error`].

use cudarc::driver::{sys as cu, DriverError};
use prism_cuda_sys as sys;

use super::source::KernelSource;
use crate::context::Gpu;
use crate::error::{capture_error_of_code, is_capture_error};
use crate::lane::Lane;
use crate::memory::{DeviceBuffer, Element, Tracked};
use crate::order::Fence;
use crate::order::{Access, Used};
use crate::raw::{code_message, PtxKernels};
use crate::{Error, Result};

/// Turns a launcher status code into an error; a launch failure other than
/// a rejected argument or a refusal during a stream capture (not a GPU
/// failure: `CaptureInProgress`) makes the context unusable.
pub(super) fn check_code(gpu: &Gpu, kernel: &'static str, code: i32) -> Result<()> {
    match code {
        0 => Ok(()),
        c if c == sys::PRISM_ERR_KERNELS_NOT_BUILT as i32 => Err(Error::KernelsNotBuilt { kernel }),
        c => {
            if let Some(source) = capture_error_of_code(c) {
                return Err(Error::CaptureInProgress {
                    call: kernel,
                    source,
                });
            }
            let message = code_message(c);
            if c != sys::PRISM_ERR_INVALID_ARGUMENT as i32 {
                gpu.poison(&format!("kernel {kernel}: {message}"));
            }
            Err(Error::Kernel {
                kernel,
                code: c,
                message,
            })
        }
    }
}

/// Turns a failed driver launch into the launcher path's error: anything
/// but a rejected argument or a refusal during a stream capture
/// (`CaptureInProgress`) leaves the context unusable.
pub(super) fn check_driver_launch(
    gpu: &Gpu,
    kernel: &'static str,
    outcome: std::result::Result<(), DriverError>,
) -> Result<()> {
    let Err(e) = outcome else { return Ok(()) };
    if is_capture_error(&e) {
        return Err(Error::CaptureInProgress {
            call: kernel,
            source: e,
        });
    }
    let message = e.to_string();
    if e.0 != cu::CUresult::CUDA_ERROR_INVALID_VALUE {
        gpu.poison(&format!("kernel {kernel}: {message}"));
    }
    Err(Error::Kernel {
        kernel,
        code: e.0 as i32,
        message,
    })
}

/// A kernel launch scope on one [`Lane`] (see [`Lane::launch`]; inside
/// [`AsyncCoordinator::queue_compute`](crate::AsyncCoordinator::queue_compute)
/// and pipeline stages it is handed to you). Each launch is ordered after
/// the earlier uses of the buffers it names and fenced before the method
/// returns; the scope itself holds nothing that could be lost.
#[derive(Debug)]
pub struct Launch<'l> {
    lane: &'l mut Lane,
    last: Option<Fence>,
}

impl Lane {
    /// Opens a launch scope on this lane.
    pub fn launch(&mut self) -> Launch<'_> {
        Launch {
            lane: self,
            last: None,
        }
    }
}

impl<'l> Launch<'l> {
    /// The fence of the last launch of this scope (`None` before the first).
    pub fn last_fence(&self) -> Option<&Fence> {
        self.last.as_ref()
    }

    /// The GPU of the scope's lane.
    pub fn gpu(&self) -> &Gpu {
        self.lane.gpu()
    }

    /// Makes the lane wait (on the GPU) for `fence` before its next launch.
    pub fn wait_for(&mut self, fence: &Fence) -> Result<()> {
        self.lane.wait_for(fence)
    }

    /// Records a fence after everything queued on the scope's lane so far,
    /// the waits of [`wait_for`](Self::wait_for) included, and makes it the
    /// scope's last: the end of a scope that joined other lanes' work.
    pub fn fence(&mut self) -> Result<Fence> {
        let f = self.lane.fence()?;
        self.last = Some(f.clone());
        Ok(f)
    }

    /// Issues the waits a kernel reading `buf` needs, now. Optional (every
    /// launch orders itself); useful before a timed fence, so the time
    /// measured excludes the wait. Nothing while capturing a graph (its
    /// launches order themselves).
    pub fn prepare_read<T: Element>(&mut self, buf: &DeviceBuffer<T>) -> Result<()> {
        if self.is_capturing() {
            return Ok(());
        }
        self.lane.order(&[buf.used(Access::Read, "device buffer")])
    }

    /// Issues the waits a kernel writing `buf` needs, now (see
    /// [`prepare_read`](Self::prepare_read)).
    pub fn prepare_write<T: Element>(&mut self, buf: &mut DeviceBuffer<T>) -> Result<()> {
        if self.is_capturing() {
            return Ok(());
        }
        self.lane.order(&[buf.used(Access::Write, "device buffer")])
    }

    /// True inside [`Lane::capture`]: the scope's work is recorded into a
    /// CUDA graph, and fences and waits are refused (the graph's launches
    /// are ordered and fenced as a whole).
    pub fn is_capturing(&self) -> bool {
        self.lane.capture.is_some()
    }

    /// Queues one op of this scope through the lane (ordered and fenced,
    /// or captured: [`Lane::enqueue_scoped`]) and keeps its fence as the
    /// scope's last.
    pub(crate) fn enqueue<R>(
        &mut self,
        uses: &[Used<'_>],
        op: impl FnOnce(cu::CUstream) -> Result<R>,
    ) -> Result<R> {
        let (end, r) = self.lane.enqueue_scoped(uses, op)?;
        if let Some(end) = end {
            self.last = Some(end);
        }
        Ok(r)
    }

    /// The fence after the scope's last op (one recorded now if it queued
    /// none), for the `Lane` methods built on a scope.
    pub(crate) fn finish(self) -> Result<Fence> {
        match self.last {
            Some(f) => Ok(f),
            None => self.lane.fence(),
        }
    }

    /// The scope's lane, for the modules that build ops on it.
    pub(crate) fn lane_mut(&mut self) -> &mut Lane {
        self.lane
    }

    /// Makes `fence` the scope's last (a graph launched on its lane).
    pub(crate) fn set_last(&mut self, fence: Fence) {
        self.last = Some(fence);
    }

    /// The lane and the scope's last fence, for outside work.
    pub(crate) fn parts(&mut self) -> (&mut Lane, &mut Option<Fence>) {
        (self.lane, &mut self.last)
    }

    /// Records a timed fence on the scope's lane (for per-stage GPU times).
    pub fn timed_fence(&mut self) -> Result<Fence> {
        self.lane.timed_fence()
    }

    /// Runs one of prism's kernels through the lane, from the GPU's
    /// [`KernelSource`]: `launcher` calls the nvcc launcher, `ptx` launches
    /// the same kernel(s) from the PTX with the same grid.
    pub(super) fn run(
        &mut self,
        kernel: &'static str,
        uses: &[Used<'_>],
        launcher: impl FnOnce(sys::prism_stream_t) -> i32,
        ptx: impl FnOnce(&PtxKernels, cu::CUstream) -> std::result::Result<(), DriverError>,
    ) -> Result<()> {
        let gpu = self.lane.gpu().clone();
        // The status is checked once the fence is noted: a failed launch is
        // fenced like any other (enqueue fences every path).
        match gpu.kernel_source() {
            KernelSource::Launchers => {
                let code = self.enqueue(uses, |stream| Ok(launcher(stream.cast())))?;
                check_code(&gpu, kernel, code)
            }
            KernelSource::Ptx => {
                let kernels = gpu.ptx_kernels()?;
                let outcome = self.enqueue(uses, |stream| Ok(ptx(&kernels, stream)))?;
                check_driver_launch(&gpu, kernel, outcome)
            }
        }
    }
}
