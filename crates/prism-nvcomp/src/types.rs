//! The codecs, element types and statuses of nvCOMP's batched API, as
//! plain values (no library call: they also name file contents and errors).

use crate::sys;

/// Alignment (bytes) prism gives every chunk it lays out, compressed or
/// not: the largest any nvCOMP 6 codec requires (ANS: 16).
pub const ALIGN: usize = 16;

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

    /// The largest uncompressed chunk prism lets nvCOMP compress with this
    /// codec (bytes). nvCOMP 6's headers disagree with themselves: the
    /// `*CompressAsync` docs say Deflate and GDeflate chunks must not
    /// exceed 64 KiB and Zstd chunks 16 MiB ("may result in undefined
    /// behaviour"), while their `MaxAllowedChunkSize` constants are far
    /// larger; the smaller limits are kept until the larger are shown safe.
    pub fn max_chunk_bytes(self) -> usize {
        match self {
            Codec::Lz4 => sys::nvcompLZ4CompressionMaxAllowedChunkSize,
            Codec::Snappy => sys::nvcompSnappyCompressionMaxAllowedChunkSize,
            Codec::Zstd => sys::nvcompZstdCompressionMaxAllowedChunkSize.min(16 << 20),
            Codec::Deflate => sys::nvcompDeflateCompressionMaxAllowedChunkSize.min(1 << 16),
            Codec::GDeflate => sys::nvcompGdeflateCompressionMaxAllowedChunkSize.min(1 << 16),
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

    pub(crate) fn nvcomp(self) -> sys::nvcompType_t {
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
