#!/usr/bin/env python3
"""S4 from Python: 1 GiB and 4 GiB of ordinary (pageable) host memory
through one fma step on the GPU and back, in one process:

* prism from NumPy arrays: ``Pipeline("gpu", adaptive=True, timing=False)``
  with ``Fma(a, b)``, ``run(x, out=out)``;
* prism between registered arrays: ``Pipeline.register`` of the input and
  output once (its time reported apart), then runs with no staging, against
  t_bidir (``--bidir-ms``, prism-bench's in the same machine call);
* prism from PyTorch CPU tensors: the same call given ``torch`` tensors
  (read in place through NumPy's view of them, written through
  ``out_tensor.numpy()``);
* PyTorch's patterns over the same bytes (``crates/prism-bench/python/
  s4_torch.py``): its best practice (``pin_memory()``, 64 MiB chunks on 3
  streams, pinned output copied back), the naive ``.cuda()``/``.cpu()``
  loop, and a ``DataLoader(pin_memory=True)`` feeding 64 MiB chunks.

Every timed run starts and ends in pageable memory; every output of every
prism run is checked against the correctly rounded fma (PyTorch's against
``x * a + b`` within 1e-6, as s4_torch.py does). Prints a markdown table
and the ratios (best PyTorch pattern / prism); ``--rust-ms`` takes the
Rust S4 one-shot medians (``MIB=MS,...``, from prism-bench in the same
machine call) for the Python overhead. ``--out FILE`` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "..", "prism-bench", "python"))

import prism  # noqa: E402
from conftest import fma_f32  # noqa: E402  (the exact fma reference)

A, B = 1.0001, 0.5
CHECK_BLOCK = 1 << 24  # elements per block of the reference check


def check(x: np.ndarray, out: np.ndarray, what: str) -> None:
    for s in range(0, len(x), CHECK_BLOCK):
        want = fma_f32(x[s : s + CHECK_BLOCK], A, B)
        got = out[s : s + CHECK_BLOCK]
        if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            bad = s + int(np.argmax(got.view(np.uint32) != want.view(np.uint32)))
            raise SystemExit(f"{what}: element {bad} is {out[bad]!r}, want {fma_f32(x[bad:bad+1], A, B)[0]!r}")


def timed(run, reps: int, before=None) -> list[float]:
    times = []
    for rep in range(reps + 1):
        if before:
            before()
        t = time.perf_counter()
        run()
        if rep > 0:
            times.append((time.perf_counter() - t) * 1e3)
    return times


def summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", default="1024,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="prism from NumPy only")
    ap.add_argument("--rust-ms", default="", help="MIB=MS,... Rust S4 one-shot medians")
    ap.add_argument("--bidir-ms", default="", help="MIB=MS,... t_bidir measured by prism-bench S4")
    ap.add_argument("--out")
    args = ap.parse_args()

    p = prism.Pipeline("gpu", adaptive=True, timing=False)
    p.add_stage(prism.Fma(a=A, b=B))
    torch = None
    if not args.no_torch:
        import torch  # noqa: F811

        import s4_torch

    def pairs(arg: str) -> dict:
        return {int(k): float(v) for k, v in (kv.split("=") for kv in arg.split(",") if kv)}

    rust, bidir = pairs(args.rust_ms), pairs(args.bidir_ms)
    print(f"prism {prism.__version__}, {p.device}; numpy {np.__version__}" + (f", torch {torch.__version__}" if torch else ""))
    print("| size | pattern | median ms | min..max ms | GB/s each way |")
    print("| --- | --- | --- | --- | --- |")
    rows = []

    def row(mib: int, pattern: str, times: list[float]) -> dict:
        r = {"mib": mib, "pattern": pattern, **summary(times)}
        r["gbps"] = (mib << 20) / (r["median_ms"] * 1e6)
        print(f"| {mib} MiB | {pattern} | {r['median_ms']:.1f} | {r['min_ms']:.1f}..{r['max_ms']:.1f} | {r['gbps']:.1f} |")
        rows.append(r)
        return r

    for mib in (int(s) for s in args.sizes_mib.split(",")):
        n = mib << 18
        x = np.random.default_rng(mib).random(n, dtype=np.float32) * np.float32(2) - np.float32(1)
        out = np.empty_like(x)
        nan = lambda: out.fill(np.nan)  # noqa: E731
        t = timed(lambda: p.run(x, out=out), args.reps, nan)
        check(x, out, f"prism numpy {mib} MiB")
        prism_np = row(mib, "prism (numpy)", t)
        s = p.stats()
        prism_np["chunk_bytes"], prism_np["slots"] = s["chunk_bytes"], s["slots"]
        if mib in rust:
            prism_np["rust_ms"] = rust[mib]
            prism_np["python_overhead"] = prism_np["median_ms"] / rust[mib] - 1
        # Registered in place once, then runs with no staging.
        t0 = time.perf_counter()
        xr, outr = p.register(x), p.register(out)
        register_ms = (time.perf_counter() - t0) * 1e3
        t = timed(lambda: p.run(xr, out=outr), args.reps, nan)
        check(x, out, f"prism registered {mib} MiB")
        reg = row(mib, "prism (numpy, registered)", t)
        reg["register_ms"] = register_ms
        t0 = time.perf_counter()
        xr.close()
        outr.close()
        reg["unregister_ms"] = (time.perf_counter() - t0) * 1e3
        if mib in bidir:
            reg["t_bidir_ms"] = bidir[mib]
            reg["bidir_over_measured"] = bidir[mib] / reg["median_ms"]
        if torch is None:
            continue
        xt, outt = torch.from_numpy(x), torch.empty(n)
        outn = outt.numpy()
        t = timed(lambda: p.run(xt, out=outn), args.reps, lambda: outt.fill_(float("nan")))
        check(x, outn, f"prism torch {mib} MiB")
        row(mib, "prism (torch CPU tensors)", t)
        best = None
        for fn in (s4_torch.best_practice, s4_torch.naive, dataloader):
            med, lo, hi = s4_torch.timed(fn, xt, outt, args.reps)
            r = row(mib, f"torch {fn.__name__}", [med, lo, hi])
            best = r if best is None or med < best["median_ms"] else best
        prism_np["best_torch"] = best["pattern"]
        prism_np["speedup_over_best_torch"] = best["median_ms"] / prism_np["median_ms"]
        del xt, outt, outn

    print()
    for r in rows:
        if r["pattern"] != "prism (numpy)":
            continue
        line = f"{r['mib']} MiB: prism from NumPy {r['median_ms']:.1f} ms (chunks {r['chunk_bytes'] >> 20} MiB, {r['slots']} slots)"
        if "speedup_over_best_torch" in r:
            line += f"; {r['speedup_over_best_torch']:.2f}x PyTorch's best ({r['best_torch']})"
        if "python_overhead" in r:
            line += f"; {100 * r['python_overhead']:+.1f} % over Rust's {r['rust_ms']:.1f} ms"
        print(line)
    for r in rows:
        if "bidir_over_measured" in r:
            print(
                f"{r['mib']} MiB registered: {r['median_ms']:.1f} ms, {r['bidir_over_measured']:.3f} of t_bidir "
                f"({r['t_bidir_ms']:.1f} ms); register {r['register_ms']:.0f} ms, unregister {r['unregister_ms']:.0f} ms"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": p.device, "rows": rows}, f, indent=1)
    return 0


def dataloader(x, out):
    """A ``DataLoader(pin_memory=True)`` over 64 MiB chunks of ``x``: each
    pinned batch copied to the GPU (non-blocking), computed, and copied
    back into the pageable output."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    chunk = 16 << 20

    class Chunks(Dataset):
        def __len__(self):
            return -(-x.numel() // chunk)

        def __getitem__(self, k):
            return x[k * chunk : (k + 1) * chunk]

    for k, c in enumerate(DataLoader(Chunks(), batch_size=None, pin_memory=True)):
        d = c.cuda(non_blocking=True)
        d.mul_(A).add_(B)
        out[k * chunk : k * chunk + c.numel()].copy_(d)
    torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(main())
