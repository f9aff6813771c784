//! CUDA graphs (issue #21): a lane's work captured once and launched many
//! times; each launch ordered and fenced like one op over every buffer the
//! graph uses, read-backs per launch, buffers kept alive by the graph, and
//! every refusal typed. Outputs against a CPU reference. GPU-gated.

use prism_stream::{fma_chain_cpu, DeviceBuffer, Error, HostAllocFlags, Lane, PinnedBuffer};
use prism_testing::{bits, gpu_or_skip, random_f32, scaled, spin_ns};

const A: f32 = 0.999;
const B: f32 = 0.001;

#[test]
fn gpu_graph_launches_match_the_same_work_queued_directly() {
    let Some(ctx) = gpu_or_skip("gpu_graph_launches_match_the_same_work_queued_directly") else {
        return;
    };
    let gpu = ctx.gpu();
    let n = scaled(1 << 20, 1 << 10);
    let launches = scaled(200, 10);
    let data = random_f32(11, n);
    let mut lane = Lane::new(gpu).unwrap();
    let mut x = DeviceBuffer::from_slice(&mut lane, &data).unwrap();
    let mut y = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let mut acc = DeviceBuffer::<f32>::zeroed(&mut lane, 4).unwrap();
    // One iteration: x = fma(x), y = x, acc[..4] = y[..4], read acc back.
    let (mut graph, key) = lane
        .capture(|c| {
            c.fma_chain_in_place(&mut x, n, A, B, 1)?;
            c.copy_dtod(&x, 0, &mut y, 0, n)?;
            c.copy_dtod(&y, 0, &mut acc, 0, 4)?;
            c.read_back(&acc, 0, 4)
        })
        .unwrap();
    assert_eq!(graph.buffers(), 3);
    let mut want = data.clone();
    for k in 0..launches {
        let mut run = graph.launch(&mut lane).unwrap();
        let got = run.read_back(key).unwrap().wait().unwrap();
        for v in &mut want {
            *v = fma_chain_cpu(*v, A, B, 1);
        }
        assert_eq!(bits(&got), bits(&want[..4]), "launch {k}");
    }
    assert_eq!(graph.launches(), launches as u64);
    assert_eq!(
        graph.repoints(),
        0,
        "each launch's slot came back before the next"
    );
    let all = lane.read_async(&y, 0, n).unwrap().wait().unwrap();
    assert_eq!(bits(&all), bits(&want));
}

#[test]
fn gpu_graph_launches_are_ordered_against_other_lanes() {
    let Some(ctx) = gpu_or_skip("gpu_graph_launches_are_ordered_against_other_lanes") else {
        return;
    };
    let gpu = ctx.gpu();
    let n = scaled(1 << 20, 1 << 10);
    let data = random_f32(12, n);
    let (mut a, mut b, mut c) = (
        Lane::new(gpu).unwrap(),
        Lane::new(gpu).unwrap(),
        Lane::new(gpu).unwrap(),
    );
    let mut x = DeviceBuffer::<f32>::zeroed(&mut a, n).unwrap();
    let mut y = DeviceBuffer::<f32>::zeroed(&mut a, n).unwrap();
    let (mut graph, ()) = b
        .capture(|cap| cap.fma_chain(&x, &mut y, n, A, B, 3))
        .unwrap();
    a.synchronize().unwrap();
    // Lane a writes x late; the graph on lane b reads it; lane c reads y.
    a.launch().spin(spin_ns()).unwrap();
    a.upload_slice(&data, &mut x, 0).unwrap();
    graph.launch(&mut b).unwrap();
    let got = c.read_async(&y, 0, n).unwrap().wait().unwrap();
    let want: Vec<f32> = data.iter().map(|&v| fma_chain_cpu(v, A, B, 3)).collect();
    assert_eq!(bits(&got), bits(&want), "a graph launch ran out of order");
    // A later write of x on lane c waits for the graph's read of it.
    c.launch().spin(spin_ns()).unwrap();
    graph.launch(&mut c).unwrap();
    a.fill(&mut x, 0, n, 0.0f32).unwrap();
    let got = a.read_async(&y, 0, n).unwrap().wait().unwrap();
    assert_eq!(bits(&got), bits(&want), "a write overtook the graph's read");
}

#[test]
fn gpu_graph_read_slots_rotate_while_values_are_held() {
    let Some(ctx) = gpu_or_skip("gpu_graph_read_slots_rotate_while_values_are_held") else {
        return;
    };
    let gpu = ctx.gpu();
    let mut lane = Lane::new(gpu).unwrap();
    let mut x = DeviceBuffer::from_slice(&mut lane, &[1.0f32, 2.0]).unwrap();
    let (mut graph, key) = lane
        .capture(|c| {
            c.fma_chain_in_place(&mut x, 2, 2.0, 0.0, 1)?;
            c.read_back(&x, 0, 2)
        })
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut run = graph.launch(&mut lane).unwrap();
        held.push(run.read_back(key).unwrap());
    }
    assert!(
        graph.repoints() >= 4,
        "held slots must not be written again"
    );
    for (k, r) in held.into_iter().enumerate() {
        let p = 2f32.powi(k as i32 + 1);
        assert_eq!(r.wait().unwrap(), vec![p, 2.0 * p], "launch {k}");
    }
    // A key taken twice, or a key of another graph, is refused.
    let mut run = graph.launch(&mut lane).unwrap();
    let _first = run.read_back(key).unwrap();
    assert!(matches!(run.read_back(key), Err(Error::Unsupported { .. })));
    let (mut other, other_key) = lane.capture(|c| c.read_back(&x, 0, 1)).unwrap();
    let mut other_run = other.launch(&mut lane).unwrap();
    assert!(matches!(
        other_run.read_back(key),
        Err(Error::WrongScope { .. })
    ));
    assert!(matches!(
        run.read_back(other_key),
        Err(Error::WrongScope { .. })
    ));
}

#[test]
fn gpu_graph_keeps_its_buffers_alive() {
    let Some(ctx) = gpu_or_skip("gpu_graph_keeps_its_buffers_alive") else {
        return;
    };
    let gpu = ctx.gpu();
    let n = scaled(1 << 20, 1 << 10);
    let data = random_f32(13, n);
    let mut lane = Lane::new(gpu).unwrap();
    let x = DeviceBuffer::from_slice(&mut lane, &data).unwrap();
    let mut y = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let (mut graph, key) = lane
        .capture(|c| {
            c.fma_chain(&x, &mut y, n, A, B, 2)?;
            c.read_back(&y, n - 1, 1)
        })
        .unwrap();
    // The user's handles go; the graph still has the memory.
    drop(x);
    drop(y);
    // Allocations made now must not land on the graph's buffers.
    let mut decoy = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    lane.fill(&mut decoy, 0, n, 9.0f32).unwrap();
    let mut run = graph.launch(&mut lane).unwrap();
    let last = run.read_back(key).unwrap().wait_value().unwrap();
    assert_eq!(
        last.to_bits(),
        fma_chain_cpu(data[n - 1], A, B, 2).to_bits()
    );
    assert!(lane
        .read_async(&decoy, 0, n)
        .unwrap()
        .wait()
        .unwrap()
        .iter()
        .all(|&v| v == 9.0));
    // A buffer a graph holds cannot go to cudarc.
    let z = DeviceBuffer::<f32>::zeroed(&mut lane, 16).unwrap();
    let (_g, ()) = lane.capture(|c| c.launch_spin_free(&z)).unwrap();
    let stream = gpu.cuda_context().new_stream().unwrap();
    match z.into_cuda_slice(&stream) {
        Err(e) => assert!(matches!(e.error, Error::InGraph { .. }), "{}", e.error),
        Ok(_) => panic!("a buffer held by a graph went to cudarc"),
    }
}

/// A captured op that reads `z` (for the hand-over refusal above).
trait ReadIt {
    fn launch_spin_free(&mut self, z: &DeviceBuffer<f32>) -> prism_stream::Result<()>;
}
impl ReadIt for prism_stream::Capture<'_> {
    fn launch_spin_free(&mut self, z: &DeviceBuffer<f32>) -> prism_stream::Result<()> {
        self.read_back(z, 0, 1).map(|_| ())
    }
}

#[test]
fn gpu_capture_refuses_what_a_graph_cannot_hold_and_the_lane_recovers() {
    let Some(ctx) =
        gpu_or_skip("gpu_capture_refuses_what_a_graph_cannot_hold_and_the_lane_recovers")
    else {
        return;
    };
    let gpu = ctx.gpu();
    let mut lane = Lane::new(gpu).unwrap();
    let mut x = DeviceBuffer::<f32>::zeroed(&mut lane, 64).unwrap();
    let mut pinned = PinnedBuffer::<f32>::new(gpu, 64, HostAllocFlags::DEFAULT).unwrap();
    let refusals: Vec<Error> = vec![
        lane.capture(|c| c.timed_fence().map(|_| ())).unwrap_err(),
        lane.capture(|c| c.read_async(&x, 0, 1).map(|_| ()))
            .unwrap_err(),
        lane.capture(|c| c.upload_slice(&[1.0f32], &mut x, 0))
            .unwrap_err(),
        lane.capture(|c| {
            c.fill(&mut x, 0, 1, 1.0f32)
                .and_then(|()| c.timed_fence().map(|_| ()))
        })
        .unwrap_err(),
    ];
    for e in &refusals {
        assert!(matches!(e, Error::NotCapturable { .. }), "{e}");
    }
    // A pooled stream other lanes may share would capture their work.
    let pool = prism_stream::StreamPool::new(gpu, 1).unwrap();
    let mut pooled = pool.acquire(prism_stream::StreamPurpose::Compute).unwrap();
    let r = pooled.capture(|c| c.fill(&mut x, 0, 1, 1.0f32));
    assert!(matches!(r, Err(Error::NotCapturable { .. })), "{r:?}");
    // Host memory (a pinned buffer through prism's zero-copy kernels).
    let mut desc = PinnedBuffer::<u64>::new(gpu, 3, HostAllocFlags::DEFAULT).unwrap();
    let r = lane.capture(|c| c.scatter_pinned(&x, &mut [&mut pinned], &mut desc));
    assert!(matches!(r, Err(Error::NotCapturable { .. })), "{r:?}");
    // A panic inside the capture ends it and leaves the lane usable.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = lane.capture(|c| -> prism_stream::Result<()> {
            c.fill(&mut x, 0, 64, 3.0f32)?;
            panic!("a panic while capturing");
        });
    }));
    assert!(caught.is_err());
    // After every refusal the lane runs, orders and fences work again.
    lane.fill(&mut x, 0, 64, 4.0f32).unwrap();
    let f = lane.fence().unwrap();
    assert_eq!(lane.read_value(&x, 63).unwrap(), 4.0);
    assert!(f.is_complete().unwrap());
    gpu.check_usable().unwrap();
}

#[test]
fn gpu_graph_of_another_context_is_refused() {
    let Some(ctx) = gpu_or_skip("gpu_graph_of_another_context_is_refused") else {
        return;
    };
    let gpu = ctx.gpu();
    let other = prism_stream::Gpu::open_private(0).unwrap();
    let mut lane = Lane::new(gpu).unwrap();
    let mut x = DeviceBuffer::<f32>::zeroed(&mut lane, 64).unwrap();
    let (mut graph, ()) = lane.capture(|c| c.fill(&mut x, 0, 64, 1.0f32)).unwrap();
    let mut foreign = Lane::new(&other).unwrap();
    assert!(matches!(
        graph.launch(&mut foreign),
        Err(Error::WrongContext { .. })
    ));
    graph.launch(&mut lane).unwrap().wait().unwrap();
}
