//! prism's kernels from both sources, the nvcc launchers and the bundled PTX
//! launched through the driver API, give bit-identical results, each equal
//! to the CPU reference on random data. In a build without launchers (no
//! nvcc, or the `cuda-12` feature) the PTX runs alone and asking for the
//! launchers is a typed error.

use std::time::Instant;

use prism_stream::{
    fma_chain_cpu, pattern, DeviceBuffer, Element, Error, Gpu, HostAllocFlags, KernelSource, Lane,
    PinnedBuffer,
};
use prism_testing::{gpu_or_skip, random_f32, scaled};

fn upload<T: Element>(lane: &mut Lane, data: &[T]) -> DeviceBuffer<T> {
    let host = PinnedBuffer::from_slice(lane.gpu(), data, HostAllocFlags::DEFAULT).unwrap();
    let mut dev = DeviceBuffer::zeroed(lane, data.len()).unwrap();
    lane.copy_htod(&host, 0, &mut dev, 0, data.len()).unwrap();
    dev
}

fn download<T: Element>(lane: &mut Lane, dev: &DeviceBuffer<T>, n: usize) -> Vec<T> {
    let mut host = PinnedBuffer::new(lane.gpu(), n, HostAllocFlags::DEFAULT).unwrap();
    lane.copy_dtoh(dev, 0, &mut host, 0, n).unwrap();
    let out = host.wait_slice().unwrap().to_vec();
    out
}

/// Every output of one pass over prism's kernels, as bits.
#[derive(Debug, PartialEq, Eq)]
struct Outputs(Vec<(&'static str, Vec<u64>)>);

fn bits(v: &[f32]) -> Vec<u64> {
    v.iter().map(|x| u64::from(x.to_bits())).collect()
}

/// Runs every kernel with `source`, checks each output against the CPU,
/// and returns them all.
fn run_all(gpu: &Gpu, source: KernelSource) -> Outputs {
    gpu.set_kernel_source(source).unwrap();
    assert_eq!(gpu.kernel_source(), source);
    let mut lane = Lane::new(gpu).unwrap();
    let mut out = Vec::new();
    let (a, b, iters) = (1.0001f32, -0.25f32, 13u32);

    // fma_chain: a length that is not a multiple of 4 runs the float4
    // kernel and the scalar tail; 3 elements run the scalar kernel alone.
    for n in [scaled(1 << 22, 1 << 12) + 3, 3] {
        let x = random_f32(n as u64, n);
        let xd = upload(&mut lane, &x);
        let mut yd = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
        lane.launch()
            .fma_chain(&xd, &mut yd, n, a, b, iters)
            .unwrap();
        let y = download(&mut lane, &yd, n);
        for (i, (&xi, &yi)) in x.iter().zip(&y).enumerate() {
            let want = fma_chain_cpu(xi, a, b, iters);
            assert_eq!(
                yi.to_bits(),
                want.to_bits(),
                "{source:?} fma_chain n={n} [{i}]"
            );
        }
        out.push(("fma_chain", bits(&y)));
        // In place, over the same data.
        let mut zd = upload(&mut lane, &x);
        lane.launch()
            .fma_chain_in_place(&mut zd, n, a, b, iters)
            .unwrap();
        let z = download(&mut lane, &zd, n);
        assert_eq!(z, y, "{source:?} fma_chain_in_place n={n}");
        out.push(("fma_chain_in_place", bits(&z)));
    }

    // clamp and clamp_in_place.
    let n = scaled(1 << 20, 1 << 10) + 1;
    let x = random_f32(7, n);
    let (lo, hi) = (-0.5f32, 0.25f32);
    let xd = upload(&mut lane, &x);
    let mut yd = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    lane.launch().clamp(&xd, &mut yd, n, lo, hi).unwrap();
    let y = download(&mut lane, &yd, n);
    let want: Vec<f32> = x.iter().map(|v| v.max(lo).min(hi)).collect();
    assert_eq!(bits(&y), bits(&want), "{source:?} clamp");
    out.push(("clamp", bits(&y)));
    let mut zd = upload(&mut lane, &x);
    lane.launch().clamp_in_place(&mut zd, n, lo, hi).unwrap();
    assert_eq!(
        bits(&download(&mut lane, &zd, n)),
        bits(&want),
        "{source:?} clamp_in_place"
    );

    // group_sum, with a last group shorter than the others.
    let (n, group) = (scaled(1 << 20, 1 << 10) + 5, 7u32);
    let x = random_f32(8, n);
    let xd = upload(&mut lane, &x);
    let groups = n.div_ceil(group as usize);
    let mut sd = DeviceBuffer::<f32>::zeroed(&mut lane, groups).unwrap();
    lane.launch().group_sum(&xd, n, group, &mut sd).unwrap();
    let s = download(&mut lane, &sd, groups);
    let want: Vec<f32> = x
        .chunks(group as usize)
        .map(|c| c.iter().fold(0.0f32, |acc, v| acc + v))
        .collect();
    assert_eq!(bits(&s), bits(&want), "{source:?} group_sum");
    out.push(("group_sum", bits(&s)));

    // fill_pattern, then check_pattern against the right and a wrong seed.
    let n = scaled(1 << 20, 1 << 10) + 9;
    let mut pd = DeviceBuffer::<u32>::zeroed(&mut lane, n).unwrap();
    let mut counters = DeviceBuffer::<u64>::zeroed(&mut lane, 2).unwrap();
    lane.launch().fill_pattern(&mut pd, n, 42).unwrap();
    let p = download(&mut lane, &pd, n);
    for (i, &v) in p.iter().enumerate() {
        assert_eq!(v, pattern(42, i as u64), "{source:?} fill_pattern [{i}]");
    }
    out.push(("fill_pattern", p.iter().map(|&v| u64::from(v)).collect()));
    lane.launch()
        .check_pattern(&pd, n, 42, &mut counters)
        .unwrap();
    assert_eq!(
        download(&mut lane, &counters, 2),
        [0, u64::MAX],
        "{source:?} check ok"
    );
    lane.launch()
        .check_pattern(&pd, n, 43, &mut counters)
        .unwrap();
    let c = download(&mut lane, &counters, 2);
    let mismatches = (0..n as u64)
        .filter(|&i| pattern(43, i) != pattern(42, i))
        .count();
    let first = (0..n as u64)
        .find(|&i| pattern(43, i) != pattern(42, i))
        .unwrap();
    assert_eq!(
        c,
        [mismatches as u64, first],
        "{source:?} check with a wrong seed"
    );
    out.push(("check_pattern", c));

    // Zero-copy gather and scatter, with odd lengths (the byte path too).
    let lens: Vec<usize> = (0..scaled(64, 8)).map(|k| 1 + (k * 7919) % 3000).collect();
    let inputs: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(k, &n)| random_f32(500 + k as u64, n))
        .collect();
    let items: Vec<PinnedBuffer<f32>> = inputs
        .iter()
        .map(|v| PinnedBuffer::from_slice(gpu, v, HostAllocFlags::DEFAULT).unwrap())
        .collect();
    let mut outs: Vec<PinnedBuffer<f32>> = lens
        .iter()
        .map(|&n| {
            PinnedBuffer::from_slice(gpu, &vec![f32::NAN; n], HostAllocFlags::DEFAULT).unwrap()
        })
        .collect();
    let total: usize = lens.iter().sum();
    let mut dev = DeviceBuffer::<f32>::zeroed(&mut lane, total).unwrap();
    let mut desc_in =
        PinnedBuffer::<u64>::new(gpu, 3 * lens.len(), HostAllocFlags::DEFAULT).unwrap();
    let mut desc_out =
        PinnedBuffer::<u64>::new(gpu, 3 * lens.len(), HostAllocFlags::DEFAULT).unwrap();
    {
        let mut l = lane.launch();
        let refs: Vec<&PinnedBuffer<f32>> = items.iter().collect();
        assert_eq!(
            l.gather_pinned(&refs, &mut desc_in, &mut dev).unwrap(),
            total
        );
        l.fma_chain_in_place(&mut dev, total, a, b, 2).unwrap();
        l.spin(1_000_000).unwrap();
        let mut out_refs: Vec<&mut PinnedBuffer<f32>> = outs.iter_mut().collect();
        assert_eq!(
            l.scatter_pinned(&dev, &mut out_refs, &mut desc_out)
                .unwrap(),
            total
        );
    }
    let mut scattered = Vec::new();
    for (i, o) in inputs.iter().zip(&outs) {
        let o = o.wait_slice().unwrap();
        let want: Vec<f32> = i.iter().map(|&v| fma_chain_cpu(v, a, b, 2)).collect();
        assert_eq!(bits(o), bits(&want), "{source:?} gather/scatter");
        scattered.extend(bits(o));
    }
    out.push(("gather_fma_scatter", scattered));
    Outputs(out)
}

#[test]
fn gpu_ptx_and_launchers_give_bit_identical_results() {
    let Some(ctx) = gpu_or_skip("gpu_ptx_and_launchers_give_bit_identical_results") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    assert_eq!(gpu.kernel_source(), KernelSource::default_for_build());
    let ptx = run_all(&gpu, KernelSource::Ptx);
    if prism_cuda_sys::KERNELS_BUILT {
        let launchers = run_all(&gpu, KernelSource::Launchers);
        assert_eq!(ptx.0.len(), launchers.0.len());
        for ((name, p), (_, l)) in ptx.0.iter().zip(&launchers.0) {
            assert!(p == l, "{name}: PTX and launcher outputs differ");
        }
        eprintln!(
            "launchers and PTX: {} outputs, {} values, bit-identical",
            ptx.0.len(),
            ptx.0.iter().map(|(_, v)| v.len()).sum::<usize>()
        );
    } else {
        assert!(matches!(
            gpu.set_kernel_source(KernelSource::Launchers),
            Err(Error::KernelsNotBuilt { .. })
        ));
        eprintln!("build without launchers: the PTX path matches the CPU references");
    }
}

/// How long a new context takes to open with the PTX loaded (the driver
/// compiles it for the GPU). Reported, not asserted: the driver caches
/// compiled PTX on disk, so a later process loads it faster.
#[test]
fn gpu_ptx_load_time_is_reported() {
    let Some(_ctx) = gpu_or_skip("gpu_ptx_load_time_is_reported") else {
        return;
    };
    let t = Instant::now();
    let gpu = Gpu::open_private(0).unwrap();
    let opened = t.elapsed();
    gpu.set_kernel_source(KernelSource::Ptx).unwrap();
    let loaded = t.elapsed();
    eprintln!(
        "new context: open {:.1} ms, with the PTX loaded {:.1} ms (default source {:?})",
        opened.as_secs_f64() * 1e3,
        loaded.as_secs_f64() * 1e3,
        KernelSource::default_for_build()
    );
}

/// A kernel that uses no buffer (`spin`) may still run when the last handle
/// that loaded the PTX goes: its module is unloaded only after the context
/// is idle, so dropping the handle waits for the kernel.
#[test]
fn gpu_ptx_module_outlives_a_running_kernel() {
    let Some(ctx) = gpu_or_skip("gpu_ptx_module_outlives_a_running_kernel") else {
        return;
    };
    // Another handle keeps the (primary) context alive; this one has a
    // module of its own.
    let _keep = ctx.gpu().clone();
    let gpu = Gpu::open(0).unwrap();
    gpu.set_kernel_source(KernelSource::Ptx).unwrap();
    let mut lane = Lane::new(&gpu).unwrap();
    lane.launch().spin(300_000_000).unwrap();
    let t = Instant::now();
    drop(lane);
    drop(gpu);
    let waited = t.elapsed();
    eprintln!("dropping the last handle of the module took {waited:?}");
    if !prism_testing::under_sanitizer() {
        assert!(
            waited.as_millis() >= 200,
            "the module was unloaded while its kernel ran ({waited:?})"
        );
    }
}
