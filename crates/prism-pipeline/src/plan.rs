//! How a run over a slice is cut into chunks.
//!
//! Full chunks keep per-chunk costs small, but the ring fills behind the
//! first chunk's upload and drains behind the last chunk's kernels and
//! download, none of which overlaps anything. With the ramp on (and only
//! elementwise stages, whose output does not depend on where chunks
//! begin), a run of at least four chunks starts with a quarter and a half
//! chunk and ends with chunks that halve down to a quarter, so what does
//! not overlap at either end is a short copy, not a full one.

/// Chunk lengths are rounded to this many elements (the last one excepted).
const ALIGN: usize = 4096;

/// The chunk lengths of a run over `total` elements, in order.
#[derive(Debug, Clone)]
pub(crate) struct ChunkPlan {
    left: usize,
    chunk: usize,
    ramp: bool,
    issued: usize,
}

impl ChunkPlan {
    /// Chunks of `chunk` elements (at least 1) over `total` elements,
    /// ramped at both ends when `ramp` is true and the run is long enough.
    pub(crate) fn new(total: usize, chunk: usize, ramp: bool) -> Self {
        let chunk = chunk.max(1);
        Self {
            left: total,
            chunk,
            // Ramps only pay on runs of several chunks, and only with room
            // for aligned quarters.
            ramp: ramp && chunk / 4 >= ALIGN && total / 4 >= chunk,
            issued: 0,
        }
    }

    fn ramped(&self) -> usize {
        let (c, left) = (self.chunk, self.left);
        let quarter = round(c / 4);
        match self.issued {
            0 => return quarter,
            1 => return round(c / 2),
            _ => {}
        }
        if left > 2 * c {
            c
        } else if left > quarter {
            // Halve what is left, down to a quarter chunk.
            round(left.div_ceil(2)).clamp(quarter, c)
        } else {
            left
        }
    }
}

impl ChunkPlan {
    /// Full chunks the plan hands out next, one after another: all of them
    /// when flat, those before the closing ramp when ramped.
    fn full_ahead(&self) -> usize {
        let c = self.chunk;
        if !self.ramp {
            self.left / c
        } else if self.issued >= 2 && self.left > 2 * c {
            (self.left - 2 * c).div_ceil(c)
        } else {
            0
        }
    }

    /// The same lengths as the iterator, as (length, how many in a row),
    /// in time proportional to the number of distinct runs, not of chunks
    /// (for sizes of any magnitude).
    pub(crate) fn runs(mut self) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        let mut push = |len: usize, count: usize| match out.last_mut() {
            Some((l, n)) if *l == len => *n += count,
            _ => out.push((len, count)),
        };
        loop {
            let k = self.full_ahead();
            if k > 0 {
                self.left -= k * self.chunk;
                self.issued += k;
                push(self.chunk, k);
            }
            match self.next() {
                Some(len) => push(len, 1),
                None => return out,
            }
        }
    }
}

fn round(n: usize) -> usize {
    (n.div_ceil(ALIGN) * ALIGN).max(ALIGN)
}

impl Iterator for ChunkPlan {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.left == 0 {
            return None;
        }
        let want = if self.ramp { self.ramped() } else { self.chunk };
        let len = want.min(self.left);
        self.left -= len;
        self.issued += 1;
        Some(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ramped_run_starts_and_ends_small() {
        let c = 1 << 20;
        let lens: Vec<usize> = ChunkPlan::new(16 * c, c, true).collect();
        assert_eq!(lens.iter().sum::<usize>(), 16 * c);
        assert_eq!(lens[0], c / 4);
        assert_eq!(lens[1], c / 2);
        let tail = &lens[lens.len() - 4..];
        assert!(tail.windows(2).all(|w| w[0] >= w[1]), "{tail:?}");
        assert!(tail[3] <= c / 4 && tail[0] < c, "{tail:?}");
        assert!(lens.len() <= 16 + 4);
        let flat: Vec<usize> = ChunkPlan::new(16 * c + 3, c, false).collect();
        assert_eq!(flat.len(), 17);
        assert_eq!(flat[16], 3);
        // Short runs are not ramped.
        assert!(ChunkPlan::new(3 * c, c, true).all(|l| l == c));
        // Sizes near the top of usize neither overflow nor loop.
        assert_eq!(ChunkPlan::new(usize::MAX, usize::MAX / 2, true).count(), 3);
        assert_eq!(ChunkPlan::new(10, usize::MAX, true).count(), 1);
        // Runs of a huge plan come at once.
        assert_eq!(
            ChunkPlan::new(1 << 60, 16, false).runs(),
            vec![(16, 1 << 56)]
        );
        let ramped = ChunkPlan::new((1 << 50) + 5, 1 << 20, true).runs();
        assert_eq!(
            ramped.iter().map(|&(l, n)| l * n).sum::<usize>(),
            (1 << 50) + 5
        );
        assert!(ramped.len() <= 8, "{ramped:?}");
    }

    proptest! {
        #[test]
        fn runs_are_the_plan_run_length_encoded(
            total in 0usize..50_000_000,
            chunk in 1usize..4_000_000,
            ramp: bool,
        ) {
            let lens: Vec<usize> = ChunkPlan::new(total, chunk, ramp).collect();
            let runs = ChunkPlan::new(total, chunk, ramp).runs();
            let expanded: Vec<usize> = runs
                .iter()
                .flat_map(|&(l, n)| std::iter::repeat_n(l, n))
                .collect();
            prop_assert_eq!(expanded, lens);
            prop_assert!(runs.windows(2).all(|w| w[0].0 != w[1].0));
        }

        #[test]
        fn plans_cover_the_input_in_bounded_chunks(
            total in 0usize..50_000_000,
            chunk in 1usize..4_000_000,
            ramp: bool,
        ) {
            let lens: Vec<usize> = ChunkPlan::new(total, chunk, ramp).collect();
            prop_assert_eq!(lens.iter().sum::<usize>(), total);
            prop_assert!(lens.iter().all(|&l| l >= 1 && l <= chunk));
            // At most four chunks more than a flat cut.
            prop_assert!(lens.len() <= total.div_ceil(chunk) + 4);
            if !ramp {
                prop_assert!(lens.iter().rev().skip(1).all(|&l| l == chunk));
            }
        }
    }
}
