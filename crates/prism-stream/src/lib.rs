//! prism-stream: the layer that makes GPU work asynchronous and correctly ordered.
//!
//! - [`ManagedGpuContext`] / [`Gpu`]: opens a device (typed errors when there
//!   is no driver or device), device facts, the "unusable after a fault" flag.
//! - [`StreamPool`] / [`ManagedStream`]: non-blocking streams by [`StreamPurpose`].
//! - [`Fence`]: a pooled CUDA event; [`OpGraph`] the op bookkeeping.
//! - [`DeviceBuffer`] / [`PinnedBuffer`]: memory that remembers which queued
//!   operations use it; the GPU orders hazards, `Drop` waits before freeing.
//! - [`AsyncCoordinator`]: upload / compute / download streams and op ids.
//! - [`Launch`]: safe launches of prism's kernels inside a compute op.
//!
//! Built on cudarc's driver API with `dynamic-loading`: a binary runs (and
//! reports [`Error::DriverNotFound`]) on machines without a driver.
//!
//! This crate and prism-cuda-sys are the only ones with `unsafe` code; every
//! block carries a `// SAFETY:` comment.

mod context;
mod coordinator;
mod copy;
mod error;
mod event;
pub mod graph;
mod kernels;
mod memory;
mod stream;
pub mod testing;

pub use context::{device_count, driver_available, DeviceInfo, Gpu, ManagedGpuContext};
pub use coordinator::AsyncCoordinator;
pub use copy::{
    copy_dtoh, copy_dtoh_at, copy_dtoh_timed, copy_htod, copy_htod_at, copy_htod_timed,
};
pub use error::{Error, Result};
pub use event::{Fence, WaitClock};
pub use graph::{Completion, OpGraph, OpId, OpStatus, Probe};
pub use kernels::{fma_chain_cpu, pattern, Launch, LaunchScratch};
pub use memory::{DeviceBuffer, Element, HostAllocFlags, PinnedBuffer};
pub use stream::{ManagedStream, StreamPool, StreamPurpose};

/// Re-export of the cudarc version prism is built on, for users who launch
/// their own modules on prism's streams.
pub use cudarc;
