//! Safe kernel launches: [`Launch`] validates lengths, orders each buffer's
//! use against other streams, calls the launcher and records the use, so
//! buffers are never freed or overwritten while a kernel still reads them.

use std::ffi::CStr;
use std::sync::Arc;

use cudarc::driver::{result, CudaStream};
use prism_cuda_sys as sys;

use crate::context::Gpu;
use crate::error::check_len;
use crate::error::DriverResultExt;
use crate::event::{Fence, WaitClock};
use crate::memory::{lock, DeviceBuffer, Element, PinnedBuffer, UseCell};
use crate::{Error, Result};

/// Describes a launcher return code.
fn code_message(code: i32) -> String {
    // SAFETY: prism_error_string returns a pointer to a static NUL-terminated
    // string for any code (both in the nvcc build and in the stub).
    unsafe { CStr::from_ptr(sys::prism_error_string(code)) }
        .to_string_lossy()
        .into_owned()
}

/// Enqueues kernels on one stream inside [`AsyncCoordinator::queue_compute`](crate::AsyncCoordinator::queue_compute)
/// (or on any stream via [`Launch::new`]), tracking which buffers they use.
#[derive(Debug)]
pub struct Launch<'s> {
    gpu: &'s Gpu,
    stream: &'s Arc<CudaStream>,
    reads: Vec<UseCell>,
    writes: Vec<UseCell>,
    clock: WaitClock,
}

impl<'s> Launch<'s> {
    /// Starts a launch scope on `stream`; end it with [`Launch::finish`].
    pub fn new(gpu: &'s Gpu, stream: &'s Arc<CudaStream>) -> Self {
        Self::with_clock(gpu, stream, WaitClock::default())
    }

    /// Like [`Launch::new`], starting from the waits `clock` says `stream` already issued.
    pub fn with_clock(gpu: &'s Gpu, stream: &'s Arc<CudaStream>, clock: WaitClock) -> Self {
        Self::with_scratch(gpu, stream, clock, LaunchScratch::default())
    }

    /// Like [`Launch::with_clock`], reusing the lists of an earlier scope
    /// (see [`Launch::finish_reuse`]) so a steady stream of launches allocates nothing.
    pub fn with_scratch(
        gpu: &'s Gpu,
        stream: &'s Arc<CudaStream>,
        clock: WaitClock,
        scratch: LaunchScratch,
    ) -> Self {
        let (mut reads, mut writes) = (scratch.reads, scratch.writes);
        reads.clear();
        writes.clear();
        Self {
            gpu,
            stream,
            reads,
            writes,
            clock,
        }
    }

    /// The stream kernels go on (for cudarc launches of one's own modules).
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.stream
    }

    /// Declares that the kernels read `buf`: waits (on the GPU) for its last writer.
    pub fn reads<T: Element>(&mut self, buf: &DeviceBuffer<T>) -> Result<()> {
        self.same_gpu(buf)?;
        lock(&buf.uses).order_read(self.stream, &mut self.clock)?;
        self.reads.push(Arc::clone(&buf.uses));
        Ok(())
    }

    /// Declares that the kernels write `buf`: waits (on the GPU) for every earlier use.
    pub fn writes<T: Element>(&mut self, buf: &mut DeviceBuffer<T>) -> Result<()> {
        self.same_gpu(buf)?;
        lock(&buf.uses).order_write(self.stream, &mut self.clock)?;
        self.writes.push(Arc::clone(&buf.uses));
        Ok(())
    }

    fn same_gpu<T: Element>(&self, buf: &DeviceBuffer<T>) -> Result<()> {
        if buf.gpu().same(self.gpu) {
            Ok(())
        } else {
            Err(Error::WrongContext {
                what: "device buffer",
            })
        }
    }

    fn check(&self, kernel: &'static str, code: i32) -> Result<()> {
        match code {
            0 => Ok(()),
            c if c == sys::PRISM_ERR_KERNELS_NOT_BUILT as i32 => {
                Err(Error::KernelsNotBuilt { kernel })
            }
            c => {
                let message = code_message(c);
                if c != sys::PRISM_ERR_INVALID_ARGUMENT as i32 {
                    self.gpu.poison(&format!("kernel {kernel}: {message}"));
                }
                Err(Error::Kernel {
                    kernel,
                    code: c,
                    message,
                })
            }
        }
    }

    fn raw_stream(&self) -> sys::prism_stream_t {
        self.stream.cu_stream().cast()
    }

    /// `y[..n] = x[..n]` after `iters` steps of `v = fma(v, a, b)`.
    pub fn fma_chain(
        &mut self,
        x: &DeviceBuffer<f32>,
        y: &mut DeviceBuffer<f32>,
        n: usize,
        a: f32,
        b: f32,
        iters: u32,
    ) -> Result<()> {
        check_len("fma_chain input", n, x.len())?;
        check_len("fma_chain output", n, y.len())?;
        self.reads(x)?;
        self.writes(y)?;
        let iters = iters_i32(iters)?;
        // SAFETY: x and y are live allocations of this context with at least n
        // elements (checked above); their uses are ordered against other streams
        // (reads/writes above) and recorded on finish, so they outlive the kernel.
        let code = unsafe {
            sys::prism_fma_chain_f32(
                x.device_ptr() as *const f32,
                y.device_ptr() as *mut f32,
                n as u64,
                a,
                b,
                iters,
                self.raw_stream(),
            )
        };
        self.check("fma_chain", code)
    }

    /// In place: `y[..n] = fma^iters(y[..n])`.
    pub fn fma_chain_in_place(
        &mut self,
        y: &mut DeviceBuffer<f32>,
        n: usize,
        a: f32,
        b: f32,
        iters: u32,
    ) -> Result<()> {
        check_len("fma_chain buffer", n, y.len())?;
        self.writes(y)?;
        let iters = iters_i32(iters)?;
        let p = y.device_ptr();
        // SAFETY: as in fma_chain; the launcher allows x == y (elementwise).
        let code = unsafe {
            sys::prism_fma_chain_f32(
                p as *const f32,
                p as *mut f32,
                n as u64,
                a,
                b,
                iters,
                self.raw_stream(),
            )
        };
        self.check("fma_chain", code)
    }

    /// `buf[i] = pattern(seed, i)` for `i < n` (see [`pattern`]).
    pub fn fill_pattern(&mut self, buf: &mut DeviceBuffer<u32>, n: usize, seed: u32) -> Result<()> {
        check_len("fill_pattern buffer", n, buf.len())?;
        self.writes(buf)?;
        // SAFETY: buf has at least n elements and is ordered/recorded as above.
        let code = unsafe {
            sys::prism_fill_pattern_u32(
                buf.device_ptr() as *mut u32,
                n as u64,
                seed,
                self.raw_stream(),
            )
        };
        self.check("fill_pattern", code)
    }

    /// Counts mismatches of `buf[..n]` against the pattern into
    /// `counters[0]` (mismatches) and `counters[1]` (first bad index, u64::MAX if none).
    pub fn check_pattern(
        &mut self,
        buf: &DeviceBuffer<u32>,
        n: usize,
        seed: u32,
        counters: &mut DeviceBuffer<u64>,
    ) -> Result<()> {
        check_len("check_pattern buffer", n, buf.len())?;
        check_len("check_pattern counters", 2, counters.len())?;
        self.reads(buf)?;
        self.writes(counters)?;
        let c = counters.device_ptr();
        // SAFETY: counters has at least 2 u64 (16 bytes); both memsets stay inside
        // it and run on this stream before the kernel.
        unsafe {
            result::memset_d8_async(c, 0, 8, self.stream.cu_stream()).call("cuMemsetD8Async")?;
            result::memset_d8_async(c + 8, 0xFF, 8, self.stream.cu_stream())
                .call("cuMemsetD8Async")?;
        }
        // SAFETY: buf has n elements, counters 2; ordered/recorded as above.
        let code = unsafe {
            sys::prism_check_pattern_u32(
                buf.device_ptr() as *const u32,
                n as u64,
                seed,
                c as *mut _,
                (c + 8) as *mut _,
                self.raw_stream(),
            )
        };
        self.check("check_pattern", code)
    }

    /// A kernel that keeps the stream busy for `ns` nanoseconds (tests, demos).
    pub fn spin(&mut self, ns: u64) -> Result<()> {
        // SAFETY: touches no memory; the stream is live (borrowed).
        let code = unsafe { sys::prism_spin_ns(ns, self.raw_stream()) };
        self.check("spin_ns", code)
    }

    /// A kernel that writes through an invalid address: the GPU faults and the
    /// context becomes unusable. Only for testing error paths.
    pub fn fault_injection(&mut self) -> Result<()> {
        // SAFETY: the kernel faults on the GPU by design; no host memory and no
        // prism buffer is involved, and the fault is reported as a CUDA error.
        let code = unsafe { sys::prism_fault(self.raw_stream()) };
        self.check("fault", code)
    }

    /// `out[j] = sum(x[j*group .. min((j+1)*group, n)])`; `out` needs `ceil(n/group)` elements.
    pub fn group_sum(
        &mut self,
        x: &DeviceBuffer<f32>,
        n: usize,
        group: u32,
        out: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        if group == 0 {
            return Err(Error::ZeroLength {
                what: "group_sum group size",
            });
        }
        check_len("group_sum input", n, x.len())?;
        check_len("group_sum output", n.div_ceil(group as usize), out.len())?;
        self.reads(x)?;
        self.writes(out)?;
        // SAFETY: sizes checked above; ordered/recorded as in fma_chain.
        let code = unsafe {
            sys::prism_group_sum_f32(
                x.device_ptr() as *const f32,
                n as u64,
                group,
                out.device_ptr() as *mut f32,
                self.raw_stream(),
            )
        };
        self.check("group_sum", code)
    }

    /// Gathers `items` back to back into the front of `dst` with one kernel
    /// that reads the pinned host buffers directly over the bus (zero-copy),
    /// and returns the elements written. `desc` (at least 3 x items) holds the
    /// kernel's descriptors; the host must not need it until this op completes.
    pub fn gather_pinned<T: Element>(
        &mut self,
        items: &[&PinnedBuffer<T>],
        desc: &mut PinnedBuffer<u64>,
        dst: &mut DeviceBuffer<T>,
    ) -> Result<usize> {
        let (total, desc_ptr) =
            self.write_descriptors(items.iter().copied(), desc, "gathered pinned buffer")?;
        check_len("gather destination", total, dst.len())?;
        for item in items {
            lock(&item.uses).order_read(self.stream, &mut self.clock)?;
            self.reads.push(Arc::clone(&item.uses));
        }
        self.reads.push(Arc::clone(&desc.uses));
        self.writes(dst)?;
        // SAFETY: desc holds 3 * items.len() initialised descriptors in mapped
        // pinned memory; each names a live mapped pinned buffer of the stated
        // size (its use is recorded on finish, so it outlives the kernel), and
        // the offsets stay within dst (total <= dst.len(), checked above).
        let code = unsafe {
            sys::prism_gather_bytes(
                desc_ptr as *const u64,
                items.len() as u64,
                dst.device_ptr() as *mut u8,
                self.raw_stream(),
            )
        };
        self.check("gather_bytes", code)?;
        Ok(total)
    }

    /// Scatters the front of `src` back to back into `items` with one kernel
    /// that writes the pinned host buffers directly (zero-copy). Host reads
    /// of `items` fail with `BufferInFlight` until this op completes.
    pub fn scatter_pinned<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        items: &mut [&mut PinnedBuffer<T>],
        desc: &mut PinnedBuffer<u64>,
    ) -> Result<usize> {
        let (total, desc_ptr) =
            self.write_descriptors(items.iter().map(|b| &**b), desc, "scattered pinned buffer")?;
        check_len("scatter source", total, src.len())?;
        self.reads(src)?;
        self.reads.push(Arc::clone(&desc.uses));
        for item in items.iter() {
            lock(&item.uses).order_write(self.stream, &mut self.clock)?;
            self.writes.push(Arc::clone(&item.uses));
        }
        // SAFETY: as in gather_pinned, with the roles swapped: every
        // descriptor names a live mapped pinned buffer the host cannot touch
        // until the write recorded on finish completes; offsets stay within src.
        let code = unsafe {
            sys::prism_scatter_bytes(
                src.device_ptr() as *const u8,
                desc_ptr as *const u64,
                items.len() as u64,
                self.raw_stream(),
            )
        };
        self.check("scatter_bytes", code)?;
        Ok(total)
    }

    /// Fills `desc` with one (mapped address, byte offset, bytes) triple per
    /// item, back to back; returns the items' total elements and the mapped
    /// address of `desc` for the kernel. Writes nothing into `desc` on error.
    fn write_descriptors<'b, T: Element>(
        &self,
        items: impl ExactSizeIterator<Item = &'b PinnedBuffer<T>> + Clone,
        desc: &mut PinnedBuffer<u64>,
        what: &'static str,
    ) -> Result<(usize, cudarc::driver::sys::CUdeviceptr)> {
        check_len("zero-copy items", items.len(), desc.len() / 3)?;
        let desc_ptr = desc.mapped_ptr().ok_or(Error::NotMapped {
            what: "zero-copy descriptors",
        })?;
        for item in items.clone() {
            if !item.gpu().same(self.gpu) {
                return Err(Error::WrongContext { what });
            }
            item.mapped_ptr().ok_or(Error::NotMapped { what })?;
        }
        let size = std::mem::size_of::<T>() as u64;
        let d = desc.as_mut_slice()?;
        let (mut offset, mut total) = (0u64, 0usize);
        for (k, item) in items.enumerate() {
            d[3 * k] = item.mapped_ptr().unwrap_or(0);
            d[3 * k + 1] = offset;
            d[3 * k + 2] = item.len() as u64 * size;
            offset += item.len() as u64 * size;
            total += item.len();
        }
        Ok((total, desc_ptr))
    }

    /// `y[i] = clamp(x[i], lo, hi)` for `i < n`.
    pub fn clamp(
        &mut self,
        x: &DeviceBuffer<f32>,
        y: &mut DeviceBuffer<f32>,
        n: usize,
        lo: f32,
        hi: f32,
    ) -> Result<()> {
        check_len("clamp input", n, x.len())?;
        check_len("clamp output", n, y.len())?;
        self.reads(x)?;
        self.writes(y)?;
        // SAFETY: x and y have >= n elements (checked), are ordered against other
        // streams and recorded on finish, so they outlive the kernel.
        let code = unsafe {
            sys::prism_clamp_f32(
                x.device_ptr() as *const f32,
                y.device_ptr() as *mut f32,
                n as u64,
                lo,
                hi,
                self.raw_stream(),
            )
        };
        self.check("clamp", code)
    }

    /// In place: `y[i] = clamp(y[i], lo, hi)` for `i < n`.
    pub fn clamp_in_place(
        &mut self,
        y: &mut DeviceBuffer<f32>,
        n: usize,
        lo: f32,
        hi: f32,
    ) -> Result<()> {
        check_len("clamp buffer", n, y.len())?;
        self.writes(y)?;
        let p = y.device_ptr();
        // SAFETY: y has n elements; the launcher allows x == y; ordered/recorded.
        let code = unsafe {
            sys::prism_clamp_f32(
                p as *const f32,
                p as *mut f32,
                n as u64,
                lo,
                hi,
                self.raw_stream(),
            )
        };
        self.check("clamp", code)
    }

    /// The waits this scope's stream is ordered after (record the scope's
    /// end fence with [`Gpu::fence_after`] and this clock).
    pub fn clock(&self) -> &WaitClock {
        &self.clock
    }

    /// Records the uses declared in this scope against `fence` (recorded
    /// after the last kernel), so later ops and buffer drops wait for them;
    /// returns the stream's wait clock for the next scope on it.
    pub fn finish(self, fence: &Fence) -> WaitClock {
        self.finish_reuse(fence).0
    }

    /// [`finish`](Self::finish), also handing back the emptied lists for the next scope.
    pub fn finish_reuse(mut self, fence: &Fence) -> (WaitClock, LaunchScratch) {
        for r in self.reads.drain(..) {
            lock(&r).add_read(fence);
        }
        for w in self.writes.drain(..) {
            lock(&w).set_write(fence);
        }
        let scratch = LaunchScratch {
            reads: self.reads,
            writes: self.writes,
        };
        (self.clock, scratch)
    }
}

/// The (empty) use lists of a finished [`Launch`], kept for the next one
/// (their allocations are what is reused; they hold no buffer).
#[derive(Debug, Default)]
pub struct LaunchScratch {
    reads: Vec<UseCell>,
    writes: Vec<UseCell>,
}

/// The launcher takes `iters` as an `int32_t`.
fn iters_i32(iters: u32) -> Result<i32> {
    i32::try_from(iters).map_err(|_| Error::LengthMismatch {
        what: "fma_chain iterations (max i32::MAX)",
        expected: i32::MAX as usize,
        actual: iters as usize,
    })
}

/// The CPU twin of the GPU fill/check pattern (see kernels/prism_kernels.h).
pub fn pattern(seed: u32, i: u64) -> u32 {
    let mut h = (i as u32) ^ ((i >> 32) as u32).wrapping_mul(0x9E37_79B9) ^ seed;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^= h >> 16;
    h
}

/// CPU reference of the fma chain kernel (same operation order, so results match bit for bit).
pub fn fma_chain_cpu(x: f32, a: f32, b: f32, iters: u32) -> f32 {
    let mut v = x;
    for _ in 0..iters {
        v = v.mul_add(a, b);
    }
    v
}
