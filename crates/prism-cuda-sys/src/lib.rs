//! Raw bindings to prism's CUDA kernel launchers (`kernels/prism_kernels.h`).
//!
//! This crate is the bottom layer: it compiles `kernels/*.cu` with nvcc (see
//! `build.rs`) and exposes the C launchers exactly as the header declares them.
//! It holds no safe wrappers and no policy; `prism-stream` validates arguments
//! and turns status codes into typed errors.
//!
//! Without nvcc at build time the launchers still link, and each returns
//! [`PRISM_ERR_KERNELS_NOT_BUILT`]; [`KERNELS_BUILT`] tells which build this is.
//!
//! # Safety contract of every launcher
//! - device pointers are valid allocations of the CUDA context current on the
//!   calling thread, with at least the element count the launcher is given;
//! - `stream` is a live stream of that context (or null for the legacy default
//!   stream, which prism never uses);
//! - nothing else writes the buffers, and nothing frees them, until the work
//!   enqueued on `stream` has completed.

#![no_std]
#![allow(non_camel_case_types)]

#[cfg(not(feature = "bindgen"))]
mod bindings;
#[cfg(feature = "bindgen")]
mod bindings {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}

pub use bindings::*;

/// True when this build compiled the CUDA kernels with nvcc; false for the stub build.
pub const KERNELS_BUILT: bool = cfg!(prism_kernels);

/// PTX (compute_80) of `kernels/user/scale_add.cu`, a stand-in for a user's
/// own kernel that examples load at run time through cudarc
/// (`extern "C" scale_add(const float *x, float *y, u64 n, float a, float b)`:
/// `y[i] = fmaf(a, x[i], b)`). Empty in a build without nvcc.
pub const EXAMPLE_USER_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/user_scale_add.ptx"));
