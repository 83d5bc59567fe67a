"""The DataLoader actuator under torch.distributed: rank 0 decides, every rank applies the change
at the same step, and each rank still gets exactly its DistributedSampler share, in order.

Two ranks (forked processes, gloo over a FileStore in a temp dir) each run the same loader
untuned, then watched by an embedded hook (nothing listens on its socket) that shares rank 0's
decisions every `sync_every_steps` steps. Only rank 0 queues decisions. Every wait is bounded:
a rank that hangs in a collective is killed and the test fails.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from gloo_ranks import run_ranks

N = 96             # divisible by the world size: DistributedSampler pads nothing
WORLD = 2
BATCH = 4          # N / WORLD / BATCH = 12 steps per epoch
EPOCHS = 3
SEED = 31
SYNC_EVERY = 4
# rank 0 queues these after the k-th batch of an epoch; each is shared at the next multiple of SYNC_EVERY
CHANGES = {(0, 3): ("num_workers", 2), (1, 6): ("num_workers", 0), (2, 1): ("num_workers", 3)}
TIMEOUT = 120


class Indices(Dataset):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


def make_loader(rank: int) -> DataLoader:
    torch.manual_seed(1000 + rank)       # the loader's base seeds come from the global RNG
    sampler = DistributedSampler(Indices(), num_replicas=WORLD, rank=rank, shuffle=True, seed=SEED)
    return DataLoader(Indices(), batch_size=BATCH, sampler=sampler)


def epochs_of(loader: Any, sampler: DistributedSampler, hook: Any = None, rank: int = 0) -> list[list[int]]:
    stream = []
    ids = iter(range(1, 100))
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        got: list[int] = []
        for k, batch in enumerate(loader, start=1):
            got += [int(x) for x in batch]
            if hook is not None:
                if rank == 0 and (epoch, k) in CHANGES:
                    knob, value = CHANGES[(epoch, k)]
                    hook._queue_decision({"id": next(ids), "knob": knob, "value": value, "reason": "test",
                                          "tuner": "test"})
                hook.step()
        stream.append(got)
    return stream


def rank_main(rank: int, store: str, tmp: str, results: Any) -> dict[str, Any]:
    import torch.distributed as dist

    from looptune.tuners.hook import Hook
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    untuned_loader = make_loader(rank)
    untuned = epochs_of(untuned_loader, untuned_loader.sampler)
    hook = Hook(run="ddp", socket=os.path.join(tmp, f"nobody-{rank}.sock"),
                config={"hook": {"sync_every_steps": SYNC_EVERY},
                        "tuners": {"enabled": [], "state_file": os.path.join(tmp, f"best-{rank}.json")}})
    try:
        user = make_loader(rank)
        watched = hook.watch(user)
        tuned = epochs_of(watched, user.sampler, hook, rank)
        dist.barrier()
        result = {"rank": rank, "untuned": untuned, "tuned": tuned, "mode": hook.mode,
                  "sync_every": hook._sync.every, "errors": hook.errors, "disabled": hook.disabled,
                  "knobs": dict(hook.knobs), "active_workers": watched.active.num_workers,
                  "decisions": [(d.id, d.knob, d.new, d.outcome, d.step, d.detail) for d in hook.decisions]}
    finally:
        hook.close()
    return result


def expected_stream(rank: int) -> list[list[int]]:
    """What DistributedSampler gives `rank`, without any process group."""
    sampler = DistributedSampler(Indices(), num_replicas=WORLD, rank=rank, shuffle=True, seed=SEED)
    out = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_ranks_apply_rank0_decisions_at_the_same_step_and_keep_their_share() -> None:
    got = run_ranks(rank_main, WORLD, TIMEOUT, prefix="lt-ddp-")
    for r in range(WORLD):
        assert got[r]["mode"] == "embedded" and got[r]["sync_every"] == SYNC_EVERY
        assert got[r]["errors"] == 0 and not got[r]["disabled"]

    # untuned: each rank its DistributedSampler share; together the dataset, each sample once
    for r in range(WORLD):
        assert got[r]["untuned"] == expected_stream(r)
    for epoch in range(EPOCHS):
        union = sorted(i for r in range(WORLD) for i in got[r]["untuned"][epoch])
        assert union == list(range(N))
    assert got[0]["untuned"][0] != got[0]["untuned"][1]

    # tuned: the same streams, epoch by epoch
    for r in range(WORLD):
        for epoch in range(EPOCHS):
            assert got[r]["tuned"][epoch] == got[r]["untuned"][epoch], f"rank {r} epoch {epoch}"

    # the same decisions, applied at the same step on both ranks: the first sync step after rank 0
    # queued them (hook.step() applies them before counting its own step)
    per_epoch = N // WORLD // BATCH
    want = []
    for i, ((epoch, k), (knob, value)) in enumerate(sorted(CHANGES.items()), start=1):
        queued_at = epoch * per_epoch + k             # the step() call that follows the k-th batch
        sync_call = -(-queued_at // SYNC_EVERY) * SYNC_EVERY
        want.append((i, knob, value, "applied", sync_call - 1, ""))
    assert got[0]["decisions"] == want
    assert got[1]["decisions"] == got[0]["decisions"]
    for r in range(WORLD):
        assert got[r]["knobs"]["num_workers"] == 3 and got[r]["active_workers"] == 3
