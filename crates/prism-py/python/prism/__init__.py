"""prism for Python: stream NumPy arrays through GPU pipelines.

A :class:`Pipeline` holds stages (:class:`Fma`, :class:`Clamp`,
:class:`GroupSum`) in an order and streams 1-D float32 arrays through them
in chunks: on an NVIDIA GPU, uploads, stages and downloads of different
chunks overlap; without one (``backend="host"``, or ``"auto"`` on a machine
with no GPU) the same pipeline runs on CPU threads. The GIL is released
while prism works. A :class:`Graph` of the same stages (one input read
by several branches, several outputs) runs with :meth:`Pipeline.run_graph`.
Data already on the GPU (a :class:`DeviceArray`, or a PyTorch or CuPy CUDA
tensor through DLPack) runs without crossing the link, and comes back as a
:class:`DeviceArray` that ``torch.from_dlpack`` takes without a copy.
prism's errors are raised as the typed exceptions of this module, all
derived from :class:`PrismError`.

Example::

    import numpy as np
    import prism

    p = prism.Pipeline(backend="auto", chunk_bytes=1 << 20)
    p.add_stage(prism.Fma(a=2.0, b=1.0, iters=4))
    p.add_stage(prism.Clamp(lo=-1.0, hi=1.0))
    y = p.run(np.random.rand(1 << 20).astype(np.float32))
    print(p.backend, p.stats()["throughput_gbps"])
"""

from ._errors import (
    BusyError,
    ConfigError,
    ContextPoisonedError,
    DriverNotFoundError,
    ForeignMemoryError,
    GpuError,
    GraphError,
    LengthError,
    NoDeviceError,
    NoOutputsError,
    NoStagesError,
    OutOfMemoryError,
    PrismError,
    SinkError,
    SourceError,
    StageError,
    UnsupportedError,
)
from ._prism import (
    Clamp,
    DeviceArray,
    Fma,
    Graph,
    GroupSum,
    Kernel,
    Node,
    Pipeline,
    Registered,
    StreamIter,
    __version__,
    from_dlpack,
)

from . import _errors

__all__ = [
    "Pipeline",
    "StreamIter",
    "Registered",
    "DeviceArray",
    "from_dlpack",
    "Graph",
    "Node",
    "Fma",
    "Clamp",
    "GroupSum",
    "Kernel",
    *_errors.__all__,
    "__version__",
]
