"""Shard a float32 dataset over Dask workers, each running a prism Pipeline.

The client cuts one array into shards and sends them to the workers, shard i
to worker i mod W (so every worker, on a cluster every GPU, gets its share).
Each worker process streams its shards through a prism ``Pipeline``
(``backend="auto"``: its GPU, or its CPU threads where it has none), one
pipeline per worker thread, kept for the worker's later shards. The client
gathers the outputs in shard order and checks them, bit for bit, against
NumPy. Dask schedules; prism is the engine on each node.

Locally, on worker processes of a ``LocalCluster`` the script starts and
closes::

    python dask_shards.py --workers 2 --shards 8 --elements 1000000

On a real cluster: start a scheduler and one single-threaded worker per GPU,
each seeing its own GPU, with prism, NumPy and Dask installed alike on every
machine::

    dask scheduler                                   # on scheduler, port 8786
    CUDA_VISIBLE_DEVICES=0 dask worker scheduler:8786 --nworkers 1 --nthreads 1
    CUDA_VISIBLE_DEVICES=1 dask worker scheduler:8786 --nworkers 1 --nthreads 1

then point the script at the scheduler (it runs ``Client("scheduler:8786")``)::

    python dask_shards.py --scheduler scheduler:8786 --elements 100000000

The client here makes the data and scatters it, which is simple but sends
every byte through the client; with real data each worker would read its own
shards (from files or object storage) inside ``run_shard`` instead.

The last line printed is a JSON summary (shards, elements, per-worker
process ids, backends and devices, whether the output matched); ``--out``
also saves the gathered output as a ``.npy`` file. The exit status is 1
when the output does not match NumPy.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

# The pipeline every worker runs: three steps of y = fma(y, 2, -0.5) and a
# clamp. A multiplier of 2 makes every product exact, so NumPy's unfused
# y * 2 - 0.5 in float32 rounds once, as the fused multiply-add does: the
# reference below is exact, bit for bit.
FMA_A, FMA_B, FMA_ITERS = 2.0, -0.5, 3
CLAMP_LO, CLAMP_HI = -4.0, 4.0


def _pipeline(backend: str, chunk_bytes: Optional[int], host_threads: Optional[int]):
    """This worker thread's pipeline for these settings (made once: opening
    a GPU takes a while, and a pipeline runs one call at a time).

    The cache hangs on the thread object: run as a script, this module is
    ``__main__`` and its functions go to the workers by value, so a
    module-level cache would be a copy per task (and a ``threading.local``
    cannot be pickled at all)."""
    import prism

    thread = threading.current_thread()
    cache = getattr(thread, "prism_pipelines", None)
    if cache is None:
        cache = thread.prism_pipelines = {}
    key = (backend, chunk_bytes, host_threads)
    p = cache.get(key)
    if p is None:
        p = prism.Pipeline(backend, chunk_bytes=chunk_bytes, host_threads=host_threads)
        p.add_stage(prism.Fma(FMA_A, FMA_B, FMA_ITERS))
        p.add_stage(prism.Clamp(CLAMP_LO, CLAMP_HI))
        cache[key] = p
    return p


def run_shard(
    index: int,
    shard: np.ndarray,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
    host_threads: Optional[int] = None,
) -> Dict[str, Any]:
    """Runs on a worker: one shard through prism. Returns the output and
    where it ran."""
    p = _pipeline(backend, chunk_bytes, host_threads)
    out = p.run(shard)
    return {
        "index": index,
        "out": out,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "backend": p.backend,
        "device": p.device,
    }


def reference(x: np.ndarray) -> np.ndarray:
    """The pipeline in NumPy (exact: see FMA_A)."""
    y = np.asarray(x, dtype=np.float32).copy()
    for _ in range(FMA_ITERS):
        y = y * np.float32(FMA_A) + np.float32(FMA_B)
    return np.clip(y, np.float32(CLAMP_LO), np.float32(CLAMP_HI)).astype(np.float32)


def make_data(elements: int, seed: int) -> np.ndarray:
    """The dataset: ``elements`` standard normal float32 values."""
    return np.random.default_rng(seed).standard_normal(elements).astype(np.float32)


def run(
    client,
    data: np.ndarray,
    shards: int,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
    host_threads: Optional[int] = None,
) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """Cuts ``data`` into ``shards`` shards, runs them on the workers of
    ``client`` (shard i on worker i mod W) and returns the output in shard
    order, with each shard's record (``pid``, ``host``, ``backend``, ...)."""
    workers = sorted(client.scheduler_info()["workers"])
    if not workers:
        raise RuntimeError("the Dask cluster has no worker")
    futures = []
    for i, piece in enumerate(np.array_split(data, shards)):
        where = [workers[i % len(workers)]]
        [remote] = client.scatter([piece], workers=where)
        futures.append(
            client.submit(
                run_shard,
                i,
                remote,
                backend,
                chunk_bytes,
                host_threads,
                workers=where,
                allow_other_workers=False,
                pure=False,
            )
        )
    records = sorted(client.gather(futures), key=lambda r: r["index"])
    out = np.concatenate([r.pop("out") for r in records]) if records else data[:0]
    return out, records


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scheduler", help="a running scheduler (host:port); else a LocalCluster")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--elements", type=int, default=1 << 20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto", choices=["auto", "gpu", "host"])
    ap.add_argument("--chunk-bytes", type=int, default=None)
    ap.add_argument("--host-threads", type=int, default=None)
    ap.add_argument("--out", help="save the gathered output here (.npy)")
    args = ap.parse_args(argv)

    from dask.distributed import Client, LocalCluster

    data = make_data(args.elements, args.seed)
    if args.scheduler:
        cluster = None
        client = Client(args.scheduler)
    else:
        cluster = LocalCluster(
            n_workers=args.workers,
            threads_per_worker=args.threads_per_worker,
            processes=True,
            dashboard_address=None,
        )
        client = Client(cluster)
    try:
        worker_pids = client.run(os.getpid)
        out, records = run(
            client, data, args.shards, args.backend, args.chunk_bytes, args.host_threads
        )
    finally:
        client.close()
        if cluster is not None:
            cluster.close()

    want = reference(data)
    matched = out.shape == want.shape and bool(
        np.array_equal(out.view(np.int32), want.view(np.int32))
    )
    if args.out:
        np.save(args.out, out)
    summary = {
        "shards": len(records),
        "elements": int(out.size),
        "client_pid": os.getpid(),
        "worker_pids": sorted(worker_pids.values()),
        "shard_pids": [r["pid"] for r in records],
        "backends": sorted({r["backend"] for r in records}),
        "devices": sorted({r["device"] for r in records}),
        "hosts": sorted({r["host"] for r in records}),
        "matched": matched,
    }
    print(json.dumps(summary))
    return 0 if matched else 1


if __name__ == "__main__":
    sys.exit(main())
