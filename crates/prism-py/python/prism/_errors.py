"""The exceptions prism raises, mapped from prism's Rust errors.

Every exception derives from :class:`PrismError`. Those for a bad argument
also derive from :class:`ValueError`, and :class:`OutOfMemoryError` from
:class:`MemoryError`, so that ordinary ``except`` clauses catch them too.
Attributes that an error does not carry are ``None``.
"""

from __future__ import annotations

from typing import Any, Optional


class PrismError(Exception):
    """Base class of prism's errors; also raised as is for errors without a
    class of their own (its message says what went wrong)."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        for name, value in fields.items():
            setattr(self, name, value)

    @property
    def message(self) -> str:
        """The error's message."""
        return str(self.args[0]) if self.args else ""


class NoDeviceError(PrismError):
    """No usable GPU: the driver reports no device, or the device asked for
    does not exist. ``backend="host"`` (or ``"auto"``) runs on CPU threads."""


class DriverNotFoundError(NoDeviceError):
    """No NVIDIA driver: ``libcuda.so`` could not be loaded."""


class ConfigError(PrismError, ValueError):
    """A configuration value out of range (chunk size, slots, threads,
    backend name, stage order; ``index`` names a bad stage index), or a stage
    graph that cannot be built or run (:class:`GraphError`)."""

    index: Optional[int] = None


class NoStagesError(ConfigError):
    """A run, or ``set_order``, with no stage."""


class GraphError(ConfigError):
    """A stage graph that cannot be built or run as asked: a node of another
    graph (``node``: its index there, ``nodes``: this graph's node count), or
    a graph needing more device buffers per ring slot than a GPU run has
    (``buffers``, ``max_buffers``)."""

    node: Optional[int] = None
    nodes: Optional[int] = None
    buffers: Optional[int] = None
    max_buffers: Optional[int] = None


class NoOutputsError(GraphError):
    """A graph run (or ``graph_output_lens``, ``buffers_per_slot``) on a
    graph with no output: mark one with ``Graph.output``."""


class LengthError(PrismError, ValueError):
    """A length that does not fit: ``out`` of the wrong size, a stream item
    empty or longer than a chunk, a graph run's ``outs`` with another number
    of arrays than the graph has outputs, or one of the wrong size. ``expected``
    and ``actual`` are element (or, for the number of ``outs``, array) counts
    where known; ``item`` is the stream item's index, ``output`` the graph
    output's."""

    expected: Optional[int] = None
    actual: Optional[int] = None
    item: Optional[int] = None
    output: Optional[int] = None


class StageError(PrismError):
    """A stage failed (or panicked, ``panicked`` is then true) on chunk
    ``chunk``; the run stopped after the chunks in flight drained."""

    stage: Optional[str] = None
    chunk: Optional[int] = None
    panicked: bool = False


class UnsupportedError(PrismError):
    """Something the backend or build cannot do (a stage without an
    implementation for the backend: ``stage``, ``backend``)."""

    stage: Optional[str] = None
    backend: Optional[str] = None


class OutOfMemoryError(PrismError, MemoryError):
    """A device or pinned host allocation failed for lack of memory."""


class ContextPoisonedError(PrismError):
    """An earlier GPU error left the GPU context unusable (CUDA errors are
    sticky): make a new pipeline (in a new process if it persists)."""


class GpuError(PrismError):
    """A CUDA driver call, kernel launch or GPU operation failed."""


class SourceError(PrismError):
    """A stream's input failed at chunk ``chunk`` (an exception raised by the
    iterable passed to ``run_stream`` is raised as itself instead)."""

    chunk: Optional[int] = None


class SinkError(PrismError):
    """A stream's output failed at chunk ``chunk``."""

    chunk: Optional[int] = None


class ForeignMemoryError(PrismError, ValueError):
    """Memory handed over through DLPack that prism cannot use: an address
    the driver does not know as GPU memory, memory of another device or
    CUDA context, or a range past its allocation. Nothing was taken."""


class BusyError(PrismError):
    """The pipeline is in use: another thread runs it, or a ``run_stream``
    iterator is neither exhausted nor closed."""


__all__ = [
    "PrismError",
    "NoDeviceError",
    "DriverNotFoundError",
    "ConfigError",
    "NoStagesError",
    "GraphError",
    "NoOutputsError",
    "LengthError",
    "StageError",
    "UnsupportedError",
    "OutOfMemoryError",
    "ForeignMemoryError",
    "ContextPoisonedError",
    "GpuError",
    "SourceError",
    "SinkError",
    "BusyError",
]
