//! The manager's host threads: a persistent pool (rayon), sized by
//! `PipelineConfig::host_threads`. On the GPU, pageable input/output and
//! item gathering copy on it (one thread cannot move bytes as fast as a
//! PCIe Gen5 link); on the host backend, the stages run on it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use prism_stream::{copy_streaming, Element};
use rayon::prelude::*;

/// Bytes each piece of a parallel copy moves at most (enough to amortise
/// the hand over to a pool thread, small enough to balance the threads).
const PIECE_BYTES: usize = 1 << 20;

/// Bytes each piece moves at least: smaller copies are cut finer, down to
/// this, so that every thread gets a share.
const MIN_PIECE_BYTES: usize = 64 << 10;

/// Copies of at least this many bytes in all go to the pool, with
/// streaming (non-temporal) stores; smaller ones stay on the calling
/// thread, cached.
const POOL_BYTES: usize = 1 << 20;

/// The host threads of a manager.
#[derive(Debug)]
pub(crate) struct CopyPool {
    /// `None` only if the threads could not be started: then everything
    /// runs on the calling thread.
    pool: Option<rayon::ThreadPool>,
    /// Wall time of the copies since the last `take_ms`, in ns.
    busy_ns: AtomicU64,
    /// With a trace on: each copy's (chunk, what, start, end).
    recorder: Mutex<Option<Recorder>>,
}

/// Copies seen while a trace records (see [`CopyPool::record`]).
#[derive(Debug)]
struct Recorder {
    label: (u64, &'static str),
    spans: Vec<(u64, &'static str, Instant, Instant)>,
}

impl CopyPool {
    /// `threads` threads (with 1, copies stay on the calling thread, and
    /// host stages run on the one pool thread).
    pub(crate) fn new(threads: usize) -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("prism-host-{i}"))
            .build()
            .ok();
        Self {
            pool,
            busy_ns: AtomicU64::new(0),
            recorder: Mutex::new(None),
        }
    }

    fn recorder(&self) -> MutexGuard<'_, Option<Recorder>> {
        self.recorder.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts (or, with `false`, stops and clears) keeping every copy's span.
    pub(crate) fn record(&self, on: bool) {
        *self.recorder() = on.then(|| Recorder {
            label: (0, ""),
            spans: Vec::new(),
        });
    }

    /// Names the copies that follow (chunk and what), while recording.
    pub(crate) fn label(&self, chunk: u64, what: &'static str) {
        if let Some(r) = self.recorder().as_mut() {
            r.label = (chunk, what);
        }
    }

    /// The recorded spans, and recording stops.
    pub(crate) fn take_spans(&self) -> Vec<(u64, &'static str, Instant, Instant)> {
        self.recorder().take().map_or_else(Vec::new, |r| r.spans)
    }

    /// The copies' wall time since the last call, in ms (and restarts it).
    pub(crate) fn take_ms(&self) -> f64 {
        self.busy_ns.swap(0, Ordering::Relaxed) as f64 / 1e6
    }

    /// The pool, for the host backend's stages.
    pub(crate) fn pool(&self) -> Option<&rayon::ThreadPool> {
        self.pool.as_ref()
    }
}

/// Copies each `(dst, src)` pair (equal lengths), cut into pieces of 64 KiB
/// to 1 MiB spread over the pool, with streaming stores. Totals under
/// 1 MiB stay on this thread (`copy_from_slice`). Adds its wall time to the
/// pool's clock (`take_ms`).
pub(crate) fn par_copy<T: Element>(pairs: Vec<(&mut [T], &[T])>, pool: &CopyPool) {
    let started = Instant::now();
    copy_pieces(pairs, pool);
    let ended = Instant::now();
    let ns = u64::try_from((ended - started).as_nanos()).unwrap_or(u64::MAX);
    pool.busy_ns.fetch_add(ns, Ordering::Relaxed);
    if let Some(r) = pool.recorder().as_mut() {
        let (chunk, what) = r.label;
        r.spans.push((chunk, what, started, ended));
    }
}

fn copy_pieces<T: Element>(pairs: Vec<(&mut [T], &[T])>, pool: &CopyPool) {
    debug_assert!(pairs.iter().all(|(d, s)| d.len() == s.len()));
    let total: usize = pairs.iter().map(|(d, _)| d.len()).sum();
    let size = std::mem::size_of::<T>().max(1);
    let Some(pool) = pool
        .pool
        .as_ref()
        .filter(|p| p.current_num_threads() > 1 && total * size >= POOL_BYTES)
    else {
        for (d, s) in pairs {
            d.copy_from_slice(s);
        }
        return;
    };
    // About four pieces per thread, each between 64 KiB and 1 MiB.
    let piece =
        (total * size / (4 * pool.current_num_threads())).clamp(MIN_PIECE_BYTES, PIECE_BYTES);
    // Pieces a multiple of 4 KiB long: threads meet on few cache lines.
    let per = (piece / 4096 * 4096 / size).max(1);
    let mut pieces: Vec<(&mut [T], &[T])> = Vec::with_capacity(total / per + pairs.len());
    for (d, s) in pairs {
        for (dp, sp) in d.chunks_mut(per).zip(s.chunks(per)) {
            pieces.push((dp, sp));
        }
    }
    pool.install(|| {
        pieces
            .into_par_iter()
            .for_each(|(d, s)| copy_streaming(d, s))
    });
}

/// Copies `src` into `dst` (equal lengths) on the pool.
pub(crate) fn par_copy_one<T: Element>(dst: &mut [T], src: &[T], pool: &CopyPool) {
    par_copy(vec![(dst, src)], pool);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_copy_copies_every_pair_exactly() {
        let srcs: Vec<Vec<u32>> = (0..37)
            .map(|i| (0..(i * 9973 % 50_000 + 1)).map(|v| v * 31 + i).collect())
            .collect();
        let mut dsts: Vec<Vec<u32>> = srcs.iter().map(|s| vec![0; s.len()]).collect();
        let pairs = dsts
            .iter_mut()
            .zip(&srcs)
            .map(|(d, s)| (d.as_mut_slice(), s.as_slice()))
            .collect();
        par_copy(pairs, &CopyPool::new(5));
        assert_eq!(dsts, srcs);
        let mut one = vec![0u8; 3 << 20];
        let src: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        par_copy_one(&mut one, &src, &CopyPool::new(1));
        assert_eq!(one, src);
    }

    #[test]
    fn streaming_copies_are_exact_at_every_alignment_and_length() {
        let src: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        for at in 0..19 {
            for len in [0, 1, 15, 16, 17, 63, 64, 65, 200, 1000, 4000 - 19] {
                let mut dst = vec![0xEEu8; 4096];
                copy_streaming(&mut dst[at..at + len], &src[3..3 + len]);
                assert_eq!(&dst[at..at + len], &src[3..3 + len], "at {at} len {len}");
                assert!(dst[..at].iter().chain(&dst[at + len..]).all(|&b| b == 0xEE));
            }
        }
    }
}
