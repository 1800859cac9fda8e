"""Where the GPU time of a profiled training step goes: the kernels of a Chrome trace written by
``bench_optimize_deformations.py --profile --profile-output DIR``, each attributed to the host
code that launched it.

A kernel's launch (``cudaLaunchKernel``, ``cuLaunchKernel`` and kin, matched by the trace's
correlation id) lies inside a stack of host ranges on its thread: the trainer's ``dm::`` range
(data, codes, forward, loss, optimiser, statistics), the autograd node for kernels of the
backward pass (``AddmmBackward0``, ...) and the innermost aten operator or custom function.
Kernels are summed per (range, node, operator); one without a launch event is listed by its
name. The profiler's own table cannot do this: it attributes a backward kernel to no ``dm::``
range (the autograd engine's thread runs outside them).

Example::

    python benchmarks/trace_breakdown.py prof/train_box256_trace.json.gz --top 30
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
from pathlib import Path

_KERNELS = ("kernel", "gpu_memcpy", "gpu_memset")
_AUTOGRAD = "autograd::engine::evaluate_function: "


def _events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X"]


def breakdown(events: list[dict]) -> tuple[collections.Counter, collections.Counter, float]:
    """Kernel microseconds and counts per (dm range, autograd node, innermost operator), and
    the total."""
    host = collections.defaultdict(list)  # thread -> ranges sorted by start
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation"):
            host[e["tid"]].append(e)
    starts = {}
    for tid, ranges in host.items():
        ranges.sort(key=lambda e: e["ts"])
        starts[tid] = [e["ts"] for e in ranges]
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver")}
    times, counts = collections.Counter(), collections.Counter()
    total = 0.0
    for kernel in (e for e in events if e.get("cat") in _KERNELS):
        total += kernel["dur"]
        launch = launches.get(kernel["args"].get("correlation"))
        if launch is None:
            key = ("-", "", kernel["name"][:60])
        else:
            ranges = host[launch["tid"]]
            end = bisect.bisect_right(starts[launch["tid"]], launch["ts"])
            names = [e["name"] for e in ranges[:end] if e["ts"] + e["dur"] >= launch["ts"]]
            dm = next((n for n in names if n.startswith("dm::")), "-")
            node = next((n[len(_AUTOGRAD):] for n in names if n.startswith(_AUTOGRAD)), "")
            key = (dm, node, names[-1] if names else "?")
        times[key] += kernel["dur"]
        counts[key] += 1
    return times, counts, total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path, help="Chrome trace (.json or .json.gz)")
    parser.add_argument("--top", type=int, default=40, help="rows to print")
    parser.add_argument("--batches", type=int, default=4,
                        help="training batches in the trace (per-batch figures)")
    args = parser.parse_args(argv)
    times, counts, total = breakdown(_events(args.trace))
    print(f"kernel time {total / 1e3:.1f} ms in the trace, {total / 1e3 / args.batches:.2f} ms "
          f"per batch ({args.batches} batches)")
    print(f"{'ms/batch':>9} {'share':>6} {'kernels':>8}  range / backward node / operator")
    for key, value in times.most_common(args.top):
        print(f"{value / 1e3 / args.batches:9.2f} {value / total:6.1%} "
              f"{counts[key] / args.batches:8.1f}  {' / '.join(k for k in key if k)}")


if __name__ == "__main__":
    main()
