"""Communication share of a DDP job: `hook.watch(ddp_model)` times gradient all-reduce with its
own comm hook (DDP's default averaging, timed), so a job that waits on the wire gets the
`communication` verdict. Two real gloo ranks (forked, FileStore), bounded in time.

The gradients must be exactly those of DDP without the hook: the same parameters after the
same steps, on both ranks.
"""
from __future__ import annotations

import os
import traceback
from datetime import timedelta
from typing import Any

import torch

from gloo_ranks import run_ranks

WORLD = 2
STEPS = 8
TIMEOUT = 120


def model() -> torch.nn.Module:
    torch.manual_seed(7)
    # large enough that averaging its gradients over loopback takes longer than computing them
    return torch.nn.Sequential(torch.nn.Linear(256, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 256))


def train(ddp: Any, rank: int, hook: Any = None) -> list[dict[str, Any]]:
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)
    reports = []
    for step in range(STEPS):
        x = torch.randn(2, 256, generator=g)
        loss = ddp(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if hook is not None:
            hook.step(loss=loss)
            if step in (1, STEPS - 1):
                reports.append(hook.report())
    return reports


def rank_main(rank: int, store: str, tmp: str, results: Any) -> None:
    try:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        from looptune import Hook
        from looptune.tuners.bottleneck import verdict
        from looptune.tuners.engine import Observation, _window
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=60))
        plain = DDP(model())
        train(plain, rank)
        hook = Hook(run="ddp-comm", socket=os.path.join(tmp, f"nobody-{rank}.sock"),
                    config={"tuners": {"enabled": [], "state_file": os.path.join(tmp, f"best-{rank}.json")}})
        try:
            ddp = DDP(model())
            same = hook.watch(ddp) is ddp
            first, last = train(ddp, rank, hook)
            a, b = (Observation(time=float(i), counters=r["counters"], knobs={}) for i, r in enumerate((first, last)))
            w = _window(a, b)
            result = {"rank": rank, "same": same, "errors": hook.errors,
                      "equal": all(torch.equal(p, q) for p, q in zip(plain.parameters(), ddp.parameters())),
                      "counters": last["counters"], "comm_share": w.comm_share, "verdict": verdict(w)}
        finally:
            hook.close()
        dist.destroy_process_group()
        results.put(result)
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put({"rank": rank, "error": traceback.format_exc()})


def test_ddp_all_reduce_is_timed_and_the_gradients_are_unchanged() -> None:
    got = run_ranks(rank_main, WORLD, TIMEOUT, prefix="lt-comm-")
    for r in range(WORLD):
        res = got[r]
        assert res["same"] and res["errors"] == 0
        assert res["equal"], f"rank {r}: parameters differ from DDP without the hook"
        c = res["counters"]
        assert 0 < c["comm_seconds"] < c["step_seconds"]
        assert "loss" in c and c["loss"] > 0
        assert res["comm_share"] >= 0.3 and res["verdict"] == "communication", (res["comm_share"], res["verdict"])
