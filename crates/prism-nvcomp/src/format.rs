//! The compressed chunk file: data compressed once, streamed back chunk by
//! chunk. Host code only (no GPU, no nvCOMP), so it is tested everywhere.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! header   64 bytes  magic "PRISMNVC", version u32, codec u32, element size u32,
//!                    reserved u32, chunk bytes u64 (uncompressed), 24 zero bytes
//! payload            the compressed chunks in order, each starting at a multiple
//!                    of ALIGN (16) bytes from the payload's start, zero padding
//! table    24 * n    per chunk: compressed bytes u64, uncompressed bytes u64,
//!                    checksum u64 (of the compressed bytes)
//! trailer  48 bytes  chunk count u64, uncompressed total u64, payload bytes u64,
//!                    checksum u64 (of header and table), 8 zero bytes, magic "PRISMEND"
//! ```
//!
//! Every chunk but the last expands to exactly the header's chunk bytes. A
//! reader ([`ChunkFileReader`]) checks the magic, version, codec, the sizes
//! against the file's length and one another, and the header-and-table
//! checksum when it opens; each chunk's checksum when it reads it. Anything
//! wrong is a typed error ([`Error::NotAChunkFile`], [`Error::Truncated`],
//! [`Error::Corrupt`]), never a panic.

use std::io::{Read, Seek, SeekFrom, Write};

use crate::batch::ChunkLoc;
use crate::types::Codec;
use crate::{Error, Result};

/// Alignment of every chunk in the payload (and in a frame read from it).
pub use crate::types::ALIGN;
/// The format's version.
pub const VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"PRISMNVC";
const MAGIC_END: &[u8; 8] = b"PRISMEND";
const HEADER: u64 = 64;
const ENTRY: u64 = 24;
const TRAILER: u64 = 48;

/// A 64-bit checksum of `bytes` (word-wise multiply-rotate, several GB/s;
/// it detects accidental damage, not tampering).
pub fn checksum(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h: u64 = 0x243F_6A88_85A3_08D3 ^ (bytes.len() as u64).wrapping_mul(K);
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h ^ v).wrapping_mul(K).rotate_left(29);
    }
    let mut tail = [0u8; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    h ^ (h >> 31)
}

/// What a chunk file says about its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    /// The codec the chunks were compressed with.
    pub codec: Codec,
    /// Bytes per element of the data (1, 2, 4, 8).
    pub element_size: u32,
    /// Uncompressed bytes of every chunk (the last may hold fewer).
    pub chunk_bytes: u64,
    /// Chunks.
    pub chunks: u64,
    /// Uncompressed bytes in all.
    pub total_bytes: u64,
    /// Bytes of the payload (compressed chunks with their padding).
    pub payload_bytes: u64,
}

impl FileInfo {
    /// Uncompressed ÷ payload bytes.
    pub fn ratio(&self) -> f64 {
        self.total_bytes as f64 / self.payload_bytes.max(1) as f64
    }
}

fn header_bytes(codec: Codec, element_size: u32, chunk_bytes: u64) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&codec.id().to_le_bytes());
    h[16..20].copy_from_slice(&element_size.to_le_bytes());
    h[24..32].copy_from_slice(&chunk_bytes.to_le_bytes());
    h
}

fn padded(n: u64) -> Option<u64> {
    n.checked_add(ALIGN as u64 - 1)
        .map(|x| x / ALIGN as u64 * ALIGN as u64)
}

/// A zeroed buffer of `n` bytes, or a typed error where memory runs out (a
/// file's table is sized from the file, which may be sparse and huge).
fn zeroed(n: u64, what: &str) -> Result<Vec<u8>> {
    let n = usize::try_from(n).map_err(|_| Error::Corrupt(format!("{what} of {n} bytes")))?;
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| Error::Corrupt(format!("{what} of {n} bytes does not fit in memory")))?;
    v.resize(n, 0);
    Ok(v)
}

/// The largest chunk size a file may record (no codec takes more).
const MAX_CHUNK_BYTES: u64 = u32::MAX as u64;

/// Writes a chunk file: [`new`](Self::new), one [`push`](Self::push) per
/// compressed chunk in order, then [`finish`](Self::finish).
#[derive(Debug)]
pub struct ChunkFileWriter<W: Write> {
    out: W,
    header: [u8; HEADER as usize],
    chunk_bytes: u64,
    table: Vec<u8>,
    total: u64,
    payload: u64,
    last_short: bool,
}

impl<W: Write> ChunkFileWriter<W> {
    /// Starts a file of chunks of `chunk_bytes` uncompressed bytes of
    /// elements of `element_size` bytes, compressed with `codec`.
    pub fn new(mut out: W, codec: Codec, element_size: u32, chunk_bytes: u64) -> Result<Self> {
        if chunk_bytes > MAX_CHUNK_BYTES {
            return Err(Error::Corrupt(format!(
                "chunk size {chunk_bytes}: no codec takes chunks above {MAX_CHUNK_BYTES} bytes"
            )));
        }
        if chunk_bytes == 0 {
            return Err(Error::ZeroLength { what: "chunk size" });
        }
        if ![1, 2, 4, 8].contains(&element_size)
            || !chunk_bytes.is_multiple_of(u64::from(element_size))
        {
            return Err(Error::Corrupt(format!(
                "element size {element_size} (1, 2, 4 or 8, dividing the chunk's {chunk_bytes} bytes)"
            )));
        }
        let header = header_bytes(codec, element_size, chunk_bytes);
        out.write_all(&header)?;
        Ok(Self {
            out,
            header,
            chunk_bytes,
            table: Vec::new(),
            total: 0,
            payload: 0,
            last_short: false,
        })
    }

    /// Appends one compressed chunk that expands to `uncompressed` bytes
    /// (the chunk size, or fewer for the last chunk).
    pub fn push(&mut self, compressed: &[u8], uncompressed: u64) -> Result<()> {
        if compressed.is_empty() || uncompressed == 0 {
            return Err(Error::ZeroLength { what: "chunk" });
        }
        if uncompressed > self.chunk_bytes || self.last_short {
            return Err(Error::Corrupt(format!(
                "chunk {} expands to {uncompressed} bytes: only the last chunk may hold fewer than {}",
                self.table.len() as u64 / ENTRY,
                self.chunk_bytes
            )));
        }
        self.last_short = uncompressed < self.chunk_bytes;
        self.out.write_all(compressed)?;
        // A slice's length is far below u64::MAX - ALIGN.
        let pad = padded(compressed.len() as u64).unwrap_or(0) - compressed.len() as u64;
        self.out.write_all(&[0u8; ALIGN][..pad as usize])?;
        self.table
            .extend_from_slice(&(compressed.len() as u64).to_le_bytes());
        self.table.extend_from_slice(&uncompressed.to_le_bytes());
        self.table
            .extend_from_slice(&checksum(compressed).to_le_bytes());
        self.total += uncompressed;
        self.payload += compressed.len() as u64 + pad;
        Ok(())
    }

    /// Writes the table and trailer; returns the writer and what the file holds.
    pub fn finish(mut self) -> Result<(W, FileInfo)> {
        let chunks = self.table.len() as u64 / ENTRY;
        if chunks == 0 {
            return Err(Error::ZeroLength {
                what: "chunk file (no chunk pushed)",
            });
        }
        self.out.write_all(&self.table)?;
        let mut t = [0u8; TRAILER as usize];
        t[..8].copy_from_slice(&chunks.to_le_bytes());
        t[8..16].copy_from_slice(&self.total.to_le_bytes());
        t[16..24].copy_from_slice(&self.payload.to_le_bytes());
        let mut covered = self.header.to_vec();
        covered.extend_from_slice(&self.table);
        covered.extend_from_slice(&t[..24]);
        t[24..32].copy_from_slice(&checksum(&covered).to_le_bytes());
        t[40..48].copy_from_slice(MAGIC_END);
        self.out.write_all(&t)?;
        self.out.flush()?;
        let (codec, element_size) = parse_header(&self.header)?;
        Ok((
            self.out,
            FileInfo {
                codec,
                element_size,
                chunk_bytes: self.chunk_bytes,
                chunks,
                total_bytes: self.total,
                payload_bytes: self.payload,
            },
        ))
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn parse_header(h: &[u8]) -> Result<(Codec, u32)> {
    if &h[..8] != MAGIC {
        return Err(Error::NotAChunkFile("bad magic".into()));
    }
    let version = u32_at(h, 8);
    if version != VERSION {
        return Err(Error::NotAChunkFile(format!(
            "version {version}, this reader reads {VERSION}"
        )));
    }
    let codec = Codec::from_id(u32_at(h, 12))
        .ok_or_else(|| Error::Corrupt(format!("unknown codec number {}", u32_at(h, 12))))?;
    let element_size = u32_at(h, 16);
    if ![1, 2, 4, 8].contains(&element_size) {
        return Err(Error::Corrupt(format!("element size {element_size}")));
    }
    Ok((codec, element_size))
}

/// One chunk's place in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// From the payload's start.
    offset: u64,
    compressed: u64,
    uncompressed: u64,
    checksum: u64,
}

/// Reads a chunk file (see the module docs): checked when opened, then
/// frames of consecutive chunks read on demand.
#[derive(Debug)]
pub struct ChunkFileReader<R: Read + Seek> {
    src: R,
    info: FileInfo,
    entries: Vec<Entry>,
    verify: bool,
}

impl<R: Read + Seek> ChunkFileReader<R> {
    /// Opens and checks a chunk file (header, trailer, table, sizes and
    /// the header-and-table checksum).
    pub fn open(mut src: R) -> Result<Self> {
        let _span = tracing::debug_span!("prism.nvcomp.open_chunk_file").entered();
        let len = src.seek(SeekFrom::End(0))?;
        let min = HEADER + TRAILER;
        if len < min {
            return Err(Error::Truncated {
                what: "header and trailer",
                needed: min,
                available: len,
            });
        }
        let mut header = [0u8; HEADER as usize];
        src.seek(SeekFrom::Start(0))?;
        src.read_exact(&mut header)?;
        let (codec, element_size) = parse_header(&header)?;
        let chunk_bytes = u64_at(&header, 24);
        if chunk_bytes == 0
            || chunk_bytes > MAX_CHUNK_BYTES
            || !chunk_bytes.is_multiple_of(u64::from(element_size))
        {
            return Err(Error::Corrupt(format!(
                "chunk size {chunk_bytes} for elements of {element_size} bytes"
            )));
        }
        let mut t = [0u8; TRAILER as usize];
        src.seek(SeekFrom::Start(len - TRAILER))?;
        src.read_exact(&mut t)?;
        if &t[40..48] != MAGIC_END {
            return Err(Error::Truncated {
                what: "trailer (end magic missing)",
                needed: min,
                available: len,
            });
        }
        if t[32..40].iter().any(|&b| b != 0) {
            return Err(Error::Corrupt(
                "trailer's reserved bytes are not zero".into(),
            ));
        }
        let (chunks, total, payload) = (u64_at(&t, 0), u64_at(&t, 8), u64_at(&t, 16));
        let table_len = chunks
            .checked_mul(ENTRY)
            .ok_or_else(|| Error::Corrupt(format!("{chunks} chunks")))?;
        let needed = [HEADER, payload, table_len, TRAILER]
            .iter()
            .try_fold(0u64, |a, &b| a.checked_add(b))
            .ok_or_else(|| Error::Corrupt("sizes overflow".into()))?;
        if needed != len {
            return Err(if needed > len {
                Error::Truncated {
                    what: "payload and table",
                    needed,
                    available: len,
                }
            } else {
                Error::Corrupt(format!("{len} bytes, the trailer accounts for {needed}"))
            });
        }
        if chunks == 0 {
            return Err(Error::Corrupt("no chunks".into()));
        }
        let mut table = zeroed(table_len, "the chunk table")?;
        src.seek(SeekFrom::Start(HEADER + payload))?;
        src.read_exact(&mut table)?;
        let mut covered = header.to_vec();
        covered.extend_from_slice(&table);
        covered.extend_from_slice(&t[..24]);
        if checksum(&covered) != u64_at(&t, 24) {
            return Err(Error::Corrupt("header and table checksum mismatch".into()));
        }
        let mut entries = Vec::new();
        entries
            .try_reserve_exact(usize::try_from(chunks).unwrap_or(usize::MAX))
            .map_err(|_| Error::Corrupt(format!("{chunks} chunks do not fit in memory")))?;
        let (mut offset, mut sum) = (0u64, 0u64);
        for i in 0..chunks as usize {
            let e = &table[i * ENTRY as usize..];
            let (compressed, uncompressed) = (u64_at(e, 0), u64_at(e, 8));
            let last = i + 1 == chunks as usize;
            if compressed == 0
                || compressed > payload
                || uncompressed == 0
                || uncompressed > chunk_bytes
                || (!last && uncompressed != chunk_bytes)
            {
                return Err(Error::Corrupt(format!(
                    "chunk {i}: {compressed} compressed, {uncompressed} uncompressed bytes"
                )));
            }
            entries.push(Entry {
                offset,
                compressed,
                uncompressed,
                checksum: u64_at(e, 16),
            });
            offset = padded(compressed)
                .and_then(|p| offset.checked_add(p))
                .ok_or_else(|| Error::Corrupt("offsets overflow".into()))?;
            sum = sum
                .checked_add(uncompressed)
                .ok_or_else(|| Error::Corrupt("sizes overflow".into()))?;
        }
        if offset != payload || sum != total {
            return Err(Error::Corrupt(format!(
                "table sums to {offset} payload and {sum} uncompressed bytes, trailer says {payload} and {total}"
            )));
        }
        let info = FileInfo {
            codec,
            element_size,
            chunk_bytes,
            chunks,
            total_bytes: total,
            payload_bytes: payload,
        };
        Ok(Self {
            src,
            info,
            entries,
            verify: true,
        })
    }

    /// What the file holds.
    pub fn info(&self) -> FileInfo {
        self.info
    }

    /// Whether [`read_frame`](Self::read_frame) checks each chunk's
    /// checksum (default on).
    pub fn set_verify(&mut self, verify: bool) {
        self.verify = verify;
    }

    /// Payload bytes of chunks `first..first + count` (with padding), the
    /// room a frame of them takes.
    pub fn frame_bytes(&self, first: usize, count: usize) -> Result<usize> {
        let (a, b) = self.range(first, count)?;
        Ok((b - a) as usize)
    }

    /// The most payload bytes of any `count` consecutive chunks (frames
    /// start at multiples of `count`).
    pub fn max_frame_bytes(&self, count: usize) -> usize {
        let n = self.entries.len();
        (0..n)
            .step_by(count.max(1))
            .filter_map(|f| self.frame_bytes(f, count.min(n - f)).ok())
            .max()
            .unwrap_or(0)
    }

    fn range(&self, first: usize, count: usize) -> Result<(u64, u64)> {
        let n = self.entries.len();
        if count == 0 || first >= n || count > n - first {
            return Err(Error::TooSmall {
                what: "chunks in the file for this frame",
                needed: first.saturating_add(count),
                available: n,
            });
        }
        let last = &self.entries[first + count - 1];
        Ok((
            self.entries[first].offset,
            // Checked when the file was opened: every entry's padded end
            // is within the payload.
            last.offset + padded(last.compressed).unwrap_or(u64::MAX - last.offset),
        ))
    }

    /// Reads chunks `first..first + count` into the front of `dst` as they
    /// lie in the payload (each at a multiple of [`ALIGN`] from `dst`'s
    /// start), checks their checksums, and returns where each lies.
    pub fn read_frame(
        &mut self,
        first: usize,
        count: usize,
        dst: &mut [u8],
    ) -> Result<Vec<ChunkLoc>> {
        let (a, b) = self.range(first, count)?;
        let bytes = (b - a) as usize;
        if bytes > dst.len() {
            return Err(Error::TooSmall {
                what: "frame buffer",
                needed: bytes,
                available: dst.len(),
            });
        }
        self.src.seek(SeekFrom::Start(HEADER + a))?;
        self.src.read_exact(&mut dst[..bytes])?;
        let mut locs = Vec::with_capacity(count);
        for (i, e) in self.entries[first..first + count].iter().enumerate() {
            let at = (e.offset - a) as usize;
            let data = &dst[at..at + e.compressed as usize];
            if self.verify && checksum(data) != e.checksum {
                return Err(Error::Corrupt(format!(
                    "chunk {}: checksum mismatch",
                    first + i
                )));
            }
            locs.push(ChunkLoc {
                offset: at,
                compressed: e.compressed as usize,
                uncompressed: e.uncompressed as usize,
            });
        }
        Ok(locs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn sample() -> Vec<u8> {
        let mut w = ChunkFileWriter::new(Vec::new(), Codec::Lz4, 4, 64).unwrap();
        w.push(&[1, 2, 3], 64).unwrap();
        w.push(&[9; 17], 64).unwrap();
        w.push(&[7; 5], 12).unwrap();
        w.finish().unwrap().0
    }

    #[test]
    fn round_trip_small() {
        let bytes = sample();
        let mut r = ChunkFileReader::open(Cursor::new(bytes)).unwrap();
        let info = r.info();
        assert_eq!(
            (
                info.codec,
                info.element_size,
                info.chunk_bytes,
                info.chunks,
                info.total_bytes
            ),
            (Codec::Lz4, 4, 64, 3, 140)
        );
        assert_eq!(info.payload_bytes, 16 + 32 + 16);
        let mut buf = vec![0u8; r.max_frame_bytes(2)];
        let locs = r.read_frame(0, 2, &mut buf).unwrap();
        assert_eq!(
            locs[1],
            ChunkLoc {
                offset: 16,
                compressed: 17,
                uncompressed: 64
            }
        );
        assert_eq!(&buf[16..33], &[9; 17]);
        let locs = r.read_frame(2, 1, &mut buf).unwrap();
        assert_eq!(
            locs,
            vec![ChunkLoc {
                offset: 0,
                compressed: 5,
                uncompressed: 12
            }]
        );
        assert!(matches!(
            r.read_frame(2, 2, &mut buf),
            Err(Error::TooSmall { .. })
        ));
    }

    #[test]
    fn only_the_last_chunk_may_be_short() {
        let mut w = ChunkFileWriter::new(Vec::new(), Codec::Zstd, 1, 8).unwrap();
        w.push(&[1], 4).unwrap();
        assert!(matches!(w.push(&[1], 8), Err(Error::Corrupt(_))));
        assert!(matches!(
            ChunkFileWriter::new(Vec::new(), Codec::Zstd, 3, 9),
            Err(Error::Corrupt(_))
        ));
        let w = ChunkFileWriter::new(Vec::new(), Codec::Zstd, 1, 8).unwrap();
        assert!(matches!(w.finish(), Err(Error::ZeroLength { .. })));
    }

    #[test]
    fn damaged_payload_fails_its_chunk_only() {
        let mut bytes = sample();
        bytes[HEADER as usize + 16] ^= 1; // chunk 1's first byte
        let mut r = ChunkFileReader::open(Cursor::new(bytes)).unwrap();
        let mut buf = vec![0u8; 64];
        r.read_frame(0, 1, &mut buf).unwrap();
        let e = r.read_frame(1, 1, &mut buf).unwrap_err();
        assert!(
            matches!(e, Error::Corrupt(ref m) if m.contains("chunk 1")),
            "{e}"
        );
        r.set_verify(false);
        r.read_frame(1, 1, &mut buf).unwrap();
    }

    #[test]
    fn header_errors_are_typed() {
        let good = sample();
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(
            ChunkFileReader::open(Cursor::new(b)),
            Err(Error::NotAChunkFile(_))
        ));
        let mut b = good.clone();
        b[8] = 2;
        assert!(matches!(
            ChunkFileReader::open(Cursor::new(b)),
            Err(Error::NotAChunkFile(_))
        ));
        let mut b = good.clone();
        b[12] = 200;
        assert!(matches!(
            ChunkFileReader::open(Cursor::new(b)),
            Err(Error::Corrupt(_))
        ));
        let mut b = good.clone();
        b[24] = 65; // chunk bytes: the checksum catches it
        assert!(matches!(
            ChunkFileReader::open(Cursor::new(b)),
            Err(Error::Corrupt(_))
        ));
        assert!(matches!(
            ChunkFileReader::open(Cursor::new(good[..40].to_vec())),
            Err(Error::Truncated { .. })
        ));
    }
}
