//! Each codec's options and one dispatch from [`Codec`] to each codec's functions (their
//! signatures are the same for every codec but the options type).

use crate::sys;
pub(crate) use crate::types::{Alignments, Codec, DataType, Status};
use crate::{Error, Result};

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

// The options. Decompression always uses nvCOMP's CUDA backend (`DEFAULT`
// may pick the hardware engine, whose behaviour on corrupt input nvCOMP
// leaves undefined). The CUDA backend is not safe on corrupt input either
// for every codec, hence `Decompressor::decompress` is unsafe.
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
            coarse_grained_encoding_flags: u64::from(
                sys::NVCOMP_CASCADED_COARSE_GRAINED_ENCODING_NONE,
            ),
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
            coarse_grained_encoding_flags: u64::from(
                sys::NVCOMP_CASCADED_COARSE_GRAINED_ENCODING_NONE,
            ),
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
            Codec::Lz4 => $body!(
                lz4_c,
                lz4_d,
                nvcompBatchedLZ4CompressGetRequiredAlignments,
                nvcompBatchedLZ4DecompressGetRequiredAlignments,
                nvcompBatchedLZ4CompressGetTempSize,
                nvcompBatchedLZ4CompressGetMaxOutputChunkSize,
                nvcompBatchedLZ4CompressAsync,
                nvcompBatchedLZ4DecompressGetTempSize,
                nvcompBatchedLZ4DecompressAsync
            ),
            Codec::Snappy => $body!(
                snappy_c,
                snappy_d,
                nvcompBatchedSnappyCompressGetRequiredAlignments,
                nvcompBatchedSnappyDecompressGetRequiredAlignments,
                nvcompBatchedSnappyCompressGetTempSize,
                nvcompBatchedSnappyCompressGetMaxOutputChunkSize,
                nvcompBatchedSnappyCompressAsync,
                nvcompBatchedSnappyDecompressGetTempSize,
                nvcompBatchedSnappyDecompressAsync
            ),
            Codec::Zstd => $body!(
                zstd_c,
                zstd_d,
                nvcompBatchedZstdCompressGetRequiredAlignments,
                nvcompBatchedZstdDecompressGetRequiredAlignments,
                nvcompBatchedZstdCompressGetTempSize,
                nvcompBatchedZstdCompressGetMaxOutputChunkSize,
                nvcompBatchedZstdCompressAsync,
                nvcompBatchedZstdDecompressGetTempSize,
                nvcompBatchedZstdDecompressAsync
            ),
            Codec::Deflate => $body!(
                deflate_c,
                deflate_d,
                nvcompBatchedDeflateCompressGetRequiredAlignments,
                nvcompBatchedDeflateDecompressGetRequiredAlignments,
                nvcompBatchedDeflateCompressGetTempSize,
                nvcompBatchedDeflateCompressGetMaxOutputChunkSize,
                nvcompBatchedDeflateCompressAsync,
                nvcompBatchedDeflateDecompressGetTempSize,
                nvcompBatchedDeflateDecompressAsync
            ),
            Codec::GDeflate => $body!(
                gdeflate_c,
                gdeflate_d,
                nvcompBatchedGdeflateCompressGetRequiredAlignments,
                nvcompBatchedGdeflateDecompressGetRequiredAlignments,
                nvcompBatchedGdeflateCompressGetTempSize,
                nvcompBatchedGdeflateCompressGetMaxOutputChunkSize,
                nvcompBatchedGdeflateCompressAsync,
                nvcompBatchedGdeflateDecompressGetTempSize,
                nvcompBatchedGdeflateDecompressAsync
            ),
            Codec::Cascaded => $body!(
                cascaded_c,
                cascaded_d,
                nvcompBatchedCascadedCompressGetRequiredAlignments,
                nvcompBatchedCascadedDecompressGetRequiredAlignments,
                nvcompBatchedCascadedCompressGetTempSize,
                nvcompBatchedCascadedCompressGetMaxOutputChunkSize,
                nvcompBatchedCascadedCompressAsync,
                nvcompBatchedCascadedDecompressGetTempSize,
                nvcompBatchedCascadedDecompressAsync
            ),
            Codec::Bitcomp => $body!(
                bitcomp_c,
                bitcomp_d,
                nvcompBatchedBitcompCompressGetRequiredAlignments,
                nvcompBatchedBitcompDecompressGetRequiredAlignments,
                nvcompBatchedBitcompCompressGetTempSize,
                nvcompBatchedBitcompCompressGetMaxOutputChunkSize,
                nvcompBatchedBitcompCompressAsync,
                nvcompBatchedBitcompDecompressGetTempSize,
                nvcompBatchedBitcompDecompressAsync
            ),
            Codec::Ans => $body!(
                ans_c,
                ans_d,
                nvcompBatchedANSCompressGetRequiredAlignments,
                nvcompBatchedANSDecompressGetRequiredAlignments,
                nvcompBatchedANSCompressGetTempSize,
                nvcompBatchedANSCompressGetMaxOutputChunkSize,
                nvcompBatchedANSCompressAsync,
                nvcompBatchedANSDecompressGetTempSize,
                nvcompBatchedANSDecompressAsync
            ),
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
        Ok(Alignments {
            input: a.input,
            output: a.output,
            temp: a.temp,
        })
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
        Ok(Alignments {
            input: a.input,
            output: a.output,
            temp: a.temp,
        })
    }

    /// The most bytes a chunk of at most `chunk_bytes` compresses to.
    pub fn max_compressed_bytes(
        &self,
        codec: Codec,
        t: DataType,
        chunk_bytes: usize,
    ) -> Result<usize> {
        let lib = self.lib();
        let mut out = 0usize;
        macro_rules! body {
            ($c:ident, $d:ident, $ca:ident, $da:ident, $ct:ident, $cm:ident, $($rest:ident),*) => {
                // SAFETY: writes one size_t through a pointer to a live local.
                check(codec, stringify!($cm), unsafe {
                    lib.$cm(chunk_bytes, $c(t), &mut out)
                })
            };
        }
        with_codec!(codec, body)?;
        Ok(out)
    }

    /// Temporary bytes for compressing `n` chunks of at most `chunk_bytes`.
    pub(crate) fn compress_temp_bytes(
        &self,
        codec: Codec,
        t: DataType,
        n: usize,
        chunk_bytes: usize,
    ) -> Result<usize> {
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
    pub(crate) fn decompress_temp_bytes(
        &self,
        codec: Codec,
        n: usize,
        chunk_bytes: usize,
    ) -> Result<usize> {
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
    pub(crate) unsafe fn compress_async(
        &self,
        codec: Codec,
        t: DataType,
        b: RawBatch,
    ) -> Result<()> {
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
