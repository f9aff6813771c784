//! Kernel launches through a [`Lane`](crate::Lane): [`Launch`] holds
//! prism's own kernels (validating lengths and contexts), and
//! [`Launch::kernel`] launches the user's own kernels on prism buffers.
//! Every launch goes through [`Lane::enqueue`](crate::Lane::enqueue)
//! (`lane.rs`): it is ordered after the buffers' earlier uses and its fence
//! is noted on every buffer before the call returns, so a scope that is
//! dropped, forgotten or left with `?` loses nothing.
//!
//! prism's own kernels come from one of two [`KernelSource`]s: the launchers
//! nvcc compiled into prism-cuda-sys, or prism-cuda-sys's bundled PTX,
//! loaded into the context and launched by name through the driver API
//! (`cuLaunchKernel`) with the same grids the launchers compute
//! (`ptx_grid` and the methods of `builtin` mirror
//! `kernels/prism_kernels.cu`).
//!
//! # What lives where
//!
//! - `source`: where prism's kernels come from: [`KernelSource`] and the
//!   choice per [`Gpu`](crate::Gpu). The loading of the PTX, the early load
//!   at `Gpu::open` and `ModuleHold` (a module unloaded only once its
//!   context has finished its work) are the driver layer's (`raw`).
//! - `launch`: the [`Launch`] scope and its generic machinery: waits,
//!   fences, `enqueue`, and `run`, which takes one of prism's kernels to the
//!   launcher or to the PTX by the GPU's [`KernelSource`]; the turning of a
//!   launcher's code or a driver launch's result into an [`Error`](crate::Error).
//! - `builtin`: prism's own kernels as methods of [`Launch`], each written
//!   for both sources, and their PTX helpers (`ptx_grid`, the fma chain
//!   and clamp launches, the zero-copy and iteration checks).
//! - `user`: the user's own kernels: [`Module`], [`Kernel`], [`KernelCall`],
//!   `Gpu::load_module` and [`Launch::kernel`].
//! - `cpu`: CPU references of the kernels ([`pattern`], [`fma_chain_cpu`]).
//!
//! Each file's unit tests sit at its end.

mod builtin;
mod cpu;
mod launch;
mod source;
mod user;

pub use cpu::{fma_chain_cpu, pattern};
pub use launch::Launch;
pub use source::KernelSource;
pub use user::{Kernel, KernelCall, Module};
