//! Helpers shared by the host-backend test files (`mod common;`): a host
//! manager, random stage chains, a sequential reference and bit-exact
//! comparison.

#![allow(dead_code)]

pub mod draws;

use prism_pipeline::{
    Backend, Clamp, Fma, GroupSum, PipelineConfig, PipelineStageManager, Stage, StageError,
};

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
