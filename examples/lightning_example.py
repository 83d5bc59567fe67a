#!/usr/bin/env python3
"""looptune in a Lightning Trainer: an input-bound fit that looptune speeds up while it runs.

Every item of the data set waits 2 ms (a read from slow storage), each step waits 10 ms more
(standing in for the accelerator's share of it), and the DataLoader starts with num_workers=0,
Lightning's default. The LooptuneCallback reports to the node daemon when one runs
(`looptune daemon`), else it tunes in-process; either way it raises num_workers mid-epoch, every
sample still delivered once and in the same order. At the end it prints the samples/s of each
epoch, the knobs and the changes looptune made.

    pip install 'looptune[torch,lightning]'     # or, in this repository: pip install -e '.[torch,lightning]'
    python examples/lightning_example.py         # about 40 s on 2 CPUs
    python examples/lightning_example.py --epochs 4 --run my-run
"""
from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from looptune.lightning import LooptuneCallback


class SlowReads(Dataset):
    """n samples of 32 features; each read waits `delay` seconds."""

    def __init__(self, n: int, delay: float) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 32, generator=g)
        # targets mostly noise: the loss stays near 1 (looptune's loss guard reads a steady trend)
        self.y = 0.1 * self.x @ torch.randn(32, 1, generator=g) + torch.randn(n, 1, generator=g)
        self.delay = delay

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.delay)
        return self.x[i], self.y[i]


class Regression(pl.LightningModule):
    def __init__(self, n: int, delay: float, batch_size: int, compute: float) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
        torch.nn.init.zeros_(self.net[2].weight)   # start from predicting 0: no steep first descent
        self.n, self.delay, self.batch_size, self.compute = n, delay, batch_size, compute

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        time.sleep(self.compute)                   # the accelerator's share of the step
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.001)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(SlowReads(self.n, self.delay), batch_size=self.batch_size, shuffle=True)


class EpochSpeed(pl.Callback):
    """Prints each epoch's samples/s and num_workers."""

    def __init__(self, looptune: LooptuneCallback, n: int) -> None:
        self.looptune, self.n = looptune, n

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rate = self.n / (time.perf_counter() - self.t0)
        print(f"epoch {trainer.current_epoch}: {rate:7.0f} samples/s, "
              f"num_workers {self.looptune.hook.knobs.get('num_workers')}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="lightning-example", help="the run name looptune reports (default %(default)s)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--items", type=int, default=2048)
    p.add_argument("--delay", type=float, default=0.002, help="seconds each item's read waits")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--compute", type=float, default=0.010, help="seconds each training step waits")
    args = p.parse_args()

    pl.seed_everything(0, verbose=False)
    looptune = LooptuneCallback(run=args.run)            # socket, tune and config as for looptune.Hook
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[looptune, EpochSpeed(looptune, args.items)])
    trainer.fit(Regression(args.items, args.delay, args.batch_size, args.compute))

    hook = looptune.hook
    print(f"\nlooptune ran {hook.mode} (run {hook.run!r}); knobs at the end: {hook.knobs}")
    for d in hook.decisions:
        print(f"  step {d.step}: {d.knob} {d.old} -> {d.new} ({d.outcome}; {d.reason})")


if __name__ == "__main__":
    main()
