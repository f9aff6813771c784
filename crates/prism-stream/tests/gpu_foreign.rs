//! Other libraries' memory and streams by raw handle (what DLPack hands
//! over): `DeviceBuffer::from_foreign` waits on the GPU for the producer's
//! stream, `DeviceBuffer::export` makes each consumer's stream wait for
//! prism's work and frees only after the consumers' work, and every bad
//! address or stream is a typed error. The producer's and prism's work is
//! kept running (a spin kernel first) while the hand-over is made, so a
//! missing wait shows as wrong data; outputs are compared bit for bit with
//! a CPU reference on random data. Without a GPU each test prints `SKIPPED`.

use std::sync::Arc;

use prism_stream::cudarc::driver::{result, CudaContext, CudaStream, DevicePtr};
use prism_stream::{DeviceBuffer, Error, ForeignStream, Gpu, HostAllocFlags, Lane, PinnedBuffer};
use prism_testing::{gpu_or_skip, random_f32, scaled, under_sanitizer};

mod common;
use common::{assert_same_bits, busy, download, reference, A, B, ITERS, SPIN_NS};

/// The "other library": a cudarc context object with event tracking off
/// (so cudarc adds no ordering of its own) on the device's primary context.
fn other_library() -> Arc<CudaContext> {
    let cuda = CudaContext::new(0).unwrap();
    // SAFETY: the tests order every use of this object's memory themselves.
    unsafe { cuda.disable_event_tracking() };
    cuda
}

fn raw(stream: &CudaStream) -> ForeignStream {
    // SAFETY: a live stream held by the test until after every call.
    unsafe { ForeignStream::from_raw(stream.cu_stream() as usize) }.unwrap()
}

/// Another library's buffer whose last write (a copy on its stream, after
/// a long spin) is still queued when prism takes it: prism's kernel and
/// copy see the write; nothing waited on the host; dropping prism's buffer
/// drops the owner, which frees the memory (the library's own `Drop`).
#[test]
fn gpu_foreign_memory_waits_for_the_producers_stream() {
    let Some(ctx) = gpu_or_skip("gpu_foreign_memory_waits_for_the_producers_stream") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let cuda = other_library();
    let n = scaled(1 << 22, 1 << 14) + 3;
    let input = random_f32(0xF0, n);
    let home = cuda.new_stream().unwrap();
    let src = home.clone_htod(&input).unwrap();
    let slice = home.alloc_zeros::<f32>(n).unwrap();
    home.synchronize().unwrap();
    let (src_ptr, dst_ptr) = (src.device_ptr(&home).0, slice.device_ptr(&home).0);
    let producer = busy(&gpu, cuda.new_stream().unwrap(), SPIN_NS);
    // SAFETY: both ranges are `n` f32 of live allocations of this context.
    unsafe { result::memcpy_dtod_async(dst_ptr, src_ptr, n * 4, producer.cu_stream()) }.unwrap();
    let copied = producer.record_event(None).unwrap();

    // SAFETY: `slice` (the owner) keeps the memory allocated; its last
    // write is queued on `producer`; nothing else touches it meanwhile.
    let buf = unsafe {
        DeviceBuffer::<f32>::from_foreign(&gpu, dst_ptr, n, Some(raw(&producer)), Box::new(slice))
    }
    .unwrap();
    if !under_sanitizer() {
        assert!(
            !copied.is_complete(),
            "from_foreign waited on the host where the GPU could order"
        );
    }
    let mut lane = Lane::new(&gpu).unwrap();
    let mut y = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    lane.launch()
        .fma_chain(&buf, &mut y, n, A, B, ITERS)
        .unwrap();
    assert_same_bits(
        "kernel over foreign memory",
        &download(&gpu, &y),
        &reference(&input),
    );
    assert_same_bits("foreign memory itself", &download(&gpu, &buf), &input);
    drop(buf);
    producer.synchronize().unwrap();
    drop(src);

    // The legacy default stream as the producer's (DLPack's stream 1).
    let legacy = cuda.default_stream();
    let src = legacy.clone_htod(&input).unwrap();
    let slice = legacy.alloc_zeros::<f32>(n).unwrap();
    let (src_ptr, dst_ptr) = (src.device_ptr(&legacy).0, slice.device_ptr(&legacy).0);
    legacy.synchronize().unwrap();
    // The write is held back behind a spin on another stream.
    let gate = busy(&gpu, cuda.new_stream().unwrap(), SPIN_NS);
    legacy.wait(&gate.record_event(None).unwrap()).unwrap();
    // SAFETY: as above, on the legacy stream (handle 0 in the driver API).
    unsafe { result::memcpy_dtod_async(dst_ptr, src_ptr, n * 4, legacy.cu_stream()) }.unwrap();
    let copied = legacy.record_event(None).unwrap();
    // SAFETY: as above.
    let buf = unsafe {
        DeviceBuffer::<f32>::from_foreign(
            &gpu,
            dst_ptr,
            n,
            Some(ForeignStream::LEGACY),
            Box::new(slice),
        )
    }
    .unwrap();
    if !under_sanitizer() {
        assert!(
            !copied.is_complete(),
            "from_foreign waited on the host for the legacy stream"
        );
    }
    assert_same_bits(
        "foreign memory from the legacy stream",
        &download(&gpu, &buf),
        &input,
    );
    drop(buf);
    legacy.synchronize().unwrap();
    gate.synchronize().unwrap();
}

/// A prism buffer whose kernel is still queued (after a long spin) lent to
/// a consumer's stream: the consumer's copy sees the kernel's output and
/// nothing waited on the host. Shared with the legacy stream only, the
/// export's free waits for the consumer's work there and not for the
/// whole GPU (an unrelated spin is still running after the drop).
#[test]
fn gpu_foreign_export_orders_consumers_both_ways() {
    let Some(ctx) = gpu_or_skip("gpu_foreign_export_orders_consumers_both_ways") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let cuda = other_library();
    let n = scaled(1 << 22, 1 << 14) + 9;
    let input = random_f32(0xF1, n);
    let mut lane = Lane::new(&gpu).unwrap();
    let x = DeviceBuffer::from_slice(&mut lane, &input).unwrap();
    let mut y = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let mut l = lane.launch();
    l.spin(SPIN_NS).unwrap();
    l.fma_chain(&x, &mut y, n, A, B, ITERS).unwrap();
    let kernel = l.last_fence().unwrap().clone();
    drop(l);

    let exported = y.export().unwrap();
    assert_eq!(exported.len(), n);
    let consumer = cuda.new_stream().unwrap();
    exported.share_with(Some(raw(&consumer))).unwrap();
    if !under_sanitizer() {
        assert!(
            !kernel.is_complete().unwrap(),
            "share_with waited on the host where the GPU could order"
        );
    }
    let mut got = vec![0f32; n];
    // SAFETY: `exported` keeps `n` f32 allocated; `consumer` waits for the kernel.
    unsafe { result::memcpy_dtoh_async(&mut got, exported.device_ptr(), consumer.cu_stream()) }
        .unwrap();
    consumer.synchronize().unwrap();
    assert_same_bits(
        "consumer's copy of an exported buffer",
        &got,
        &reference(&input),
    );
    drop(exported); // shared with a stream of unknown life: waits for the context

    // Shared with the legacy stream only, over memory another library owns
    // (so the drop frees nothing: `cuMemFree` would wait for the device).
    // The consumer's work on the legacy stream is held back by a spin on
    // another stream, and copies into page-locked memory (asynchronous).
    let home = cuda.new_stream().unwrap();
    let mem = home.alloc_zeros::<f32>(n).unwrap();
    home.synchronize().unwrap();
    let mem_ptr = mem.device_ptr(&home).0;
    // SAFETY: `mem` (held by the test to the end) keeps the memory; it is
    // idle (synchronised above); nothing else touches it meanwhile.
    let mut z =
        unsafe { DeviceBuffer::<f32>::from_foreign(&gpu, mem_ptr, n, None, Box::new(())) }.unwrap();
    lane.launch().fma_chain(&x, &mut z, n, A, B, ITERS).unwrap();
    let exported = z.export().unwrap();
    exported.share_with(Some(ForeignStream::LEGACY)).unwrap();
    let legacy = cuda.default_stream();
    let gate = busy(&gpu, cuda.new_stream().unwrap(), SPIN_NS);
    legacy.wait(&gate.record_event(None).unwrap()).unwrap();
    for _ in 0..8 {
        // SAFETY: the consumer's work on the legacy stream, inside the export.
        unsafe { result::memset_d8_async(exported.device_ptr(), 0x3f, n * 4, legacy.cu_stream()) }
            .unwrap();
    }
    let mut host = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    {
        let dst = host.as_mut_slice().unwrap();
        // SAFETY: `dst` is page-locked and stays allocated (`host` lives on)
        // and untouched by the host until the legacy stream is synchronised.
        unsafe { result::memcpy_dtoh_async(dst, exported.device_ptr(), legacy.cu_stream()) }
            .unwrap();
    }
    let consumers_done = legacy.record_event(None).unwrap();
    let unrelated = busy(&gpu, cuda.new_stream().unwrap(), 5 * SPIN_NS);
    let spinning = unrelated.record_event(None).unwrap();
    drop(exported);
    assert!(
        consumers_done.is_complete(),
        "the export was released before its consumer's work on the legacy stream finished"
    );
    if !under_sanitizer() {
        assert!(
            !spinning.is_complete(),
            "dropping an export shared with the legacy stream waited for the whole GPU"
        );
    }
    legacy.synchronize().unwrap();
    assert!(host
        .as_slice()
        .unwrap()
        .iter()
        .all(|v| v.to_bits() == 0x3f3f_3f3f));
    unrelated.synchronize().unwrap();
    gate.synchronize().unwrap();
    drop(mem);
}

/// `order_stream_after`: a tensor prism reads (a long spin first) that its
/// library writes next on its stream: the write waits for prism's read.
/// `Exported::reclaim` hands the buffer back while no consumer had it.
#[test]
fn gpu_foreign_owner_writes_after_prisms_reads() {
    let Some(ctx) = gpu_or_skip("gpu_foreign_owner_writes_after_prisms_reads") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let cuda = other_library();
    let n = scaled(1 << 22, 1 << 14) + 1;
    let input = random_f32(0xF2, n);
    let owner_stream = cuda.new_stream().unwrap();
    let mem = owner_stream.clone_htod(&input).unwrap();
    owner_stream.synchronize().unwrap();
    let ptr = mem.device_ptr(&owner_stream).0;
    // SAFETY: `mem` stays allocated until the end; idle now; its library
    // writes it only after `order_stream_after` below.
    let buf =
        unsafe { DeviceBuffer::<f32>::from_foreign(&gpu, ptr, n, None, Box::new(())) }.unwrap();
    let mut lane = Lane::new(&gpu).unwrap();
    let mut y = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let mut l = lane.launch();
    l.spin(SPIN_NS).unwrap();
    l.fma_chain(&buf, &mut y, n, A, B, ITERS).unwrap();
    drop(l);
    buf.order_stream_after(raw(&owner_stream)).unwrap();
    // The library's next write, on its stream.
    // SAFETY: `ptr` is `n` f32 of `mem`; ordered after prism's read above.
    unsafe { result::memset_d8_async(ptr, 0, n * 4, owner_stream.cu_stream()) }.unwrap();
    assert_same_bits(
        "prism's read before the owner's write",
        &download(&gpu, &y),
        &reference(&input),
    );
    // And the other way: the owner writes again (held back by a spin), then
    // prism reads after `order_after_stream`.
    let src = owner_stream.clone_htod(&input).unwrap();
    let src_ptr = src.device_ptr(&owner_stream).0;
    owner_stream.synchronize().unwrap();
    let gate = busy(&gpu, cuda.new_stream().unwrap(), SPIN_NS);
    owner_stream
        .wait(&gate.record_event(None).unwrap())
        .unwrap();
    // SAFETY: both ranges are `n` f32 of live allocations; the write of
    // `mem` is ordered after prism's earlier uses (order_stream_after).
    unsafe { result::memcpy_dtod_async(ptr, src_ptr, n * 4, owner_stream.cu_stream()) }.unwrap();
    buf.order_after_stream(raw(&owner_stream)).unwrap();
    assert_same_bits(
        "prism's read after the owner's write",
        &download(&gpu, &buf),
        &input,
    );
    owner_stream.synchronize().unwrap();
    gate.synchronize().unwrap();
    drop(buf);

    // reclaim: no consumer yet, so prism may use the buffer again.
    let z = DeviceBuffer::from_slice(&mut lane, &input).unwrap();
    let exported = z.export().unwrap();
    let z = exported.reclaim().expect("no consumer had it");
    assert_same_bits("reclaimed", &download(&gpu, &z), &input);
    let exported = z.export().unwrap();
    exported.share_with(Some(ForeignStream::LEGACY)).unwrap();
    assert!(
        exported.reclaim().is_err(),
        "reclaimed after a consumer had it"
    );
    drop(mem);
}

/// Every address or stream prism cannot use is a typed error, and nothing
/// is taken over.
#[test]
fn gpu_foreign_refusals_are_typed() {
    let Some(ctx) = gpu_or_skip("gpu_foreign_refusals_are_typed") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let cuda = other_library();
    let n = 4096;
    let home = cuda.new_stream().unwrap();
    let slice = home.alloc_zeros::<f32>(n).unwrap();
    home.synchronize().unwrap();
    let ptr = slice.device_ptr(&home).0;
    let owner = || Box::new(()) as Box<dyn std::any::Any + Send + Sync>;
    let take = |p: u64, len: usize, ready: Option<ForeignStream>| {
        // SAFETY: each call below is refused before anything is used.
        unsafe { DeviceBuffer::<f32>::from_foreign(&gpu, p, len, ready, owner()) }
    };
    let foreign_memory = |r: prism_stream::Result<DeviceBuffer<f32>>, what: &str| match r {
        Err(Error::ForeignMemory { reason }) => eprintln!("{what}: {reason}"),
        other => panic!("{what}: {other:?}"),
    };
    foreign_memory(take(ptr, n + 1, None), "one element past the allocation");
    foreign_memory(take(ptr + 2, n - 1, None), "misaligned");
    foreign_memory(take(0, n, None), "null");
    let host = vec![0f32; n];
    foreign_memory(take(host.as_ptr() as u64, n, None), "pageable host memory");
    let pinned = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    let pinned_addr = pinned.as_slice().unwrap().as_ptr() as u64;
    foreign_memory(take(pinned_addr, n, None), "page-locked host memory");
    assert!(matches!(take(ptr, 0, None), Err(Error::ZeroLength { .. })));
    // SAFETY: refused before any use.
    let zero = unsafe { ForeignStream::from_raw(0) };
    assert!(matches!(zero, Err(Error::Unsupported { .. })), "{zero:?}");

    // Memory and a stream of another context (a private one, same GPU).
    let private = Gpu::open_private(0).unwrap();
    let theirs = private.cuda_context().new_stream().unwrap();
    let their_slice = theirs.alloc_zeros::<f32>(n).unwrap();
    theirs.synchronize().unwrap();
    let their_ptr = their_slice.device_ptr(&theirs).0;
    assert!(matches!(
        take(their_ptr, n, None),
        Err(Error::ForeignContext { .. })
    ));
    assert!(matches!(
        take(ptr, n, Some(raw(&theirs))),
        Err(Error::ForeignContext { .. })
    ));

    // A foreign buffer never goes to cudarc (which would free it).
    // SAFETY: `slice` stays allocated (the test holds it) and is idle.
    let buf = unsafe { DeviceBuffer::<f32>::from_foreign(&gpu, ptr, n, None, owner()) }.unwrap();
    let e = buf.into_cuda_slice(&home).unwrap_err();
    assert!(matches!(e.error, Error::Unsupported { .. }), "{}", e.error);
    drop(e);

    // A share that fails (a stream of another context) records no
    // consumer: the buffer can be reclaimed.
    let mut lane0 = Lane::new(&gpu).unwrap();
    let mine = DeviceBuffer::<f32>::zeroed(&mut lane0, n).unwrap();
    let exported = mine.export().unwrap();
    assert!(matches!(
        exported.share_with(Some(raw(&theirs))),
        Err(Error::ForeignContext { .. })
    ));
    assert!(
        exported.reclaim().is_ok(),
        "a failed share counted as a consumer"
    );

    // A buffer a captured graph holds is not exported.
    let mut lane = Lane::new(&gpu).unwrap();
    let mut z = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let (graph, ()) = lane.capture(|c| c.fill(&mut z, 0, n, 1.0f32)).unwrap();
    let e = z.export().unwrap_err();
    assert!(matches!(e.error, Error::InGraph { .. }), "{}", e.error);
    drop(graph);
    let z = e.value;
    assert!(z.export().is_ok(), "exported once the graph is gone");
    drop(slice);
    drop(their_slice);
}

/// `order_after_stream` notes the owner's work as a write, which replaces
/// the use list's earlier entries: the fence must come after prism's own
/// earlier uses, or a later prism write would skip waiting for a prism
/// read still queued (found in review of the first version, which
/// recorded the fence without making the stream wait first).
#[test]
fn gpu_foreign_owner_fence_keeps_prisms_own_order() {
    let Some(ctx) = gpu_or_skip("gpu_foreign_owner_fence_keeps_prisms_own_order") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let cuda = other_library();
    let n = scaled(1 << 22, 1 << 14) + 5;
    let input = random_f32(0xF3, n);
    let owner_stream = cuda.new_stream().unwrap();
    let mem = owner_stream.clone_htod(&input).unwrap();
    owner_stream.synchronize().unwrap();
    let ptr = mem.device_ptr(&owner_stream).0;
    // SAFETY: `mem` stays allocated to the end and is idle; its library
    // queues nothing on it during the test.
    let mut buf =
        unsafe { DeviceBuffer::<f32>::from_foreign(&gpu, ptr, n, None, Box::new(())) }.unwrap();
    let mut reader = Lane::new(&gpu).unwrap();
    let mut y = DeviceBuffer::<f32>::zeroed(&mut reader, n).unwrap();
    let mut l = reader.launch();
    l.spin(SPIN_NS).unwrap();
    l.fma_chain(&buf, &mut y, n, A, B, ITERS).unwrap(); // a read, held back
    drop(l);
    buf.order_after_stream(raw(&owner_stream)).unwrap();
    let mut writer = Lane::new(&gpu).unwrap();
    writer.fill(&mut buf, 0, n, 0.0f32).unwrap(); // must wait for the read
    assert_same_bits(
        "a read before a later write",
        &download(&gpu, &y),
        &reference(&input),
    );
    owner_stream.synchronize().unwrap();
    drop(buf);
    drop(mem);
}
