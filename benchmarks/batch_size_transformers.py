#!/usr/bin/env python3
"""Batch-size search inside a Hugging Face Trainer, on the stand-in GPU of benchmarks/batch_size.py
(same curves, data, model and FakeCuda capacity; its docstring describes them).

Rows, in batch_size.py's `ToolRun` form so that its table and goals can take them:

  hf auto_find above / below  transformers 5.x `Trainer` with `TrainingArguments(auto_find_batch_size=True,
            per_device_train_batch_size=S)`: the Trainer runs its training loop inside Accelerate's
            find_executable_batch_size; an out-of-memory error anywhere restarts the loop at 0.9 x the
            batch (the model keeps what the failed attempt trained). S = 4096 (above the maximum) and 512
            (below it). One epoch (use_cpu=True; the stand-in answers torch.cuda.is_available()).
            Steps spent probing: every training step of the attempts that ended in an out-of-memory
            error; samples wasted: their samples; restarts: attempts less one.
  looptune in HF  the same Trainer with `callbacks=[LooptuneCallback(run=..., tune=["batch_size"])]`
            and per_device_train_batch_size = the global batch (2048, gradient_accumulation_steps=1):
            the callback splits each batch inside the Trainer's training_step; the row's size is
            `hook.knobs["micro_batch_size"]`. It trains until the knob reached 90% of the maximum,
            then one more epoch's worth of steps (16), as batch_size.py's looptune row, within 60 s
            (--seconds). The batch_size tuner's throughput trial is off (tuners.batch_size.try_smaller:
            false): on the stand-in a step's time is this CPU's, and a half micro-batch kept for it
            says nothing about a GPU.

    python benchmarks/batch_size_transformers.py                   # 3 seeds, HF and looptune-in-HF rows
    python benchmarks/batch_size_transformers.py --quick --peers   # 1 seed, with batch_size.py's own tools

From benchmarks/batch_size.py: `--tools hf,looptune-hf` (or `--tools all`) runs `run_hf_auto` and
`run_looptune_hf` there, in one table with every other tool. Needs transformers 5.x and accelerate in the environment (the project's
`transformers` extra); exit status 2 where they are missing.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import batch_size as bs  # noqa: E402
import torch  # noqa: E402

HF_ABOVE, HF_BELOW = 4096, 512
LABEL_ABOVE, LABEL_BELOW, LABEL_LOOPTUNE = "hf auto_find above", "hf auto_find below", "looptune in HF"


class _HFNet(torch.nn.Module):
    """batch_size.py's model, as the Trainer wants it: forward(x, labels) -> {"loss", "logits"};
    records the rows of every training forward."""

    def __init__(self, fake: Any, curve: Any) -> None:
        super().__init__()
        self.net = bs.make_model(fake, curve)
        self.fake = fake
        self.rows: list[tuple[int, int]] = []     # (rows, self.tag at the forward)
        self.calls: list[tuple[int, int]] = []    # this optimizer step's forwards: (rows, OOMs at its start)
        self.tag = 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        if self.training:
            self.rows.append((int(x.shape[0]), self.tag))
            self.calls.append((int(x.shape[0]), self.fake.ooms))
        out = self.net(x)
        return {"loss": bs.loss_fn(out, labels) if labels is not None else None, "logits": out}


def _collate(data: Any) -> dict[str, torch.Tensor]:
    x, y = data                   # the data set's __getitems__ returns the batch already
    return {"x": x, "labels": y}


def _args(out: str, batch: int, seed: int, **kw: Any) -> Any:
    from transformers import TrainingArguments
    base: dict[str, Any] = dict(output_dir=out, per_device_train_batch_size=batch, num_train_epochs=1,
                                learning_rate=1e-3, logging_strategy="no", save_strategy="no", report_to="none",
                                disable_tqdm=True, use_cpu=True, seed=0, data_seed=seed, remove_unused_columns=False,
                                dataloader_num_workers=0, dataloader_pin_memory=False, max_grad_norm=0.0)
    base.update(kw)
    return TrainingArguments(**base)


def run_hf_auto(curve: Any, capacity: int, seed: int, start: int, label: str) -> Any:
    """HF's own search: auto_find_batch_size inside its Trainer, one epoch."""
    from transformers import Trainer, TrainerCallback

    attempts: list[dict[str, Any]] = []

    class Attempts(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            attempts.append({"size": state.train_batch_size, "steps": 0, "samples": 0, "done": False})
            model.tag = len(attempts) - 1

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            attempts[-1]["steps"] += 1

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            attempts[-1]["done"] = True

    out = tempfile.mkdtemp(prefix="lt-bench-hf-")
    t0 = time.perf_counter()
    run = bs.ToolRun(label, curve.key, seed, start, None, 0, 0, 0, 0, 0.0)
    try:
        with bs.fc.FakeCuda(capacity) as fake, bs._quiet():
            model = _HFNet(fake, curve)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            trainer = Trainer(model=model, args=_args(out, start, seed, auto_find_batch_size=True),
                              train_dataset=bs.dataset(curve), data_collator=_collate, callbacks=[Attempts()],
                              optimizers=(opt, None))
            try:
                trainer.train()
                run.final = int(trainer._train_batch_size)
            except RuntimeError as exc:
                run.notes.append(f"failed: {str(exc)[:200]}")
            run.ooms = fake.ooms
        for r, tag in model.rows:
            attempts[tag]["samples"] += r
    finally:
        shutil.rmtree(out, ignore_errors=True)
    failed = [a for a in attempts if not a["done"]]
    # a step that ran out of memory never reached on_step_end: count it as spent too
    run.probe_steps = sum(a["steps"] + 1 for a in failed)
    run.samples_wasted = sum(a["samples"] for a in failed)
    run.restarts = max(0, len(attempts) - 1)
    late = [a for a in failed if a["steps"] > 0]
    if late:
        run.notes.append("OOM after the first step: " +
                         ", ".join(f"{a['size']} at step {a['steps'] + 1}" for a in late))
        run.brief["attempts out of memory after their first step"] = len(late)
    run.trajectory = [f"{a['size']}:{a['steps'] + (0 if a['done'] else 1)}{'' if a['done'] else '!'}" for a in attempts]
    run.seconds = time.perf_counter() - t0
    return run


def run_looptune_hf(curve: Any, capacity: int, seed: int, maxb: int, *, global_batch: int = bs.GLOBAL_BATCH,
                    max_steps: int = 2000, seconds: float = 60.0, after_steps: int | None = None) -> Any:
    """looptune's callback in the Trainer: the per-device batch is the global batch, split in the step."""
    from transformers import Trainer, TrainerCallback

    from looptune.transformers import LooptuneCallback

    after = after_steps if after_steps is not None else math.ceil(bs.N / global_batch)
    out = tempfile.mkdtemp(prefix="lt-bench-hf-lt-")
    t0 = time.perf_counter()
    run = bs.ToolRun(LABEL_LOOPTUNE, curve.key, seed, global_batch, None, 0, 0, 0, 0, 0.0)
    reached: list[int] = []
    try:
        # the memory search only: the batch_size tuner's throughput trial (half the micro-batch) would be
        # judged on this CPU's step time, which says nothing about a GPU (batch_size.py: "engine trials")
        config = {"tuners": {"state_file": os.path.join(out, "best.json"), "batch_size": {"try_smaller": False}}}
        cb = LooptuneCallback(run=f"bench-hf-batch-{curve.key}", socket=os.path.join(out, "no-daemon.sock"),
                              tune=["batch_size"], config=config)
        try:
            class Follow(TrainerCallback):
                stable_from, last = 0, None

                def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                    model.calls.clear()

                def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                    knob = cb.hook.knobs.get("micro_batch_size")
                    bs.record_step(run, knob, model.calls, fake.ooms)
                    step = state.global_step
                    if not reached and isinstance(knob, int) and knob >= bs.REACH * maxb:
                        reached.append(step)
                    mb = cb.hook.microbatcher
                    if knob != self.last or mb is None or not mb.fitted:
                        self.stable_from, self.last = step, knob
                    if (reached and step >= self.stable_from + after) or time.perf_counter() - t0 > seconds:
                        control.should_training_stop = True

            with bs.fc.FakeCuda(capacity) as fake, bs._quiet():
                model = _HFNet(fake, curve)
                opt = torch.optim.SGD(model.parameters(), lr=1e-3)
                epochs = max(1, math.ceil(max_steps * global_batch / bs.N))
                trainer = Trainer(model=model, args=_args(out, global_batch, seed, max_steps=max_steps,
                                                          num_train_epochs=epochs),
                                  train_dataset=bs.dataset(curve), data_collator=_collate, callbacks=[cb, Follow()],
                                  optimizers=(opt, None))
                trainer.train()
                run.ooms = fake.ooms
            if cb.hook.errors:
                run.notes.append(f"hook errors: {cb.hook.errors}")
            if "micro_batch_size" in cb.hook.untunable:
                run.notes.append(f"untunable: {cb.hook.untunable['micro_batch_size']}")
        finally:
            cb.close()
        steps = len(run.knobs)
        fed = sum(r for r, _ in model.rows)
        run.samples_wasted = max(0, fed - steps * global_batch)
        run.final = run.knobs[-1] if run.knobs and isinstance(run.knobs[-1], int) else None
        run.probe_steps = 0                     # probes are splits of training steps
        run.steps_to_final = next((k + 1 for k, v in enumerate(run.knobs) if v == run.final), steps)
        run.trajectory = bs._knob_path(run.knobs)
        run.notes.append(f"{steps} steps, {time.perf_counter() - t0:.0f} s")
        run.brief[f"knob >= {bs.REACH:.0%} at step"] = reached[0] if reached else "never"
    finally:
        shutil.rmtree(out, ignore_errors=True)
    run.seconds = time.perf_counter() - t0
    return run


def rows(curve: Any, capacity: int, seed: int, maxb: int, *, global_batch: int = bs.GLOBAL_BATCH,
         seconds: float = 60.0) -> list[Any]:
    """The HF rows for one curve and seed: auto_find from above and below, looptune in the Trainer."""
    return [run_hf_auto(curve, capacity, seed, HF_ABOVE, LABEL_ABOVE),
            run_hf_auto(curve, capacity, seed, HF_BELOW, LABEL_BELOW),
            run_looptune_hf(curve, capacity, seed, maxb, global_batch=global_batch, seconds=seconds)]


def table(runs: list[Any], maxb: dict[str, int], curves: list[str]) -> str:
    """batch_size.py's table, every tool that ran, and a line per run."""
    lines = [bs.table(runs, maxb, curves), ""]
    for r in runs:
        lines.append(f"- {r.curve} {r.tool} seed {r.seed}: {r.trajectory} ({r.seconds:.1f} s) {r.notes}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--curves", default="straight,jump,padded")
    p.add_argument("--capacity-mib", type=int, default=bs.CAPACITY_MIB)
    p.add_argument("--peers", action="store_true", help="also batch_size.py's Lightning, Accelerate and looptune rows")
    p.add_argument("--seconds", type=float, default=60.0, help="looptune-in-HF time cap per run")
    a = p.parse_args(argv)
    try:
        import accelerate
        import transformers
    except ImportError as exc:
        print(f"transformers / accelerate not installed here ({exc}): pip install -e '.[transformers]'",
              file=sys.stderr)
        return 2
    seeds = list(range(1, 1 + (a.seeds if a.seeds is not None else (1 if a.quick else 3))))
    curves = [c.strip() for c in a.curves.split(",") if c.strip()]
    torch.set_num_threads(1)
    capacity = a.capacity_mib * bs.MiB
    maxb: dict[str, int] = {}
    runs: list[Any] = []
    for ck in curves:
        curve = bs.CURVES[ck]
        maxb[ck] = bs.maximum(curve, capacity)
        print(f"[{ck}] maximum {maxb[ck]}", file=sys.stderr, flush=True)
        for seed in seeds:
            if a.peers:
                if importlib.util.find_spec("lightning") is not None:
                    runs += [bs.run_lightning(curve, capacity, mode, seed, 2) for mode in ("power", "binsearch")]
                else:
                    print("lightning: not installed, its rows left out", file=sys.stderr)
                runs.append(bs.run_accelerate(curve, capacity, 4096, seed, "accelerate above"))
                runs.append(bs.run_looptune(curve, capacity, seed, maxb[ck], seconds=a.seconds))
            for r in rows(curve, capacity, seed, maxb[ck], seconds=a.seconds):
                runs.append(r)
                share = f"{r.final / maxb[ck]:.2f}" if r.final else "-"
                print(f"[{ck}] {r.tool} seed {seed}: probe steps {r.probe_steps}, OOMs {r.ooms}, final {r.final} "
                      f"({share}), wasted {r.samples_wasted}, restarts {r.restarts}, {r.seconds:.1f} s",
                      file=sys.stderr, flush=True)
    print(f"# batch size inside the Trainer: transformers {transformers.__version__}, accelerate "
          f"{accelerate.__version__}, torch {torch.__version__}; stand-in {a.capacity_mib} MiB; seeds {seeds}")
    print(table(runs, maxb, curves))
    return 0


if __name__ == "__main__":
    sys.exit(main())
