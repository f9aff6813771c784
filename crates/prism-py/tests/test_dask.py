"""The Dask example (examples/dask_shards.py) runs on a LocalCluster of two
worker processes: every shard ran in a worker process (both of them), and
the gathered output matches this test's own NumPy reference bit for bit.

Dask is not optional here: CI installs ``dask[distributed]``, and without it
the import below fails the test instead of skipping it.
"""

import json
import pathlib
import subprocess
import sys

import dask.distributed  # noqa: F401  (a missing Dask fails, not skips)
import numpy as np

from conftest import assert_bits_equal, clamp_ref, fma_chain_ref

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "dask_shards.py"


def test_dask_example_shards_over_two_worker_processes(tmp_path):
    n, shards, seed = 100_003, 6, 7
    out = tmp_path / "out.npy"
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--workers", "2",
            "--threads-per-worker", "1",
            "--shards", str(shards),
            "--elements", str(n),
            "--seed", str(seed),
            "--host-threads", "1",
            "--chunk-bytes", str(4 * 4096),
            "--out", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])

    # The output, against a reference made here (the emulated fused
    # multiply-add of conftest, not the example's own NumPy reference).
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    want = clamp_ref(fma_chain_ref(x, 2.0, -0.5, 3), -4.0, 4.0)
    assert_bits_equal(np.load(out), want)
    assert summary["matched"] is True
    assert (summary["shards"], summary["elements"]) == (shards, n)

    # Two worker processes, neither of them the client, each ran shards.
    workers = summary["worker_pids"]
    assert len(set(workers)) == 2 and summary["client_pid"] not in workers
    assert sorted(set(summary["shard_pids"])) == sorted(workers)
    assert set(summary["backends"]) <= {"gpu", "host"}
