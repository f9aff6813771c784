//! Host cost of the coordinator: `queue_upload` + `queue_compute` +
//! `queue_download`, each with one dependency, against the same three calls
//! made on cudarc directly (event tracking off, one event record + stream wait
//! per dependency). Small copies, so the host side dominates. Prints µs per op
//! and the ratio. Not a test: a measurement.
//!
//! `cargo run --release -p prism-stream --example coordinator_overhead`

use std::sync::Arc;
use std::time::Instant;

use prism_stream::cudarc::driver::{CudaContext, CudaStream};
use prism_stream::testing::{gpu_required, random_f32};
use prism_stream::{AsyncCoordinator, DeviceBuffer, Error, Gpu, HostAllocFlags, PinnedBuffer};

const ITERS: usize = 2000;
const N: usize = 1024;

fn main() {
    let gpu = match Gpu::open(0) {
        Ok(g) => g,
        Err(e @ (Error::DriverNotFound | Error::NoDevice)) if !gpu_required() => {
            println!("coordinator_overhead: no GPU here ({e}); nothing to measure");
            return;
        }
        Err(e) => panic!("coordinator_overhead: {e}"),
    };
    let mut prism_us = Vec::new();
    let mut raw_us = Vec::new();
    for _ in 0..7 {
        prism_us.push(prism_round(&gpu).expect("prism round"));
        raw_us.push(cudarc_round(gpu.cuda_context()));
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (p, r) = (med(&mut prism_us), med(&mut raw_us));
    println!("prism coordinator_overhead: {ITERS} x (upload + compute + download, 1 dependency each), {N} f32 per copy, median of 7 on {}", gpu.info().name);
    println!("prism coordinator_overhead: prism   {p:.3} us/op");
    println!("prism coordinator_overhead: cudarc  {r:.3} us/op");
    println!(
        "prism coordinator_overhead: prism - cudarc = {:+.3} us/op, ratio {:.2}",
        p - r,
        p / r
    );
}

/// Host µs per op for prism.
fn prism_round(gpu: &Gpu) -> Result<f64, Error> {
    let src = PinnedBuffer::from_slice(gpu, &random_f32(1, N), HostAllocFlags::DEFAULT)?;
    let mut dst = PinnedBuffer::<f32>::new(gpu, N, HostAllocFlags::DEFAULT)?;
    let mut x = DeviceBuffer::<f32>::new(gpu, N)?;
    let mut y = DeviceBuffer::<f32>::new(gpu, N)?;
    let mut c = AsyncCoordinator::new(gpu)?;
    let mut last = None;
    let t = Instant::now();
    for _ in 0..ITERS {
        let deps: Vec<_> = last.into_iter().collect();
        let up = c.queue_upload(&src, &mut x, &deps)?;
        let k = c.queue_compute("fma", &[up], |l| l.fma_chain(&x, &mut y, N, 1.0, 0.5, 1))?;
        last = Some(c.queue_download(&y, &mut dst, &[k])?);
        if c.pending() > 256 {
            c.poll();
        }
    }
    let host = t.elapsed().as_secs_f64();
    c.synchronize_all()?;
    Ok(host * 1e6 / (3 * ITERS) as f64)
}

/// Host µs per op for the same work on cudarc alone.
fn cudarc_round(ctx: &Arc<CudaContext>) -> f64 {
    let up: Arc<CudaStream> = ctx.new_stream().unwrap();
    let comp = ctx.new_stream().unwrap();
    let down = ctx.new_stream().unwrap();
    // SAFETY: filled by the copy below before any read; f32 is valid for any bits.
    let mut src = unsafe { ctx.alloc_pinned_with_flags::<f32>(N, 0) }.unwrap();
    src.as_mut_slice()
        .unwrap()
        .copy_from_slice(&random_f32(1, N));
    // SAFETY: as above.
    let mut dst = unsafe { ctx.alloc_pinned_with_flags::<f32>(N, 0) }.unwrap();
    let mut x = up.alloc_zeros::<f32>(N).unwrap();
    let y = comp.alloc_zeros::<f32>(N).unwrap();
    let e_up = ctx.new_event(None).unwrap();
    let e_k = ctx.new_event(None).unwrap();
    let e_down = ctx.new_event(None).unwrap();
    ctx.synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..ITERS {
        up.wait(&e_down).unwrap();
        up.memcpy_htod(&src, &mut x).unwrap();
        e_up.record(&up).unwrap();
        comp.wait(&e_up).unwrap();
        let xp = prism_stream::cudarc::driver::DevicePtr::device_ptr(&x, &comp).0;
        let yp = prism_stream::cudarc::driver::DevicePtr::device_ptr(&y, &comp).0;
        // SAFETY: x and y hold N f32 each and live until the synchronize below.
        let code = unsafe {
            prism_cuda_sys::prism_fma_chain_f32(
                xp as *const f32,
                yp as *mut f32,
                N as u64,
                1.0,
                0.5,
                1,
                comp.cu_stream().cast(),
            )
        };
        assert_eq!(code, 0);
        e_k.record(&comp).unwrap();
        down.wait(&e_k).unwrap();
        down.memcpy_dtoh(&y, &mut dst).unwrap();
        e_down.record(&down).unwrap();
    }
    let host = t.elapsed().as_secs_f64();
    ctx.synchronize().unwrap();
    host * 1e6 / (3 * ITERS) as f64
}
