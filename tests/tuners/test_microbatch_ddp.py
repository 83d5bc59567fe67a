"""hook.accumulate under DistributedDataParallel: two real gloo ranks (forked, FileStore), each
with its own stand-in GPU; out-of-memory errors injected on rank 1 only, in the first, a middle and
the last micro-batch of a step, in forward and in backward. No rank may hang (bounded), the ranks'
parameters stay identical, and equal an unsplit DDP run within 1e-9 (float64, SGD with momentum).
"""
from __future__ import annotations

import os
from typing import Any

import torch

from gloo_ranks import join, run_ranks
from tests.fakes.fake_cuda import FakeCuda, MemoryLayer, MiB, straight

WORLD = 2
STEPS = 140
TIMEOUT = 240
# step -> (where, which micro-batch of that step) on rank 1
INJECT = {20: ("forward", "first"), 35: ("forward", "middle"), 50: ("forward", "last"),
          65: ("backward", "first"), 80: ("backward", "middle"), 95: ("backward", "last")}


def make_model(fake: FakeCuda) -> torch.nn.Module:
    torch.manual_seed(11)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), MemoryLayer(fake, straight(MiB // 2)),
                               torch.nn.Linear(32, 1)).double()


def batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(2048, 8, generator=g, dtype=torch.float64),
             torch.randn(2048, 1, generator=g, dtype=torch.float64)) for _ in range(8)]


def rank_main(rank: int, store: str, tmp: str, results: Any) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from looptune import Hook
    join(rank, WORLD, store, timeout=90)
    data = batches(rank)
    # the reference: plain DDP, whole batches, on a device big enough
    big = FakeCuda(10**13).install()
    ref = DDP(make_model(big))
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for step in range(STEPS):
        x, y = data[step % len(data)]
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt.step()
        opt.zero_grad()
    big.uninstall()

    fake = FakeCuda(1000 * MiB).install()
    fake.alloc(100 * MiB)
    hook = Hook(run="mb-ddp", tune=["batch_size"], socket=os.path.join(tmp, f"nobody-{rank}.sock"),
                config={"tuners": {"state_file": os.path.join(tmp, f"best-{rank}.json")}})
    try:
        ddp = hook.watch(DDP(make_model(fake)))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        calls = [0]

        def loss_fn(mb: Any) -> torch.Tensor:
            calls[0] += 1
            return torch.nn.functional.mse_loss(ddp(mb[0]), mb[1])
        per_step = 0
        for step in range(STEPS):
            if rank == 1 and step in INJECT:
                where, which = INJECT[step]
                fake.inject(where, {"first": 1, "middle": per_step // 2 + 1, "last": per_step}[which])
            calls[0] = 0
            hook.accumulate(data[step % len(data)], loss_fn)
            per_step = calls[0]
            opt.step()
            opt.zero_grad()
            hook.step()
        # plain lists: tensors would cross the queue through shared memory the rank frees on exit
        result = {"rank": rank, "params": [p.detach().tolist() for p in ddp.parameters()],
                  "ref": [p.detach().tolist() for p in ref.parameters()], "ooms": fake.ooms,
                  "recoveries": hook.microbatcher.recoveries, "micro_batches": per_step,
                  "errors": hook.errors}
    finally:
        hook.close()
    return result


def test_ooms_on_one_rank_recover_without_a_hang_and_the_ranks_stay_identical() -> None:
    got = run_ranks(rank_main, WORLD, TIMEOUT, prefix="lt-mb-")
    assert got[1]["recoveries"] >= len(INJECT)          # every injected error recovered in its step
    assert got[0]["micro_batches"] > 1 and got[1]["micro_batches"] > 1      # the batches were split
    for a, b in zip(got[0]["params"], got[1]["params"]):
        assert a == b
    for a, b in zip(got[0]["params"], got[0]["ref"]):
        a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        rel = float((a - b).abs().max() / b.abs().max())
        assert rel < 1e-9, rel
    assert got[0]["errors"] == got[1]["errors"] == 0
