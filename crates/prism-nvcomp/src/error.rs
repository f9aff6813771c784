//! `prism_nvcomp::Error`: the one error type of the crate.

use std::path::PathBuf;

use crate::types::{Codec, Status};

/// A boxed error from user code (a sink).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of prism-nvcomp: the library, the batch checks, nvCOMP's own
/// statuses, the chunk file format, and prism's errors underneath.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No libnvcomp was found in any place searched.
    #[error(
        "libnvcomp.so.6 not found (looked in: {looked}); get it with `cargo xtask fetch-nvcomp` \
         (into ./.nvcomp) or `pip install nvidia-libnvcomp-cu13`, or set PRISM_NVCOMP_LIB to its path"
    )]
    LibraryNotFound {
        /// Every place searched, in order.
        looked: String,
    },
    /// A library was found but cannot be used (missing symbols, another major version).
    #[error("{path}: not a usable libnvcomp 6: {reason}")]
    LibraryUnusable {
        /// The file loaded.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// An nvCOMP call returned an error status on the host.
    #[error("nvCOMP {call} ({codec}) failed: {status}")]
    Call {
        /// The function.
        call: &'static str,
        /// The codec.
        codec: Codec,
        /// What it returned.
        status: Status,
    },
    /// One chunk of a batch failed on the GPU (a corrupt input, say).
    #[error("nvCOMP {codec}: chunk {chunk} of the batch failed: {status}")]
    ChunkFailed {
        /// The codec.
        codec: Codec,
        /// The chunk's index in the batch.
        chunk: usize,
        /// The status nvCOMP wrote for it.
        status: Status,
    },
    /// A chunk decompressed to another size than the one recorded for it.
    #[error("nvCOMP {codec}: chunk {chunk} decompressed to {actual} bytes, {expected} expected")]
    SizeMismatch {
        /// The codec.
        codec: Codec,
        /// The chunk's index in the batch.
        chunk: usize,
        /// Bytes recorded (the file's table).
        expected: usize,
        /// Bytes nvCOMP reported.
        actual: usize,
    },
    /// Something that must not be empty was.
    #[error("{what} is empty")]
    ZeroLength {
        /// What.
        what: &'static str,
    },
    /// A buffer or batch is too small for what it must hold.
    #[error("{what}: {needed} needed, {available} available")]
    TooSmall {
        /// What.
        what: &'static str,
        /// Needed (bytes or chunks).
        needed: usize,
        /// Available.
        available: usize,
    },
    /// A batch that breaks nvCOMP's rules (alignment, chunk size, layout).
    #[error("invalid batch for {codec}: {detail}")]
    InvalidBatch {
        /// The codec.
        codec: Codec,
        /// What is wrong.
        detail: String,
    },
    /// A chunk file that is not one, or not one this version reads.
    #[error("not a prism compressed chunk file: {0}")]
    NotAChunkFile(String),
    /// A chunk file cut short.
    #[error("chunk file truncated: {what} needs {needed} bytes, {available} present")]
    Truncated {
        /// The part that is cut.
        what: &'static str,
        /// Bytes it needs.
        needed: u64,
        /// Bytes present.
        available: u64,
    },
    /// A chunk file whose contents contradict themselves or their checksum.
    #[error("corrupt chunk file: {0}")]
    Corrupt(String),
    /// Reading or writing a file.
    #[error("chunk file I/O: {0}")]
    Io(#[from] std::io::Error),
    /// From prism-stream (no driver, out of memory, a fault, ...).
    #[error(transparent)]
    Stream(#[from] prism_stream::Error),
    /// From prism-buffer's ring.
    #[error(transparent)]
    Buffer(#[from] prism_buffer::Error),
    /// A stage failed on a frame.
    #[error("stage {stage} failed on frame {frame}: {source}")]
    Stage {
        /// The stage's name.
        stage: String,
        /// The frame.
        frame: u64,
        /// Its error.
        source: BoxError,
    },
    /// The sink refused a frame.
    #[error("sink failed on frame {frame}: {source}")]
    Sink {
        /// The frame.
        frame: u64,
        /// Its error.
        source: BoxError,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
