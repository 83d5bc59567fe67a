#!/usr/bin/env python3
"""Batch-size search inside Lightning's own Trainer, on the stand-in GPU: Lightning's BatchSizeFinder
(power, binsearch) next to looptune's LooptuneCallback in the same kind of Trainer.

Rows for benchmarks/batch_size.py (same curves, data, model, stand-in GPU and ToolRun figures; see
its docstring for what each column means):

  run_lightning_finder(curve, capacity, mode, seed, init)   Lightning's BatchSizeFinder in its
        Trainer: benchmarks/batch_size.py's run_lightning, unchanged (label "lightning power" /
        "lightning binsearch").
  run_looptune_lightning(curve, capacity, seed, maxb, ...)  label "looptune in lightning": a
        LightningModule whose train_dataloader() yields the global batch per optimizer step
        (--global-batch, default 2048), Trainer(accelerator="cpu", max_epochs large, no logger, no
        checkpointing) with LooptuneCallback(tune=["batch_size"], config=<a temp state file>, socket=<no
        daemon>). Lightning's closure runs as looptune's micro-batches (looptune/lightning.py); the
        micro-batch size is read from callback.hook.knobs["micro_batch_size"] after each optimizer
        step. It stops (trainer.should_stop) when the knob has reached 90% of the maximum and held
        its value for one more epoch, or at the step and time caps, as batch_size.py's looptune row.

    python benchmarks/batch_size_lightning.py            # 3 curves x 1 seed, about a minute on 2 cores
    python benchmarks/batch_size_lightning.py --seeds 3 --curves padded

`python benchmarks/batch_size.py --tools all` puts these rows in one table with every other tool
(`--tools looptune-lightning` runs this module's looptune row there).

Needs lightning 2.6 (`pip install -e '.[torch,lightning]'`). Exit status: 0 when looptune in Lightning
is ahead of both of Lightning's finders on every curve (batch_size.py's goal: share >= the finder's,
steps spent probing <= the finder's, OOMs before a micro-batch of the finder's size ran <= the
finder's OOMs), 1 when not, 2 when Lightning is not installed.
"""
from __future__ import annotations

import argparse
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

import batch_size as bs  # noqa: E402 - benchmarks/batch_size.py: curves, data, model, stand-in, ToolRun
import torch  # noqa: E402

LABEL = "looptune in lightning"


def run_lightning_finder(curve: bs.Curve, capacity: int, mode: str, seed: int, init: int = 2) -> bs.ToolRun:
    """Lightning's BatchSizeFinder inside its Trainer (benchmarks/batch_size.py's row)."""
    return bs.run_lightning(curve, capacity, mode, seed, init)


def run_looptune_lightning(curve: bs.Curve, capacity: int, seed: int, maxb: int, *,
                           global_batch: int = bs.GLOBAL_BATCH, max_steps: int = 20000, seconds: float = 60.0,
                           after_steps: int | None = None, label: str = LABEL) -> bs.ToolRun:
    """looptune's micro-batch fit inside a Lightning Trainer on the stand-in GPU (module docstring)."""
    import lightning.pytorch as pl

    from looptune.lightning import LooptuneCallback

    after = after_steps if after_steps is not None else math.ceil(bs.N / global_batch)
    state = tempfile.mkdtemp(prefix="lt-bench-lit-")
    run = bs.ToolRun(label, curve.key, seed, global_batch, None, 0, 0, 0, 0, 0.0)
    t0 = time.perf_counter()

    class LitNet(pl.LightningModule):
        def __init__(self, fake: Any) -> None:
            super().__init__()
            self.net = bs.make_model(fake, curve)
            self.fake = fake
            self.calls: list[tuple[int, int]] = []      # this step's micro-batches: (rows, OOMs at entry)
            self.fed = 0

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            self.calls.append((int(x.shape[0]), self.fake.ooms))
            self.fed += int(x.shape[0])
            return bs.loss_fn(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

        def train_dataloader(self) -> Any:
            return bs.loader(curve, global_batch, seed)

    class Follow(pl.Callback):
        """After each optimizer step: the knob, the OOMs, the micro-batches that ran; stops the fit."""

        def __init__(self, cb: LooptuneCallback) -> None:
            self.cb = cb
            self.reached: int | None = None
            self.stable_from, self.last = 0, None
            self.used = 0
            self.last_calls: list[tuple[int, int]] = []

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            module.calls.clear()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            hook = self.cb.hook
            steps = trainer.global_step
            self.used += int(batch[0].shape[0])
            knob = hook.knobs.get("micro_batch_size")
            calls = list(module.calls)
            bs.record_step(run, knob, calls, module.fake.ooms)
            self.last_calls = calls
            if self.reached is None and isinstance(knob, int) and knob >= bs.REACH * maxb:
                self.reached = steps
            fitted = hook.microbatcher is not None and hook.microbatcher.fitted
            if knob != self.last or not fitted:
                self.stable_from, self.last = steps, knob
            elapsed = time.perf_counter() - t0
            if (self.reached is not None and steps >= self.stable_from + after) or steps >= max_steps \
                    or elapsed > seconds:
                trainer.should_stop = True

    try:
        config = {"tuners": {"state_file": os.path.join(state, "best.json")}}
        with bs.fc.FakeCuda(capacity) as fake, bs._quiet():
            cb = LooptuneCallback(run=f"bench-lit-{curve.key}", socket=os.path.join(state, "no-daemon.sock"),
                                  tune=["batch_size"], config=config)
            follow = Follow(cb)
            module = LitNet(fake)
            trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=10**6, max_steps=max_steps, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                 num_sanity_val_steps=0, default_root_dir=state, callbacks=[cb, follow])
            crashed = None
            try:
                trainer.fit(module)
            except RuntimeError as exc:         # an OOM the split could not recover (one row does not fit)
                if not bs.is_oom(exc):
                    raise
                crashed = exc
            hook = cb.hook
            run.ooms = fake.ooms
            run.samples_wasted = module.fed - follow.used
            run.final = run.knobs[-1] if run.knobs and isinstance(run.knobs[-1], int) and crashed is None else None
            if crashed is not None:
                run.notes.append(f"crashed: {crashed}")
                run.restarts = 1
            if hook.errors:
                run.notes.append(f"hook errors: {hook.errors}")
            if "micro_batch_size" in hook.untunable:
                run.notes.append(f"untunable: {hook.untunable['micro_batch_size']}")
    finally:
        shutil.rmtree(state, ignore_errors=True)
    run.probe_steps = 0             # its probes are splits of training steps, which train
    run.steps_to_final = next((k + 1 for k, v in enumerate(run.knobs) if v == run.final), len(run.knobs))
    run.trajectory = bs._knob_path(run.knobs)
    run.notes.append(f"{len(run.knobs)} steps, {time.perf_counter() - t0:.0f} s")
    reached = follow.reached
    run.notes.append(f"knob >= {bs.REACH:.0%} of the maximum at step {reached}" if reached is not None
                     else f"knob never reached {bs.REACH:.0%} of the maximum")
    run.brief[f"knob >= {bs.REACH:.0%} at step"] = reached if reached is not None else "never"
    run.brief["last step's micro-batches"] = bs._runs([c[0] for c in follow.last_calls])
    run.seconds = time.perf_counter() - t0
    return run


# ---- Lightning's rows side by side (batch_size.py --tools all prints every framework's) ----

def goals(runs: list[bs.ToolRun], maxb: dict[str, int]) -> list[tuple[str, bool, str]]:
    """batch_size.py's goals of looptune in Lightning against Lightning's finders."""
    return [g for g in bs.goals(runs, maxb) if g[0].split(": ", 1)[1].startswith(LABEL + " vs ")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--curves", default="straight,jump,padded")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--capacity-mib", type=int, default=bs.CAPACITY_MIB)
    p.add_argument("--global-batch", type=int, default=bs.GLOBAL_BATCH)
    p.add_argument("--with-hand-loop", action="store_true", help="also batch_size.py's looptune row (a hand-written "
                   "loop around hook.accumulate)")
    args = p.parse_args(argv)
    try:
        import lightning
    except ImportError:
        print("lightning is not installed here: pip install -e '.[torch,lightning]'", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    capacity = args.capacity_mib * bs.MiB
    curves = [c.strip() for c in args.curves.split(",") if c.strip()]
    runs: list[bs.ToolRun] = []
    maxb: dict[str, int] = {}
    for ck in curves:
        curve = bs.CURVES[ck]
        maxb[ck] = bs.maximum(curve, capacity)
        for seed in range(1, args.seeds + 1):
            for mode in ("power", "binsearch"):
                runs.append(run_lightning_finder(curve, capacity, mode, seed))
            if args.with_hand_loop:
                runs.append(bs.run_looptune(curve, capacity, seed, maxb[ck], global_batch=args.global_batch))
            runs.append(run_looptune_lightning(curve, capacity, seed, maxb[ck], global_batch=args.global_batch))
            for r in runs[-(3 + args.with_hand_loop):]:
                print(f"[{ck}] {r.tool} seed {seed}: final {r.final}, probe steps {r.probe_steps}, OOMs {r.ooms}, "
                      f"{r.seconds:.1f} s; {r.notes}", file=sys.stderr, flush=True)
    print(f"# Lightning {lightning.__version__}, torch {torch.__version__}; stand-in GPU {args.capacity_mib} MiB; "
          f"looptune global batch {args.global_batch}\n")
    print(bs.table(runs, maxb, curves))
    print("\nPer run (Lightning: sizes x steps per fit; looptune: micro_batch_size@step):")
    for r in runs:
        print(f"- {r.curve} {r.tool} seed {r.seed}: {r.trajectory} ({r.seconds:.1f} s)")
    print("\nGoals (looptune in Lightning ahead of each Lightning finder):")
    results = goals(runs, maxb)
    for name, ok, value in results:
        print(f"- {name}: {'PASS' if ok else 'FAIL'} ({value})")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
