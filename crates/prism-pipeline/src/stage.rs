//! Stages: named steps with a GPU implementation, a host implementation, or both.

use prism_stream::{fma_chain_cpu, DeviceBuffer, Element, Launch};

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
pub trait Stage<T: Element>: Send + Sync {
    fn name(&self) -> &str;

    /// Elements produced from `input_len` elements (default: the same).
    fn output_len(&self, input_len: usize) -> usize {
        input_len
    }

    /// True when element i of the output depends only on element i of the
    /// input: such stages may run over many small items batched together.
    fn elementwise(&self) -> bool {
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

/// `y = x` after `iters` steps of `y = fma(y, a, b)`: prism's FMA chain kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fma {
    pub a: f32,
    pub b: f32,
    pub iters: u32,
}

impl Stage<f32> for Fma {
    fn name(&self) -> &str {
        "fma"
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
        for (o, x) in output.iter_mut().zip(input) {
            *o = fma_chain_cpu(*x, self.a, self.b, self.iters);
        }
        Ok(())
    }
}

/// `y = clamp(x, lo, hi)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clamp {
    pub lo: f32,
    pub hi: f32,
}

impl Stage<f32> for Clamp {
    fn name(&self) -> &str {
        "clamp"
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
        for (o, x) in output.iter_mut().zip(input) {
            *o = x.max(self.lo).min(self.hi);
        }
        Ok(())
    }
}

/// Sums of consecutive groups of `group` elements: shrinks the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSum {
    pub group: u32,
}

impl Stage<f32> for GroupSum {
    fn name(&self) -> &str {
        "group_sum"
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
        for (o, g) in output.iter_mut().zip(input.chunks(self.group as usize)) {
            // Sequential sum, the order the GPU kernel uses.
            *o = g.iter().fold(0.0, |acc, v| acc + v);
        }
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
