"""Rank sync: under torch.distributed rank 0 decides, and every rank applies the same change at
the same step. Every `sync_every_steps` steps one all-gather of two numbers per rank (the comm
wait since the last sync, the size of rank 0's pending decisions), and a broadcast of those
decisions when there are any. Decided before the first step, the same way on every rank, so the
collectives line up."""
from __future__ import annotations

import json
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

    def decide(self, every: int) -> None:
        if not self.every and distributed():
            self.every = every

    def tick(self) -> bool:
        """Every step, on every rank (a disabled hook too): True when this step is a sync step."""
        self.steps += 1
        return self.steps % self.every == 0

    def exchange(self, rank: int, take: Callable[[], list[Any]], meter: Any = None) -> list[Any]:
        """Rank 0's pending decisions (from `take`), on every rank; and, where `meter` is given, the
        ranks' smallest comm wait since the last sync added to its comm_wire_seconds.

        One all-gather of two numbers per sync (this rank's comm wait, and the size of rank 0's
        decisions); a broadcast of the decisions (JSON) only when there are some. A rank that
        finished backward first waits for the slowest one inside all-reduce; the slowest waits only
        for the wire. So the smallest wait is the wire's part, and compression can shorten only that."""
        import torch
        import torch.distributed as dist
        payload = b""
        if rank == 0:
            pending = take()
            payload = json.dumps(pending, default=str).encode() if pending else b""
        total = getattr(meter, "comm_seconds", None)
        delta = 0.0 if total is None else max(0.0, total - meter.wire_mark)
        device = collective_device()
        mine = torch.tensor([delta, float(len(payload))], dtype=torch.float64, device=device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        got = torch.stack(every).cpu()
        if total is not None:
            least = float(got[:, 0].min())
            meter.comm_wire_seconds = (meter.comm_wire_seconds or 0.0) + least
            meter.wire_ratio = least / delta if delta > 0 else meter.wire_ratio
            meter.wire_mark = total
        size = int(got[0, 1])
        if size == 0:
            return []
        buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if rank == 0
               else torch.empty(size, dtype=torch.uint8, device=device))
        dist.broadcast(buf, src=0)
        return json.loads(payload if rank == 0 else bytes(buf.cpu().tolist()))

    def agree(self, values: list[Any]) -> bool:
        """True when every rank holds the same `values` as rank 0 (one broadcast, one all-reduce)."""
        import torch
        import torch.distributed as dist
        ref: list[Any] = [values]
        dist.broadcast_object_list(ref, src=0)
        same = torch.tensor([0 if ref[0] == values else 1], dtype=torch.int32, device=collective_device())
        dist.all_reduce(same)
        return int(same.item()) == 0


def collective_device(group: Any = None) -> Any:
    """Where a small tensor for a collective must live: the current CUDA device under NCCL (it takes
    no CPU tensors), the CPU otherwise (gloo, or a group with a CPU backend beside NCCL)."""
    import torch
    import torch.distributed as dist
    if str(dist.get_backend(group)) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

