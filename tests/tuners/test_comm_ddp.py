"""Communication share of a DDP job: `hook.watch(ddp_model)` times gradient all-reduce with its
own comm hook (DDP's default averaging, timed), so a job that waits on the wire gets the
`communication` verdict. Two real gloo ranks (forked, FileStore), bounded in time.

The gradients must be exactly those of DDP without the hook: the same parameters after the
same steps, on both ranks.
"""
from __future__ import annotations

import os
import traceback
from typing import Any

import torch

from gloo_ranks import join, run_ranks

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
        join(rank, WORLD, store)
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


# ---- the wire's part: a wait on a slower rank is no communication ----

def small_model() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Linear(64, 64)        # gradients of 16 KB: the wire takes no time


def wire_rank_main(rank: int, store: str, tmp: str, results: Any, straggle: bool) -> None:
    try:
        import time

        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        from looptune import Hook
        from looptune.tuners.bottleneck import verdict
        from looptune.tuners.engine import Observation, _window
        join(rank, WORLD, store)
        # tuning on (rank sync every 2 steps), no tuner enabled: figures only, no change
        hook = Hook(run="ddp-wire", socket=os.path.join(tmp, f"nobody-{rank}.sock"),
                    config={"hook": {"sync_every_steps": 2},
                            "tuners": {"enabled": [], "state_file": os.path.join(tmp, f"best-{rank}.json")}})
        try:
            ddp = hook.watch(DDP(small_model() if straggle else model()))
            opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
            g = torch.Generator().manual_seed(100 + rank)
            reports = []
            for step in range(24):
                x = torch.randn(2, 64 if straggle else 256, generator=g)
                loss = ddp(x).pow(2).mean()
                if straggle and rank == 1:
                    time.sleep(0.03)      # a slower rank: rank 0 waits for it inside all-reduce
                loss.backward()
                opt.step()
                opt.zero_grad()
                hook.step(loss=loss.detach())
                if step in (3, 23):
                    reports.append(hook.report())
            a, b = (Observation(time=float(i), counters=r["counters"], knobs={}) for i, r in enumerate(reports))
            c0, c1 = a.counters, b.counters
            dstep = c1["step_seconds"] - c0["step_seconds"]
            w = _window(a, b)
            result = {"rank": rank, "errors": hook.errors, "own": (c1["comm_seconds"] - c0["comm_seconds"]) / dstep,
                      "wire": w.comm_share, "wire_seconds": c1.get("comm_wire_seconds"), "verdict": verdict(w)}
        finally:
            hook.close()
        dist.destroy_process_group()
        results.put(result)
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put({"rank": rank, "error": traceback.format_exc()})


def test_a_wait_on_a_slower_rank_is_not_communication() -> None:
    got = run_ranks(lambda *a: wire_rank_main(*a, straggle=True), WORLD, TIMEOUT, prefix="lt-wire-")
    fast, slow = got[0], got[1]
    assert fast["errors"] == 0 and slow["errors"] == 0
    assert fast["own"] >= 0.5, fast            # rank 0 spends most of its step waiting in all-reduce ...
    assert slow["own"] < 0.2, slow             # ... for rank 1, which arrives last and barely waits
    assert fast["wire_seconds"] == slow["wire_seconds"]       # one figure, agreed by every rank
    for r in (fast, slow):
        assert r["wire"] < 0.2 and r["verdict"] != "communication", r


def test_a_job_waiting_on_the_wire_keeps_its_communication_verdict() -> None:
    got = run_ranks(lambda *a: wire_rank_main(*a, straggle=False), WORLD, TIMEOUT, prefix="lt-wire-")
    for r in got.values():
        assert r["errors"] == 0
        assert r["wire"] >= 0.3 and r["verdict"] == "communication", r
        assert r["wire"] <= r["own"] + 1e-9, r
