//! Helpers shared by the test files (`mod common;`): a host manager,
//! random stage chains, a sequential reference and bit-exact comparison;
//! and [`TestBackend`], the backend a scenario written once runs on (a
//! `host_*` test and a `gpu_*` test call the same scenario function).

#![allow(dead_code)]

pub mod draws;

use std::sync::atomic::{AtomicUsize, Ordering};

use prism_pipeline::{
    Backend, Clamp, Fma, GpuFn, GpuPipelineExt, GroupSum, HostFn, PipelineConfig,
    PipelineStageManager, Stage, StageError,
};
use prism_stream::{DeviceBuffer, Gpu, Launch, ManagedGpuContext};

/// The backend a scenario runs on: the host backend (runs everywhere), or
/// GPU 0 from [`prism_testing::gpu_or_skip`] (a `gpu_*` test without a
/// GPU prints `SKIPPED <test>: <reason>` and returns).
pub enum TestBackend {
    Host,
    Gpu(Box<ManagedGpuContext>),
}

impl TestBackend {
    /// GPU 0, or `None` after printing that `test` was skipped and why.
    pub fn gpu_or_skip(test: &str) -> Option<Self> {
        prism_testing::gpu_or_skip(test).map(|ctx| Self::Gpu(Box::new(ctx)))
    }

    /// The GPU (`None` on the host backend).
    pub fn gpu(&self) -> Option<&Gpu> {
        match self {
            Self::Host => None,
            Self::Gpu(ctx) => Some(ctx.gpu()),
        }
    }

    pub fn is_gpu(&self) -> bool {
        matches!(self, Self::Gpu(_))
    }

    /// A manager on this backend: `PipelineStageManager::new(Backend::Host, ..)`
    /// or the context's `create_pipeline_manager`.
    pub fn manager(&self, config: PipelineConfig) -> PipelineStageManager<f32> {
        match self {
            Self::Host => PipelineStageManager::new(Backend::Host, config).unwrap(),
            Self::Gpu(ctx) => ctx.create_pipeline_manager::<f32>(config).unwrap(),
        }
    }

    /// Adds to `p` a stage of this backend's form named `name` that copies
    /// its input (elementwise) and fails with `message` on its `call`-th
    /// call (counted from 1): a `HostFn`, or a `GpuFn` whose copy is a clamp
    /// to the whole range. Returns its index. The GPU calls a stage chunk by
    /// chunk, so call `k` is chunk `k - 1`; on the host that holds where
    /// chunks run one at a time (one host thread, or one `execute_iteration`
    /// at a time).
    pub fn add_failing_copy(
        &self,
        p: &mut PipelineStageManager<f32>,
        name: &str,
        call: usize,
        message: &'static str,
    ) -> usize {
        match self {
            Self::Host => {
                let calls = AtomicUsize::new(0);
                p.add_stage(HostFn::new(name, true, move |i: &[f32], o: &mut [f32]| {
                    if calls.fetch_add(1, Ordering::SeqCst) + 1 == call {
                        return Err(message.into());
                    }
                    o.copy_from_slice(i);
                    Ok(())
                }))
            }
            Self::Gpu(_) => {
                let mut calls = 0;
                p.add_stage(GpuFn::new(
                    name,
                    true,
                    move |l: &mut Launch<'_>,
                          i: &DeviceBuffer<f32>,
                          o: &mut DeviceBuffer<f32>,
                          n| {
                        calls += 1;
                        if calls == call {
                            return Err(message.into());
                        }
                        Ok(l.clamp(i, o, n, f32::MIN, f32::MAX)?)
                    },
                ))
            }
        }
    }
}

/// A host-backend manager with chunks of `chunk_elems` f32.
pub fn host(chunk_elems: usize, slots: usize) -> PipelineStageManager<f32> {
    host_threads(chunk_elems, slots, PipelineConfig::default().host_threads)
}

/// A host-backend manager with chunks of `chunk_elems` f32 whose stages
/// run on `threads` host threads.
pub fn host_threads(chunk_elems: usize, slots: usize, threads: usize) -> PipelineStageManager<f32> {
    let config = PipelineConfig {
        chunk_bytes: chunk_elems * 4,
        slots,
        host_threads: threads,
        ..PipelineConfig::default()
    };
    PipelineStageManager::new(Backend::Host, config).unwrap()
}

/// One of the built-in stages, picked and parameterised by `code` and `a`.
pub fn stage_from(code: u8, a: f32) -> Box<dyn Stage<f32>> {
    match code % 3 {
        0 => Box::new(Fma {
            a,
            b: 0.25,
            iters: (code as u32 % 4) + 1,
        }),
        1 => Box::new(Clamp {
            lo: -a.abs(),
            hi: a.abs(),
        }),
        _ => Box::new(GroupSum {
            group: (code as u32 % 5) + 1,
        }),
    }
}

/// The stages over one chunk, one after another, on the calling thread.
pub fn reference_chunk(stages: &[Box<dyn Stage<f32>>], chunk: &[f32]) -> Vec<f32> {
    let mut cur = chunk.to_vec();
    for s in stages {
        let mut next = vec![0.0; s.output_len(cur.len())];
        s.host(&cur, &mut next).unwrap();
        cur = next;
    }
    cur
}

pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Adapts a boxed stage to `add_stage`.
pub struct BoxedStage(pub Box<dyn Stage<f32>>);

impl Stage<f32> for BoxedStage {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn output_len(&self, n: usize) -> usize {
        self.0.output_len(n)
    }
    fn elementwise(&self) -> bool {
        self.0.elementwise()
    }
    fn has_gpu(&self) -> bool {
        self.0.has_gpu()
    }
    fn has_host(&self) -> bool {
        self.0.has_host()
    }
    fn host(&self, i: &[f32], o: &mut [f32]) -> Result<(), StageError> {
        self.0.host(i, o)
    }
}
