//! Helpers of the hand-over tests (`gpu_interop.rs`, `gpu_foreign.rs`):
//! memory and streams changing hands while the old owner's work still runs.

#![allow(dead_code)] // each test binary uses its own part

use std::sync::Arc;

use prism_stream::cudarc::driver::CudaStream;
use prism_stream::{fma_chain_cpu, DeviceBuffer, Gpu, HostAllocFlags, Lane, PinnedBuffer};

/// How long the old owner's work keeps running after a hand-over is queued.
pub const SPIN_NS: u64 = 300_000_000;
pub const A: f32 = 1.0001;
pub const B: f32 = 0.25;
pub const ITERS: u32 = 3;

/// prism's `fma_chain(A, B, ITERS)` on the CPU.
pub fn reference(input: &[f32]) -> Vec<f32> {
    input
        .iter()
        .map(|&x| fma_chain_cpu(x, A, B, ITERS))
        .collect()
}

#[track_caller]
pub fn assert_same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: element {i} of {} is {}, the CPU reference {} (a hand-over not ordered after the work that wrote it?)",
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// `stream` made busy for `ns` by a prism spin kernel: the stream is lent
/// to a lane and taken back (it must be the only handle to it).
pub fn busy(gpu: &Gpu, stream: Arc<CudaStream>, ns: u64) -> Arc<CudaStream> {
    let mut lane = Lane::from_cuda_stream(gpu, stream).unwrap();
    lane.launch().spin(ns).unwrap();
    lane.into_cuda_stream().unwrap()
}

/// `buf`'s contents, through prism's own lanes.
pub fn download(gpu: &Gpu, buf: &DeviceBuffer<f32>) -> Vec<f32> {
    let mut lane = Lane::new(gpu).unwrap();
    let mut host = PinnedBuffer::<f32>::new(gpu, buf.len(), HostAllocFlags::DEFAULT).unwrap();
    lane.copy_dtoh(buf, 0, &mut host, 0, buf.len()).unwrap();
    host.wait_slice().unwrap().to_vec()
}
