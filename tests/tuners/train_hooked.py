"""A small training job with the control hook, run as its own process by test_hook_daemon.py.

    python train_hooked.py --socket S --run RUN --n N --batch B --workers W [--delay SECONDS]
                           [--pause-at K] [--rank R --world W --init-method URL [--hook-before-init]]

The file name matches the daemon's default `jobs.match` pattern (train*.py), so the jobs collector
would name this process `train_hooked` by itself; the hook's registration must win over that.
With --world > 1 it joins a gloo process group with an explicit rank (no RANK/WORLD_SIZE in the
environment: the hook must read them from torch.distributed), shards the data with a
DistributedSampler and all-reduces once per step, like DDP's gradient sync.

It prints one JSON object per line on stdout:
    {"event": "ready", ...}    after Hook()
    {"event": "paused", ...}   at batch K (before its step), with the hook's knobs; then it waits for
                               a line on stdin (knobs change only at a step, so not meanwhile)
    {"event": "done", ...}     after hook.close(): the hook's counters, knobs, mode, rank, world size
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from looptune.tuners.hook import Hook  # noqa: E402


class Slow(Dataset):
    def __init__(self, n: int, delay: float) -> None:
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if self.delay:
            time.sleep(self.delay)
        return torch.full((3,), float(i)), i


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--pause-at", type=int, default=-1)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--init-method", default="")
    p.add_argument("--hook-before-init", action="store_true")
    args = p.parse_args()

    dist = None
    hook = None
    if args.world > 1:
        import torch.distributed as dist
        if args.hook_before_init:
            hook = Hook(run=args.run, socket=args.socket, config={})
        dist.init_process_group("gloo", init_method=args.init_method, rank=args.rank, world_size=args.world)
    if hook is None:
        hook = Hook(run=args.run, socket=args.socket, config={})
    emit(event="ready", pid=os.getpid(), mode=hook.mode)

    ds = Slow(args.n, args.delay)
    sampler = None
    if dist is not None:
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(ds, shuffle=False)
    loader = hook.watch(DataLoader(ds, batch_size=args.batch, num_workers=args.workers, sampler=sampler))
    seen = 0
    for i, (_x, idx) in enumerate(loader):
        if dist is not None:
            t = torch.tensor([len(idx)])
            dist.all_reduce(t)
        seen += len(idx)
        if i == args.pause_at:
            emit(event="paused", batch=i, mode=hook.mode, knobs=hook.knobs)
            sys.stdin.readline()
        hook.step()
    hook.close()
    emit(event="done", counters=hook.counters, seen=seen, mode=hook.mode, rank=hook.rank,
         world=hook.world_size, errors=hook.errors, disabled=hook.disabled, knobs=hook.knobs)
    if dist is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
