//! The chunk file format on the host: round trips and damaged files
//! (proptest), with no GPU and no nvCOMP.

use std::io::Cursor;

use prism_nvcomp::format::{checksum, ChunkFileReader, ChunkFileWriter, ALIGN};
use prism_nvcomp::{Codec, Error};
use proptest::prelude::*;

/// A file of `chunks` (compressed bytes, uncompressed size) written with `codec`.
fn write(codec: Codec, elem: u32, chunk_bytes: u64, chunks: &[(Vec<u8>, u64)]) -> Vec<u8> {
    let mut w = ChunkFileWriter::new(Vec::new(), codec, elem, chunk_bytes).unwrap();
    for (c, u) in chunks {
        w.push(c, *u).unwrap();
    }
    w.finish().unwrap().0
}

fn arb_file() -> impl Strategy<Value = (Codec, u32, u64, Vec<(Vec<u8>, u64)>)> {
    (
        0..Codec::ALL.len(),
        prop::sample::select(vec![1u32, 2, 4, 8]),
        1u64..64,
        1usize..12,
    )
        .prop_flat_map(|(c, elem, units, n)| {
            let chunk = units * u64::from(elem);
            (
                Just(Codec::ALL[c]),
                Just(elem),
                Just(chunk),
                prop::collection::vec(prop::collection::vec(any::<u8>(), 1..200), n),
                1..=units,
            )
                .prop_map(move |(codec, elem, chunk, payloads, last_units)| {
                    let n = payloads.len();
                    let chunks = payloads
                        .into_iter()
                        .enumerate()
                        .map(|(i, p)| {
                            (
                                p,
                                if i + 1 == n {
                                    last_units * u64::from(elem)
                                } else {
                                    chunk
                                },
                            )
                        })
                        .collect();
                    (codec, elem, chunk, chunks)
                })
        })
}

proptest! {
    #[test]
    fn round_trip((codec, elem, chunk, chunks) in arb_file(), per_frame in 1usize..5) {
        let bytes = write(codec, elem, chunk, &chunks);
        let mut r = ChunkFileReader::open(Cursor::new(bytes)).unwrap();
        let info = r.info();
        prop_assert_eq!((info.codec, info.element_size, info.chunk_bytes), (codec, elem, chunk));
        prop_assert_eq!(info.chunks as usize, chunks.len());
        prop_assert_eq!(info.total_bytes, chunks.iter().map(|c| c.1).sum::<u64>());
        let mut buf = vec![0u8; r.max_frame_bytes(per_frame)];
        let mut first = 0;
        while first < chunks.len() {
            let count = per_frame.min(chunks.len() - first);
            let locs = r.read_frame(first, count, &mut buf).unwrap();
            for (k, loc) in locs.iter().enumerate() {
                let (data, raw) = &chunks[first + k];
                prop_assert_eq!(loc.offset % ALIGN, 0);
                prop_assert_eq!(&buf[loc.offset..loc.offset + loc.compressed], &data[..]);
                prop_assert_eq!(loc.uncompressed as u64, *raw);
            }
            first += count;
        }
    }

    /// Any cut of a file is refused with a typed error, never a panic.
    #[test]
    fn truncated_files_are_refused((codec, elem, chunk, chunks) in arb_file(), cut in any::<prop::sample::Index>()) {
        let bytes = write(codec, elem, chunk, &chunks);
        let keep = cut.index(bytes.len());
        let e = ChunkFileReader::open(Cursor::new(bytes[..keep].to_vec())).unwrap_err();
        prop_assert!(matches!(e, Error::Truncated { .. } | Error::Corrupt(_) | Error::NotAChunkFile(_)), "{e}");
    }

    /// Any flipped bit is caught: when opening (header, table, trailer) or
    /// when reading the chunk it falls in; padding bits change nothing read.
    #[test]
    fn flipped_bits_are_caught((codec, elem, chunk, chunks) in arb_file(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let good = write(codec, elem, chunk, &chunks);
        let mut bytes = good.clone();
        let i = at.index(bytes.len());
        bytes[i] ^= 1 << bit;
        match ChunkFileReader::open(Cursor::new(bytes)) {
            Err(e) => prop_assert!(matches!(e, Error::Truncated { .. } | Error::Corrupt(_) | Error::NotAChunkFile(_)), "{e}"),
            Ok(mut r) => {
                // Opened: the flip must be in the payload (everything else
                // is checked when opening). Reading every chunk either fails
                // on the damaged one or returns the original bytes (the flip
                // hit padding).
                prop_assert!(i >= 64 && (i as u64) < 64 + r.info().payload_bytes, "flip at {i} not caught");
                let mut buf = vec![0u8; r.max_frame_bytes(1)];
                for (k, (data, _)) in chunks.iter().enumerate() {
                    match r.read_frame(k, 1, &mut buf) {
                        Ok(locs) => prop_assert_eq!(&buf[locs[0].offset..locs[0].offset + locs[0].compressed], &data[..]),
                        Err(e) => prop_assert!(matches!(e, Error::Corrupt(_)), "{e}"),
                    }
                }
            }
        }
    }
}

#[test]
fn checksum_sees_every_byte_and_the_length() {
    let a = vec![0u8; 37];
    let mut seen = std::collections::HashSet::new();
    seen.insert(checksum(&a));
    for i in 0..a.len() {
        let mut b = a.clone();
        b[i] = 1;
        assert!(seen.insert(checksum(&b)), "byte {i}");
    }
    assert_ne!(checksum(&a[..36]), checksum(&a));
}

/// Re-seals a file whose header or table was edited: the header-and-table
/// checksum is public, so a crafted file passes it (it guards accidents).
fn reseal(file: &mut [u8], table_at: usize) {
    let len = file.len();
    let t = len - 48;
    let mut covered = file[..64].to_vec();
    covered.extend_from_slice(&file[table_at..t]);
    covered.extend_from_slice(&file[t..t + 24]);
    let sum = checksum(&covered);
    file[t + 24..t + 32].copy_from_slice(&sum.to_le_bytes());
}

/// Crafted files with valid checksums: sizes that overflow, a chunk size no
/// codec takes. Each is a typed error, never a panic (in debug and release
/// builds alike) nor a huge allocation.
#[test]
fn crafted_files_are_typed_errors() {
    let base = write(Codec::Lz4, 1, 64, &[(vec![7u8; 10], 64), (vec![9u8; 5], 3)]);
    let payload = 2 * ALIGN;
    let table_at = 64 + payload;
    // Resealing an untouched file keeps it valid (so the errors below come
    // from the checks, not from a checksum).
    let mut same = base.clone();
    reseal(&mut same, table_at);
    assert_eq!(same, base);
    // A chunk claiming u64::MAX - 5 compressed bytes.
    let mut f = base.clone();
    f[table_at..table_at + 8].copy_from_slice(&(u64::MAX - 5).to_le_bytes());
    reseal(&mut f, table_at);
    assert!(matches!(
        ChunkFileReader::open(Cursor::new(f)),
        Err(Error::Corrupt(_))
    ));
    // A chunk size of 2^63 (both chunks then "fit" it).
    let mut f = base.clone();
    f[24..32].copy_from_slice(&(1u64 << 63).to_le_bytes());
    reseal(&mut f, table_at);
    assert!(matches!(
        ChunkFileReader::open(Cursor::new(f)),
        Err(Error::Corrupt(_))
    ));
    // The untouched file still opens.
    ChunkFileReader::open(Cursor::new(base)).unwrap();
}
