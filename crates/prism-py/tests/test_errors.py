"""Typed exceptions: configuration, stage order, backends."""

import numpy as np
import pytest

import prism
from conftest import host_pipeline


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"chunk_bytes": 0}, "chunk_bytes"),
        ({"chunk_bytes": 6}, "multiple"),
        ({"slots": 0}, "slots"),
        ({"slots": 1}, "slots"),
        ({"slots": 9}, "slots"),
        ({"host_threads": 0}, "host_threads"),
        ({"chunk_bytes": -4}, "chunk_bytes"),
        ({"slots": -3}, "slots"),
        ({"host_threads": -1}, "host_threads"),
        ({"chunk_bytes": 1 << 100}, "chunk_bytes"),
        ({"chunk_bytes": (1 << 63) + 4}, "chunk_bytes"),
    ],
)
def test_zero_and_out_of_range_sizes_are_config_errors(kwargs, fragment):
    with pytest.raises(prism.ConfigError, match=fragment) as e:
        prism.Pipeline("host", **kwargs)
    assert isinstance(e.value, ValueError) and isinstance(e.value, prism.PrismError)


def test_unknown_backend_is_a_config_error():
    with pytest.raises(prism.ConfigError, match="backend"):
        prism.Pipeline("cuda")


def test_group_of_zero_is_a_config_error():
    with pytest.raises(prism.ConfigError, match="group"):
        prism.GroupSum(0)


def test_no_stage_is_a_typed_error():
    p = host_pipeline()
    with pytest.raises(prism.NoStagesError, match="add_stage"):
        p.run(np.ones(10, dtype=np.float32))
    with pytest.raises(prism.NoStagesError):
        p.set_order([])
    assert issubclass(prism.NoStagesError, prism.ConfigError)
    assert p.stats()["runs"] == 0  # a refused run adds nothing


def test_bad_stage_orders():
    p = host_pipeline()
    p.add_stage(prism.Clamp(0, 1))
    p.add_stage(prism.Clamp(0, 2))
    with pytest.raises(prism.ConfigError, match="only 2 stage") as e:
        p.set_order([0, 5])
    assert e.value.index == 5
    with pytest.raises(prism.ConfigError, match="twice") as e:
        p.set_order([1, 1])
    assert e.value.index == 1


def _gpu_present() -> bool:
    return prism.Pipeline("auto").backend == "gpu"


def test_auto_picks_a_backend_and_says_which():
    p = prism.Pipeline("auto")
    assert p.backend in ("gpu", "host")
    assert (p.device != "") == (p.backend == "gpu")


def test_gpu_backend_without_a_gpu_says_what_is_needed():
    if _gpu_present():
        assert prism.Pipeline("gpu").backend == "gpu"
        return
    with pytest.raises(prism.NoDeviceError) as e:
        prism.Pipeline("gpu")
    msg = str(e.value)
    # No driver here: DriverNotFoundError (a NoDeviceError); a driver with
    # no device would be NoDeviceError itself.
    if isinstance(e.value, prism.DriverNotFoundError):
        assert "NVIDIA driver" in msg and "libcuda" in msg
    else:
        assert "GPU" in msg
    assert 'backend="host"' in msg


def test_exception_hierarchy():
    for cls in (
        prism.NoDeviceError,
        prism.DriverNotFoundError,
        prism.ConfigError,
        prism.NoStagesError,
        prism.GraphError,
        prism.NoOutputsError,
        prism.LengthError,
        prism.StageError,
        prism.UnsupportedError,
        prism.OutOfMemoryError,
        prism.ContextPoisonedError,
        prism.GpuError,
        prism.SourceError,
        prism.SinkError,
        prism.BusyError,
    ):
        assert issubclass(cls, prism.PrismError), cls
    assert issubclass(prism.DriverNotFoundError, prism.NoDeviceError)
    assert issubclass(prism.OutOfMemoryError, MemoryError)
    assert issubclass(prism.NoOutputsError, prism.GraphError)
    assert issubclass(prism.GraphError, prism.ConfigError)
    assert issubclass(prism.GraphError, ValueError)
    e = prism.StageError("boom", stage="fma", chunk=3)
    assert (e.stage, e.chunk, e.panicked, e.message) == ("fma", 3, False, "boom")
