//! The scenarios a user meets first, across the crates, each output
//! compared bit for bit with a CPU reference. One test binary (so the GPU
//! bundle carries one more file, not four):
//!
//! - `end_to_end`: the design's flow on GPU 0: `ManagedGpuContext::new(0,
//!   true)`, its `AsyncCoordinator` (uploads, computes with dependencies,
//!   downloads, `poll` and `wait`), `create_triple_buffer`, then
//!   `create_pipeline_manager`.
//! - `readme`: README.md's "Example" on
//!   `Backend::Host` and on `Backend::Auto`.
//! - `custom_stage`: a user's own `Stage` with both forms, on the host
//!   backend and on the GPU.
//! - `multi_gpu`: `MultiGpuPipeline` over every GPU.
//! - `cudarc_interop`: a user's cudarc slice and stream through their own
//!   stage's GPU form and back, no copy through the host.
//!
//! Tests named `gpu_*` start with `prism_testing::gpu_or_skip`:
//! without a GPU they print `SKIPPED` and pass (`PRISM_REQUIRE_GPU=1` makes
//! that a failure). The others run anywhere.

mod cudarc_interop;
mod custom_stage;
mod end_to_end;
mod multi_gpu;
mod readme;
