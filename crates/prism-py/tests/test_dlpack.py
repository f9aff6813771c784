"""DLPack: another library's memory in, prism's device arrays out.

The capsule reader runs everywhere (NumPy's host tensors); the device
paths need a GPU (skipped without one, failed with ``PRISM_REQUIRE_GPU=1``)
and PyTorch or CuPy for the round trips (skipped without them). Every
output is compared bit for bit with the NumPy reference.
"""

from __future__ import annotations

import faulthandler
import sys
import threading

import numpy as np
import pytest

import prism
from conftest import (
    assert_bits_equal,
    clamp_ref,
    fma_chain_ref,
    gpu_pipeline,
    group_sum_ref,
)
from prism import _prism

# ---------------------------------------------------------------- the host


def test_capsule_reader_takes_numpy_tensors_in_place():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert _prism._dlpack_info(a) == (a.ctypes.data, 12, 1, 0)
    b = np.arange(10, dtype=np.float32)
    view = b[3:]
    assert _prism._dlpack_info(view) == (view.ctypes.data, 7, 1, 0)
    one = np.float32(2.0).reshape(())  # 0-d: one element
    assert _prism._dlpack_info(np.asarray(one))[1] == 1


def test_capsule_reader_calls_each_deleter_once():
    b = np.arange(10, dtype=np.float32)
    before = sys.getrefcount(b)
    for _ in range(200):
        _prism._dlpack_info(b)
    for _ in range(50):  # refused after the capsule was taken
        with pytest.raises(ValueError):
            _prism._dlpack_info(b[::2])
    assert sys.getrefcount(b) == before  # no tensor leaked, none freed twice


def test_capsule_reader_refuses_what_prism_cannot_read():
    b = np.arange(10, dtype=np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        _prism._dlpack_info(b[::2])
    with pytest.raises(ValueError, match="C-contiguous"):
        _prism._dlpack_info(np.arange(12, dtype=np.float32).reshape(3, 4).T)
    with pytest.raises(TypeError, match="float32"):
        _prism._dlpack_info(b.astype(np.float64))
    with pytest.raises(TypeError, match="float32"):
        _prism._dlpack_info(np.arange(4, dtype=np.int32))

    class NotACapsule:
        def __dlpack__(self, stream=None):
            return object()

    with pytest.raises(TypeError, match="dltensor"):
        _prism._dlpack_info(NotACapsule())


def test_host_arrays_are_no_device_arrays():
    b = np.arange(10, dtype=np.float32)
    with pytest.raises(BufferError, match="not CUDA memory"):
        prism.from_dlpack(b)
    with pytest.raises(TypeError, match="__dlpack__"):
        prism.from_dlpack([1.0, 2.0])


def test_host_pipeline_refuses_device_data():
    p = prism.Pipeline(backend="host")
    p.add_stage(prism.Clamp(lo=0.0, hi=1.0))
    with pytest.raises(prism.UnsupportedError, match="GPU pipeline"):
        p.to_device(np.ones(4, dtype=np.float32))

    class CudaLooking:
        def __dlpack_device__(self):
            return (2, 0)

        def __dlpack__(self, stream=None):
            raise AssertionError("a host pipeline must not take the tensor")

    with pytest.raises(prism.UnsupportedError):
        p.run(CudaLooking())
    # Host tensors (DLPack device 1) still run as arrays.
    x = np.linspace(-1, 2, 9, dtype=np.float32)
    assert_bits_equal(p.run(x), clamp_ref(x, 0.0, 1.0))


# ----------------------------------------------------------------- the GPU


def cuda_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA device")
    return torch


def cuda_cupy():
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - any CUDA failure means no device
        pytest.skip(f"CuPy sees no CUDA device: {e}")
    return cupy


def test_gpu_device_run_matches_the_host_run(rng):
    chunk = (1 << 16) + 3  # groups end at chunk ends, as in run()
    p = gpu_pipeline(4 * chunk)
    p.add_stage(prism.Clamp(lo=-0.5, hi=0.5))
    p.add_stage(prism.GroupSum(group=8))
    x = rng.standard_normal(5 * chunk + 11).astype(np.float32)
    d = p.to_device(x)
    assert isinstance(d, prism.DeviceArray) and len(d) == len(x) and d.ptr != 0
    assert_bits_equal(d.numpy(), x)
    y = p.run(d)
    assert isinstance(y, prism.DeviceArray) and len(y) == p.output_len(len(x))
    assert_bits_equal(y.numpy(), group_sum_ref(clamp_ref(x, -0.5, 0.5), 8, chunk))
    assert_bits_equal(p.run(x), y.numpy())  # the host-memory run agrees
    with pytest.raises(TypeError, match="out"):
        p.run(d, out=np.empty(len(y), dtype=np.float32))
    empty = p.to_device(np.empty(0, dtype=np.float32))
    assert len(p.run(empty)) == 0 and empty.ptr == 0


def test_gpu_torch_round_trip_copies_nothing(rng):
    torch = cuda_torch()
    p = gpu_pipeline(1 << 22)
    p.add_stage(prism.Fma(a=1.000244, b=-0.5, iters=8))
    x = rng.standard_normal((1 << 22) + 5).astype(np.float32)
    t = torch.from_numpy(x).cuda()
    # In: a view of the tensor's memory.
    d = prism.from_dlpack(t)
    assert d.ptr == t.data_ptr()
    # Through the pipeline, straight from the tensor.
    y = p.run(t)
    # Out: torch takes prism's memory as it is.
    u = torch.from_dlpack(y)
    assert y.exported and u.data_ptr() == y.ptr and u.is_cuda
    assert_bits_equal(u.cpu().numpy(), fma_chain_ref(x, 1.000244, -0.5, 8))
    with pytest.raises(prism.BusyError):
        y.numpy()  # theirs now
    with pytest.raises(prism.BusyError):
        p.run(y)
    # A strided tensor is refused, not misread.
    with pytest.raises(ValueError, match="C-contiguous"):
        prism.from_dlpack(t[::2])
    with pytest.raises(TypeError, match="float32"):
        prism.from_dlpack(t.double())
    # The export outlives the DeviceArray; freed when torch is done.
    del y
    u.mul_(2.0)
    torch.cuda.synchronize()
    assert_bits_equal(u.cpu().numpy(), fma_chain_ref(x, 1.000244, -0.5, 8) * np.float32(2.0))
    del u, d


def test_gpu_torch_handoff_waits_on_an_event_not_the_device(rng):
    """The consumer's stream waits on an event: a long kernel on an
    unrelated torch stream is still running after the hand-over, and the
    output is right."""
    torch = cuda_torch()
    p = gpu_pipeline(1 << 24)
    p.add_stage(prism.Fma(a=1.0001, b=0.25, iters=64))
    x = rng.standard_normal(1 << 24).astype(np.float32)
    t = torch.from_numpy(x).cuda()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU cycles on the side
    y = p.run(t)
    u = torch.from_dlpack(y)
    v = u * 1.0  # queued on torch's stream after the event wait
    assert not side.query(), "the hand-over waited for the whole device"
    side.synchronize()
    assert_bits_equal(v.cpu().numpy(), fma_chain_ref(x, 1.0001, 0.25, 64))


def test_gpu_cupy_round_trip_copies_nothing(rng):
    cupy = cuda_cupy()
    p = gpu_pipeline(1 << 22)
    p.add_stage(prism.Clamp(lo=-1.0, hi=1.0))
    x = rng.standard_normal((1 << 20) + 3).astype(np.float32)
    c = cupy.asarray(x)
    assert prism.from_dlpack(c).ptr == c.data.ptr
    y = p.run(c)
    u = cupy.from_dlpack(y)
    assert u.data.ptr == y.ptr
    assert_bits_equal(cupy.asnumpy(u), clamp_ref(x, -1.0, 1.0))


def test_gpu_export_to_a_stream_of_the_consumers_own(rng):
    torch = cuda_torch()
    p = gpu_pipeline(1 << 22)
    p.add_stage(prism.Clamp(lo=0.0, hi=0.5))
    x = rng.standard_normal(1 << 20).astype(np.float32)
    y = p.run(p.to_device(x))
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        u = torch.from_dlpack(y)  # torch passes its current stream
        w = u + 0.0
    s.synchronize()
    assert_bits_equal(w.cpu().numpy(), clamp_ref(x, 0.0, 0.5))
    del u, w, y  # the free waits for the whole GPU here (a stream of torch's own)


def test_gpu_refused_exports_leave_the_array_prisms(rng):
    """Arguments refused before anything is shared leave the array prism's."""
    p = gpu_pipeline(1 << 22)
    p.add_stage(prism.Clamp(lo=0.0, hi=0.5))
    x = rng.standard_normal(1 << 16).astype(np.float32)
    y = p.run(p.to_device(x))
    for bad in ({"stream": 0}, {"copy": True}, {"dl_device": (1, 0)}):
        with pytest.raises(BufferError):
            y.__dlpack__(**bad)
        assert not y.exported
    assert_bits_equal(y.numpy(), clamp_ref(x, 0.0, 0.5))


def test_gpu_capsules_on_every_stream_kind(rng):
    torch = cuda_torch()
    from torch.utils import dlpack as tdl

    p = gpu_pipeline(1 << 22)
    p.add_stage(prism.Fma(a=2.0, b=1.0, iters=4))
    x = rng.standard_normal((1 << 20) + 1).astype(np.float32)
    want = fma_chain_ref(x, 2.0, 1.0, 4)
    for stream in (None, 1, 2, -1):
        y = p.run(p.to_device(x))
        cap = y.__dlpack__() if stream is None else y.__dlpack__(stream=stream)
        del y  # the capsule keeps the memory
        u = tdl.from_dlpack(cap)
        torch.cuda.synchronize()
        assert_bits_equal(u.cpu().numpy(), want)
    # A capsule nobody takes: its destructor deletes the tensor.
    y = p.run(p.to_device(x))
    cap = y.__dlpack__()
    del cap
    with pytest.raises(prism.BusyError):
        y.numpy()
    del y
    # No element: a tensor of shape (0,).
    e = torch.from_dlpack(p.to_device(np.empty(0, dtype=np.float32)))
    assert tuple(e.shape) == (0,)


def test_gpu_owner_writes_after_a_run_over_its_tensor(rng):
    """The owner's next write on its default stream waits for prism's reads
    (the legacy stream waits on them), so the run sees the old values."""
    torch = cuda_torch()
    # Many small chunks on one lane: the last chunks' reads come long after
    # run() returns, so an unordered write would reach them.
    p = gpu_pipeline(1 << 14)
    p.add_stage(prism.Fma(a=1.0001, b=0.25, iters=64))
    x = rng.standard_normal(1 << 20).astype(np.float32)
    t = torch.from_numpy(x).cuda()
    torch.cuda.synchronize()
    d = prism.from_dlpack(t)
    y = p.run(d)
    t.fill_(7.0)  # queued at once on torch's (legacy) stream
    torch.cuda.synchronize()
    assert_bits_equal(y.numpy(), fma_chain_ref(x, 1.0001, 0.25, 64))
    # The other way: the owner's write (held back by a sleep) comes before
    # prism's next run over the same array.
    t2 = torch.from_numpy(2 * x).cuda()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    t.copy_(t2)  # device to device, queued behind the sleep
    y2 = p.run(d)
    assert_bits_equal(y2.numpy(), fma_chain_ref(2 * x, 1.0001, 0.25, 64))


def test_gpu_attributes_while_another_thread_runs(rng):
    """``repr``, ``ptr`` and ``exported`` never wait for a run of the same
    array in another thread (which holds it while the GIL is released):
    before the fix they waited for it with the GIL, a deadlock."""
    p = gpu_pipeline(1 << 22)
    p.add_stage(prism.Fma(a=1.0001, b=0.25, iters=64))
    d = p.to_device(rng.standard_normal(1 << 24).astype(np.float32))
    done = threading.Event()
    errors = []

    def runner():
        try:
            for _ in range(20):
                p.run(d)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            done.set()

    # A deadlock would hang: dump the stacks and fail instead.
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        th = threading.Thread(target=runner)
        th.start()
        seen = 0
        while not done.is_set():
            repr(d), d.ptr, d.exported, len(d)
            seen += 1
        th.join(timeout=60)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert not th.is_alive() and not errors, errors
    assert seen > 0
