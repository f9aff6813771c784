"""Type stubs of prism's native module (``prism._prism``); use it through
the package ``prism``, which re-exports these classes."""

from types import TracebackType
from typing import Any, Iterable, Iterator, List, Literal, Optional, Type, Union, overload

import numpy as np
import numpy.typing as npt

__version__: str

_Input = Union[npt.NDArray[np.float32], npt.ArrayLike]

class Fma:
    """``y = x`` after ``iters`` steps of ``y = fma(y, a, b)`` (float32 fused
    multiply-add, one rounding per step); elementwise. ``a`` and ``b`` are
    rounded to float32."""

    def __init__(self, a: float, b: float, iters: int = 1) -> None: ...
    @property
    def a(self) -> float: ...
    @property
    def b(self) -> float: ...
    @property
    def iters(self) -> int: ...
    @property
    def name(self) -> Literal["fma"]: ...

class Clamp:
    """``y = min(max(x, lo), hi)`` elementwise; ``lo`` and ``hi`` are rounded
    to float32."""

    def __init__(self, lo: float, hi: float) -> None: ...
    @property
    def lo(self) -> float: ...
    @property
    def hi(self) -> float: ...
    @property
    def name(self) -> Literal["clamp"]: ...

class GroupSum:
    """Sums of consecutive groups of ``group`` elements within each chunk
    (``ceil(n / group)`` sums from a chunk of ``n``); ``group >= 1``."""

    def __init__(self, group: int) -> None: ...
    @property
    def group(self) -> int: ...
    @property
    def name(self) -> Literal["group_sum"]: ...

class Kernel:
    """Your own CUDA kernel from PTX, as a stage (GPU backend only):
    ``extern "C" __global__ void name(const float *in, float *out,
    unsigned long long n, float p0, ...)``, one float per ``params`` value;
    the PTX's ``.entry`` is checked for that parameter list."""

    def __init__(
        self,
        ptx: str,
        name: str,
        params: List[float] = ...,
        *,
        elementwise: bool = False,
        block: int = 256,
    ) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def params(self) -> List[float]: ...
    @property
    def elementwise(self) -> bool: ...
    @property
    def block(self) -> int: ...

Stage = Union[Fma, Clamp, GroupSum, Kernel]

class Node:
    """A node of a :class:`Graph` (its input or a stage); valid only on the
    graph that made it (another graph raises ``GraphError``)."""

    @property
    def index(self) -> int:
        """The node's position in its graph (0 is the input)."""
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...

class Graph:
    """A DAG of stages over one input: fan-out (read in place), any node an
    output (taps, the input itself); run with ``Pipeline.run_graph``."""

    def __init__(self, *, concurrent_branches: bool = True) -> None: ...
    @property
    def concurrent_branches(self) -> bool:
        """Whether independent branches run concurrently on the GPU."""
    @property
    def node_count(self) -> int:
        """Nodes, the input included."""
    @property
    def output_count(self) -> int:
        """Outputs declared."""
    def input(self) -> Node:
        """The graph's input."""
    def stage(self, node: Node, stage: Stage) -> Node:
        """Adds a stage reading ``node``; returns the new node."""
    def output(self, node: Node) -> int:
        """Makes ``node`` an output; returns its index in a run's outputs."""
    def name(self, node: Node) -> str:
        """The node's name in stats and errors (unique in the graph)."""
    def buffers_per_slot(self) -> int:
        """Device buffers a GPU ring slot holds for this graph (more than 16
        raises ``GraphError``)."""

class StreamIter(Iterator[npt.NDArray[np.float32]]):
    """Outputs of ``Pipeline.run_stream``, one float32 array per item, in
    order; a context manager that closes it."""

    def __iter__(self) -> StreamIter: ...
    def __next__(self) -> npt.NDArray[np.float32]: ...
    def close(self) -> None:
        """Stops the stream and frees the pipeline; idempotent."""
    def __enter__(self) -> StreamIter: ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

class Registered:
    """A float32 array page-locked in place (``Pipeline.register``); a
    context manager that unregisters it on exit."""

    @property
    def array(self) -> npt.NDArray[np.float32]:
        """The registered array itself (no copy)."""
    @property
    def pinned(self) -> bool:
        """Page-locked on a GPU now (False on the host backend, or closed)."""
    def __len__(self) -> int: ...
    def close(self) -> None:
        """Unregisters the array once the GPU is done with it."""
    def __enter__(self) -> Registered: ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

class DeviceArray:
    """float32 data on a GPU (1-D): a device run's output,
    ``Pipeline.to_device``'s upload, or a CUDA tensor's memory through
    ``from_dlpack``. ``torch.from_dlpack`` / ``cupy.from_dlpack`` take it
    without a copy; from then on it is theirs (prism refuses it)."""

    @property
    def shape(self) -> tuple[int]: ...
    @property
    def dtype(self) -> np.dtype[np.float32]: ...
    @property
    def device(self) -> int:
        """The CUDA device ordinal."""
    @property
    def ptr(self) -> int:
        """The device address of the first element (0 when empty)."""
    @property
    def exported(self) -> bool:
        """True once handed to another library through ``__dlpack__``."""
    def __len__(self) -> int: ...
    def numpy(self) -> npt.NDArray[np.float32]:
        """A NumPy copy of the contents."""
    def __dlpack_device__(self) -> tuple[int, int]: ...
    def __dlpack__(
        self,
        *,
        stream: Optional[int] = None,
        max_version: Optional[tuple[int, int]] = None,
        dl_device: Optional[tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any:
        """A ``"dltensor"`` capsule; ``stream`` waits for prism's work."""

def from_dlpack(tensor: Any) -> DeviceArray:
    """A CUDA tensor (PyTorch, CuPy, ...) as a ``DeviceArray`` over the same
    memory, no copy."""

def _dlpack_info(obj: Any) -> tuple[int, int, int, int]:
    """Internal, for tests: (address, elements, device type, device id) of
    any DLPack object's tensor."""

class Pipeline:
    """Stages in an order, streaming float32 data through them in chunks on
    a GPU or on CPU threads (``backend="host"``)."""

    def __init__(
        self,
        backend: Literal["auto", "gpu", "host"] = "auto",
        *,
        chunk_bytes: Optional[int] = None,
        slots: Optional[int] = None,
        host_threads: Optional[int] = None,
        timing: Optional[bool] = None,
        trace: bool = False,
        adaptive: bool = False,
        graphs: bool = False,
    ) -> None: ...
    @property
    def backend(self) -> Literal["gpu", "host"]:
        """What the pipeline runs on (what ``"auto"`` chose)."""
    @property
    def device(self) -> str:
        """The GPU's name; ``""`` on the host."""
    @property
    def chunk_bytes(self) -> int: ...
    @property
    def slots(self) -> int: ...
    @property
    def host_threads(self) -> int: ...
    @property
    def timing(self) -> bool: ...
    @property
    def adaptive(self) -> bool: ...
    @property
    def graphs(self) -> bool: ...
    def add_stage(self, stage: Stage) -> int:
        """Adds a stage; returns its index."""
    def set_order(self, order: List[int]) -> None:
        """Runs only these stages, in this order."""
    def output_len(self, n: int) -> int:
        """Elements a run over ``n`` elements produces."""
    def register(self, array: npt.NDArray[np.float32]) -> Registered:
        """Page-locks ``array`` in place for this pipeline's GPU (no copy):
        runs from one registered array into another need no staging."""
    def to_device(self, array: _Input) -> DeviceArray:
        """Uploads ``array`` to the pipeline's GPU."""
    @overload
    def run(self, input: DeviceArray, out: None = None) -> DeviceArray:
        """A run over data on the GPU (a ``DeviceArray`` or a CUDA tensor
        with ``__dlpack__``): nothing crosses the link; returns a new
        ``DeviceArray``."""
    @overload
    def run(self, input: Union[_Input, Registered], out: Registered) -> Registered: ...
    @overload
    def run(
        self,
        input: Union[_Input, Registered],
        out: Optional[npt.NDArray[np.float32]] = None,
    ) -> npt.NDArray[np.float32]:
        """Streams ``input`` through the stages (GIL released); returns the
        output (``out`` when given). Non-float32 or non-contiguous input is
        copied first; two ``Registered`` arrays run with no staging."""
    def graph_output_lens(self, graph: Graph, n: int) -> List[int]:
        """Elements each output of ``graph`` gets from ``n`` input elements."""
    def run_graph(
        self,
        graph: Graph,
        input: _Input,
        outs: Optional[Iterable[npt.NDArray[np.float32]]] = None,
    ) -> List[npt.NDArray[np.float32]]:
        """Streams ``input`` through ``graph`` (GIL released); returns one
        array per output, in output order (the arrays of ``outs`` when
        given)."""
    def run_stream(self, items: Iterable[_Input]) -> StreamIter:
        """One output per item, in order, computed on a worker thread."""
    def stats(self) -> dict[str, Any]:
        """Counts and times since creation or ``reset_stats()``."""
    def reset_stats(self) -> None: ...
    def trace(self) -> str:
        """The last traced run as Chrome trace-event JSON."""
