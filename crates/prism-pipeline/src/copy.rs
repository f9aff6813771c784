//! Host-side copies split over threads: one thread cannot move bytes as
//! fast as a PCIe Gen5 link, so pageable input/output and item gathering use
//! several.

/// Copies each `(dst, src)` pair (equal lengths), spreading the bytes over
/// up to `threads` scoped threads. Small totals stay on this thread.
pub(crate) fn par_copy<T: Copy + Send + Sync>(pairs: Vec<(&mut [T], &[T])>, threads: usize) {
    let total: usize = pairs.iter().map(|(d, _)| d.len()).sum();
    let bytes = total * std::mem::size_of::<T>();
    if threads <= 1 || bytes < (1 << 20) {
        for (d, s) in pairs {
            d.copy_from_slice(s);
        }
        return;
    }
    // Cut the pairs into pieces of about total/threads elements.
    let per = total.div_ceil(threads).max(1);
    let mut groups: Vec<Vec<(&mut [T], &[T])>> = vec![Vec::new()];
    let mut filled = 0;
    for (mut d, mut s) in pairs {
        while !d.is_empty() {
            let room = per - filled;
            let take = room.min(d.len());
            let (dh, dt) = d.split_at_mut(take);
            let (sh, st) = s.split_at(take);
            if let Some(g) = groups.last_mut() {
                g.push((dh, sh));
            }
            filled += take;
            d = dt;
            s = st;
            if filled == per {
                groups.push(Vec::new());
                filled = 0;
            }
        }
    }
    std::thread::scope(|scope| {
        for group in groups.into_iter().filter(|g| !g.is_empty()) {
            scope.spawn(move || {
                for (d, s) in group {
                    d.copy_from_slice(s);
                }
            });
        }
    });
}

/// Copies `src` into `dst` (equal lengths) with up to `threads` threads.
pub(crate) fn par_copy_one<T: Copy + Send + Sync>(dst: &mut [T], src: &[T], threads: usize) {
    par_copy(vec![(dst, src)], threads);
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
        par_copy(pairs, 5);
        assert_eq!(dsts, srcs);
    }
}
