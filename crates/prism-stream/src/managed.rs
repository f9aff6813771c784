//! [`ManagedGpuContext`]: an open device plus, with streams enabled, its
//! [`AsyncCoordinator`]. Its own module, so the context (`Gpu`) does not
//! depend on the coordinator built on it.

use crate::context::{DeviceInfo, Gpu};
use crate::coordinator::AsyncCoordinator;
use crate::{Error, Result};

/// The entry point: an open device, and (with streams enabled) its coordinator.
#[derive(Debug)]
pub struct ManagedGpuContext {
    gpu: Gpu,
    coordinator: Option<AsyncCoordinator>,
}

impl ManagedGpuContext {
    /// Opens GPU `device`. Typed errors for no driver, no device, a bad
    /// ordinal. `enable_streams` creates the upload/compute/download streams
    /// of the [`AsyncCoordinator`].
    pub fn new(device: usize, enable_streams: bool) -> Result<Self> {
        let gpu = Gpu::open(device)?;
        let coordinator = if enable_streams {
            Some(AsyncCoordinator::new(&gpu)?)
        } else {
            None
        };
        Ok(Self { gpu, coordinator })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn device_info(&self) -> &DeviceInfo {
        self.gpu.info()
    }

    pub fn streams_enabled(&self) -> bool {
        self.coordinator.is_some()
    }

    pub fn async_coordinator(&self) -> Result<&AsyncCoordinator> {
        self.coordinator.as_ref().ok_or(Error::StreamsDisabled {
            what: "async coordinator",
        })
    }

    pub fn async_coordinator_mut(&mut self) -> Result<&mut AsyncCoordinator> {
        self.coordinator.as_mut().ok_or(Error::StreamsDisabled {
            what: "async coordinator",
        })
    }
}
