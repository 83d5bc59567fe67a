#!/usr/bin/env python3
"""What a Python DDP comm hook costs a step, against DDP's built-in all-reduce (C++).

One process, a one-rank gloo group (DDP still runs its reducer and all-reduce), one torch thread,
the compute-bound model of benchmarks/compression.py (128-256-256-128, batch 256 here). Five DDP
copies of the model, each step timed in blocks of 20 steps, the copies in turn (--blocks rounds),
medians per copy:

  builtin    DDP's default: no comm hook registered (C++ all-reduce and division)
  looptune   looptune's dispatcher at grad_compression none (timed, bytes counted)
  torch      torch's own Python allreduce_hook (default_hooks.allreduce_hook)
  minimal    a Python hook doing only the process group's allreduce and one future callback
  noop       a Python hook that communicates nothing (what the all-reduce itself costs)

Printed: microseconds a step more than `builtin`. The figures are differences of two medians on a
shared host: read them to tens of microseconds.

    python benchmarks/comm_hook_overhead.py [--blocks 40]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
                               torch.nn.Linear(256, 128))


def minimal(group, bucket):  # type: ignore[no-untyped-def]
    buf = bucket.buffer()
    return group.allreduce([buf]).get_future().then(lambda f: buf)


def noop(state, bucket):  # type: ignore[no-untyped-def]
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=40, help="rounds of one 20-step block per copy (default 40)")
    args = p.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="lt-hookcost-")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
    from looptune.tuners.hook.actuators.ddp import Dispatch, dispatch
    from looptune.tuners.hook.meter import Meter
    copies = {k: DDP(model()) for k in ("builtin", "looptune", "torch", "minimal", "noop")}
    # looptune's dispatcher at none, as after a first switch and back (DDP's timer read as in a job)
    state = Dispatch(Meter(lambda exc: None), copies["looptune"], {})
    copies["looptune"].register_comm_hook(state, dispatch)
    state.registered = True
    copies["torch"].register_comm_hook(None, default_hooks.allreduce_hook)
    copies["minimal"].register_comm_hook(dist.group.WORLD, minimal)
    copies["noop"].register_comm_hook(None, noop)
    x, y = torch.randn(256, 128), torch.randn(256, 128)

    def block(m: torch.nn.Module, n: int = 20) -> float:
        t = time.perf_counter()
        for _ in range(n):
            torch.nn.functional.mse_loss(m(x), y).backward()
            for q in m.parameters():
                q.grad = None
        return (time.perf_counter() - t) / n

    times: dict[str, list[float]] = {k: [] for k in copies}
    for _ in range(3):                 # warm-up
        for m in copies.values():
            block(m)
    for _ in range(args.blocks):
        for k, m in copies.items():
            times[k].append(block(m))
    base = statistics.median(times["builtin"])
    print(f"# Python comm hook cost: torch {torch.__version__}, {os.cpu_count()} CPUs, 1-rank gloo, "
          f"{args.blocks} blocks of 20 steps per copy; builtin {base * 1e6:.0f} us a step")
    print("| comm hook | us a step more than builtin |")
    print("|---|---:|")
    for k in copies:
        print(f"| {k} | {(statistics.median(times[k]) - base) * 1e6:+.0f} |")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
