//! The manager's host threads: a persistent pool (rayon), sized by
//! `PipelineConfig::host_threads`. On the GPU, pageable input/output and
//! item gathering copy on it (one thread cannot move bytes as fast as a
//! PCIe Gen5 link); on the host backend, the stages run on it.

use rayon::prelude::*;

/// Bytes each piece of a parallel copy moves (enough to amortise the hand
/// over to a pool thread, small enough to balance the threads).
const PIECE_BYTES: usize = 1 << 20;

/// The host threads of a manager.
#[derive(Debug)]
pub(crate) struct CopyPool {
    /// `None` only if the threads could not be started: then everything
    /// runs on the calling thread.
    pool: Option<rayon::ThreadPool>,
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
        Self { pool }
    }

    /// The pool, for the host backend's stages.
    pub(crate) fn pool(&self) -> Option<&rayon::ThreadPool> {
        self.pool.as_ref()
    }
}

/// Copies each `(dst, src)` pair (equal lengths), cut into pieces of about
/// 1 MiB spread over the pool. Totals under 1 MiB stay on this thread.
pub(crate) fn par_copy<T: Copy + Send + Sync>(pairs: Vec<(&mut [T], &[T])>, pool: &CopyPool) {
    let total: usize = pairs.iter().map(|(d, _)| d.len()).sum();
    let size = std::mem::size_of::<T>().max(1);
    let Some(pool) = pool
        .pool
        .as_ref()
        .filter(|p| p.current_num_threads() > 1 && total * size >= PIECE_BYTES)
    else {
        for (d, s) in pairs {
            d.copy_from_slice(s);
        }
        return;
    };
    let per = (PIECE_BYTES / size).max(1);
    let mut pieces: Vec<(&mut [T], &[T])> = Vec::with_capacity(total / per + pairs.len());
    for (d, s) in pairs {
        for (dp, sp) in d.chunks_mut(per).zip(s.chunks(per)) {
            pieces.push((dp, sp));
        }
    }
    pool.install(|| {
        pieces
            .into_par_iter()
            .for_each(|(d, s)| d.copy_from_slice(s))
    });
}

/// Copies `src` into `dst` (equal lengths) on the pool.
pub(crate) fn par_copy_one<T: Copy + Send + Sync>(dst: &mut [T], src: &[T], pool: &CopyPool) {
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
}
