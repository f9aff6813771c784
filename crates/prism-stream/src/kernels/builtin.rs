//! prism's own kernels, as methods of [`Launch`]: each checks its lengths,
//! names the buffers it uses and is written twice, for the nvcc launcher
//! and for the same kernel(s) from the PTX with the grid the launcher
//! computes ([`Launch::run`] picks one by the GPU's [`KernelSource`]);
//! [`ptx_grid`] and these methods mirror `kernels/prism_kernels.cu`. Also
//! their PTX helpers and the argument checks they share.

use std::ffi::c_void;

use cudarc::driver::{result, sys as cu, CudaFunction, DriverError};
use prism_cuda_sys as sys;

use super::launch::{check_code, check_driver_launch, Launch};
use super::source::KernelSource;
use crate::error::{check_len, DriverResultExt};
use crate::memory::{DeviceBuffer, Element, PinnedBuffer, Tracked};
use crate::order::{Access, Used};
use crate::raw::PtxKernels;
use crate::{Error, Result};

/// Threads per block of every grid-stride kernel (`kBlock` in the .cu file).
const BLOCK: u32 = 256;
/// Grid cap of grid-stride kernels (`kMaxBlocks`).
const MAX_BLOCKS: u64 = 65535 * 8;

/// Blocks for `work` items: `blocks_for` of `kernels/prism_kernels.cu`.
fn ptx_grid(work: u64) -> u32 {
    work.div_ceil(u64::from(BLOCK)).clamp(1, MAX_BLOCKS) as u32
}

/// Launches `f` with `grid` x `block` threads on `stream`.
///
/// # Safety
///
/// `params` must point at live values matching `f`'s parameters in number,
/// order and type; every buffer they name must be valid for what the
/// kernel does with it and ordered on `stream` (the caller's lane).
unsafe fn launch_ptx(
    f: &CudaFunction,
    grid: u32,
    block: u32,
    stream: cu::CUstream,
    params: &mut [*mut c_void],
) -> std::result::Result<(), DriverError> {
    // SAFETY: forwarded from the caller; `f` belongs to the lane's context
    // (the module was loaded into the lane's Gpu).
    unsafe {
        result::launch_kernel(
            f.cu_function(),
            (grid, 1, 1),
            (block, 1, 1),
            0,
            stream,
            params,
        )
    }
}

/// A pointer to a launch parameter, as `cuLaunchKernel` takes it.
fn param<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

impl<'l> Launch<'l> {
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
        let iters = iters_i32(iters)?;
        let (xp, yp) = (x.addr(), y.addr());
        let uses = [
            x.used(Access::Read, "fma_chain input"),
            y.used(Access::Write, "fma_chain output"),
        ];
        self.run(
            "fma_chain",
            &uses,
            |stream| {
                // SAFETY: x and y are allocations of the lane's context (checked by
                // enqueue) with at least n elements (checked above), ordered after
                // their earlier uses and fenced before this call returns.
                unsafe {
                    sys::prism_fma_chain_f32(
                        xp as *const f32,
                        yp as *mut f32,
                        n as u64,
                        a,
                        b,
                        iters,
                        stream,
                    )
                }
            },
            |k, stream| ptx_fma_chain(k, stream, xp, yp, n as u64, a, b, iters),
        )
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
        let iters = iters_i32(iters)?;
        let p = y.addr();
        let uses = [y.used(Access::Write, "fma_chain buffer")];
        self.run(
            "fma_chain",
            &uses,
            |stream| {
                // SAFETY: as in fma_chain; the launcher allows x == y (elementwise).
                unsafe {
                    sys::prism_fma_chain_f32(
                        p as *const f32,
                        p as *mut f32,
                        n as u64,
                        a,
                        b,
                        iters,
                        stream,
                    )
                }
            },
            |k, stream| ptx_fma_chain(k, stream, p, p, n as u64, a, b, iters),
        )
    }

    /// `buf[i] = pattern(seed, i)` for `i < n` (see [`pattern`](crate::pattern)).
    pub fn fill_pattern(&mut self, buf: &mut DeviceBuffer<u32>, n: usize, seed: u32) -> Result<()> {
        check_len("fill_pattern buffer", n, buf.len())?;
        let p = buf.addr();
        let uses = [buf.used(Access::Write, "fill_pattern buffer")];
        self.run(
            "fill_pattern",
            &uses,
            |stream| {
                // SAFETY: buf has at least n elements; ordered and fenced by enqueue.
                unsafe { sys::prism_fill_pattern_u32(p as *mut u32, n as u64, seed, stream) }
            },
            |k, stream| {
                let (mut p, mut n, mut seed) = (p, n as u64, seed);
                let mut params = [param(&mut p), param(&mut n), param(&mut seed)];
                // SAFETY: (u32*, u64, u32) as the kernel declares; buf has n
                // elements, ordered and fenced by enqueue.
                unsafe { launch_ptx(&k.fill_pattern, ptx_grid(n), BLOCK, stream, &mut params) }
            },
        )
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
        let (p, c) = (buf.addr(), counters.addr());
        let uses = [
            buf.used(Access::Read, "check_pattern buffer"),
            counters.used(Access::Write, "check_pattern counters"),
        ];
        let gpu = self.gpu().clone();
        self.enqueue(&uses, |stream| {
            // SAFETY: counters has at least 2 u64 (16 bytes); both memsets stay
            // inside it and run on this stream before the kernel.
            unsafe {
                result::memset_d8_async(c, 0, 8, stream).call("cuMemsetD8Async")?;
                result::memset_d8_async(c + 8, 0xFF, 8, stream).call("cuMemsetD8Async")?;
            }
            match gpu.kernel_source() {
                KernelSource::Launchers => {
                    // SAFETY: buf has n elements, counters 2; ordered and fenced by enqueue.
                    let code = unsafe {
                        sys::prism_check_pattern_u32(
                            p as *const u32,
                            n as u64,
                            seed,
                            c as *mut _,
                            (c + 8) as *mut _,
                            stream.cast(),
                        )
                    };
                    check_code(&gpu, "check_pattern", code)
                }
                KernelSource::Ptx => {
                    let k = gpu.ptx_kernels()?;
                    let (mut p, mut n, mut seed, mut m, mut first) = (p, n as u64, seed, c, c + 8);
                    let mut params = [
                        param(&mut p),
                        param(&mut n),
                        param(&mut seed),
                        param(&mut m),
                        param(&mut first),
                    ];
                    // SAFETY: (u32*, u64, u32, u64*, u64*) as the kernel
                    // declares; buf has n elements and counters 2, ordered
                    // and fenced by enqueue.
                    let outcome = unsafe {
                        launch_ptx(&k.check_pattern, ptx_grid(n), BLOCK, stream, &mut params)
                    };
                    check_driver_launch(&gpu, "check_pattern", outcome)
                }
            }
        })
    }

    /// A kernel that keeps the stream busy for `ns` nanoseconds (tests, demos).
    pub fn spin(&mut self, ns: u64) -> Result<()> {
        self.run(
            "spin_ns",
            &[],
            // SAFETY: touches no memory; the stream is live (held by the lane).
            |stream| unsafe { sys::prism_spin_ns(ns, stream) },
            |k, stream| {
                let mut ns = ns;
                // SAFETY: (u64) as the kernel declares; touches no memory.
                unsafe { launch_ptx(&k.spin_ns, 1, 1, stream, &mut [param(&mut ns)]) }
            },
        )
    }

    /// A kernel that writes through an invalid address: the GPU faults and the
    /// context (the device's primary context, shared by every user of it in
    /// the process) becomes unusable. Only for testing error paths; use it
    /// on a context of its own
    /// ([`Gpu::open_private`](crate::Gpu::open_private)). Only with the
    /// `fault-injection` feature (off by default; prism-testing turns it on).
    #[cfg(feature = "fault-injection")]
    pub fn fault_injection(&mut self) -> Result<()> {
        self.run(
            "fault",
            &[],
            // SAFETY: the kernel faults on the GPU by design; no host memory and no
            // prism buffer is involved, and the fault is reported as a CUDA error.
            |stream| unsafe { sys::prism_fault(stream) },
            |k, stream| {
                // The launcher's address: one no allocation can have.
                let mut bad: u64 = 0x10;
                // SAFETY: as above: the store faults on the GPU, touching nothing.
                unsafe { launch_ptx(&k.fault, 1, 1, stream, &mut [param(&mut bad)]) }
            },
        )
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
        let (xp, op) = (x.addr(), out.addr());
        let uses = [
            x.used(Access::Read, "group_sum input"),
            out.used(Access::Write, "group_sum output"),
        ];
        self.run(
            "group_sum",
            &uses,
            |stream| {
                // SAFETY: sizes checked above; ordered and fenced by enqueue.
                unsafe {
                    sys::prism_group_sum_f32(
                        xp as *const f32,
                        n as u64,
                        group,
                        op as *mut f32,
                        stream,
                    )
                }
            },
            |k, stream| {
                let (mut xp, mut n, mut group, mut op) = (xp, n as u64, group, op);
                let mut groups = n.div_ceil(u64::from(group));
                let grid = ptx_grid(groups);
                let mut params = [
                    param(&mut xp),
                    param(&mut n),
                    param(&mut group),
                    param(&mut op),
                    param(&mut groups),
                ];
                // SAFETY: (f32*, u64, u32, f32*, u64) as the kernel declares;
                // sizes checked above; ordered and fenced by enqueue.
                unsafe { launch_ptx(&k.group_sum, grid, BLOCK, stream, &mut params) }
            },
        )
    }

    /// Gathers `items` back to back into the front of `dst` with one kernel
    /// that reads the pinned host buffers directly over the bus (zero-copy),
    /// and returns the elements written. `desc` (at least 3 x items) holds the
    /// kernel's descriptors; it is written here, so it fails with
    /// `BufferInFlight` while an earlier gather or scatter still reads it.
    pub fn gather_pinned<T: Element>(
        &mut self,
        items: &[&PinnedBuffer<T>],
        desc: &mut PinnedBuffer<u64>,
        dst: &mut DeviceBuffer<T>,
    ) -> Result<usize> {
        let total = zero_copy_total(
            items.iter().map(|b| b.len()),
            "gathered pinned buffers",
            "gather destination",
            dst.len(),
        )?;
        let count = items.len() as u64;
        let grid = zero_copy_grid(count)?;
        let desc_ptr =
            self.write_descriptors(items.iter().copied(), desc, "gathered pinned buffer")?;
        let mut uses: Vec<Used<'_>> = Vec::with_capacity(items.len() + 2);
        uses.extend(
            items
                .iter()
                .map(|b| b.used(Access::Read, "gathered pinned buffer")),
        );
        uses.push(desc.used(Access::Read, "zero-copy descriptors"));
        let d = dst.addr();
        uses.push(dst.used(Access::Write, "gather destination"));
        self.run(
            "gather_bytes",
            &uses,
            |stream| {
                // SAFETY: desc holds 3 * count initialised descriptors in mapped
                // pinned memory; each names a live mapped pinned buffer of this
                // context and its size, all fenced by enqueue before this returns;
                // the offsets stay within dst (total <= dst.len(), checked above).
                unsafe {
                    sys::prism_gather_bytes(desc_ptr as *const u64, count, d as *mut u8, stream)
                }
            },
            |k, stream| {
                let (mut desc, mut d) = (desc_ptr, d);
                let mut params = [param(&mut desc), param(&mut d)];
                // SAFETY: (u64*, u8*) as the kernel declares, one block per
                // descriptor; as for the launcher above.
                unsafe { launch_ptx(&k.gather_bytes, grid, BLOCK, stream, &mut params) }
            },
        )?;
        Ok(total)
    }

    /// Scatters the front of `src` back to back into `items` with one kernel
    /// that writes the pinned host buffers directly (zero-copy). Host reads
    /// of `items` fail with `BufferInFlight` until the kernel completes.
    pub fn scatter_pinned<T: Element>(
        &mut self,
        src: &DeviceBuffer<T>,
        items: &mut [&mut PinnedBuffer<T>],
        desc: &mut PinnedBuffer<u64>,
    ) -> Result<usize> {
        let total = zero_copy_total(
            items.iter().map(|b| b.len()),
            "scattered pinned buffers",
            "scatter source",
            src.len(),
        )?;
        let count = items.len() as u64;
        let grid = zero_copy_grid(count)?;
        let desc_ptr =
            self.write_descriptors(items.iter().map(|b| &**b), desc, "scattered pinned buffer")?;
        let mut uses: Vec<Used<'_>> = Vec::with_capacity(items.len() + 2);
        let s = src.addr();
        uses.push(src.used(Access::Read, "scatter source"));
        uses.push(desc.used(Access::Read, "zero-copy descriptors"));
        uses.extend(
            items
                .iter()
                .map(|b| b.used(Access::Write, "scattered pinned buffer")),
        );
        self.run(
            "scatter_bytes",
            &uses,
            |stream| {
                // SAFETY: as in gather_pinned, with the roles swapped: every
                // descriptor names a live mapped pinned buffer that host code cannot
                // touch until the write fence noted by enqueue completes.
                unsafe {
                    sys::prism_scatter_bytes(s as *const u8, desc_ptr as *const u64, count, stream)
                }
            },
            |k, stream| {
                let (mut s, mut desc) = (s, desc_ptr);
                let mut params = [param(&mut s), param(&mut desc)];
                // SAFETY: (u8*, u64*) as the kernel declares, one block per
                // descriptor; as for the launcher above.
                unsafe { launch_ptx(&k.scatter_bytes, grid, BLOCK, stream, &mut params) }
            },
        )?;
        Ok(total)
    }

    /// Fills `desc` with one (mapped address, byte offset, bytes) triple per
    /// item, back to back; returns the mapped address of `desc` for the
    /// kernel. Checks every item first and writes nothing into `desc` on error.
    fn write_descriptors<'b, T: Element>(
        &self,
        items: impl ExactSizeIterator<Item = &'b PinnedBuffer<T>> + Clone,
        desc: &mut PinnedBuffer<u64>,
        what: &'static str,
    ) -> Result<cu::CUdeviceptr> {
        check_len("zero-copy items", items.len(), desc.len() / 3)?;
        if !desc.gpu().same(self.gpu()) {
            return Err(Error::WrongContext {
                what: "zero-copy descriptors",
            });
        }
        let desc_ptr = desc.mapped().ok_or(Error::NotMapped {
            what: "zero-copy descriptors",
        })?;
        let size = std::mem::size_of::<T>() as u64;
        let overflow = || Error::LengthOverflow {
            what: "zero-copy descriptor bytes",
        };
        // Every item's bytes and their running sum, checked here, before
        // anything is written: the loop below then repeats sums that fit.
        let mut end = 0u64;
        for item in items.clone() {
            if !item.gpu().same(self.gpu()) {
                return Err(Error::WrongContext { what });
            }
            item.mapped().ok_or(Error::NotMapped { what })?;
            let bytes = u64::try_from(item.len())
                .ok()
                .and_then(|n| n.checked_mul(size))
                .ok_or_else(overflow)?;
            end = end.checked_add(bytes).ok_or_else(overflow)?;
        }
        let d = desc.as_mut_slice()?;
        let mut offset = 0u64;
        for (k, item) in items.enumerate() {
            // Cannot wrap: every partial sum is at most `end`, computed
            // with checked arithmetic above.
            let bytes = item.len() as u64 * size;
            d[3 * k] = item.mapped().unwrap_or(0);
            d[3 * k + 1] = offset;
            d[3 * k + 2] = bytes;
            offset += bytes;
        }
        Ok(desc_ptr)
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
        let (xp, yp) = (x.addr(), y.addr());
        let uses = [
            x.used(Access::Read, "clamp input"),
            y.used(Access::Write, "clamp output"),
        ];
        self.run(
            "clamp",
            &uses,
            |stream| {
                // SAFETY: x and y have >= n elements (checked), ordered and fenced by enqueue.
                unsafe {
                    sys::prism_clamp_f32(xp as *const f32, yp as *mut f32, n as u64, lo, hi, stream)
                }
            },
            |k, stream| ptx_clamp(k, stream, xp, yp, n as u64, lo, hi),
        )
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
        let p = y.addr();
        let uses = [y.used(Access::Write, "clamp buffer")];
        self.run(
            "clamp",
            &uses,
            |stream| {
                // SAFETY: y has n elements; the launcher allows x == y; ordered and fenced.
                unsafe {
                    sys::prism_clamp_f32(p as *const f32, p as *mut f32, n as u64, lo, hi, stream)
                }
            },
            |k, stream| ptx_clamp(k, stream, p, p, n as u64, lo, hi),
        )
    }
}

/// `prism_fma_chain_f32` through the PTX: the float4 kernel over the
/// aligned body, the scalar kernel over the rest.
#[allow(clippy::too_many_arguments)]
fn ptx_fma_chain(
    k: &PtxKernels,
    stream: cu::CUstream,
    x: u64,
    y: u64,
    n: u64,
    a: f32,
    b: f32,
    iters: i32,
) -> std::result::Result<(), DriverError> {
    let (mut a, mut b, mut iters) = (a, b, iters);
    let mut head = 0u64;
    if x.is_multiple_of(16) && y.is_multiple_of(16) {
        let mut n4 = n / 4;
        if n4 != 0 {
            let (mut x, mut y) = (x, y);
            let grid = ptx_grid(n4);
            let mut params = [
                param(&mut x),
                param(&mut y),
                param(&mut n4),
                param(&mut a),
                param(&mut b),
                param(&mut iters),
            ];
            // SAFETY: (float4*, float4*, u64, f32, f32, i32) as the kernel
            // declares; x and y are 16-byte aligned and hold n >= 4 * n4
            // floats (the caller's checks), ordered by the caller's lane.
            unsafe { launch_ptx(&k.fma_chain_vec4, grid, BLOCK, stream, &mut params) }?;
        }
        head = n4 * 4;
    }
    if head < n {
        let (mut x, mut y, mut head, mut n) = (x, y, head, n);
        let grid = ptx_grid(n - head);
        let mut params = [
            param(&mut x),
            param(&mut y),
            param(&mut head),
            param(&mut n),
            param(&mut a),
            param(&mut b),
            param(&mut iters),
        ];
        // SAFETY: (f32*, f32*, u64, u64, f32, f32, i32) as the kernel
        // declares; x and y hold n floats, ordered by the caller's lane.
        unsafe { launch_ptx(&k.fma_chain_scalar, grid, BLOCK, stream, &mut params) }?;
    }
    Ok(())
}

/// `prism_clamp_f32` through the PTX.
fn ptx_clamp(
    k: &PtxKernels,
    stream: cu::CUstream,
    x: u64,
    y: u64,
    n: u64,
    lo: f32,
    hi: f32,
) -> std::result::Result<(), DriverError> {
    let (mut x, mut y, mut n2, mut lo, mut hi) = (x, y, n, lo, hi);
    let mut params = [
        param(&mut x),
        param(&mut y),
        param(&mut n2),
        param(&mut lo),
        param(&mut hi),
    ];
    // SAFETY: (f32*, f32*, u64, f32, f32) as the kernel declares; x and y
    // hold n floats (the caller's checks), ordered by the caller's lane.
    unsafe { launch_ptx(&k.clamp, ptx_grid(n), BLOCK, stream, &mut params) }
}

/// One block per zero-copy descriptor: the launchers refuse more than
/// `i32::MAX` of them.
fn zero_copy_grid(count: u64) -> Result<u32> {
    u32::try_from(count)
        .ok()
        .filter(|&c| c <= i32::MAX as u32)
        .ok_or(Error::LengthMismatch {
            what: "zero-copy items (max i32::MAX)",
            expected: i32::MAX as usize,
            actual: count as usize,
        })
}

/// The elements a zero-copy gather or scatter moves: the sum of the items'
/// lengths, which must fit `capacity` (the device buffer's length). The sum
/// is checked, never wrapped: one pinned buffer listed many times must not
/// add up, modulo 2^64, to a small total that passes the capacity check, or
/// the kernel would copy every item's real bytes past the end of the device
/// buffer. `items` names the items in the overflow error, `what` the device
/// buffer in the capacity error.
fn zero_copy_total(
    lens: impl Iterator<Item = usize>,
    items: &'static str,
    what: &'static str,
    capacity: usize,
) -> Result<usize> {
    let mut total = 0usize;
    for len in lens {
        total = total
            .checked_add(len)
            .ok_or(Error::LengthOverflow { what: items })?;
    }
    check_len(what, total, capacity)?;
    Ok(total)
}

/// The launcher takes `iters` as an `int32_t`.
fn iters_i32(iters: u32) -> Result<i32> {
    i32::try_from(iters).map_err(|_| Error::LengthMismatch {
        what: "fma_chain iterations (max i32::MAX)",
        expected: i32::MAX as usize,
        actual: iters as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parameter lists of the PTX entries are the ones this file's
    /// driver-API launches pass (pointers and u64 as `.u64`, u32 and the
    /// `int` iteration count as `.u32`, floats as `.f32`): a kernel whose
    /// signature changes fails here, on the host, before the GPU test.
    #[test]
    fn bundled_ptx_parameters_match_the_driver_launches() {
        let expected: [(&str, &[&str]); 10] = [
            (
                "prism_k_fma_chain_vec4",
                &["u64", "u64", "u64", "f32", "f32", "u32"],
            ),
            (
                "prism_k_fma_chain_scalar",
                &["u64", "u64", "u64", "u64", "f32", "f32", "u32"],
            ),
            ("prism_k_fill_pattern", &["u64", "u64", "u32"]),
            (
                "prism_k_check_pattern",
                &["u64", "u64", "u32", "u64", "u64"],
            ),
            ("prism_k_spin_ns", &["u64"]),
            ("prism_k_fault", &["u64"]),
            ("prism_k_group_sum", &["u64", "u64", "u32", "u64", "u64"]),
            ("prism_k_clamp", &["u64", "u64", "u64", "f32", "f32"]),
            ("prism_k_gather_bytes", &["u64", "u64"]),
            ("prism_k_scatter_bytes", &["u64", "u64"]),
        ];
        for (name, params) in expected {
            let start = sys::KERNELS_PTX
                .find(&format!(".visible .entry {name}("))
                .unwrap_or_else(|| panic!("{name} missing"));
            let body = &sys::KERNELS_PTX[start..];
            let list = &body[..body.find(')').expect("a closing parenthesis")];
            let found: Vec<&str> = list
                .lines()
                .filter_map(|l| l.trim().strip_prefix(".param ."))
                .map(|l| l.split_whitespace().next().unwrap_or(""))
                .collect();
            assert_eq!(
                found, params,
                "{name}: PTX parameters vs the launch in kernels/builtin.rs"
            );
        }
    }

    /// `ptx_grid` is the .cu file's `blocks_for`.
    #[test]
    fn ptx_grid_matches_the_launchers() {
        assert_eq!(ptx_grid(0), 1);
        assert_eq!(ptx_grid(1), 1);
        assert_eq!(ptx_grid(256), 1);
        assert_eq!(ptx_grid(257), 2);
        assert_eq!(ptx_grid(u64::MAX), (65535 * 8) as u32);
        assert_eq!(zero_copy_grid(7).unwrap(), 7);
        assert!(zero_copy_grid(1 << 31).is_err());
    }

    /// One item listed `usize::MAX / len + 2` times: the plain sum wraps to
    /// `len` (in a release build), which fits the capacity. The checked sum
    /// reports the overflow instead, without collecting the items.
    #[test]
    fn zero_copy_total_never_wraps() {
        let len = 1usize << 40;
        let n = usize::MAX / len + 2;
        let wrapped = (0..n).fold(0usize, |s, _| s.wrapping_add(len));
        assert!(wrapped <= len, "the unchecked sum wraps to {wrapped}");
        let lens = std::iter::repeat_n(len, n);
        assert!(matches!(
            zero_copy_total(lens, "items", "destination", len),
            Err(Error::LengthOverflow { what: "items" })
        ));
        // Fine sums: checked against the capacity as before.
        assert_eq!(
            zero_copy_total([3, 4].into_iter(), "items", "destination", 7).unwrap(),
            7
        );
        assert!(matches!(
            zero_copy_total([3, 5].into_iter(), "items", "destination", 7),
            Err(Error::LengthMismatch {
                what: "destination",
                expected: 7,
                actual: 8
            })
        ));
        assert!(matches!(
            zero_copy_total(std::iter::empty(), "items", "destination", 7),
            Err(Error::ZeroLength { .. })
        ));
        // The largest sum that fits is not an overflow (only too long).
        assert!(matches!(
            zero_copy_total([usize::MAX - 1, 1].into_iter(), "items", "d", 7),
            Err(Error::LengthMismatch {
                actual: usize::MAX,
                ..
            })
        ));
    }
}
