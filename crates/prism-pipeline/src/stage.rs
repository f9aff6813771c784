//! Stages: named steps with a GPU implementation, a host implementation, or both.

use std::any::Any;

use prism_stream::{DeviceBuffer, Element, Launch};

use crate::error::StageError;

/// One step of a pipeline. A stage reads `len` elements and writes
/// `output_len(len)` elements. The GPU form enqueues kernels on the stream
/// of `launch` (prism's kernels, or your own through `launch.kernel`, which
/// orders and tracks every buffer passed to it); the host
/// form computes on slices. Implement the forms the stage supports.
///
/// Stages are `Send + Sync`, and the host form takes `&self`: the host
/// backend runs one stage on several chunks at once, on the manager's
/// threads. A host stage that keeps state between chunks holds it in a
/// `Mutex` or atomics (and must not rely on seeing chunks in order).
///
/// # Resident state
///
/// A GPU stage may own device memory that outlives chunks: weights or a
/// lookup table uploaded once, an accumulator its kernels update chunk
/// after chunk. Make the buffers before [`add_stage`](crate::PipelineStageManager::add_stage)
/// (`DeviceBuffer::from_slice(&mut lane, &weights)` on a `Lane` of the
/// manager's GPU, [`gpu`](crate::PipelineStageManager::gpu)), or, over
/// several GPUs, in the factory of
/// [`MultiGpuPipeline::add_stage_with`](crate::MultiGpuPipeline::add_stage_with),
/// which gets each GPU in turn (every GPU needs its own copy). Pass them to
/// your kernels like the chunk's buffers (`arg` for the table, `arg_mut`
/// for the accumulator): prism orders every use, so they persist across
/// chunks and across runs, and `Drop` waits for the GPU. To read them back
/// after a run, get the stage with
/// [`stage_mut::<MyStage>(index)`](crate::PipelineStageManager::stage_mut)
/// (or [`stage`](crate::PipelineStageManager::stage)) and read through any
/// lane of the GPU (`lane.read_async(&stage.acc, 0, n)?.wait()?`): the read
/// waits for the last kernel that wrote the buffer, nothing more.
pub trait Stage<T: Element>: Send + Sync {
    /// The name in stats, traces and errors.
    fn name(&self) -> &str;

    /// Elements produced from `input_len` elements (default: the same).
    /// In a chain a stage is never called with no elements: a chunk that a
    /// stage empties skips the later stages and comes back empty (in a
    /// [`StageGraph`](crate::StageGraph) every live node runs, even on an
    /// empty input).
    fn output_len(&self, input_len: usize) -> usize {
        input_len
    }

    /// True when element i of the output depends only on element i of the
    /// input: such stages may run over many small items batched together.
    fn elementwise(&self) -> bool {
        false
    }

    /// True when [`gpu`](Self::gpu) enqueues the same work (kernels,
    /// arguments, scalar parameters) for every chunk of a given length on
    /// the same buffers, so that its launches can be captured once into a
    /// CUDA graph and replayed ([`PipelineConfig::graphs`](crate::PipelineConfig::graphs)).
    /// Default false: a stage whose parameters change between chunks (a
    /// counter, a per-chunk seed) must not say true.
    fn capturable(&self) -> bool {
        false
    }

    /// Whether [`gpu`](Self::gpu) is implemented.
    fn has_gpu(&self) -> bool {
        false
    }

    /// Whether [`host`](Self::host) is implemented.
    fn has_host(&self) -> bool {
        false
    }

    /// Enqueues the stage: `input[..len]` → `output[..output_len(len)]`.
    fn gpu(
        &mut self,
        launch: &mut Launch<'_>,
        input: &DeviceBuffer<T>,
        output: &mut DeviceBuffer<T>,
        len: usize,
    ) -> Result<(), StageError> {
        let _ = (launch, input, output, len);
        Err(format!("stage {} has no GPU implementation", self.name()).into())
    }

    /// Computes the stage on the host: `output.len() == output_len(input.len())`,
    /// and the stage writes every element of `output`. Called on the
    /// manager's threads, for several chunks at once.
    fn host(&self, input: &[T], output: &mut [T]) -> Result<(), StageError> {
        let _ = (input, output);
        Err(format!("stage {} has no host implementation", self.name()).into())
    }
}

/// A stage as the managers store it: the [`Stage`] and, for
/// [`PipelineStageManager::stage`](crate::PipelineStageManager::stage), the
/// `Any` it is, to be found again by type. Implemented for every `'static`
/// stage (which `add_stage` requires anyway), so a user's `Stage` needs
/// nothing for it.
pub(crate) trait AnyStage<T: Element>: Stage<T> {
    /// The stage as `Any`.
    fn as_any(&self) -> &dyn Any;
    /// The stage as `Any`, mutably.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// The stages as plain `Stage`s (for the host backend's threads).
pub(crate) fn refs<T: Element>(stages: &[Box<dyn AnyStage<T>>]) -> Vec<&dyn Stage<T>> {
    stages.iter().map(|s| &**s as &dyn Stage<T>).collect()
}

impl<T: Element, S: Stage<T> + 'static> AnyStage<T> for S {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// `y = x` after `iters` steps of `y = fma(y, a, b)`: prism's FMA chain kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fma {
    /// The multiplier.
    pub a: f32,
    /// The addend.
    pub b: f32,
    /// Steps of `v = fma(v, a, b)`.
    pub iters: u32,
}

impl Stage<f32> for Fma {
    fn name(&self) -> &str {
        "fma"
    }
    fn capturable(&self) -> bool {
        true
    }
    fn elementwise(&self) -> bool {
        true
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
        Ok(launch.fma_chain(input, output, len, self.a, self.b, self.iters)?)
    }
    fn host(&self, input: &[f32], output: &mut [f32]) -> Result<(), StageError> {
        fma_chain(input, output, self.a, self.b, self.iters);
        Ok(())
    }
}

/// `y = clamp(x, lo, hi)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clamp {
    /// Lower bound.
    pub lo: f32,
    /// Upper bound.
    pub hi: f32,
}

impl Stage<f32> for Clamp {
    fn name(&self) -> &str {
        "clamp"
    }
    fn capturable(&self) -> bool {
        true
    }
    fn elementwise(&self) -> bool {
        true
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
        Ok(launch.clamp(input, output, len, self.lo, self.hi)?)
    }
    fn host(&self, input: &[f32], output: &mut [f32]) -> Result<(), StageError> {
        clamp(input, output, self.lo, self.hi);
        Ok(())
    }
}

/// Sums of consecutive groups of `group` elements: shrinks the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSum {
    /// Elements per group (the last group of a chunk may be shorter).
    pub group: u32,
}

impl Stage<f32> for GroupSum {
    fn name(&self) -> &str {
        "group_sum"
    }
    fn capturable(&self) -> bool {
        true
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
        Ok(launch.group_sum(input, len, self.group, output)?)
    }
    fn host(&self, input: &[f32], output: &mut [f32]) -> Result<(), StageError> {
        if self.group == 0 {
            return Err("group_sum: group size 0".into());
        }
        group_sum(input, output, self.group as usize);
        Ok(())
    }
}

/// A host stage from a closure (same-length output). The closure is `Fn`
/// and `Sync`: the host backend calls it for several chunks at once.
pub struct HostFn<T, F> {
    name: String,
    elementwise: bool,
    f: F,
    _t: std::marker::PhantomData<fn(T)>,
}

impl<T, F> std::fmt::Debug for HostFn<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostFn").field("name", &self.name).finish()
    }
}

impl<T: Element, F: Fn(&[T], &mut [T]) -> Result<(), StageError> + Send + Sync> HostFn<T, F> {
    /// A stage named `name` running `f`; `elementwise` says whether output i depends on input i only.
    pub fn new(name: impl Into<String>, elementwise: bool, f: F) -> Self {
        Self {
            name: name.into(),
            elementwise,
            f,
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: Element, F: Fn(&[T], &mut [T]) -> Result<(), StageError> + Send + Sync> Stage<T>
    for HostFn<T, F>
{
    fn name(&self) -> &str {
        &self.name
    }
    fn elementwise(&self) -> bool {
        self.elementwise
    }
    fn has_host(&self) -> bool {
        true
    }
    fn host(&self, input: &[T], output: &mut [T]) -> Result<(), StageError> {
        (self.f)(input, output)
    }
}

/// A GPU stage from a closure (same-length output): enqueue your own kernels,
/// e.g. a module you loaded through cudarc, on `launch.stream()`. The
/// closure is `FnMut + Send`; it need not be `Sync` (the GPU form takes
/// `&mut self`, and the stage keeps the closure behind a `Mutex` it never
/// has to lock).
pub struct GpuFn<T, F> {
    name: String,
    elementwise: bool,
    f: std::sync::Mutex<F>,
    _t: std::marker::PhantomData<fn(T)>,
}

impl<T, F> std::fmt::Debug for GpuFn<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuFn").field("name", &self.name).finish()
    }
}

impl<T: Element, F> GpuFn<T, F>
where
    F: FnMut(
            &mut Launch<'_>,
            &DeviceBuffer<T>,
            &mut DeviceBuffer<T>,
            usize,
        ) -> Result<(), StageError>
        + Send,
{
    /// A stage named `name` running `f`; `elementwise` says whether output i depends on input i only.
    pub fn new(name: impl Into<String>, elementwise: bool, f: F) -> Self {
        Self {
            name: name.into(),
            elementwise,
            f: std::sync::Mutex::new(f),
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: Element, F> Stage<T> for GpuFn<T, F>
where
    F: FnMut(
            &mut Launch<'_>,
            &DeviceBuffer<T>,
            &mut DeviceBuffer<T>,
            usize,
        ) -> Result<(), StageError>
        + Send,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn elementwise(&self) -> bool {
        self.elementwise
    }
    fn has_gpu(&self) -> bool {
        true
    }
    fn gpu(
        &mut self,
        launch: &mut Launch<'_>,
        input: &DeviceBuffer<T>,
        output: &mut DeviceBuffer<T>,
        len: usize,
    ) -> Result<(), StageError> {
        // `&mut self`: no lock needed. A panic in the closure (caught by
        // the pipeline) poisons nothing, as the mutex is never locked.
        let f = self
            .f
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(launch, input, output, len)
    }
}

/// Elements per block of [`fma_chain`]: small enough to stay in L1 while
/// the `iters` steps run over it.
const FMA_BLOCK: usize = 512;

/// `output[i] = fma_chain_cpu(input[i], a, b, iters)`, bit for bit: each
/// element gets the same `iters` fused multiply-adds in the same order,
/// with the loop over `iters` outside the loop over elements (per block) so
/// the element loop vectorises. On CPUs with FMA (detected at run time) it
/// runs as vector FMA instructions; elsewhere `mul_add` is the correctly
/// rounded software `fmaf`, so results are identical everywhere.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "x86_64+fma"))]
pub(crate) fn fma_chain(input: &[f32], output: &mut [f32], a: f32, b: f32, iters: u32) {
    for (o, x) in output.chunks_mut(FMA_BLOCK).zip(input.chunks(FMA_BLOCK)) {
        o.copy_from_slice(x);
        for _ in 0..iters {
            for v in o.iter_mut() {
                *v = v.mul_add(a, b);
            }
        }
    }
}

/// `output[i] = input[i].max(lo).min(hi)` (`fminf(fmaxf(x, lo), hi)`, as
/// the GPU kernel), wider vectors where the CPU has them.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "x86_64+avx"))]
pub(crate) fn clamp(input: &[f32], output: &mut [f32], lo: f32, hi: f32) {
    for (o, x) in output.iter_mut().zip(input) {
        *o = x.max(lo).min(hi);
    }
}

/// Groups summed side by side by [`group_sum`].
const SUM_LANES: usize = 8;

/// `output[j]` = the sum of `input[j * group..][..group]`, each group summed
/// from 0.0 one element after another (the GPU kernel's order). Groups are
/// summed `SUM_LANES` at a time with one accumulator each: the order within
/// a group does not change, but the adds of different groups overlap (and
/// vectorise where the CPU can gather them).
#[multiversion::multiversion(targets("x86_64+avx2+fma", "x86_64+avx"))]
pub(crate) fn group_sum(input: &[f32], output: &mut [f32], group: usize) {
    let block = group * SUM_LANES;
    let full = (input.len() / block).min(output.len() / SUM_LANES);
    for (o, x) in output
        .chunks_exact_mut(SUM_LANES)
        .zip(input.chunks_exact(block))
        .take(full)
    {
        let mut acc = [0.0f32; SUM_LANES];
        for i in 0..group {
            for (lane, a) in acc.iter_mut().enumerate() {
                *a += x[lane * group + i];
            }
        }
        o.copy_from_slice(&acc);
    }
    let done = full * SUM_LANES;
    for (o, g) in output[done..]
        .iter_mut()
        .zip(input[done * group..].chunks(group))
    {
        *o = g.iter().fold(0.0, |acc, v| acc + v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prism_stream::fma_chain_cpu;
    use rand::{RngExt, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    /// Random bit patterns (NaNs, infinities, subnormals, zeros of both
    /// signs included), with the special values up front.
    fn any_f32(seed: u64, n: usize) -> Vec<f32> {
        let special = [
            0.0,
            -0.0,
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE / 3.0,
            f32::MAX,
            f32::MIN,
            1.0,
            -1.0,
        ];
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        special
            .into_iter()
            .chain(std::iter::repeat_with(move || {
                // Half raw bit patterns, half ordinary values in [-1, 1).
                if rng.random::<bool>() {
                    f32::from_bits(rng.random())
                } else {
                    rng.random_range(-1.0..1.0)
                }
            }))
            .take(n)
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn fma_matches_fma_chain_cpu_bit_for_bit() {
        for (seed, n) in [
            (1u64, 0usize),
            (2, 1),
            (3, 7),
            (4, 511),
            (5, 513),
            (6, 5000),
        ] {
            let input = any_f32(seed, n);
            for (a, b) in [
                (1.0001f32, 0.5f32),
                (-3.7, 1e-30),
                (0.1, -0.1),
                (f32::MAX, 2.0),
            ] {
                for iters in 0..5 {
                    let stage = Fma { a, b, iters };
                    let mut out = vec![0.0; n];
                    stage.host(&input, &mut out).unwrap();
                    let want: Vec<f32> = input
                        .iter()
                        .map(|x| fma_chain_cpu(*x, a, b, iters))
                        .collect();
                    assert_eq!(bits(&out), bits(&want), "n {n} a {a} b {b} iters {iters}");
                }
            }
        }
    }

    #[test]
    fn clamp_matches_the_scalar_form_bit_for_bit() {
        let input = any_f32(7, 4099);
        for (lo, hi) in [(-1.0f32, 1.0f32), (0.0, 0.0), (-0.0, 0.0), (2.0, 3.0)] {
            let mut out = vec![0.0; input.len()];
            Clamp { lo, hi }.host(&input, &mut out).unwrap();
            let want: Vec<f32> = input.iter().map(|x| x.max(lo).min(hi)).collect();
            assert_eq!(bits(&out), bits(&want), "lo {lo} hi {hi}");
        }
    }

    #[test]
    fn group_sum_adds_each_group_in_order_bit_for_bit() {
        for (seed, n) in [
            (8u64, 0usize),
            (9, 1),
            (10, 63),
            (11, 64),
            (12, 1000),
            (13, 4097),
        ] {
            // Ordinary values of mixed magnitude: the order of the adds
            // shows in the rounding.
            let input: Vec<f32> = any_f32(seed, n)
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    if v.is_finite() {
                        v * (1 << (i % 20)) as f32
                    } else {
                        1.5
                    }
                })
                .collect();
            for group in [1u32, 2, 3, 7, 8, 16, 33, 1000] {
                let stage = GroupSum { group };
                let mut out = vec![f32::NAN; stage.output_len(n)];
                stage.host(&input, &mut out).unwrap();
                let want: Vec<f32> = input
                    .chunks(group as usize)
                    .map(|g| {
                        let mut acc = 0.0f32;
                        for v in g {
                            acc += v;
                        }
                        acc
                    })
                    .collect();
                assert_eq!(bits(&out), bits(&want), "n {n} group {group}");
            }
        }
        let mut out = [0.0];
        assert!(GroupSum { group: 0 }.host(&[1.0], &mut out).is_err());
    }
}
