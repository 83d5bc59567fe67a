#!/usr/bin/env python3
"""looptune in a Hugging Face Trainer: an input-bound job (every item waits 3 ms, like a read from
slow storage) that starts with `dataloader_num_workers=0`; looptune raises the workers mid-epoch.

    pip install -e '.[torch,transformers]'        # torch first: see the README (CPU or CUDA build)
    python examples/transformers_example.py [--epochs 10] [--run hf-example]

With a looptune daemon on this node the job shows in its /metrics and in `looptune status`;
without one the callback runs the tuners in-process. Runs on a CPU, no downloads: the model is
built here and returns a dict with `loss`, as the Trainer expects.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from looptune.transformers import LooptuneCallback


class SlowItems(Dataset):
    """n items {"x", "labels"}; each takes `delay` seconds to load."""

    def __init__(self, n: int, delay: float) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 16, generator=g)
        self.y = self.x @ (0.3 * torch.randn(16, 1, generator=g)) + 0.1 * torch.randn(n, 1, generator=g)
        self.delay = delay

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        time.sleep(self.delay)
        return {"x": self.x[i], "labels": self.y[i]}


class Regressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.net(x)
        loss = torch.nn.functional.mse_loss(out, labels) if labels is not None else None
        return {"loss": loss, "logits": out}


class EpochRate(TrainerCallback):
    """Prints samples/s and num_workers at the end of every epoch."""

    def __init__(self, looptune: LooptuneCallback, n: int) -> None:
        self.looptune, self.n, self.t0 = looptune, n, 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.t0 = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        rate = self.n / (time.perf_counter() - self.t0)
        workers = self.looptune.hook.knobs.get("num_workers")
        print(f"epoch {state.epoch:.0f}: {rate:7.0f} samples/s, num_workers={workers}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--items", type=int, default=512)
    p.add_argument("--delay", type=float, default=0.003)
    p.add_argument("--run", default="hf-example")
    a = p.parse_args()

    looptune = LooptuneCallback(run=a.run, tune=["workers"])       # the daemon if it answers, else embedded
    print(f"looptune: {looptune.hook.mode}", flush=True)
    ds = SlowItems(a.items, a.delay)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=16, num_train_epochs=a.epochs,
                                 learning_rate=1e-2, dataloader_num_workers=0, dataloader_pin_memory=False,
                                 logging_strategy="epoch",
                                 save_strategy="no", report_to="none", disable_tqdm=True)
        trainer = Trainer(model=Regressor(), args=args, train_dataset=ds,
                          callbacks=[looptune, EpochRate(looptune, a.items)])
        trainer.train()
    for d in looptune.hook.decisions:
        print(f"step {d.step}: {d.knob} {d.old} -> {d.new} ({d.outcome}) {d.reason}")
    looptune.close()


if __name__ == "__main__":
    main()
