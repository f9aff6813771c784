//! The codecs nvCOMP offers through its batched C API, their options and
//! limits, and one dispatch from [`Codec`] to each codec's functions (their
//! signatures are the same for every codec but the options type).

use crate::sys;
use crate::{Error, Result};

/// A codec of nvCOMP's batched API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// LZ4: fast, moderate ratios on any bytes.
    Lz4,
    /// Snappy: fast, moderate ratios on any bytes.
    Snappy,
    /// Zstandard: higher ratios, slower.
    Zstd,
    /// Deflate (raw, as in zlib without its header).
    Deflate,
    /// GDeflate: Deflate laid out for GPU decompression.
    GDeflate,
    /// Cascaded: run-length, delta and bit-packing of integers (very fast on sorted or smooth data).
    Cascaded,
    /// Bitcomp: NVIDIA's lossless codec for numerical data.
    Bitcomp,
    /// ANS: an entropy coder (rANS).
    Ans,
}

impl Codec {
    /// Every codec, in a stable order.
    pub const ALL: [Codec; 8] = [
        Codec::Lz4,
        Codec::Snappy,
        Codec::Zstd,
        Codec::Deflate,
        Codec::GDeflate,
        Codec::Cascaded,
        Codec::Bitcomp,
        Codec::Ans,
    ];

    /// Lower-case name ("lz4", "gdeflate", ...).
    pub fn name(self) -> &'static str {
        match self {
            Codec::Lz4 => "lz4",
            Codec::Snappy => "snappy",
            Codec::Zstd => "zstd",
            Codec::Deflate => "deflate",
            Codec::GDeflate => "gdeflate",
            Codec::Cascaded => "cascaded",
            Codec::Bitcomp => "bitcomp",
            Codec::Ans => "ans",
        }
    }

    /// The codec named `name` (as [`name`](Self::name) spells it).
    pub fn from_name(name: &str) -> Option<Codec> {
        Codec::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The codec's number in the chunk file format (stable, never reused).
    pub fn id(self) -> u32 {
        match self {
            Codec::Lz4 => 1,
            Codec::Snappy => 2,
            Codec::Zstd => 3,
            Codec::Deflate => 4,
            Codec::GDeflate => 5,
            Codec::Cascaded => 6,
            Codec::Bitcomp => 7,
            Codec::Ans => 8,
        }
    }

    /// The codec with file-format number `id`.
    pub fn from_id(id: u32) -> Option<Codec> {
        Codec::ALL.into_iter().find(|c| c.id() == id)
    }

    /// The largest uncompressed chunk nvCOMP compresses with this codec (bytes).
    pub fn max_chunk_bytes(self) -> usize {
        match self {
            Codec::Lz4 => sys::nvcompLZ4CompressionMaxAllowedChunkSize,
            Codec::Snappy => sys::nvcompSnappyCompressionMaxAllowedChunkSize,
            Codec::Zstd => sys::nvcompZstdCompressionMaxAllowedChunkSize,
            Codec::Deflate => sys::nvcompDeflateCompressionMaxAllowedChunkSize,
            Codec::GDeflate => sys::nvcompGdeflateCompressionMaxAllowedChunkSize,
            Codec::Cascaded => sys::nvcompCascadedCompressionMaxAllowedChunkSize,
            Codec::Bitcomp => sys::nvcompBitcompCompressionMaxAllowedChunkSize,
            Codec::Ans => sys::nvcompANSCompressionMaxAllowedChunkSize,
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The element type a codec is told the data has (Cascaded and Bitcomp
/// model integers of this width; the byte codecs ignore it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// Bytes.
    U8,
    /// 16-bit words.
    U16,
    /// 32-bit words (also `f32`, `i32` as bits).
    U32,
    /// 64-bit words (also `f64` as bits).
    U64,
}

impl DataType {
    /// The unsigned type of `bytes` bytes (1, 2, 4, 8).
    pub fn of_size(bytes: usize) -> Option<DataType> {
        match bytes {
            1 => Some(DataType::U8),
            2 => Some(DataType::U16),
            4 => Some(DataType::U32),
            8 => Some(DataType::U64),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DataType::U8 => 1,
            DataType::U16 => 2,
            DataType::U32 => 4,
            DataType::U64 => 8,
        }
    }

    fn nvcomp(self) -> sys::nvcompType_t {
        match self {
            DataType::U8 => sys::NVCOMP_TYPE_UCHAR,
            DataType::U16 => sys::NVCOMP_TYPE_USHORT,
            DataType::U32 => sys::NVCOMP_TYPE_UINT,
            DataType::U64 => sys::NVCOMP_TYPE_ULONGLONG,
        }
    }
}

/// An nvCOMP status (`nvcompStatus_t`), named when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub i32);

impl Status {
    /// `nvcompSuccess`.
    pub fn is_success(self) -> bool {
        self.0 == sys::nvcompSuccess as i32
    }

    /// The status's name in nvCOMP's headers.
    pub fn name(self) -> &'static str {
        match self.0 as sys::nvcompStatus_t {
            sys::nvcompSuccess => "nvcompSuccess",
            sys::nvcompErrorInvalidValue => "nvcompErrorInvalidValue",
            sys::nvcompErrorNotSupported => "nvcompErrorNotSupported",
            sys::nvcompErrorCannotDecompress => "nvcompErrorCannotDecompress",
            sys::nvcompErrorBadChecksum => "nvcompErrorBadChecksum",
            sys::nvcompErrorCannotVerifyChecksums => "nvcompErrorCannotVerifyChecksums",
            sys::nvcompErrorOutputBufferTooSmall => "nvcompErrorOutputBufferTooSmall",
            sys::nvcompErrorWrongHeaderLength => "nvcompErrorWrongHeaderLength",
            sys::nvcompErrorAlignment => "nvcompErrorAlignment",
            sys::nvcompErrorChunkSizeTooLarge => "nvcompErrorChunkSizeTooLarge",
            sys::nvcompErrorCannotCompress => "nvcompErrorCannotCompress",
            sys::nvcompErrorWrongInputLength => "nvcompErrorWrongInputLength",
            sys::nvcompErrorBatchSizeTooLarge => "nvcompErrorBatchSizeTooLarge",
            sys::nvcompErrorSubChunkCountTooLarge => "nvcompErrorSubChunkCountTooLarge",
            sys::nvcompErrorSubChunkCountTooSmall => "nvcompErrorSubChunkCountTooSmall",
            sys::nvcompErrorOutputBufferAlignmentTooSmall => {
                "nvcompErrorOutputBufferAlignmentTooSmall"
            }
            sys::nvcompErrorCudaError => "nvcompErrorCudaError",
            sys::nvcompErrorInternal => "nvcompErrorInternal",
            _ => "unknown nvcompStatus_t",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// Alignments (bytes) nvCOMP requires of chunk inputs, outputs and temp space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignments {
    /// Of each input chunk.
    pub input: usize,
    /// Of each output chunk.
    pub output: usize,
    /// Of the temporary space.
    pub temp: usize,
}

fn check(codec: Codec, call: &'static str, status: sys::nvcompStatus_t) -> Result<()> {
    if status == sys::nvcompSuccess {
        Ok(())
    } else {
        Err(Error::Call {
            call,
            codec,
            status: Status(status as i32),
        })
    }
}

// The options. Decompression always uses nvCOMP's CUDA backend: with the
// hardware engine (`DEFAULT` may pick it) a corrupt input is undefined
// behaviour, and prism reads inputs it cannot vouch for.
const CUDA: sys::nvcompDecompressBackend_t = sys::NVCOMP_DECOMPRESS_BACKEND_CUDA;

fn lz4_c(_: DataType) -> sys::nvcompBatchedLZ4CompressOpts_t {
    sys::nvcompBatchedLZ4CompressOpts_t {
        data_type: sys::NVCOMP_TYPE_CHAR,
        bitshuffle_mode: sys::NVCOMP_BITSHUFFLE_NONE,
        ..Default::default()
    }
}
fn lz4_d() -> sys::nvcompBatchedLZ4DecompressOpts_t {
    sys::nvcompBatchedLZ4DecompressOpts_t {
        backend: CUDA,
        data_type: sys::NVCOMP_TYPE_CHAR,
        bitshuffle_mode: sys::NVCOMP_BITSHUFFLE_NONE,
        ..Default::default()
    }
}
fn snappy_c(_: DataType) -> sys::nvcompBatchedSnappyCompressOpts_t {
    Default::default()
}
fn snappy_d() -> sys::nvcompBatchedSnappyDecompressOpts_t {
    sys::nvcompBatchedSnappyDecompressOpts_t {
        backend: CUDA,
        ..Default::default()
    }
}
fn zstd_c(_: DataType) -> sys::nvcompBatchedZstdCompressOpts_t {
    Default::default()
}
fn zstd_d() -> sys::nvcompBatchedZstdDecompressOpts_t {
    sys::nvcompBatchedZstdDecompressOpts_t {
        backend: CUDA,
        ..Default::default()
    }
}
fn deflate_c(_: DataType) -> sys::nvcompBatchedDeflateCompressOpts_t {
    // nvCOMP's default (algorithm 1: high throughput, lower ratio).
    sys::nvcompBatchedDeflateCompressOpts_t {
        algorithm: 1,
        ..Default::default()
    }
}
fn deflate_d() -> sys::nvcompBatchedDeflateDecompressOpts_t {
    sys::nvcompBatchedDeflateDecompressOpts_t {
        backend: CUDA,
        ..Default::default()
    }
}
fn gdeflate_c(_: DataType) -> sys::nvcompBatchedGdeflateCompressOpts_t {
    sys::nvcompBatchedGdeflateCompressOpts_t {
        algorithm: 1,
        ..Default::default()
    }
}
fn gdeflate_d() -> sys::nvcompBatchedGdeflateDecompressOpts_t {
    sys::nvcompBatchedGdeflateDecompressOpts_t {
        backend: CUDA,
        ..Default::default()
    }
}
fn cascaded_c(t: DataType) -> sys::nvcompBatchedCascadedCompressOpts_t {
    // nvCOMP's defaults (asymmetric mode, bit-packing, every fine-grained
    // encoding, level 3) with the data's integer width.
    sys::nvcompBatchedCascadedCompressOpts_t {
        common_opts: sys::nvcompCascadedCommonOpts_t {
            data_type: t.nvcomp(),
            mode: sys::NVCOMP_CASCADED_MODE_ASYMMETRIC,
            terminal_codec_flags: u64::from(sys::NVCOMP_CASCADED_TERMINAL_CODEC_CASCADED_BITPACK),
            coarse_grained_encoding_flags: u64::from(sys::NVCOMP_CASCADED_COARSE_GRAINED_ENCODING_NONE),
        },
        fine_grained_encoding_flags: u64::from(sys::NVCOMP_CASCADED_FINE_GRAINED_ENCODING_ALL),
        compression_level: 3,
        ..Default::default()
    }
}
fn cascaded_d() -> sys::nvcompBatchedCascadedDecompressOpts_t {
    // Unspecified type and mode: read from each chunk's header.
    sys::nvcompBatchedCascadedDecompressOpts_t {
        backend: CUDA,
        common_opts: sys::nvcompCascadedCommonOpts_t {
            data_type: sys::NVCOMP_TYPE_BITS,
            mode: sys::NVCOMP_CASCADED_MODE_UNSPECIFIED,
            terminal_codec_flags: u64::from(sys::NVCOMP_CASCADED_TERMINAL_CODEC_UNSPECIFIED),
            coarse_grained_encoding_flags: u64::from(sys::NVCOMP_CASCADED_COARSE_GRAINED_ENCODING_NONE),
        },
        ..Default::default()
    }
}
fn bitcomp_c(t: DataType) -> sys::nvcompBatchedBitcompCompressOpts_t {
    sys::nvcompBatchedBitcompCompressOpts_t {
        algorithm: 0,
        data_type: t.nvcomp(),
        delta: 0.0,
        mode: sys::BITCOMP_LOSSLESS,
        ..Default::default()
    }
}
fn bitcomp_d() -> sys::nvcompBatchedBitcompDecompressOpts_t {
    sys::nvcompBatchedBitcompDecompressOpts_t {
        backend: CUDA,
        ..Default::default()
    }
}
fn ans_c(_: DataType) -> sys::nvcompBatchedANSCompressOpts_t {
    sys::nvcompBatchedANSCompressOpts_t {
        type_: sys::nvcomp_rANS,
        data_type: sys::NVCOMP_TYPE_CHAR,
        ..Default::default()
    }
}
fn ans_d() -> sys::nvcompBatchedANSDecompressOpts_t {
    sys::nvcompBatchedANSDecompressOpts_t {
        backend: CUDA,
        data_type: sys::NVCOMP_TYPE_BITS,
        ..Default::default()
    }
}

/// Calls `$body!` with the codec's option constructors and functions.
macro_rules! with_codec {
    ($codec:expr, $body:ident) => {
        match $codec {
            Codec::Lz4 => $body!(lz4_c, lz4_d, nvcompBatchedLZ4CompressGetRequiredAlignments, nvcompBatchedLZ4DecompressGetRequiredAlignments, nvcompBatchedLZ4CompressGetTempSize, nvcompBatchedLZ4CompressGetMaxOutputChunkSize, nvcompBatchedLZ4CompressAsync, nvcompBatchedLZ4DecompressGetTempSize, nvcompBatchedLZ4DecompressAsync),
            Codec::Snappy => $body!(snappy_c, snappy_d, nvcompBatchedSnappyCompressGetRequiredAlignments, nvcompBatchedSnappyDecompressGetRequiredAlignments, nvcompBatchedSnappyCompressGetTempSize, nvcompBatchedSnappyCompressGetMaxOutputChunkSize, nvcompBatchedSnappyCompressAsync, nvcompBatchedSnappyDecompressGetTempSize, nvcompBatchedSnappyDecompressAsync),
            Codec::Zstd => $body!(zstd_c, zstd_d, nvcompBatchedZstdCompressGetRequiredAlignments, nvcompBatchedZstdDecompressGetRequiredAlignments, nvcompBatchedZstdCompressGetTempSize, nvcompBatchedZstdCompressGetMaxOutputChunkSize, nvcompBatchedZstdCompressAsync, nvcompBatchedZstdDecompressGetTempSize, nvcompBatchedZstdDecompressAsync),
            Codec::Deflate => $body!(deflate_c, deflate_d, nvcompBatchedDeflateCompressGetRequiredAlignments, nvcompBatchedDeflateDecompressGetRequiredAlignments, nvcompBatchedDeflateCompressGetTempSize, nvcompBatchedDeflateCompressGetMaxOutputChunkSize, nvcompBatchedDeflateCompressAsync, nvcompBatchedDeflateDecompressGetTempSize, nvcompBatchedDeflateDecompressAsync),
            Codec::GDeflate => $body!(gdeflate_c, gdeflate_d, nvcompBatchedGdeflateCompressGetRequiredAlignments, nvcompBatchedGdeflateDecompressGetRequiredAlignments, nvcompBatchedGdeflateCompressGetTempSize, nvcompBatchedGdeflateCompressGetMaxOutputChunkSize, nvcompBatchedGdeflateCompressAsync, nvcompBatchedGdeflateDecompressGetTempSize, nvcompBatchedGdeflateDecompressAsync),
            Codec::Cascaded => $body!(cascaded_c, cascaded_d, nvcompBatchedCascadedCompressGetRequiredAlignments, nvcompBatchedCascadedDecompressGetRequiredAlignments, nvcompBatchedCascadedCompressGetTempSize, nvcompBatchedCascadedCompressGetMaxOutputChunkSize, nvcompBatchedCascadedCompressAsync, nvcompBatchedCascadedDecompressGetTempSize, nvcompBatchedCascadedDecompressAsync),
            Codec::Bitcomp => $body!(bitcomp_c, bitcomp_d, nvcompBatchedBitcompCompressGetRequiredAlignments, nvcompBatchedBitcompDecompressGetRequiredAlignments, nvcompBatchedBitcompCompressGetTempSize, nvcompBatchedBitcompCompressGetMaxOutputChunkSize, nvcompBatchedBitcompCompressAsync, nvcompBatchedBitcompDecompressGetTempSize, nvcompBatchedBitcompDecompressAsync),
            Codec::Ans => $body!(ans_c, ans_d, nvcompBatchedANSCompressGetRequiredAlignments, nvcompBatchedANSDecompressGetRequiredAlignments, nvcompBatchedANSCompressGetTempSize, nvcompBatchedANSCompressGetMaxOutputChunkSize, nvcompBatchedANSCompressAsync, nvcompBatchedANSDecompressGetTempSize, nvcompBatchedANSDecompressAsync),
        }
    };
}

/// The raw arguments of one batched call (device addresses, bytes).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawBatch {
    /// Device array of `n` input chunk addresses.
    pub in_ptrs: u64,
    /// Device array of `n` input sizes (`size_t`).
    pub in_sizes: u64,
    /// Device array of `n` output chunk addresses.
    pub out_ptrs: u64,
    /// Device array of `n` output capacities (decompression only).
    pub out_caps: u64,
    /// Device array of `n` sizes nvCOMP writes.
    pub out_sizes: u64,
    /// Chunks.
    pub n: usize,
    /// Largest uncompressed chunk (compression only).
    pub max_chunk: usize,
    /// Temporary space and its size.
    pub temp: u64,
    pub temp_bytes: usize,
    /// Device array of `n` statuses.
    pub statuses: u64,
    /// The stream (`CUstream`).
    pub stream: sys::cudaStream_t,
}

/// What one codec needs and allows, queried from the library.
impl crate::Nvcomp {
    /// Alignments of compression's input chunks, output chunks and temp space.
    pub fn compress_alignments(&self, codec: Codec, t: DataType) -> Result<Alignments> {
        let lib = self.lib();
        let mut a = sys::nvcompAlignmentRequirements_t::default();
        macro_rules! body {
            ($c:ident, $d:ident, $ca:ident, $da:ident, $($rest:ident),*) => {
                // SAFETY: writes one nvcompAlignmentRequirements_t through a
                // pointer to a live local; the options are plain values.
                check(codec, stringify!($ca), unsafe { lib.$ca($c(t), &mut a) })
            };
        }
        with_codec!(codec, body)?;
        Ok(Alignments { input: a.input, output: a.output, temp: a.temp })
    }

    /// Alignments of decompression's input chunks, output chunks and temp space.
    pub fn decompress_alignments(&self, codec: Codec) -> Result<Alignments> {
        let lib = self.lib();
        let mut a = sys::nvcompAlignmentRequirements_t::default();
        macro_rules! body {
            ($c:ident, $d:ident, $ca:ident, $da:ident, $($rest:ident),*) => {
                // SAFETY: as in compress_alignments.
                check(codec, stringify!($da), unsafe { lib.$da($d(), &mut a) })
            };
        }
        with_codec!(codec, body)?;
        Ok(Alignments { input: a.input, output: a.output, temp: a.temp })
    }

    /// The most bytes a chunk of at most `chunk_bytes` compresses to.
    pub fn max_compressed_bytes(&self, codec: Codec, t: DataType, chunk_bytes: usize) -> Result<usize> {
        let lib = self.lib();
        let mut out = 0usize;
        macro_rules! body {
            ($c:ident, $d:ident, $ca:ident, $da:ident, $ct:ident, $cm:ident, $($rest:ident),*) => {
                // SAFETY: writes one size_t through a pointer to a live local.
                check(codec, stringify!($cm), unsafe { lib.$cm(chunk_bytes, $c(t), &mut out) })
            };
        }
        with_codec!(codec, body)?;
        Ok(out)
    }

    /// Temporary bytes for compressing `n` chunks of at most `chunk_bytes`.
    pub(crate) fn compress_temp_bytes(&self, codec: Codec, t: DataType, n: usize, chunk_bytes: usize) -> Result<usize> {
        let lib = self.lib();
        let mut out = 0usize;
        let total = n.saturating_mul(chunk_bytes);
        macro_rules! body {
            ($c:ident, $d:ident, $ca:ident, $da:ident, $ct:ident, $($rest:ident),*) => {
                // SAFETY: the size query enqueues no work (nvCOMP's
                // documentation), so the null stream is never used; it
                // writes one size_t through a pointer to a live local.
                check(codec, stringify!($ct), unsafe {
                    lib.$ct(n, chunk_bytes, $c(t), &mut out, total, std::ptr::null_mut())
                })
            };
        }
        with_codec!(codec, body)?;
        Ok(out)
    }

    /// Temporary bytes for decompressing `n` chunks of at most `chunk_bytes`.
    pub(crate) fn decompress_temp_bytes(&self, codec: Codec, n: usize, chunk_bytes: usize) -> Result<usize> {
        let lib = self.lib();
        let mut out = 0usize;
        let total = n.saturating_mul(chunk_bytes);
        macro_rules! body {
            ($c:ident, $d:ident, $ca:ident, $da:ident, $ct:ident, $cm:ident, $cc:ident, $dt:ident, $dd:ident) => {
                // SAFETY: as in compress_temp_bytes.
                check(codec, stringify!($dt), unsafe {
                    lib.$dt(n, chunk_bytes, $d(), &mut out, total, std::ptr::null_mut())
                })
            };
        }
        with_codec!(codec, body)?;
        Ok(out)
    }

    /// Queues a batched compression.
    ///
    /// # Safety
    ///
    /// Every address in `b` is device memory of the stream's context, ordered
    /// on `b.stream` after its conflicting uses and before its later ones,
    /// alive until the work ends; the arrays hold `b.n` entries; each input
    /// chunk holds its size in bytes (at most `b.max_chunk`), each output
    /// chunk [`max_compressed_bytes`](Self::max_compressed_bytes); every
    /// address meets [`compress_alignments`](Self::compress_alignments); the
    /// temp space is at least [`compress_temp_bytes`](Self::compress_temp_bytes)
    /// for `b.n` chunks of `b.max_chunk`.
    pub(crate) unsafe fn compress_async(&self, codec: Codec, t: DataType, b: RawBatch) -> Result<()> {
        let lib = self.lib();
        macro_rules! body {
            ($c:ident, $d:ident, $ca:ident, $da:ident, $ct:ident, $cm:ident, $cc:ident, $dt:ident, $dd:ident) => {
                // SAFETY: the caller's contract covers every pointer.
                check(codec, stringify!($cc), unsafe {
                    lib.$cc(
                        b.in_ptrs as *const *const std::ffi::c_void,
                        b.in_sizes as *const usize,
                        b.max_chunk,
                        b.n,
                        b.temp as *mut std::ffi::c_void,
                        b.temp_bytes,
                        b.out_ptrs as *const *mut std::ffi::c_void,
                        b.out_sizes as *mut usize,
                        $c(t),
                        b.statuses as *mut sys::nvcompStatus_t,
                        b.stream,
                    )
                })
            };
        }
        with_codec!(codec, body)
    }

    /// Queues a batched decompression (nvCOMP's CUDA backend).
    ///
    /// # Safety
    ///
    /// As [`compress_async`](Self::compress_async): every address is ordered
    /// device memory alive until the work ends; each output chunk holds its
    /// capacity in `b.out_caps`; each input chunk its size in `b.in_sizes`;
    /// alignments meet [`decompress_alignments`](Self::decompress_alignments);
    /// the temp space is at least `decompress_temp_bytes` for `b.n` chunks.
    pub(crate) unsafe fn decompress_async(&self, codec: Codec, b: RawBatch) -> Result<()> {
        let lib = self.lib();
        macro_rules! body {
            ($c:ident, $d:ident, $ca:ident, $da:ident, $ct:ident, $cm:ident, $cc:ident, $dt:ident, $dd:ident) => {
                // SAFETY: the caller's contract covers every pointer.
                check(codec, stringify!($dd), unsafe {
                    lib.$dd(
                        b.in_ptrs as *const *const std::ffi::c_void,
                        b.in_sizes as *const usize,
                        b.out_caps as *const usize,
                        b.out_sizes as *mut usize,
                        b.n,
                        b.temp as *mut std::ffi::c_void,
                        b.temp_bytes,
                        b.out_ptrs as *const *mut std::ffi::c_void,
                        $d(),
                        b.statuses as *mut sys::nvcompStatus_t,
                        b.stream,
                    )
                })
            };
        }
        with_codec!(codec, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_round_trip_and_are_distinct() {
        for c in Codec::ALL {
            assert_eq!(Codec::from_id(c.id()), Some(c));
            assert_eq!(Codec::from_name(c.name()), Some(c));
        }
        let mut ids: Vec<u32> = Codec::ALL.iter().map(|c| c.id()).collect();
        ids.dedup();
        assert_eq!(ids.len(), Codec::ALL.len());
        assert_eq!(Codec::from_id(0), None);
        assert_eq!(Codec::from_name("gzip"), None);
    }

    #[test]
    fn statuses_are_named() {
        assert!(Status(0).is_success());
        assert_eq!(Status(12).name(), "nvcompErrorCannotDecompress");
        assert_eq!(Status(-3).name(), "unknown nvcompStatus_t");
        assert!(Status(12).to_string().contains("(12)"));
    }

    #[test]
    fn data_types_by_size() {
        for s in [1, 2, 4, 8] {
            assert_eq!(DataType::of_size(s).map(DataType::size), Some(s));
        }
        assert_eq!(DataType::of_size(3), None);
    }
}
