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
