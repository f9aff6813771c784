//! prism-stream: the layer that makes GPU work asynchronous and correctly ordered.
//!
//! - [`ManagedGpuContext`] / [`Gpu`]: opens a device (typed errors when there
//!   is no driver or device), device facts, the "unusable after a fault" flag.
//! - [`Lane`]: the one handle through which work is queued on a stream
//!   (copies, kernel scopes, memsets, fences); it orders every op after the
//!   buffers' earlier uses and fences it before returning.
//!   Batched copies ([`Lane::copy_batch_htod`], [`Lane::copy_batch_dtoh`]:
//!   many pinned items in one `cuMemcpyBatchAsync`) go through it too.
//! - [`StreamPool`] / [`ManagedStream`]: pooled lanes by [`StreamPurpose`].
//! - [`Fence`]: a pooled CUDA event; [`OpGraph`] the op bookkeeping.
//! - [`DeviceBuffer`] / [`PinnedBuffer`]: memory that remembers which queued
//!   operations use it; the GPU orders hazards, `Drop` waits before freeing.
//! - [`AsyncCoordinator`]: upload / compute / download lanes and op ids.
//! - [`FenceFuture`] / [`OpFuture`]: GPU completion as futures, for any
//!   executor ([`Fence::completion`], `fence.await`,
//!   [`AsyncCoordinator::op_future`]); one shared thread polls every
//!   awaited fence, none blocks per wait ([`future`]).
//! - [`Launch`]: launches of prism's kernels and, through
//!   [`Launch::kernel`], of your own ([`Gpu::load_module`]).
//! - cudarc interop: [`DeviceBuffer::from_cuda_slice`] /
//!   [`DeviceBuffer::into_cuda_slice`] move an allocation between a cudarc
//!   `CudaSlice` and a prism buffer, [`Lane::from_cuda_stream`] /
//!   [`Lane::into_cuda_stream`] a stream between cudarc and a lane; each
//!   orders the new owner after the old one's pending work.
//! - Other libraries' memory by raw handle (DLPack, C++):
//!   [`DeviceBuffer::from_foreign`] uses a tensor's memory without a copy,
//!   [`DeviceBuffer::export`] lends a buffer out ([`Exported`]); hand-overs
//!   are ordered by stream waits on events where the driver allows it
//!   (the module `foreign` lists where it falls back to host waits).
//! - [`nvtx`]: NVTX ranges for Nsight Systems (free when no tool listens).
//!
//! # Modules
//!
//! In layers, each using only those above it in this table (`cargo xtask
//! modules --check` keeps the modules free of import cycles):
//!
//! | module | owns |
//! | --- | --- |
//! | `error`, `op_id` | [`Error`], the mapping of driver errors; [`OpId`] |
//! | `raw` | the driver layer: current context, CUDA events, memory, prism's kernel modules; each call with its `unsafe` and error mapping, no ordering decision |
//! | `context`, `managed` | [`Gpu`] (device, poison flag), [`ManagedGpuContext`] |
//! | `order` | the tracking layer: ordering rules, use lists, [`Fence`], device allocations freed after their last use |
//! | `memory` | [`Element`], [`DeviceBuffer`], [`PinnedBuffer`]: host-access checks, waiting `Drop`, read-back slots |
//! | `lane` | [`Lane`]: the one path of every GPU op (orders it, records its fence; the one place that records events or issues stream waits) |
//! | `stream` | [`StreamPool`], [`ManagedStream`], [`StreamPurpose`], [`Lane::new`] |
//! | `copy`, `ops` | copies, batched copies, memsets, fills, read-backs of a [`Lane`] or [`Launch`] |
//! | `kernels` | [`Launch`]: prism's kernels (`builtin`), their source (`source`), your kernels (`user`), CPU references (`cpu`) |
//! | `capture` | CUDA graphs: [`Lane::capture`], [`CapturedGraph`] |
//! | `outside`, `libs` | outside work ([`Outside`]); cuBLAS and cuFFT handles |
//! | `readback` | [`Readback`] and its pinned slots |
//! | [`graph`], `coordinator` | [`OpGraph`] bookkeeping; [`AsyncCoordinator`] |
//! | [`future`] | [`FenceFuture`], [`OpFuture`] |
//! | `interop` | moves of buffers and streams between cudarc and prism |
//! | `foreign` | memory and streams of other libraries by raw handle (DLPack): [`DeviceBuffer::from_foreign`], [`Exported`], [`ForeignStream`] |
//! | `gds` | [`gds_status`]: GPUDirect Storage (cuFile) here, and its mode |
//! | [`nvtx`] | NVTX ranges |
//!
//! # Soundness
//!
//! No program without `unsafe` can make prism and the GPU touch the same
//! memory at once, free memory the GPU still uses, or skip an ordering the
//! GPU needs: every GPU use of a buffer is queued through a [`Lane`], which
//! orders it and records its fence before returning (modules `order` and
//! `lane`); host
//! access checks those fences; `Drop` waits for them; [`Element`] admits
//! only plain data; the safe constructors never hand out uninitialised
//! device memory. Memory and streams that change hands with cudarc are
//! ordered after their old owner's pending work (module `interop`).
//!
//! Built on cudarc's driver API with `dynamic-loading`: a binary runs (and
//! reports [`Error::DriverNotFound`]) on machines without a driver.
//!
//! This crate and prism-cuda-sys are the only library crates with `unsafe`
//! code (prism-bench's CUDA C++ baselines and some examples and tests have
//! their own); every block carries a `// SAFETY:` comment. Besides cudarc's driver API, its
//! only foreign calls are prism-cuda-sys's and the three of the NVTX shim
//! ([`nvtx`]).
//!
//! # Kernels with or without nvcc, and CUDA 12 drivers
//!
//! prism's own kernels run through the launchers nvcc compiled into
//! prism-cuda-sys when the build had nvcc, and otherwise from the PTX that
//! crate carries, loaded and launched through the driver API
//! ([`KernelSource`]; both give bit-identical results). Feature `cuda-13`
//! (default) binds the CUDA 13 driver API (R580 or newer); `cuda-12`, with
//! `default-features = false`, binds CUDA 12.0's (R525 or newer) and always
//! uses the PTX.

#[cfg(all(feature = "cuda-12", feature = "cuda-13"))]
compile_error!(
    "prism-stream: features `cuda-12` and `cuda-13` exclude each other; \
     for CUDA 12 drivers depend on prism with `default-features = false, features = [\"cuda-12\"]`"
);
#[cfg(not(any(feature = "cuda-12", feature = "cuda-13")))]
compile_error!(
    "prism-stream: enable feature `cuda-13` (the default, CUDA 13 drivers) or `cuda-12` (CUDA 12 drivers)"
);

mod capture;
mod context;
mod coordinator;
mod copy;
mod error;
mod foreign;
pub mod future;
mod gds;
pub mod graph;
mod interop;
mod kernels;
mod lane;
mod libs;
mod managed;
mod memory;
pub mod nvtx;
mod op_id;
mod ops;
mod order;
mod outside;
mod raw;
mod readback;
mod stream;

pub use capture::{Capture, CapturedGraph, GraphLaunch, ReadbackKey};
pub use context::{device_count, driver_available, DeviceInfo, Gpu};
pub use coordinator::AsyncCoordinator;
pub use copy::{batch_copies_supported, BatchItem};
pub use error::{Error, Result};
pub use foreign::{Exported, ForeignStream};
pub use future::{FenceFuture, OpFuture};
pub use gds::{gds_status, GdsStatus};
pub use graph::{Completion, OpGraph, OpId, OpStatus, Probe};
pub use interop::InteropError;
pub use kernels::{fma_chain_cpu, pattern, Kernel, KernelCall, KernelSource, Launch, Module};
pub use lane::Lane;
#[cfg(feature = "cublas")]
pub use libs::Blas;
#[cfg(feature = "cufft")]
pub use libs::FftPlan;
pub use managed::ManagedGpuContext;
pub use memory::{
    as_bytes, as_bytes_mut, copy_streaming, pinned_bytes, zeroed_vec, DeviceBuffer, Element,
    HostAllocFlags, PinnedBuffer, RegisterError,
};
pub use order::Fence;
pub use order::StreamId;
pub use outside::{Arg, ArgMut, DeviceView, DeviceViewMut, Outside, Work};
pub use readback::{Readback, ReadbackFuture};
pub use stream::{ManagedStream, StreamPool, StreamPurpose};

/// Re-export of the cudarc version prism is built on (for `Ptx`,
/// `LaunchConfig` and cudarc's own safe API).
pub use cudarc;
/// Re-export of `half`, whose `f16`/`bf16` are [`Element`]s.
pub use half;
