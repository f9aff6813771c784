//! Batched copies (`Lane::copy_batch_htod`, `Lane::copy_batch_dtoh`): bit
//! for bit against the data, ordered and fenced like every other copy
//! (host access waits, later GPU uses of the same bytes wait), and misuse
//! refused with typed errors before anything is queued. GPU-gated: without
//! a GPU each prints `SKIPPED`.

use prism_stream::{
    batch_copies_supported, BatchItem, DeviceBuffer, Error, Gpu, HostAllocFlags, Lane,
    PinnedBuffer, Probe,
};
use prism_testing::{gpu_or_skip, random_f32, scaled, under_sanitizer};

/// Batched copies must be there on a CUDA 13 build (the GPU machines run
/// driver 580); a `cuda-12` build must refuse them with the typed error.
fn supported() -> bool {
    match batch_copies_supported() {
        Ok(()) => true,
        Err(e @ Error::DriverUnsupported { .. }) => {
            if cfg!(feature = "cuda-13") {
                panic!("a cuda-13 build on this driver should have batched copies: {e}");
            }
            eprintln!("batched copies unavailable here: {e}");
            false
        }
        Err(e) => panic!("batch_copies_supported: {e}"),
    }
}

fn bits(a: &[f32]) -> Vec<u32> {
    a.iter().map(|x| x.to_bits()).collect()
}

/// A small deterministic generator (xorshift) for sizes and placements.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Items of random (often odd) sizes cut from three separate pinned
/// buffers, placed in the device buffer in shuffled order with gaps; the
/// gaps keep their sentinel; then each item comes back into a pinned
/// buffer of its own at an offset, by one batched download.
#[test]
fn gpu_batch_copy_round_trip_is_bit_exact() {
    let Some(ctx) = gpu_or_skip("gpu_batch_copy_round_trip_is_bit_exact") else {
        return;
    };
    if !supported() {
        return;
    }
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let count = scaled(300, 40);
    // Three source buffers, one of them write-combined and one portable.
    let flags = [
        HostAllocFlags::DEFAULT,
        HostAllocFlags::UPLOAD_ONLY,
        HostAllocFlags::PORTABLE,
    ];
    let src_len = scaled(1 << 20, 1 << 16);
    let data: Vec<Vec<f32>> = (0..3).map(|k| random_f32(100 + k, src_len)).collect();
    let srcs: Vec<PinnedBuffer<f32>> = data
        .iter()
        .zip(flags)
        .map(|(d, f)| PinnedBuffer::from_slice(&gpu, d, f).unwrap())
        .collect();
    // Sizes: 1, 2, 3, odd, and a few large ones.
    let sizes: Vec<usize> = (0..count)
        .map(|k| match k % 7 {
            0 => 1,
            1 => 3,
            2 => 2 * rng.below(2000) + 1,
            3 => rng.below(5000) + 1,
            4 => 4097,
            _ => rng.below(300) + 1,
        })
        .collect();
    // Device places: items in shuffled order, each after a random gap.
    let mut order: Vec<usize> = (0..count).collect();
    for k in (1..count).rev() {
        order.swap(k, rng.below(k + 1));
    }
    let mut device_at = vec![0; count];
    let mut at = 0;
    for &k in &order {
        at += rng.below(5);
        device_at[k] = at;
        at += sizes[k];
    }
    let dev_len = at + 3;
    let items: Vec<(usize, BatchItem)> = (0..count)
        .map(|k| {
            let which = rng.below(3);
            let host_at = rng.below(src_len - sizes[k] + 1);
            (which, BatchItem::new(host_at, device_at[k], sizes[k]))
        })
        .collect();
    let sentinel = f32::from_bits(0x7FC0_1234);
    let mut dev = DeviceBuffer::<f32>::zeroed(&mut lane, dev_len).unwrap();
    lane.fill(&mut dev, 0, dev_len, sentinel).unwrap();
    let list: Vec<(&PinnedBuffer<f32>, BatchItem)> =
        items.iter().map(|&(w, it)| (&srcs[w], it)).collect();
    lane.copy_batch_htod(&list, &mut dev).unwrap();

    // The whole device buffer, by one plain copy.
    let mut whole = PinnedBuffer::<f32>::new(&gpu, dev_len, HostAllocFlags::DEFAULT).unwrap();
    lane.copy_dtoh(&dev, 0, &mut whole, 0, dev_len).unwrap();
    let mut want = vec![sentinel; dev_len];
    for &(w, it) in &items {
        want[it.device_at..it.device_at + it.len]
            .copy_from_slice(&data[w][it.host_at..it.host_at + it.len]);
    }
    assert_eq!(bits(whole.wait_slice().unwrap()), bits(&want), "upload");

    // Back into one pinned buffer per item, at an offset, by one batch.
    let mut outs: Vec<PinnedBuffer<f32>> = sizes
        .iter()
        .map(|&n| PinnedBuffer::from_slice(&gpu, &vec![-7.0; n + 2], HostAllocFlags::DEFAULT))
        .collect::<Result<_, _>>()
        .unwrap();
    let mut back: Vec<(&mut PinnedBuffer<f32>, BatchItem)> = outs
        .iter_mut()
        .zip(&items)
        .map(|(o, &(_, it))| (o, BatchItem::new(1, it.device_at, it.len)))
        .collect();
    let fence = lane.copy_batch_dtoh(&dev, &mut back).unwrap();
    assert!(matches!(fence.synchronize(), Probe::Complete));
    for (k, (o, &(w, it))) in outs.iter().zip(&items).enumerate() {
        let got = o.as_slice().unwrap();
        let mut want = vec![-7.0; it.len + 2];
        want[1..=it.len].copy_from_slice(&data[w][it.host_at..it.host_at + it.len]);
        assert_eq!(bits(got), bits(&want), "item {k} downloaded");
    }
}

/// Buffers used by a batch queued behind a long spin: host access waits
/// (`BufferInFlight`, then the final data), and other lanes' GPU uses of
/// the same bytes are ordered after the batch (a write into a batch's
/// source after its read, a read of its destination after its write).
#[test]
fn gpu_batch_copy_orders_later_uses_of_its_buffers() {
    let Some(ctx) = gpu_or_skip("gpu_batch_copy_orders_later_uses_of_its_buffers") else {
        return;
    };
    if !supported() {
        return;
    }
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    let mut other = Lane::new(&gpu).unwrap();
    let n = 3001;
    let (a, b, c) = (random_f32(1, n), random_f32(2, n), random_f32(3, n));
    // Everything allocated before the spin: freeing or allocating pinned
    // memory may make the driver synchronise the device.
    let mut src0 = PinnedBuffer::from_slice(&gpu, &a, HostAllocFlags::DEFAULT).unwrap();
    let src1 = PinnedBuffer::from_slice(&gpu, &b, HostAllocFlags::DEFAULT).unwrap();
    let replacement = PinnedBuffer::from_slice(&gpu, &c, HostAllocFlags::DEFAULT).unwrap();
    let mut dev = DeviceBuffer::<f32>::zeroed(&mut lane, 2 * n).unwrap();
    let mut dev_c = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let mut dev2 = DeviceBuffer::<f32>::zeroed(&mut lane, n).unwrap();
    let mut out0 = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    let mut out1 = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    let mut check = PinnedBuffer::<f32>::new(&gpu, 2 * n, HostAllocFlags::DEFAULT).unwrap();
    let mut check2 = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    other.copy_htod(&replacement, 0, &mut dev_c, 0, n).unwrap();
    other.synchronize().unwrap();
    lane.synchronize().unwrap();

    lane.launch().spin(300_000_000).unwrap();
    lane.copy_batch_htod(
        &[
            (&src0, BatchItem::new(0, 0, n)),
            (&src1, BatchItem::new(0, n, n)),
        ],
        &mut dev,
    )
    .unwrap();
    // The host may not write a source while the batch reads it (behind
    // the spin; a sanitizer serialises the GPU, so the spin may be over).
    if !under_sanitizer() {
        assert!(matches!(
            src0.as_mut_slice(),
            Err(Error::BufferInFlight { .. })
        ));
    }
    // Another lane overwrites src0 at once: it must wait for the batch's read.
    other.copy_dtoh(&dev_c, 0, &mut src0, 0, n).unwrap();
    // The batch's destinations go back by batch, behind the same spin.
    lane.copy_batch_dtoh(
        &dev,
        &mut [
            (&mut out0, BatchItem::new(0, 0, n)),
            (&mut out1, BatchItem::new(0, n, n)),
        ],
    )
    .unwrap();
    if !under_sanitizer() {
        assert!(matches!(out1.as_slice(), Err(Error::BufferInFlight { .. })));
    }
    // Another lane reads out1 at once: it must wait for the batch's write.
    other.copy_htod(&out1, 0, &mut dev2, 0, n).unwrap();
    // And another lane writes the device buffer the batch reads: after it.
    other.copy_htod(&replacement, 0, &mut dev, 0, n).unwrap();

    assert_eq!(bits(out0.wait_slice().unwrap()), bits(&a), "out0");
    assert_eq!(bits(out1.wait_slice().unwrap()), bits(&b), "out1");
    assert_eq!(bits(src0.wait_slice().unwrap()), bits(&c), "src0 rewritten");
    other.copy_dtoh(&dev2, 0, &mut check2, 0, n).unwrap();
    assert_eq!(bits(check2.wait_slice().unwrap()), bits(&b), "read of out1");
    other.copy_dtoh(&dev, 0, &mut check, 0, 2 * n).unwrap();
    let mut want = c.clone();
    want.extend_from_slice(&b);
    assert_eq!(bits(check.wait_slice().unwrap()), bits(&want), "dev");
}

/// The error of an upload that must fail.
fn up(
    lane: &mut Lane,
    items: &[(&PinnedBuffer<f32>, BatchItem)],
    dev: &mut DeviceBuffer<f32>,
) -> Error {
    lane.copy_batch_htod(items, dev).unwrap_err()
}

/// Misuse is refused with a typed error and queues nothing: no items, an
/// empty item, ranges outside either buffer, overlapping destinations,
/// buffers of another context. A correct batch works afterwards.
#[test]
fn gpu_batch_copy_misuse_is_refused_with_typed_errors() {
    let Some(ctx) = gpu_or_skip("gpu_batch_copy_misuse_is_refused_with_typed_errors") else {
        return;
    };
    let gpu = ctx.gpu().clone();
    let mut lane = Lane::new(&gpu).unwrap();
    let n = 64;
    let src = PinnedBuffer::from_slice(&gpu, &random_f32(9, n), HostAllocFlags::DEFAULT).unwrap();
    let mut out = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();
    let mut dev = DeviceBuffer::<f32>::zeroed(&mut lane, 2 * n).unwrap();
    lane.synchronize().unwrap();

    let e = up(&mut lane, &[], &mut dev);
    assert!(matches!(e, Error::ZeroLength { .. }), "{e}");
    let e = up(&mut lane, &[(&src, BatchItem::new(0, 0, 0))], &mut dev);
    assert!(matches!(e, Error::ZeroLength { .. }), "{e}");
    let e = up(&mut lane, &[(&src, BatchItem::new(1, 0, n))], &mut dev);
    assert!(matches!(e, Error::LengthMismatch { .. }), "{e}");
    let e = up(&mut lane, &[(&src, BatchItem::new(0, n + 1, n))], &mut dev);
    assert!(matches!(e, Error::LengthMismatch { .. }), "{e}");
    let e = up(
        &mut lane,
        &[(&src, BatchItem::new(usize::MAX, 0, 2))],
        &mut dev,
    );
    assert!(matches!(e, Error::LengthMismatch { .. }), "{e}");
    let e = up(
        &mut lane,
        &[
            (&src, BatchItem::new(0, 0, 10)),
            (&src, BatchItem::new(0, 20, 10)),
            (&src, BatchItem::new(0, 9, 5)),
        ],
        &mut dev,
    );
    assert!(
        matches!(
            e,
            Error::Overlap {
                first: 0,
                second: 2,
                ..
            }
        ),
        "{e}"
    );
    let e = lane.copy_batch_dtoh(&dev, &mut []).unwrap_err();
    assert!(matches!(e, Error::ZeroLength { .. }), "{e}");
    let e = lane
        .copy_batch_dtoh(&dev, &mut [(&mut out, BatchItem::new(0, n + 1, n))])
        .unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { .. }), "{e}");
    let e = lane
        .copy_batch_dtoh(&dev, &mut [(&mut out, BatchItem::new(n, 0, 1))])
        .unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { .. }), "{e}");

    if supported() {
        // Another context's (non-portable) pinned buffer, device buffer or lane.
        let private = Gpu::open_private(0).unwrap();
        assert!(!private.same_context(&gpu));
        let mut foreign_lane = Lane::new(&private).unwrap();
        let foreign_src =
            PinnedBuffer::from_slice(&private, &[1.0f32; 8], HostAllocFlags::DEFAULT).unwrap();
        let mut foreign_out =
            PinnedBuffer::<f32>::new(&private, 8, HostAllocFlags::DEFAULT).unwrap();
        let e = up(
            &mut lane,
            &[
                (&src, BatchItem::new(0, 0, 8)),
                (&foreign_src, BatchItem::new(0, 8, 8)),
            ],
            &mut dev,
        );
        assert!(matches!(e, Error::WrongContext { .. }), "{e}");
        let e = lane
            .copy_batch_dtoh(&dev, &mut [(&mut foreign_out, BatchItem::new(0, 0, 8))])
            .unwrap_err();
        assert!(matches!(e, Error::WrongContext { .. }), "{e}");
        let e = up(
            &mut foreign_lane,
            &[(&src, BatchItem::new(0, 0, 8))],
            &mut dev,
        );
        assert!(matches!(e, Error::WrongContext { .. }), "{e}");
        foreign_lane.synchronize().unwrap();
    } else {
        let e = up(&mut lane, &[(&src, BatchItem::new(0, 0, n))], &mut dev);
        assert!(matches!(e, Error::DriverUnsupported { .. }), "{e}");
        return;
    }
    // Nothing was queued on the buffers by the refusals.
    assert!(src.is_idle().unwrap() && out.is_idle().unwrap());
    // A correct batch still works: two touching items, then back.
    lane.copy_batch_htod(
        &[
            (&src, BatchItem::new(0, n, n)),
            (&src, BatchItem::new(0, 0, n)),
        ],
        &mut dev,
    )
    .unwrap();
    lane.copy_batch_dtoh(&dev, &mut [(&mut out, BatchItem::new(0, n, n))])
        .unwrap();
    assert_eq!(
        bits(out.wait_slice().unwrap()),
        bits(src.as_slice().unwrap())
    );
}
