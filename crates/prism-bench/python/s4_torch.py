#!/usr/bin/env python3
"""S4's PyTorch baselines: a pageable 1 GiB / 4 GiB float32 round trip
through one fma-like step on the GPU, the two ways a PyTorch user writes it.

* best practice: `pin_memory()` of the input, 64 MiB chunks on 3 CUDA
  streams (`non_blocking` copies into and out of the GPU), a pinned output,
  then the result copied back into an ordinary (pageable) tensor;
* naive: per 64 MiB chunk, `.cuda()`, compute, `.cpu()` into the output.

Every timed run starts and ends in pageable memory, as prism's
`run(&input, &mut output)` does. Prints a markdown table; `--out FILE`
writes the figures as JSON. Run on the GPU machine next to prism-bench.
"""
import argparse
import json
import statistics
import time

import torch

A, B = 1.0001, 0.5
CHUNK = 16 << 20  # elements: 64 MiB of float32


def best_practice(x, out):
    pinned_in = x.pin_memory()
    pinned_out = torch.empty_like(pinned_in).pin_memory()
    streams = [torch.cuda.Stream() for _ in range(3)]
    bufs = [torch.empty(CHUNK, device="cuda") for _ in range(3)]
    for k, start in enumerate(range(0, x.numel(), CHUNK)):
        end = min(start + CHUNK, x.numel())
        s, d = streams[k % 3], bufs[k % 3][: end - start]
        with torch.cuda.stream(s):
            d.copy_(pinned_in[start:end], non_blocking=True)
            d.mul_(A).add_(B)
            pinned_out[start:end].copy_(d, non_blocking=True)
    torch.cuda.synchronize()
    out.copy_(pinned_out)


def naive(x, out):
    for start in range(0, x.numel(), CHUNK):
        end = min(start + CHUNK, x.numel())
        d = x[start:end].cuda()
        d.mul_(A).add_(B)
        out[start:end] = d.cpu()


def timed(fn, x, out, reps):
    times = []
    for rep in range(reps + 1):
        out.fill_(float("nan"))
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn(x, out)
        torch.cuda.synchronize()
        if rep > 0:
            times.append((time.perf_counter() - t) * 1e3)
        want = x[::7919] * A + B
        if not torch.allclose(out[::7919], want, rtol=1e-6, atol=1e-6):
            raise SystemExit(f"{fn.__name__}: wrong output")
    return statistics.median(times), min(times), max(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", default="1024,4096")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    print("| size | pattern | median ms | min..max ms |")
    print("| --- | --- | --- | --- |")
    rows = []
    for mib in (int(s) for s in args.sizes_mib.split(",")):
        n = mib << 18
        x = torch.rand(n) * 2 - 1
        out = torch.empty(n)
        for fn in (best_practice, naive):
            med, lo, hi = timed(fn, x, out, args.reps)
            print(f"| {mib} MiB | {fn.__name__} | {med:.1f} | {lo:.1f}..{hi:.1f} |")
            rows.append({"mib": mib, "pattern": fn.__name__, "median_ms": med, "min_ms": lo, "max_ms": hi})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
