//! The broadcast ring across threads.
//!
//! * Real-time mode under a producer twice as fast as its slow readers:
//!   every delivered chunk is bit-exact, each reader's
//!   `delivered + missed == committed`, the gaps a reader sees are exactly
//!   its missed count, the ring's dropped chunks and bytes are exactly what
//!   the guaranteed reader lost, and no more buffers than configured are
//!   ever allocated (memory flat).
//! * Block mode: guaranteed readers get every chunk, in order, bit-exact,
//!   and nothing is dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use prism_buffer::broadcast::{Broadcast, Config, Mode, Reader, ReaderKind};

/// Elements of chunk `n` (1 to 64).
fn len_of(n: u64) -> usize {
    1 + (n as usize * 7919) % 64
}

/// Element `k` of chunk `n`.
fn value(n: u64, k: usize) -> u32 {
    ((n as u32).wrapping_mul(2_654_435_761)) ^ (k as u32)
}

/// What a reader saw.
#[derive(Debug, Default)]
struct Seen {
    numbers: Vec<u64>,
    /// Chunks skipped between deliveries (and after the last one).
    gaps: u64,
    gap_bytes: u64,
}

/// Reads to the end, checking every chunk, sleeping `pace` per chunk while
/// holding it.
fn consume(mut r: Reader<u32>, pace: Duration, total: u64) -> (Seen, Reader<u32>) {
    let mut seen = Seen::default();
    let mut next = 0u64;
    while let Some(g) = r.read() {
        let n = g.meta().number;
        assert!(n >= next, "chunk {n} after {next}: out of order");
        for skipped in next..n {
            seen.gaps += 1;
            seen.gap_bytes += len_of(skipped) as u64 * 4;
        }
        assert_eq!(g.len(), len_of(n), "chunk {n} length");
        assert!(
            g.iter().enumerate().all(|(k, &v)| v == value(n, k)),
            "chunk {n} contents"
        );
        assert_eq!(g.meta().index, n, "one sequence: index = number");
        seen.numbers.push(n);
        next = n + 1;
        if !pace.is_zero() {
            thread::sleep(pace);
        }
    }
    for skipped in next..total {
        seen.gaps += 1;
        seen.gap_bytes += len_of(skipped) as u64 * 4;
    }
    (seen, r)
}

#[test]
fn real_time_under_a_producer_twice_as_fast_drops_exactly_and_stays_flat() {
    const TOTAL: u64 = 3000;
    let config = Config {
        buffers: 6,
        chunk_capacity: 64,
        mode: Mode::RealTime,
    };
    // The producer commits on a fixed schedule (one chunk per period); each
    // slow reader sleeps two periods per chunk (plus the sleep's overshoot),
    // so it runs at half the producer's rate or less.
    let producer_pace = Duration::from_micros(100);
    let reader_pace = producer_pace * 2;
    let ring: Broadcast<u32> = Broadcast::new(config).unwrap();
    let slow_guaranteed = ring.reader(ReaderKind::Guaranteed).unwrap();
    let slow_lossy = ring.reader(ReaderKind::Lossy).unwrap();
    let fast_lossy = ring.reader(ReaderKind::Lossy).unwrap();
    let ids = [slow_guaranteed.id(), slow_lossy.id(), fast_lossy.id()];
    let mut writer = ring.writer().unwrap();
    let over = AtomicBool::new(false);

    let (seen, max_allocated) = thread::scope(|s| {
        let a = s.spawn(|| consume(slow_guaranteed, reader_pace, TOTAL));
        let b = s.spawn(|| consume(slow_lossy, reader_pace, TOTAL));
        let c = s.spawn(|| consume(fast_lossy, Duration::ZERO, TOTAL));
        let mut max_allocated = 0;
        let start = std::time::Instant::now();
        for n in 0..TOTAL {
            let mut g = writer.reserve();
            for (k, v) in g.iter_mut().take(len_of(n)).enumerate() {
                *v = value(n, k);
            }
            let meta = g.commit(len_of(n)).unwrap();
            assert_eq!(meta.number, n);
            max_allocated = max_allocated.max(writer.stats().buffers_allocated);
            let due = start + producer_pace * (n as u32 + 1);
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                thread::sleep(wait);
            }
        }
        drop(writer);
        over.store(true, Ordering::Relaxed);
        let seen = [a, b, c].map(|h| h.join().unwrap());
        (seen, max_allocated)
    });
    assert!(over.load(Ordering::Relaxed));

    let stats = ring.stats();
    assert_eq!(stats.committed_chunks, TOTAL);
    assert!(
        max_allocated <= config.buffers,
        "memory flat: {max_allocated} buffers"
    );
    assert!(stats.buffers_allocated <= config.buffers);
    for ((seen, reader), id) in seen.iter().zip(ids) {
        let r = reader.reader_stats();
        assert_eq!(r.id, id);
        assert_eq!(r.joined_at, 0);
        assert_eq!(r.delivered, seen.numbers.len() as u64);
        assert_eq!(r.missed, seen.gaps, "reader {id}: missed = observed gaps");
        assert_eq!(r.missed_bytes, seen.gap_bytes);
        assert_eq!(r.delivered + r.missed, TOTAL, "reader {id}");
        assert_eq!(r.pending, 0);
    }
    // The only guaranteed reader lost exactly the dropped chunks.
    let g = &seen[0].0;
    assert_eq!(stats.dropped_chunks, g.gaps);
    assert_eq!(stats.dropped_bytes, g.gap_bytes);
    assert_eq!(stats.sequence_dropped_chunks, g.gaps);
    // The producer ran faster than the slow readers: they lost chunks.
    assert!(
        stats.dropped_chunks > 0,
        "a producer twice as fast drops chunks: {stats:?}"
    );
    assert!(seen[1].0.gaps > 0);
    eprintln!(
        "real-time: {} committed, {} dropped ({} bytes); delivered: guaranteed {}, slow lossy {}, fast lossy {}; {} buffers",
        stats.committed_chunks,
        stats.dropped_chunks,
        stats.dropped_bytes,
        seen[0].0.numbers.len(),
        seen[1].0.numbers.len(),
        seen[2].0.numbers.len(),
        stats.buffers_allocated
    );
}

#[test]
fn block_mode_gives_guaranteed_readers_every_chunk_in_order() {
    const TOTAL: u64 = 2000;
    let config = Config {
        buffers: 5,
        chunk_capacity: 64,
        mode: Mode::Block,
    };
    let ring: Broadcast<u32> = Broadcast::new(config).unwrap();
    let slow = ring.reader(ReaderKind::Guaranteed).unwrap();
    let fast = ring.reader(ReaderKind::Guaranteed).unwrap();
    let lossy = ring.reader(ReaderKind::Lossy).unwrap();
    let mut writer = ring.writer().unwrap();
    let seen = thread::scope(|s| {
        let a = s.spawn(|| {
            let mut k = 0u64;
            let mut r = slow;
            let mut numbers = Vec::new();
            while let Some(g) = r.read() {
                numbers.push(g.meta().number);
                assert_eq!(g.len(), len_of(g.meta().number));
                assert!(g
                    .iter()
                    .enumerate()
                    .all(|(i, &v)| v == value(g.meta().number, i)));
                k += 1;
                if k.is_multiple_of(50) {
                    thread::sleep(Duration::from_millis(1));
                }
            }
            (numbers, r)
        });
        let b = s.spawn(|| {
            let (seen, r) = consume(fast, Duration::ZERO, TOTAL);
            (seen.numbers, r)
        });
        let c = s.spawn(|| consume(lossy, Duration::from_micros(20), TOTAL));
        for n in 0..TOTAL {
            let mut data = vec![0u32; len_of(n)];
            for (k, v) in data.iter_mut().enumerate() {
                *v = value(n, k);
            }
            writer.write(&data).unwrap();
        }
        drop(writer);
        let (lossy_seen, lossy) = c.join().unwrap();
        let r = lossy.reader_stats();
        assert_eq!(r.delivered + r.missed, TOTAL);
        assert_eq!(r.missed, lossy_seen.gaps);
        [a.join().unwrap(), b.join().unwrap()]
    });
    let all: Vec<u64> = (0..TOTAL).collect();
    for (numbers, r) in &seen {
        assert_eq!(numbers, &all, "every chunk, in order");
        let st = r.reader_stats();
        assert_eq!((st.delivered, st.missed), (TOTAL, 0));
    }
    let stats = ring.stats();
    assert_eq!(stats.dropped_chunks, 0);
    assert!(stats.buffers_allocated <= config.buffers);
}

#[test]
fn a_blocked_writer_times_out_and_a_dropped_guaranteed_reader_frees_it() {
    let config = Config {
        buffers: 3,
        chunk_capacity: 4,
        mode: Mode::Block,
    };
    let ring: Broadcast<u8> = Broadcast::new(config).unwrap();
    let r = ring.reader(ReaderKind::Guaranteed).unwrap();
    let mut w = ring.writer().unwrap();
    for i in 0..3 {
        w.write(&[i]).unwrap();
    }
    // Every buffer holds a chunk the guaranteed reader has not read.
    assert!(w.try_reserve().is_none());
    assert!(w.reserve_timeout(Duration::from_millis(20)).is_none());
    thread::scope(|s| {
        s.spawn(move || {
            thread::sleep(Duration::from_millis(20));
            drop(r);
        });
        // Blocks until the reader leaves.
        let g = w.reserve();
        g.commit(0).unwrap();
    });
    assert_eq!(ring.stats().dropped_chunks, 0);
}
