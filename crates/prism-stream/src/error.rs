//! The one error type of prism-stream.

use std::time::Duration;

use cudarc::driver::sys::CUresult;
use cudarc::driver::DriverError;

use crate::op_id::OpId;

/// Everything that can go wrong in prism-stream. Messages say what was wrong
/// and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// libcuda could not be loaded: no NVIDIA driver on this machine.
    #[error(
        "no CUDA driver: libcuda.so could not be loaded (install the NVIDIA driver to use a GPU)"
    )]
    DriverNotFound,
    /// The driver loaded but reports no CUDA device.
    #[error("the CUDA driver reports no GPU on this machine")]
    NoDevice,
    /// A device ordinal past the number of devices.
    #[error("GPU {ordinal} does not exist: the driver reports {count} device(s)")]
    InvalidDevice { ordinal: usize, count: usize },
    /// A CUDA driver call failed.
    #[error("CUDA driver call {call} failed: {source}")]
    Driver {
        call: &'static str,
        #[source]
        source: DriverError,
    },
    /// A device or pinned host allocation failed for lack of memory.
    #[error("out of {memory} memory allocating {bytes} bytes for {what}")]
    OutOfMemory {
        memory: &'static str,
        bytes: usize,
        what: &'static str,
    },
    /// A kernel launcher reported an error.
    #[error("kernel {kernel} failed to launch: {message} (code {code})")]
    Kernel {
        kernel: &'static str,
        code: i32,
        message: String,
    },
    /// The nvcc launchers were asked for in a build that has none (built
    /// without nvcc, or with the `cuda-12` feature).
    #[error("kernel {kernel} has no nvcc launcher in this build: prism-cuda-sys was built without nvcc or with `ptx-only` (use KernelSource::Ptx, or run `cargo xtask install-nvcc` / set NVCC and rebuild)")]
    KernelsNotBuilt { kernel: &'static str },
    /// The driver could not load prism's bundled PTX into the context.
    #[error("prism's kernels could not be loaded from their PTX: {source} (the PTX needs a driver for CUDA 12.0 or newer and a GPU of compute capability 7.5 or newer)")]
    PtxLoad {
        #[source]
        source: DriverError,
    },
    /// The context was made with `enable_streams = false`.
    #[error("streams are disabled on this context (it was created with enable_streams = false), so it has no {what}")]
    StreamsDisabled { what: &'static str },
    /// An op id this coordinator never handed out.
    #[error("unknown operation {0}: no operation with this id was queued on this coordinator")]
    UnknownOp(OpId),
    /// An op id handed out by another coordinator (or graph).
    #[error("operation {0} belongs to another coordinator: op ids are only valid on the coordinator that queued them")]
    ForeignOp(OpId),
    /// An op may only depend on ops queued before it.
    #[error("operation {op} cannot depend on {dep}: an operation may only depend on operations queued before it, so this would form a cycle")]
    DependencyCycle { op: OpId, dep: OpId },
    /// A dependency failed, so the new op would read garbage.
    #[error("operation {op} depends on {dep} ({dep_name}), which failed: {reason}")]
    DependencyFailed {
        op: OpId,
        dep: OpId,
        dep_name: String,
        reason: String,
    },
    /// An op failed on the GPU (a kernel fault, a failed copy).
    #[error("operation {op} ({name}) failed on the GPU: {reason}")]
    OpFailed {
        op: OpId,
        name: String,
        reason: String,
    },
    /// The driver refused a call because a CUDA stream capture is in
    /// progress (`cuStreamBeginCapture`, in global mode on any thread, or
    /// on this thread). Not a GPU failure: the context stays usable, every
    /// buffer stays tracked (a fence whose query was refused is not taken
    /// as complete), and the call can be made again once the capture ended.
    #[error("CUDA call {call} was refused while a CUDA graph capture is in progress ({source}); the context stays usable: try again once the capture has ended (or capture in relaxed or thread-local mode)")]
    CaptureInProgress {
        call: &'static str,
        #[source]
        source: DriverError,
    },
    /// An earlier GPU error left the context unusable (CUDA errors are sticky).
    #[error("the GPU context is unusable after an earlier error: {reason}")]
    ContextPoisoned { reason: String },
    /// The process-wide completion thread (`prism-complete`) that wakes
    /// awaited fences could not be started.
    #[error("the completion thread (prism-complete) that wakes awaited fences could not be started: {reason} (the OS refused a new thread; block in Fence::synchronize instead)")]
    CompletionThread { reason: String },
    /// `wait_timeout` gave up.
    #[error("operation {op} did not complete within {waited:?}")]
    Timeout { op: OpId, waited: Duration },
    /// Two lengths that must agree do not.
    #[error("length mismatch for {what}: expected {expected} elements, got {actual}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    /// Lengths that must be added up (the items of a zero-copy gather, say)
    /// add up to more than a `usize` holds: no buffer can be that long.
    #[error("the lengths of {what} add up to more than {max} elements, more than any buffer can hold; pass fewer items", max = usize::MAX)]
    LengthOverflow { what: &'static str },
    /// Two items of one batched copy would write the same bytes (the
    /// copies of a batch run in no set order, so the result would be
    /// undefined); nothing was queued. `first` and `second` index the items.
    #[error("items {first} and {second} of {what} overlap: the copies of one batch run in no set order, so their destinations must be disjoint; nothing was queued")]
    Overlap {
        what: &'static str,
        first: usize,
        second: usize,
    },
    /// The driver, or the driver API this build binds, lacks what an op
    /// needs (batched copies need `cuMemcpyBatchAsync`: a `cuda-13` build
    /// on a CUDA 13 driver); nothing was copied. The same work can be done
    /// another way (one copy per item, or prism's zero-copy kernels).
    #[error("{what} is not available here: {reason}; nothing was copied (copy item by item, or gather/scatter with the zero-copy kernels instead)")]
    DriverUnsupported { what: &'static str, reason: String },
    /// A kernel image (`Gpu::load_cubin`) whose headers point past its end,
    /// or that is no image the driver loads.
    #[error("not a whole cubin or fatbin image: {reason}; nothing was loaded")]
    InvalidImage { reason: &'static str },
    /// A zero-sized buffer or copy where data is required.
    #[error("{what} has zero length")]
    ZeroLength { what: &'static str },
    /// A host buffer that a queued GPU operation still reads or writes.
    #[error("{what} is still in use by a queued GPU operation; wait for it (or poll) first")]
    BufferInFlight { what: &'static str },
    /// An op could not claim a buffer (ordering rule 7): `here`, this
    /// thread is still queuing a conflicting op on it (an outside-work
    /// closure queued another op on a buffer its own block uses); else
    /// another thread is, while this thread is inside an op and may not
    /// wait for it.
    #[error("{what} is {}; nothing was queued: queue the op after the block returns", if *here {
        "used by an op this thread is still queuing (an outside-work block or launcher that has not returned), in a way that conflicts with this op"
    } else {
        "being queued on by another thread, and this thread is inside an outside-work block or launcher, where waiting for it could deadlock"
    })]
    BufferBusy { what: &'static str, here: bool },
    /// A pinned buffer the device cannot access directly.
    #[error("{what} is not mapped into the device's address space (zero-copy access needs a device that can map host memory)")]
    NotMapped { what: &'static str },
    /// A name the driver cannot take (it holds a NUL byte).
    #[error("{what} {name:?} contains a NUL byte, which a C string cannot hold")]
    InvalidName { what: &'static str, name: String },
    /// A buffer, kernel or stream belongs to another GPU context than the
    /// lane the work was queued on (nothing was queued).
    #[error("{what} belongs to another GPU context than the stream the work was queued on; nothing was queued")]
    WrongContext { what: &'static str },
    /// A cudarc object (a `CudaSlice`, a `CudaStream`) of another CUDA
    /// context than the GPU handle it was converted with.
    #[error("{what} belongs to another CUDA context than the GPU handle it was given with (compare `Gpu::cuda_context().cu_ctx()`); nothing changed hands")]
    ForeignContext { what: &'static str },
    /// A CUDA stream that prism will not take over or hand back.
    #[error("the CUDA stream cannot change hands: {reason}")]
    StreamRefused { reason: &'static str },
    /// The stream of a conversion is being captured into a CUDA graph.
    #[error("{what} is being captured into a CUDA graph (cuStreamBeginCapture); end the capture first; nothing changed hands")]
    StreamCapturing { what: &'static str },
    /// A buffer that a captured CUDA graph still holds cannot leave prism.
    #[error("{what} is held by a captured CUDA graph (CapturedGraph); drop the graph first")]
    InGraph { what: &'static str },
    /// Something a CUDA graph capture cannot hold (nothing was captured).
    #[error("cannot capture {what} into a CUDA graph: {reason}")]
    NotCapturable {
        what: &'static str,
        reason: &'static str,
    },
    /// A handle (an outside-work argument, a graph's read-back) used with
    /// another scope or graph than the one that made it.
    #[error("{what} belongs to another {scope}: use it only with the one that made it")]
    WrongScope {
        what: &'static str,
        scope: &'static str,
    },
    /// Device memory or a stream another library handed over
    /// (`DeviceBuffer::from_foreign`, `ForeignStream`) that prism cannot
    /// use: says why (an address the driver does not know, host memory,
    /// another device, a range past its allocation, a misaligned address).
    /// Nothing was taken over.
    #[error(
        "memory handed over by another library cannot be used: {reason}; nothing was taken over"
    )]
    ForeignMemory { reason: String },
    /// A request prism cannot serve as asked (says what instead).
    #[error("{what} is not supported: {instead}")]
    Unsupported {
        what: &'static str,
        instead: &'static str,
    },
    /// A library call (cuBLAS, cuFFT) failed.
    #[error("{library} failed: {message}")]
    Library {
        library: &'static str,
        message: String,
    },
    /// A user's closure (a coordinator op, a stage) returned its own error.
    #[error("{} failed: {source}", if op.is_empty() { "a user closure" } else { op.as_str() })]
    User {
        op: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Wraps the user's own error, for a closure that prism calls (a
    /// coordinator op, outside work): `my_call().map_err(Error::user)?`.
    /// The coordinator names the op in it; `source()` (or matching
    /// `Error::User { source, .. }` and `downcast_ref`) gives it back.
    pub fn user(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::User {
            op: String::new(),
            source: error.into(),
        }
    }
}

/// Result alias of prism-stream.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) trait DriverResultExt<T> {
    fn call(self, call: &'static str) -> Result<T>;
}

impl<T> DriverResultExt<T> for std::result::Result<T, DriverError> {
    /// A refusal because of a stream capture is `CaptureInProgress` (not a
    /// failure of the GPU), anything else `Driver`.
    fn call(self, call: &'static str) -> Result<T> {
        self.map_err(|source| {
            if is_capture_error(&source) {
                Error::CaptureInProgress { call, source }
            } else {
                Error::Driver { call, source }
            }
        })
    }
}

/// `n` elements of `what` must be non-zero and fit `capacity`.
pub(crate) fn check_len(what: &'static str, n: usize, capacity: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::ZeroLength { what });
    }
    if n > capacity {
        return Err(Error::LengthMismatch {
            what,
            expected: capacity,
            actual: n,
        });
    }
    Ok(())
}

/// Errors after which the context accepts nothing more (a fault in a
/// kernel, an uncorrectable ECC error, a torn-down driver): prism poisons
/// it. Work already queued may still run (on driver 580 a context that
/// reported another context's fault still ran a queued copy), so prism
/// frees nothing whose wait failed, sticky or not.
pub(crate) fn is_sticky(e: &DriverError) -> bool {
    use CUresult::*;
    matches!(
        e.0,
        CUDA_ERROR_ILLEGAL_ADDRESS
            | CUDA_ERROR_LAUNCH_TIMEOUT
            | CUDA_ERROR_ASSERT
            | CUDA_ERROR_HARDWARE_STACK_ERROR
            | CUDA_ERROR_ILLEGAL_INSTRUCTION
            | CUDA_ERROR_MISALIGNED_ADDRESS
            | CUDA_ERROR_INVALID_ADDRESS_SPACE
            | CUDA_ERROR_INVALID_PC
            | CUDA_ERROR_LAUNCH_FAILED
            | CUDA_ERROR_ECC_UNCORRECTABLE
            | CUDA_ERROR_CONTEXT_IS_DESTROYED
            | CUDA_ERROR_DEINITIALIZED
    )
}

/// The driver's refusals of a call because a stream capture is in
/// progress (in global mode on any thread of the process, or on the calling
/// thread). Not sticky: nothing failed on the GPU, and the same call
/// succeeds once the capture ended. The CUDA runtime's `cudaError_t` has
/// the same codes (900 to 908) for the same refusals.
const CAPTURE_ERRORS: [CUresult; 9] = [
    CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
    CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
    CUresult::CUDA_ERROR_STREAM_CAPTURE_MERGE,
    CUresult::CUDA_ERROR_STREAM_CAPTURE_UNMATCHED,
    CUresult::CUDA_ERROR_STREAM_CAPTURE_UNJOINED,
    CUresult::CUDA_ERROR_STREAM_CAPTURE_ISOLATION,
    CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
    CUresult::CUDA_ERROR_CAPTURED_EVENT,
    CUresult::CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD,
];

/// Is `e` a refusal because of a stream capture (see [`CAPTURE_ERRORS`])?
/// Such an error says nothing about the work a fence marks: it is neither
/// complete nor failed, and the context is not poisoned.
pub(crate) fn is_capture_error(e: &DriverError) -> bool {
    CAPTURE_ERRORS.contains(&e.0)
}

/// The capture refusal a launcher's status code (a `cudaError_t`) stands
/// for, if it is one.
pub(crate) fn capture_error_of_code(code: i32) -> Option<DriverError> {
    CAPTURE_ERRORS
        .iter()
        .find(|&&c| c as i32 == code)
        .map(|&c| DriverError(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A capture's refusal is never taken for a dead context (which would
    /// let a buffer be freed or read while its work may still run), and
    /// the launchers' runtime codes for the same refusals map to it.
    #[test]
    fn capture_refusals_are_not_sticky() {
        for c in CAPTURE_ERRORS {
            let e = DriverError(c);
            assert!(is_capture_error(&e), "{c:?}");
            assert!(!is_sticky(&e), "{c:?} taken for a dead context");
            assert_eq!(capture_error_of_code(c as i32).map(|e| e.0), Some(c));
        }
        // cudaErrorStreamCaptureUnsupported .. cudaErrorStreamCaptureWrongThread.
        for code in 900..=908 {
            assert!(capture_error_of_code(code).is_some(), "{code}");
        }
        for code in [0, 1, 700, 719, 909, 100_001, -1] {
            assert!(capture_error_of_code(code).is_none(), "{code}");
        }
        for sticky in [
            CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
            CUresult::CUDA_ERROR_LAUNCH_FAILED,
        ] {
            assert!(!is_capture_error(&DriverError(sticky)));
        }
    }

    /// Driver errors of a capture become `CaptureInProgress`, others `Driver`.
    #[test]
    fn capture_refusals_are_typed() {
        let refused: std::result::Result<(), DriverError> =
            Err(DriverError(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED));
        assert!(matches!(
            refused.call("cuEventQuery"),
            Err(crate::Error::CaptureInProgress {
                call: "cuEventQuery",
                ..
            })
        ));
        let other: std::result::Result<(), DriverError> =
            Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
        assert!(matches!(
            other.call("cuEventQuery"),
            Err(crate::Error::Driver { .. })
        ));
    }
}
