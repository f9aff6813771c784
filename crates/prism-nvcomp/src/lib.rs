//! # prism-nvcomp
//!
//! Chunks that cross the PCIe link compressed and expand on the GPU, with
//! NVIDIA nvCOMP's batched C API on prism's buffers and lanes.
//!
//! * [`Nvcomp`]: libnvcomp loaded at run time (nothing links against it:
//!   every build and CPU test runs without it); searched in
//!   `$PRISM_NVCOMP_LIB`, the workspace's `.nvcomp/lib` (`cargo xtask fetch-nvcomp`), the
//!   system loader and Python's `site-packages/nvidia/libnvcomp/lib64`
//!   (`pip install nvidia-libnvcomp-cu13`); absent, a typed error says where
//!   it looked.
//! * [`Compressor`], [`Decompressor`]: batched compression and decompression
//!   of chunks held in prism [`DeviceBuffer`](prism_stream::DeviceBuffer)s,
//!   queued on a [`Launch`](prism_stream::Launch) scope as *outside work*
//!   (`Outside::read`/`write`/`run`), so every nvCOMP call is ordered after
//!   and before the buffers' other uses like any prism op; the pointer and
//!   size tables, statuses and temp space are prism buffers too. Results
//!   ([`Pending`]) are read back without blocking other work and checked
//!   (every status, every size).
//! * [`format`](mod@format): the compressed chunk file (header, payload, per-chunk
//!   table with checksums) and its writer and reader.
//! * [`stream`]: a compressed file streamed through prism's ring (prism-buffer's
//!   `Engine`): frames cross the link compressed, are decompressed on the
//!   GPU and go through one prism-pipeline [`Stage`](prism_pipeline::Stage).
//!
//! The codecs are those of nvCOMP 6 ([`Codec`]). Decompression always uses
//! nvCOMP's CUDA backend, and is `unsafe`: nvCOMP's decoders do not all
//! withstand corrupt input, whatever the backend, so only nvCOMP's own
//! output may be decompressed.

#![warn(missing_docs)]

mod batch;
mod codec;
mod error;
pub mod format;
mod library;
pub mod stream;
#[allow(
    warnings,
    unsafe_op_in_unsafe_fn,
    missing_docs,
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    clippy::all,
    clippy::undocumented_unsafe_blocks
)]
#[cfg(not(feature = "bindgen"))]
mod sys;
mod types;
/// With `bindgen`, the bindings just generated (`cargo xtask nvcomp-bindings`
/// copies them into `src/sys.rs`).
#[allow(
    warnings,
    unsafe_op_in_unsafe_fn,
    missing_docs,
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    clippy::all,
    clippy::undocumented_unsafe_blocks
)]
#[cfg(feature = "bindgen")]
mod sys {
    include!(concat!(env!("OUT_DIR"), "/sys.rs"));
}

pub use batch::{ChunkLoc, Compressor, Decompressor, Pending};
pub use error::{BoxError, Error, Result};
pub use library::{candidates, Candidate, Nvcomp, LIBRARY_NAME, LIBRARY_VAR};
pub use types::{Alignments, Codec, DataType, Status, ALIGN};
