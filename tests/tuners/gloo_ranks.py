"""Run `rank_main(rank, store, tmp, results)` in `world` forked processes (gloo over a FileStore in
a temp dir) and collect what each returned (a dict) or put on `results` itself; bounded: a rank
that hangs is killed and the test fails, a rank that raised fails it with its traceback. `assert_split_like_unsplit` compares two ranks that split micro-batches with the same
job unsplit (the Lightning and Hugging Face adapter tests share it)."""
from __future__ import annotations

import multiprocessing as mp
import queue
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest


def join(rank: int, world: int, store: str, timeout: float = 60.0) -> None:
    """In a rank: one torch thread, and the gloo group over the FileStore at `store`."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))


def _entry(rank_main: Callable[..., dict[str, Any] | None], rank: int, store: str, tmp: str, results: Any) -> None:
    """A rank's process: what `rank_main` returns goes to the parent with the rank, then the process
    group (if any) is taken down; an exception goes to the parent as its traceback."""
    try:
        out = rank_main(rank, store, tmp, results)
        if out is not None:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            results.put({"rank": rank, **out})
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put({"rank": rank, "error": traceback.format_exc()})


def run_ranks(rank_main: Callable[..., dict[str, Any] | None], world: int, timeout: float,
              prefix: str = "lt-ranks-") -> dict[int, dict[str, Any]]:
    ctx = mp.get_context("fork")        # the ranks inherit the imported torch: no re-import per rank
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    results = ctx.Queue()
    # not daemonic: a rank's DataLoader workers are its children
    procs = [ctx.Process(target=_entry, args=(rank_main, r, str(tmp / "store"), str(tmp), results))
             for r in range(world)]
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


def params_of(module: Any) -> list[Any]:
    """A module's parameters as plain lists: tensors would cross the results queue through shared
    memory that the rank frees when it exits."""
    return [p.detach().tolist() for p in module.parameters()]


def max_relative_difference(ref: list[Any], got: list[Any]) -> float:
    """The largest over parameters of max|ref - got| / max|ref| (float64), from params_of lists."""
    import torch
    worst = 0.0
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        assert ta.shape == tb.shape
        worst = max(worst, float((ta - tb).abs().max() / ta.abs().max()))
    return worst


def assert_split_like_unsplit(ref: dict[int, dict[str, Any]], got: dict[int, dict[str, Any]], batch: int,
                              oom_rank: int = 1, rel: float = 1e-9) -> float:
    """Two DDP ranks that split each per-device batch into micro-batches (`got`, an out-of-memory
    error injected on `oom_rank` only) against the same job unsplit (`ref`). Each rank's result holds
    params (params_of), rows (the row counts its forwards saw), ooms (the stand-in's errors),
    recoveries and errors (its hook's), knob (micro_batch_size at the end). Returns the largest
    relative parameter difference from the unsplit run."""
    for r in ref:
        assert ref[r]["rows"] == [batch], ref[r]["rows"]            # unsplit: whole per-device batches
    assert got[oom_rank]["ooms"] >= 1 and got[oom_rank]["recoveries"] >= 1   # recovered in its step, no hang
    for r in got:
        assert got[r]["errors"] == 0, got[r]
        assert 0 < got[r]["knob"] < batch and max(got[r]["rows"]) < batch, got[r]   # the batches were split
    assert got[0]["params"] == got[1]["params"]                     # the ranks identical, bit for bit
    diff = max_relative_difference(ref[0]["params"], got[0]["params"])
    assert diff < rel, diff
    return diff
