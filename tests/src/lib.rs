//! Cross-crate scenarios: what a user meets first, across prism-stream,
//! prism-buffer and prism-pipeline. The tests are in `tests/scenarios/`
//! (one test binary); this library holds what they share: a user's own
//! stage with both forms, and the CPU references every output is compared
//! with, bit for bit.
//!
//! Each crate's own tests stay in that crate's `tests/` folder.

use prism_pipeline::{Stage, StageError};
use prism_stream::{fma_chain_cpu, DeviceBuffer, Launch};

/// A user's own stage, written as a user would: `y[j] = fma(s_j, scale,
/// offset)`, where `s_j` is the sum of group `j` of `group` consecutive
/// inputs (the last group of a chunk may be shorter). It shrinks the data
/// (`output_len`), is not elementwise (groups never straddle two chunks),
/// and has both forms: on the GPU two of prism's kernels (`group_sum`, then
/// `fma_chain_in_place` over the sums), on the host a loop that sums in the
/// kernel's order, so both give the same bits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaledGroupSum {
    pub group: u32,
    pub scale: f32,
    pub offset: f32,
}

impl Stage<f32> for ScaledGroupSum {
    fn name(&self) -> &str {
        "scaled_group_sum"
    }
    fn output_len(&self, input_len: usize) -> usize {
        input_len.div_ceil(self.group.max(1) as usize)
    }
    fn has_gpu(&self) -> bool {
        true
    }
    fn has_host(&self) -> bool {
        true
    }
    fn gpu(
        &mut self,
        launch: &mut Launch<'_>,
        input: &DeviceBuffer<f32>,
        output: &mut DeviceBuffer<f32>,
        len: usize,
    ) -> Result<(), StageError> {
        let sums = self.output_len(len);
        launch.group_sum(input, len, self.group, output)?;
        launch.fma_chain_in_place(output, sums, self.scale, self.offset, 1)?;
        Ok(())
    }
    fn host(&self, input: &[f32], output: &mut [f32]) -> Result<(), StageError> {
        if self.group == 0 {
            return Err("scaled_group_sum: group size 0".into());
        }
        for (o, g) in output.iter_mut().zip(input.chunks(self.group as usize)) {
            *o = self.apply(g);
        }
        Ok(())
    }
}

impl ScaledGroupSum {
    /// The stage's output for one group: summed from 0.0 one element after
    /// another (the GPU kernel's order), then one fused multiply-add.
    pub fn apply(&self, group: &[f32]) -> f32 {
        let sum = group.iter().fold(0.0f32, |acc, v| acc + v);
        fma_chain_cpu(sum, self.scale, self.offset, 1)
    }

    /// CPU reference over a whole input cut into chunks of `chunk`
    /// elements (the stage sees one chunk at a time).
    pub fn reference(&self, input: &[f32], chunk: usize) -> Vec<f32> {
        input
            .chunks(chunk)
            .flat_map(|c| c.chunks(self.group as usize).map(|g| self.apply(g)))
            .collect()
    }
}

/// CPU reference of prism's `Clamp` (`fminf(fmaxf(x, lo), hi)`, as the
/// GPU kernel; `f32::clamp` differs on NaN).
pub fn clamp_cpu(x: f32, lo: f32, hi: f32) -> f32 {
    x.max(lo).min(hi)
}

/// Asserts that `got` and `want` hold the same bits, naming the first
/// element that differs.
#[track_caller]
pub fn assert_same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: output length");
    if let Some(i) = got
        .iter()
        .zip(want)
        .position(|(a, b)| a.to_bits() != b.to_bits())
    {
        panic!(
            "{what}: element {i} of {} is {}, the CPU reference {}",
            got.len(),
            got[i],
            want[i]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_groups_within_chunks() {
        let s = ScaledGroupSum {
            group: 4,
            scale: 0.5,
            offset: 1.0,
        };
        let input: Vec<f32> = (0..10).map(|i| i as f32).collect();
        // Chunks of 6: [0..6) gives groups 0+1+2+3 and 4+5; [6..10) one group.
        let want = [6.0 * 0.5 + 1.0, 9.0 * 0.5 + 1.0, 30.0 * 0.5 + 1.0];
        assert_eq!(s.reference(&input, 6), want);
        let mut out = vec![0.0; 2];
        s.host(&input[..6], &mut out).unwrap();
        assert_eq!(out, want[..2]);
    }
}

/// The README's code blocks, compiled and run as doctests
/// (`cargo test -p prism-tests --doc`).
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// The guide's code blocks, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/guide.md")]
pub struct GuideDoctests;
