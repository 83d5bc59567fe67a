"""Rank sync: under torch.distributed rank 0 decides, and every rank applies the same change at
the same step. One broadcast of rank 0's pending decisions every `sync_every_steps` steps.
Decided before the first step, the same way on every rank, so the collectives line up."""
from __future__ import annotations

import os
import sys
from typing import Any, Callable


def rank_world() -> tuple[int, int]:
    """This process's rank and the world size: torch.distributed when it is up, else the launcher's env."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001 - fall back to the environment
        pass
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        return 0, 1


def distributed() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RankSync:
    def __init__(self) -> None:
        self.every = 0          # 0: no sync (single process, or tuning off)
        self.steps = 0
        self._comm_mark = 0.0   # this rank's comm_seconds at the last sync

    def decide(self, every: int) -> None:
        if not self.every and distributed():
            self.every = every

    def tick(self) -> bool:
        """Every step, on every rank (a disabled hook too): True when this step is a sync step."""
        self.steps += 1
        return self.steps % self.every == 0

    def exchange(self, rank: int, take: Callable[[], list[Any]]) -> list[Any]:
        """Rank 0's pending decisions (from `take`), on every rank."""
        import torch.distributed as dist
        payload: list[Any] = [take() if rank == 0 else None]
        dist.broadcast_object_list(payload, src=0)
        return payload[0] or []

    def wire(self, meter: Any) -> None:
        """The ranks' smallest comm wait since the last sync, added to meter.comm_wire_seconds (one
        all-reduce, on every rank alike: a rank without DDP timing takes part with 0). A rank that
        finished backward first waits for the slowest one inside all-reduce; the slowest waits only
        for the wire. So the smallest wait is the wire's part, and compression can shorten only that."""
        import torch
        import torch.distributed as dist
        total = meter.comm_seconds
        delta = 0.0 if total is None else max(0.0, total - self._comm_mark)
        self._comm_mark = total or 0.0
        t = torch.tensor([delta], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        if total is not None:
            meter.comm_wire_seconds = (meter.comm_wire_seconds or 0.0) + float(t.item())

    def agree(self, values: list[Any]) -> bool:
        """True when every rank holds the same `values` as rank 0 (one broadcast, one all-reduce)."""
        import torch
        import torch.distributed as dist
        ref: list[Any] = [values]
        dist.broadcast_object_list(ref, src=0)
        same = torch.tensor([0 if ref[0] == values else 1], dtype=torch.int32)
        dist.all_reduce(same)
        return int(same.item()) == 0
