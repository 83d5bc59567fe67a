"""Run `rank_main(rank, store, tmp, results)` in `world` forked processes (gloo over a FileStore in
a temp dir) and collect what each put on `results`; bounded: a rank that hangs is killed and the
test fails."""
from __future__ import annotations

import multiprocessing as mp
import queue
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest


def run_ranks(rank_main: Callable[..., None], world: int, timeout: float, prefix: str = "lt-ranks-") -> dict[int, dict[str, Any]]:
    ctx = mp.get_context("fork")        # the ranks inherit the imported torch: no re-import per rank
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    results = ctx.Queue()
    # not daemonic: a rank's DataLoader workers are its children
    procs = [ctx.Process(target=rank_main, args=(r, str(tmp / "store"), str(tmp), results)) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        for _ in range(world):
            try:
                res = results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"a rank did not finish within {timeout} s (deadlock in a collective?); "
                            f"finished: {sorted(got)}")
            got[res["rank"]] = res
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        shutil.rmtree(tmp, ignore_errors=True)
    for r in range(world):
        assert "error" not in got[r], got[r].get("error")
    return got
