//! Files in and out of a stream on the host backend (runs everywhere, CI
//! included): random f32 written to a temporary file under the target
//! directory, streamed through `Fma` and `Clamp` with
//! `run_stream(FileSource, FileSink)`, the output file compared bit by bit
//! with a CPU reference; typed errors naming the file; the I/O mode the
//! file system gave (direct where it allows `O_DIRECT`); the disk bound.
//!
//! Set `PRISM_REQUIRE_DIRECT_IO=1` to fail instead of noting it when the
//! target directory's file system refuses `O_DIRECT`.

#![cfg(unix)]

use std::path::{Path, PathBuf};

use proptest::prelude::*;

use prism_pipeline::file::{alignment, read_bound_with};
use prism_pipeline::{
    from_file, read_bound, to_file, Clamp, Error, FileError, FileOptions, FileSink, FileSource,
    FileStats, Fma, IoMode, Source, Stage,
};
use prism_testing::random_f32;

mod common;
use common::{host, same_bits};

const FMA: Fma = Fma {
    a: 1.0001,
    b: 0.25,
    iters: 3,
};
const CLAMP: Clamp = Clamp { lo: -0.5, hi: 0.75 };

/// A temporary directory under the target directory (a disk file system,
/// usually; `/tmp` may be tmpfs).
fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("prism-files-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

fn write_f32(path: &Path, data: &[f32]) {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_ne_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes.len() % 4, 0, "output of {} bytes", bytes.len());
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_ne_bytes(b.try_into().unwrap()))
        .collect()
}

/// Fma then Clamp over the whole input (both elementwise: chunking does not
/// change the output).
fn reference(input: &[f32]) -> Vec<f32> {
    let mut a = vec![0f32; input.len()];
    let mut b = vec![0f32; input.len()];
    if !input.is_empty() {
        FMA.host(input, &mut a).unwrap();
        CLAMP.host(&a, &mut b).unwrap();
    }
    b
}

/// What one file → stages → file run reported.
struct Run {
    source: FileStats,
    sink: FileStats,
    source_mode: IoMode,
    sink_mode: IoMode,
    source_fallback: Option<String>,
    chunks: u64,
}

/// Writes `len` random f32, streams them through Fma and Clamp in chunks
/// of `chunk` elements, checks the output file bit by bit.
fn round_trip(dir: &Path, len: usize, chunk: usize, opts: FileOptions, seed: u64) -> Run {
    let (inp, out) = (dir.join("in.f32"), dir.join("out.f32"));
    let data = random_f32(seed, len);
    write_f32(&inp, &data);
    let mut p = host(chunk, 3);
    p.add_stage(FMA);
    p.add_stage(CLAMP);
    let mut src = FileSource::<f32>::open(&inp, opts.clone()).unwrap();
    let mut sink = FileSink::<f32>::create(&out, opts).unwrap();
    let counts = p.run_stream(&mut src, &mut sink).unwrap();
    let sink_stats = sink.finish().unwrap();
    assert_eq!(counts.elements_in, len as u64);
    assert_eq!(counts.elements_out, len as u64);
    assert_eq!(counts.chunks, len.div_ceil(chunk) as u64);
    let got = read_f32(&out);
    let want = reference(&data);
    assert!(
        same_bits(&got, &want),
        "output differs (len {len}, chunk {chunk}, {} elements out)",
        got.len()
    );
    let s = src.stats();
    assert_eq!(s.bytes, 4 * len as u64);
    assert_eq!(s.direct_bytes + s.buffered_bytes, s.bytes);
    assert_eq!(sink_stats.bytes, 4 * len as u64);
    assert_eq!(
        sink_stats.direct_bytes + sink_stats.buffered_bytes,
        sink_stats.bytes
    );
    Run {
        source: s,
        sink: sink_stats,
        source_mode: src.mode(),
        sink_mode: sink.mode(),
        source_fallback: src.fallback().map(str::to_owned),
        chunks: counts.chunks,
    }
}

/// Direct I/O where the target directory's file system allows it: a
/// buffered run must say the file system refused (not an error of ours).
fn expect_direct(run: &Run, what: &str) {
    if run.source_mode == IoMode::Direct {
        assert_eq!(run.sink_mode, IoMode::Direct, "{what}: the sink fell back");
        return;
    }
    let reason = run.source_fallback.clone().unwrap_or_default();
    eprintln!("NOTE {what}: O_DIRECT not used under the target directory: {reason}");
    assert!(
        std::env::var_os("PRISM_REQUIRE_DIRECT_IO").is_none(),
        "{what}: direct I/O required, got buffered: {reason}"
    );
    assert!(
        reason.contains("refused") || reason.contains("no direct I/O"),
        "{what}: unexpected fallback: {reason}"
    );
}

#[test]
fn an_empty_file_streams_to_an_empty_file() {
    let dir = tmp();
    let run = round_trip(dir.path(), 0, 1024, FileOptions::default(), 1);
    assert_eq!(run.chunks, 0);
    assert_eq!(run.source.bytes, 0);
    assert_eq!(
        std::fs::metadata(dir.path().join("out.f32")).unwrap().len(),
        0
    );
}

#[test]
fn one_element() {
    let dir = tmp();
    let run = round_trip(dir.path(), 1, 1024, FileOptions::default(), 2);
    assert_eq!(run.chunks, 1);
    // Less than a block: buffered whatever the mode.
    assert_eq!(run.source.buffered_bytes, 4);
    assert_eq!(run.sink.buffered_bytes, 4);
}

#[test]
fn exactly_one_chunk_goes_direct() {
    let dir = tmp();
    let run = round_trip(dir.path(), 16384, 16384, FileOptions::default(), 3);
    assert_eq!(run.chunks, 1);
    expect_direct(&run, "one chunk");
    if run.source_mode == IoMode::Direct {
        // 64 KiB: a whole number of blocks, read and written direct.
        assert_eq!(run.source.direct_bytes, 65536);
        assert_eq!(run.sink.direct_bytes, 65536);
    }
}

#[test]
fn many_chunks_and_a_tail_not_aligned_to_4096() {
    let dir = tmp();
    // Chunks of 12 000 bytes (not a multiple of 4096) and a tail of 492.
    let len = 40 * 3000 + 123;
    let run = round_trip(dir.path(), len, 3000, FileOptions::default(), 4);
    assert_eq!(run.chunks, 41);
    expect_direct(&run, "many chunks");
    if run.source_mode == IoMode::Direct {
        assert!(run.source.direct_bytes >= (4 * len as u64) / 4096 * 4096 - 4096);
        assert!(run.source.buffered_bytes < 4096);
        assert!(run.sink.direct_bytes > 0);
        eprintln!("many chunks: source {} | sink {}", run.source, run.sink);
    }
    // Aligned chunks with an unaligned tail.
    let run = round_trip(dir.path(), 10 * 16384 + 5, 16384, FileOptions::default(), 5);
    expect_direct(&run, "aligned chunks");
    if run.source_mode == IoMode::Direct {
        assert_eq!(run.source.direct_bytes, 10 * 65536);
        assert_eq!(run.source.buffered_bytes, 20);
        assert_eq!(run.sink.direct_bytes, 10 * 65536);
        assert_eq!(run.sink.buffered_bytes, 20);
    }
}

#[test]
fn buffered_when_asked() {
    let dir = tmp();
    let opts = FileOptions {
        direct: false,
        ..FileOptions::default()
    };
    let run = round_trip(dir.path(), 5 * 1000 + 7, 1000, opts, 6);
    assert_eq!(run.source_mode, IoMode::Buffered);
    assert_eq!(run.sink_mode, IoMode::Buffered);
    assert_eq!(run.source.direct_bytes, 0);
    assert!(run.source_fallback.unwrap().contains("off"));
}

/// An aligned destination (the GPU's pinned slots are page-aligned) is
/// read into in place: no bounce copy.
#[test]
fn an_aligned_slot_is_read_in_place() {
    let dir = tmp();
    let path = dir.path().join("in.f32");
    let data = random_f32(7, 3 * 16384 + 9);
    write_f32(&path, &data);
    let mut src = FileSource::<u8>::open(&path, FileOptions::default()).unwrap();
    if src.mode() != IoMode::Direct {
        eprintln!("NOTE aligned slot: buffered: {:?}", src.fallback());
        return;
    }
    let mut raw = vec![0u8; 65536 + 4096];
    let start = raw.as_ptr().align_offset(4096);
    let slot = &mut raw[start..start + 65536];
    let mut got = Vec::new();
    loop {
        let n = src.fill(slot).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&slot[..n]);
    }
    let want: Vec<u8> = data.iter().flat_map(|x| x.to_ne_bytes()).collect();
    assert_eq!(got, want);
    let s = src.stats();
    assert_eq!(s.bounce_bytes, 0, "{s}");
    assert_eq!(s.direct_bytes, 3 * 65536);
    assert_eq!(s.buffered_bytes, 36);
}

#[test]
fn a_torn_element_is_a_typed_error_naming_the_file() {
    let dir = tmp();
    let path = dir.path().join("torn.f32");
    std::fs::write(&path, vec![7u8; 4 * 100 + 3]).unwrap();
    let e = from_file::<f32>(&path).unwrap_err();
    match &e {
        FileError::TornElement {
            len,
            element,
            stray,
            ..
        } => assert_eq!((*len, *element, *stray), (403, 4, 3)),
        other => panic!("{other}"),
    }
    assert_eq!(e.path(), path);
    let msg = e.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("3 stray bytes"),
        "{msg}"
    );
    // As bytes the same file is fine.
    assert!(from_file::<u8>(&path).is_ok());
}

#[test]
fn a_missing_file_is_a_typed_error_naming_it() {
    let dir = tmp();
    let path = dir.path().join("no-such-file.f32");
    let e = from_file::<f32>(&path).unwrap_err();
    match &e {
        FileError::Open { source, .. } => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
        }
        other => panic!("{other}"),
    }
    assert_eq!(e.path(), path);
    assert!(e.to_string().contains("no-such-file.f32"), "{e}");
    // A missing directory for the output too.
    let e = to_file::<f32>(dir.path().join("no-dir").join("out.f32")).unwrap_err();
    assert!(matches!(e, FileError::Open { .. }) && e.to_string().contains("no-dir"));
}

#[test]
fn a_read_only_destination_is_a_typed_error_naming_it() {
    let dir = tmp();
    let path = dir.path().join("read-only.f32");
    std::fs::write(&path, b"old").unwrap();
    let mut perm = std::fs::metadata(&path).unwrap().permissions();
    perm.set_readonly(true);
    std::fs::set_permissions(&path, perm).unwrap();
    // Root ignores the permission bits: then only the cases below run.
    let bypassed = std::fs::OpenOptions::new().write(true).open(&path).is_ok();
    if bypassed {
        eprintln!("NOTE read-only file: writable anyway (root); checking a directory instead");
    } else {
        let e = to_file::<f32>(&path).unwrap_err();
        match &e {
            FileError::Open { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied)
            }
            other => panic!("{other}"),
        }
        assert_eq!(e.path(), path);
        assert!(e.to_string().contains("read-only.f32"), "{e}");
    }
    // A directory can't be written as a file, root or not.
    let e = to_file::<f32>(dir.path()).unwrap_err();
    assert!(matches!(e, FileError::Open { .. }), "{e}");
    assert_eq!(e.path(), dir.path());
}

/// A destination that opens but refuses the writes (`/proc/version`: root
/// may open it, the write fails) reaches the run as `Error::Sink` holding
/// the typed error; without root the open fails instead.
#[test]
fn a_refused_write_fails_the_run_naming_the_file() {
    let path = PathBuf::from("/proc/version");
    if !path.exists() {
        return;
    }
    let mut sink = match to_file::<f32>(&path) {
        Ok(s) => s,
        Err(e) => {
            assert!(
                matches!(e, FileError::Open { .. }) && e.path() == path,
                "{e}"
            );
            return;
        }
    };
    let dir = tmp();
    let inp = dir.path().join("in.f32");
    write_f32(&inp, &random_f32(8, 5000));
    let mut p = host(1000, 3);
    p.add_stage(CLAMP);
    let e = p
        .run_stream(from_file::<f32>(&inp).unwrap(), &mut sink)
        .unwrap_err();
    match &e {
        Error::Sink { source, .. } => {
            let f = source.downcast_ref::<FileError>().expect("a FileError");
            assert!(matches!(f, FileError::Write { .. }), "{f}");
            assert_eq!(f.path(), path);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn the_disk_bound_reads_the_whole_file() {
    let dir = tmp();
    let path = dir.path().join("in.f32");
    let len = 1 << 20; // 4 MiB and a bit
    write_f32(&path, &random_f32(9, len + 3));
    let b = read_bound(&path).unwrap();
    assert_eq!(b.bytes, 4 * (len as u64 + 3));
    assert_eq!(b.stats.bytes, b.bytes);
    assert!(b.seconds > 0.0 && b.gb_per_s() > 0.0, "{b}");
    assert!(b.stats.io_ms > 0.0);
    eprintln!("disk bound: {b}; {}", b.stats);
    let a = alignment(&path).unwrap();
    eprintln!("alignment: {a:?}");
    if b.mode == IoMode::Direct {
        // Into an aligned buffer: no bounce copy; only the tail buffered.
        assert_eq!(b.stats.bounce_bytes, 0);
        assert_eq!(b.stats.buffered_bytes, 12);
    } else {
        eprintln!("NOTE disk bound buffered: {:?}", b.fallback);
    }
    // The same with a small buffer and buffered reads.
    let opts = FileOptions {
        direct: false,
        ..FileOptions::default()
    };
    let b = read_bound_with(&path, &opts, 5000).unwrap();
    assert_eq!((b.bytes, b.mode), (4 * (len as u64 + 3), IoMode::Buffered));
    // An empty file: no bytes, no rate.
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let b = read_bound(&empty).unwrap();
    assert_eq!(b.bytes, 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn any_length_and_chunk_matches_the_reference(
        len in 0usize..20_000,
        chunk in 1usize..5_000,
        direct in any::<bool>(),
        bounce_blocks in 1usize..4,
        read_ahead in 0usize..4,
        seed in any::<u64>(),
    ) {
        let dir = tmp();
        // A small bounce buffer: many refills, leftovers across chunks.
        let opts = FileOptions {
            direct,
            bounce_bytes: bounce_blocks * 4096,
            sync: false,
            read_ahead,
        };
        let run = round_trip(dir.path(), len, chunk, opts, seed);
        if !direct {
            prop_assert_eq!(run.source.direct_bytes, 0);
            prop_assert_eq!(run.sink.direct_bytes, 0);
        }
        if read_ahead > 0 {
            // Every byte copied once from the thread's buffers.
            prop_assert_eq!(run.source.copy_bytes, 4 * len as u64);
        } else {
            prop_assert_eq!(run.source.copy_bytes, 0);
        }
    }
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    random_f32(seed, len.div_ceil(4))
        .iter()
        .flat_map(|x| x.to_ne_bytes())
        .take(len)
        .collect()
}

/// Reads the whole source with slots of the lengths in `slots` in turn
/// (an aligned slot when `aligned`), as bytes.
fn read_all(src: &mut FileSource<u8>, slots: &[usize], aligned: bool) -> Vec<u8> {
    let mut got = Vec::new();
    let mut raw = vec![0u8; slots.iter().max().unwrap() + 4096];
    let start = if aligned {
        raw.as_ptr().align_offset(4096)
    } else {
        // Off the page on purpose.
        (raw.as_ptr().align_offset(4096) + 1) % 4096
    };
    for i in 0.. {
        let len = slots[i % slots.len()];
        let slot = &mut raw[start..start + len];
        let n = src.fill(slot).unwrap();
        if n == 0 {
            break;
        }
        assert!(
            n == len || src.stats().bytes == src.len_bytes(),
            "short read mid-file"
        );
        got.extend_from_slice(&slot[..n]);
    }
    got
}

/// Read-ahead gives the same bytes as reading in `fill`, whatever the
/// slots' lengths do between calls (the thread's buffers have the first
/// slot's length; later slots are served from the same byte stream).
#[test]
fn read_ahead_gives_the_same_bytes_with_slots_of_changing_length() {
    let dir = tmp();
    let path = dir.path().join("in.bin");
    for (len, seed) in [
        (0usize, 10u64),
        (1, 11),
        (4096, 12),
        (300_007, 13),
        (1 << 20, 14),
    ] {
        let data = random_bytes(seed, len);
        std::fs::write(&path, &data).unwrap();
        for slots in [
            &[65536usize][..],
            &[1000, 65536, 3 * 4096, 777, 100_000],
            &[100_000, 4096, 1, 70_000],
        ] {
            for aligned in [false, true] {
                for direct in [true, false] {
                    for read_ahead in [0, 1, 3] {
                        let opts = FileOptions {
                            direct,
                            read_ahead,
                            bounce_bytes: 8192,
                            ..FileOptions::default()
                        };
                        let mut src = FileSource::<u8>::open(&path, opts).unwrap();
                        let got = read_all(&mut src, slots, aligned);
                        let what = format!(
                            "len {len}, slots {slots:?}, aligned {aligned}, direct {direct}, read-ahead {read_ahead}"
                        );
                        assert!(got == data, "{what}: bytes differ");
                        let s = src.stats();
                        assert_eq!(s.bytes, len as u64, "{what}");
                        assert_eq!(s.direct_bytes + s.buffered_bytes, len as u64, "{what}: {s}");
                        assert_eq!(src.read_ahead(), read_ahead);
                        if read_ahead > 0 {
                            assert_eq!(s.copy_bytes, len as u64, "{what}: {s}");
                            // The thread's buffers are aligned: no bounce.
                            assert_eq!(s.bounce_bytes, 0, "{what}: {s}");
                        } else {
                            assert_eq!((s.copy_bytes, s.wait_ms), (0, 0.0), "{what}: {s}");
                        }
                        // After the end, the end again.
                        let mut slot = [0u8; 10];
                        assert_eq!(src.fill(&mut slot).unwrap(), 0, "{what}");
                    }
                }
            }
        }
    }
}

/// Dropping a read-ahead source after one chunk of a large file stops and
/// joins its thread (the drop returns; nothing hangs).
#[test]
fn dropping_a_read_ahead_source_early_stops_its_thread() {
    let dir = tmp();
    let path = dir.path().join("large.bin");
    let len = 32 << 20;
    std::fs::write(&path, random_bytes(15, len)).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let p = path.clone();
    let worker = std::thread::spawn(move || {
        for read_ahead in [1, 4] {
            let opts = FileOptions {
                read_ahead,
                ..FileOptions::default()
            };
            let mut src = FileSource::<u8>::open(&p, opts).unwrap();
            let mut slot = vec![0u8; 1 << 20];
            assert_eq!(src.fill(&mut slot).unwrap(), 1 << 20);
            drop(src);
            // Dropped before the first fill: no thread was started.
            drop(
                FileSource::<u8>::open(
                    &p,
                    FileOptions {
                        read_ahead,
                        ..FileOptions::default()
                    },
                )
                .unwrap(),
            );
        }
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("dropping a read-ahead source hung");
    worker.join().unwrap();
}

/// A file that shrinks after open (deterministic: truncated before the
/// first `fill`) fails the read of the first chunk past its new end, with
/// and without read-ahead: the chunks before it come first and intact,
/// the error is a `FileError::Read` naming the file and the offset, and a
/// later `fill` fails again rather than ending the stream quietly.
#[test]
fn a_file_that_shrinks_fails_the_chunk_past_its_end_in_order() {
    let dir = tmp();
    let path = dir.path().join("shrinks.bin");
    let chunk = 65536;
    let data = random_bytes(16, 10 * chunk);
    for direct in [true, false] {
        for read_ahead in [0, 1, 2, 8] {
            std::fs::write(&path, &data).unwrap();
            // A bounce buffer of one chunk: the reads in `fill` are the
            // chunks too (a larger one would read past them).
            let opts = FileOptions {
                direct,
                read_ahead,
                bounce_bytes: chunk,
                ..FileOptions::default()
            };
            let mut src = FileSource::<u8>::open(&path, opts).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(3 * chunk as u64 + 1000)
                .unwrap();
            let what = format!("direct {direct}, read-ahead {read_ahead}");
            let mut slot = vec![0u8; chunk];
            for i in 0..3 {
                assert_eq!(src.fill(&mut slot).unwrap(), chunk, "{what}: chunk {i}");
                assert!(
                    slot == data[i * chunk..(i + 1) * chunk],
                    "{what}: chunk {i} differs"
                );
            }
            for attempt in 0..2 {
                let e = src.fill(&mut slot).unwrap_err();
                let f = e.downcast_ref::<FileError>().expect("a FileError");
                match f {
                    FileError::Read { offset, .. } => {
                        assert_eq!(*offset, 3 * chunk as u64, "{what}, attempt {attempt}: {f}")
                    }
                    other => panic!("{what}: {other}"),
                }
                assert_eq!(f.path(), path);
            }
        }
    }
}

/// A file → stages → file run with read-ahead, aligned chunks and an
/// unaligned tail: the same output, the counts add up, fill's waiting is
/// counted.
#[test]
fn a_run_with_read_ahead_matches_the_reference() {
    let dir = tmp();
    let opts = FileOptions {
        read_ahead: 2,
        ..FileOptions::default()
    };
    let run = round_trip(dir.path(), 20 * 16384 + 5, 16384, opts, 17);
    expect_direct(&run, "read-ahead");
    assert_eq!(run.source.copy_bytes, run.source.bytes);
    if run.source_mode == IoMode::Direct {
        assert_eq!(run.source.direct_bytes, 20 * 65536);
        assert_eq!(run.source.buffered_bytes, 20);
        assert_eq!(run.source.bounce_bytes, 0);
    }
    eprintln!("read-ahead run: source {}", run.source);
}
