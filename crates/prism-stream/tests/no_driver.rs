//! Runs everywhere (CI included): opening a GPU gives a typed answer, never a panic.

use prism_stream::{driver_available, Error, ManagedGpuContext};

#[test]
fn managed_context_without_driver_is_a_typed_error() {
    match ManagedGpuContext::new(0, true) {
        Err(Error::DriverNotFound) => {
            assert!(!driver_available(), "DriverNotFound although libcuda loads")
        }
        Err(Error::NoDevice) => assert!(driver_available()),
        Ok(ctx) => assert!(!ctx.device_info().name.is_empty()),
        Err(other) => panic!("unexpected error opening GPU 0: {other}"),
    }
}

#[test]
fn bad_ordinal_is_a_typed_error() {
    match ManagedGpuContext::new(4096, false) {
        Err(Error::DriverNotFound) => assert!(!driver_available()),
        Err(Error::NoDevice) | Err(Error::InvalidDevice { ordinal: 4096, .. }) => {}
        other => panic!("expected a typed error for GPU 4096, got {other:?}"),
    }
}
