#!/usr/bin/env python3
"""Batch-size search on a stand-in GPU: looptune against Lightning's BatchSizeFinder (power and
binsearch) and Accelerate's find_executable_batch_size, side by side on the same memory curves.

The stand-in GPU is tests/fakes/fake_cuda.py: `FakeCuda(capacity)` replaces the torch.cuda memory
functions and `MemoryLayer` inside a real CPU model allocates activation memory per forward from
the input's shape (held until backward, plus a backward workspace of the same size) and raises
`torch.cuda.OutOfMemoryError("CUDA out of memory. ...")` above the capacity. Every tool runs the
same model (Linear -> tanh -> MemoryLayer -> [mean over the sequence] -> Linear, SGD, MSE) on the
same data (N=32768 samples) on a fresh FakeCuda of the same capacity (2001 MiB by default).

Memory curves (the MemoryLayer's activation bytes for an input of B rows; the peak of a step is
twice that, activations plus the backward's workspace):

  straight  1 MiB per row                                         maximum 1000
  jump      1 MiB per row + 250 MiB of workspace from 600 rows    maximum 750 (a kernel that picks
            up (with_jump)                                        a bigger algorithm at larger sizes:
                                                                  small sizes extrapolate to ~1000)
  padded    1344 bytes per element of a (B, L, 4) input, each     maximum 816 (at the longest
            batch padded to its longest sample; lengths drawn     sample, 239; a typical batch
            once from a seeded log-normal (median 32, sigma 0.5,  of ~1000 is padded to ~155, so
            at least 4), the same data set for every tool         a few steps fit far more)

The maximum is the largest batch size for which a real forward and backward of the model fits on
a fresh FakeCuda, found by bisection (for padded: B rows at the data set's longest length, so the
size at which no batch of an epoch can run out of memory). It is checked: the maximum fits and
the maximum + 1 does not.

Tools, each run once per seed (--seeds, default 3; --quick 1); the seed sets the data order:

  lightning power / binsearch  lightning.pytorch 2.6: a LightningModule with `self.batch_size` and a
            `train_dataloader()`, Trainer(accelerator="cpu", max_epochs=1, no logger, no checkpointing)
            with a BatchSizeFinder(mode=..., init_val=--lightning-init (default 2, Lightning's),
            steps_per_trial=3, margin=0.05: Lightning's defaults) callback: the search runs in
            on_fit_start, restores the initial weights, and the fit then trains one epoch at the
            size found. When that epoch runs out of memory (padded: a batch with a long sample
            at a size above the maximum) the fit crashes; the benchmark re-fits with the same
            settings and the next data order, as a user would, up to 3 fits in all.
  accelerate above / below  accelerate 1.x: `find_executable_batch_size(starting_batch_size=S)`
            around a training function that builds the model, optimizer and loader and trains one
            epoch; an out-of-memory error anywhere restarts it at 0.9 x the size. S = 4096 (above
            the maximum) and S = 512 (below it; --accelerate-above / --accelerate-below).
  looptune  `Hook(run=..., tune=["batch_size"], config=<a temp state file, a socket path with no
            daemon>)`, `hook.watch(model)`, `hook.watch(loader)` with the loader's batch the global
            batch per optimizer step (--global-batch, default 2048),
            `hook.accumulate(batch, lambda mb: loss_fn(model(mb[0]), mb[1]))`, `optimizer.step();
            optimizer.zero_grad(); hook.step()`; the micro-batch size is read from
            `hook.knobs["micro_batch_size"]` after each step (the rows of the widest input seen so
            far that fit: a narrower padded batch is cut into bigger micro-batches, since the hook
            fits elements, not rows). Default config but for a fresh state file. Runs until the
            knob reaches 90% of the maximum, then one more epoch (16 steps; --looptune-after),
            within --looptune-steps and --looptune-seconds: the memory search, which the goal
            judges. Needs `Hook.accumulate`; without it the benchmark prints "looptune: not
            available in this checkout" and reports the peers alone.
  looptune, engine trials  the same for at least --trials-seconds (default 20; seed 1 only; not in
            --quick): long enough for the batch_size tuner's throughput trial (half the micro-batch,
            kept when at most 1% slower), which runs on 1 s windows after the search. On the
            stand-in a step's time is this CPU's, not a GPU's, so that trial's outcome says nothing
            about a GPU: the row shows what the engine does, not a figure to compare.

The framework rows (--tools hf, looptune-lightning, looptune-hf; --tools all runs every tool), from
benchmarks/batch_size_transformers.py and benchmarks/batch_size_lightning.py (their docstrings
describe them; the same curves, data, model and stand-in):

  hf auto_find above / below  (tool hf) transformers 5.x Trainer(auto_find_batch_size=True) from the
            same starts as Accelerate's (its search is Accelerate's find_executable_batch_size around
            the Trainer's training loop), one epoch.
  looptune in lightning  (tool looptune-lightning) LooptuneCallback(tune=["batch_size"]) in a
            Lightning Trainer whose loader's batch is the global batch; default config.
  looptune in HF  (tool looptune-hf) LooptuneCallback in the HF Trainer with
            per_device_train_batch_size = the global batch; the batch_size tuner's throughput trial
            off (the memory search alone).
  Both stop as the looptune row does (--looptune-after, --looptune-steps, --looptune-seconds).

Figures, per tool and curve (a range over the seeds where they differ):

  steps spent probing  steps run for the search whose training is thrown away: for Lightning every
                  step of the search (all fits) plus the steps of a fit that crashed; for Accelerate
                  every step of the attempts that ended in an out-of-memory error (the one that failed
                  included); for looptune 0: its probes are other splits of training steps, which
                  train (what an OOM redoes is in "samples wasted").
  steps until the final size  the peers: the same; looptune: the first step after which
                  micro_batch_size had its final value (it runs until the fit is done and its size
                  held for an epoch, so an OOM of a later probe is counted).
  OOMs            out-of-memory errors raised by the stand-in (FakeCuda.ooms), search and training.
  share           final size / maximum (looptune: the final micro_batch_size). Above 1.00 the size
                  does not fit every batch.
  samples wasted  samples of steps whose results were discarded: Lightning's search (it restores
                  the initial weights) and crashed fits (no checkpoint mid-epoch); Accelerate's
                  failed attempts (the function restarts from scratch); looptune: samples that went
                  through the loss function beyond one pass over each global batch (micro-batches
                  redone after an OOM).
  restarts        Lightning: re-fits after a crash; Accelerate: restarts of the training function
                  after an OOM (the starts less one; the issue's "restarted 15 times with 14 OOMs"
                  counted the starts); looptune: 0 unless the training loop had to be restarted
                  (it never is: an OOM inside hook.accumulate is redone there).

Goal (the issue's done-when: "ahead of each peer on probe steps and OOMs at equal or better
share"), per curve and per peer run of the same seed: looptune's final share is at least the
peer's (capped at 1.00), it spends no more steps probing than the peer, and it has spent no more
OOMs than the peer had by the time a micro-batch of the peer's final size ran (the table also has
looptune's whole-run OOMs). A peer that never completed a run counts as share 0. A peer that did
no search (Accelerate started below the maximum keeps its start: 0 steps, 0 OOMs, a share of
0.51-0.68) is beaten where looptune passes that share before its first OOM; its goal lines say
that it did no search. The same goal holds looptune in Lightning against Lightning's finders and
looptune in HF against HF's auto_find_batch_size.

Workarounds for the stand-in: FakeCuda answers torch.cuda.is_available() with True while the model
runs on the CPU, so the Trainer gets accelerator="cpu" (with "auto" Lightning picks CUDA and
fails in its matmul-precision check: torch.cuda.get_device_capability -> "Torch not compiled with
CUDA enabled"); Lightning then logs "GPU available but not used", which is silenced here. Nothing else: Lightning's and Accelerate's OOM
checks read the exception's message ("CUDA out of memory." / " out of memory."), which the
stand-in's error carries, and their cache clearing calls the stand-in's empty_cache.

The peers are not looptune dependencies. Their environment, separate from the project's:

    python3 -m venv /work/bench-venv && . /work/bench-venv/bin/activate
    pip install torch==2.13.0                  # first: the CPU build (a bare requirement pulls CUDA)
    pip install 'lightning>=2.6,<2.7' 'accelerate>=1.0' 'transformers>=5,<6'   # transformers: hf, looptune-hf
    pip install -e .                           # looptune from this checkout
    pip list | grep -i torch                   # torch 2.13.0+cpu

Run (in that environment):

    python benchmarks/batch_size.py                       # 3 seeds, ~3.5 minutes on 2 cores
    python benchmarks/batch_size.py --quick               # 1 seed, ~45 s
    python benchmarks/batch_size.py --curves padded --tools lightning,accelerate --seeds 5
    python benchmarks/batch_size.py --tools all           # every tool, the framework rows too: 3 seeds, ~6 minutes

Exit status 0 when every goal passes; 1 when a goal fails; 2 when a requested tool could not run
(a peer not installed, looptune without hook.accumulate), so the goals could not be checked.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402


def _load_fake_cuda() -> Any:
    """tests/fakes/fake_cuda.py by path (the repository's tests/ is no package)."""
    spec = importlib.util.spec_from_file_location("looptune_bench_fake_cuda", REPO / "tests" / "fakes" / "fake_cuda.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


fc = _load_fake_cuda()
MiB = fc.MiB

N = 32768                   # samples in the data set
ROW_DIM = 8                 # features per row (straight, jump)
PAD_DIM = 4                 # features per element (padded: (B, L, PAD_DIM))
CAPACITY_MIB = 2001
LEN_MEDIAN, LEN_SIGMA, LEN_MIN, LEN_SEED = 32, 0.5, 4, 11
DATA_SEED = 20240601
GLOBAL_BATCH = 2048         # looptune's batch per optimizer step
TRIALS_LABEL = "looptune, engine trials"
# --tools: each tool and the modules it needs besides torch (the framework rows are in
# batch_size_lightning.py and batch_size_transformers.py)
TOOLS: dict[str, tuple[str, ...]] = {
    "lightning": ("lightning",), "accelerate": ("accelerate",), "hf": ("transformers", "accelerate"),
    "looptune": (), "looptune-lightning": ("lightning",), "looptune-hf": ("transformers", "accelerate"),
}
REACH = 0.90                # looptune runs until a micro-batch of this share of the maximum completed
LIGHTNING_FITS = 3          # a crashed fit is re-fitted, up to this many fits in all
BISECT_HIGH = 16384


# ---- curves, data, model ----

@dataclass
class Curve:
    key: str
    title: str
    detail: str
    make: Callable[[], Callable[[torch.Tensor], int]]
    padded: bool = False


CURVES: dict[str, Curve] = {
    "straight": Curve("straight", "straight", "1 MiB per row", lambda: fc.straight(MiB)),
    "jump": Curve("jump", "workspace jump", "1 MiB per row + 250 MiB from 600 rows",
                  lambda: fc.with_jump(MiB, 600, 250 * MiB)),
    "padded": Curve("padded", "padded variable-length",
                    f"1344 B per element of (B, L, {PAD_DIM}), L = the batch's longest sample",
                    lambda: fc.per_element(1344), padded=True),
}


def _as_batch(data: Any) -> Any:
    """collate_fn: the dataset's __getitems__ already returns the batch."""
    return data


class Rows(Dataset):
    """N fixed-size samples: x (ROW_DIM,), y (1,)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(DATA_SEED)
        self.x = torch.randn(N, ROW_DIM, generator=g)
        self.y = torch.randn(N, 1, generator=g)

    def __len__(self) -> int:
        return N

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.as_tensor(idx)
        return self.x[i], self.y[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def worst(self, b: int) -> torch.Tensor:
        return torch.zeros(b, ROW_DIM)


class Padded(Dataset):
    """N variable-length samples (L_i, PAD_DIM); a batch is padded to its longest sample."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(LEN_SEED)
        z = torch.randn(N, generator=g)
        self.lengths = torch.exp(z * LEN_SIGMA + math.log(LEN_MEDIAN)).round().clamp(min=LEN_MIN).long()
        g = torch.Generator().manual_seed(DATA_SEED)
        self.x = torch.randn(N, PAD_DIM, generator=g)
        self.y = torch.randn(N, 1, generator=g)
        self.longest = int(self.lengths.max())

    def __len__(self) -> int:
        return N

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.as_tensor(idx)
        lens = self.lengths[i]
        width = int(lens.max())
        mask = (torch.arange(width).unsqueeze(0) < lens.unsqueeze(1)).unsqueeze(2)   # (B, L, 1)
        return self.x[i].unsqueeze(1) * mask, self.y[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def worst(self, b: int) -> torch.Tensor:
        return torch.zeros(b, self.longest, PAD_DIM)


class Net(torch.nn.Module):
    def __init__(self, fake: Any, curve: Curve, dim: int) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(dim, dim)
        self.mem = fc.MemoryLayer(fake, curve.make())
        self.out = torch.nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mem(torch.tanh(self.inp(x)))
        if h.dim() == 3:
            h = h.mean(1)
        return self.out(h)


def make_model(fake: Any, curve: Curve) -> Net:
    torch.manual_seed(0)
    return Net(fake, curve, PAD_DIM if curve.padded else ROW_DIM)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(out, y)


_DATASETS: dict[bool, Dataset] = {}


def dataset(curve: Curve) -> Any:
    if curve.padded not in _DATASETS:
        _DATASETS[curve.padded] = Padded() if curve.padded else Rows()
    return _DATASETS[curve.padded]


def loader(curve: Curve, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(dataset(curve), batch_size=batch_size, shuffle=True, collate_fn=_as_batch,
                      generator=torch.Generator().manual_seed(seed))


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def fits(curve: Curve, capacity: int, b: int) -> bool:
    """One forward and backward of B worst-case rows on a fresh stand-in."""
    fake = fc.FakeCuda(capacity)
    model = make_model(fake, curve)
    x = dataset(curve).worst(b)
    try:
        loss_fn(model(x), torch.zeros(b, 1)).backward()
        return True
    except torch.cuda.OutOfMemoryError:
        return False


def maximum(curve: Curve, capacity: int) -> int:
    lo, hi = 1, BISECT_HIGH
    if not fits(curve, capacity, lo) or fits(curve, capacity, hi):
        raise RuntimeError(f"{curve.key}: the maximum is not within 1..{BISECT_HIGH}")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(curve, capacity, mid):
            lo = mid
        else:
            hi = mid
    assert fits(curve, capacity, lo) and not fits(curve, capacity, lo + 1)
    return lo


# ---- results ----

@dataclass
class ToolRun:
    tool: str
    curve: str
    seed: int
    start: int | None
    final: int | None               # None: no run completed
    probe_steps: int
    ooms: int
    samples_wasted: int
    restarts: int
    seconds: float
    steps_to_final: int | None = None   # steps until the final size was in use (the peers: their probe steps)
    notes: list[str] = field(default_factory=list)            # the per-run lines
    brief: dict[str, Any] = field(default_factory=dict)       # the table's notes, joined over the seeds
    trajectory: list[Any] = field(default_factory=list)   # per tool: sizes tried / per-step sizes
    # looptune only
    sizes: list[int] = field(default_factory=list)       # per step: largest micro-batch completed without an OOM
    ooms_at: list[int] = field(default_factory=list)     # per step: OOMs so far
    ran: list[tuple[int, int]] = field(default_factory=list)   # every micro-batch that ran: (rows, OOMs before it)
    knobs: list[Any] = field(default_factory=list)       # per step: micro_batch_size after the step
    splits: list[int] = field(default_factory=list)      # per step: micro-batches run (redone ones included)

    def share(self, maxb: int) -> float | None:
        return None if self.final is None else self.final / maxb

    def ooms_to(self, size: float) -> int | None:
        """looptune: OOMs spent before the first micro-batch of at least `size` rows ran."""
        return next((o for r, o in self.ran if r >= size), None)

    def steps_to(self, size: float) -> int | None:
        """looptune: the first step after which micro_batch_size was at least `size`."""
        for k, s in enumerate(self.knobs):
            if isinstance(s, int) and s >= size:
                return k + 1
        return None


# ---- Lightning ----

def run_lightning(curve: Curve, capacity: int, mode: str, seed: int, init: int) -> ToolRun:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import BatchSizeFinder

    class LitNet(pl.LightningModule):
        def __init__(self, fake: Any, data_seed: int) -> None:
            super().__init__()
            self.batch_size = init
            self.net = make_model(fake, curve)
            self.data_seed = data_seed
            self.phase = "search"
            self.calls: dict[str, list[int]] = {"search": [], "train": []}

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            self.calls[self.phase].append(int(x.shape[0]))
            return loss_fn(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

        def train_dataloader(self) -> DataLoader:
            return loader(curve, self.batch_size, self.data_seed)

    class Finder(BatchSizeFinder):
        def scale_batch_size(self, trainer: Any, pl_module: Any) -> None:
            pl_module.phase = "search"
            before = fake.ooms
            try:
                super().scale_batch_size(trainer, pl_module)
            finally:
                pl_module.phase = "train"
                self.search_ooms = fake.ooms - before

    t0 = time.perf_counter()
    run = ToolRun(f"lightning {mode}", curve.key, seed, init, None, 0, 0, 0, 0, 0.0)
    with fc.FakeCuda(capacity) as fake, _quiet():
        for fit in range(LIGHTNING_FITS):
            module = LitNet(fake, seed + 1000 * fit)
            finder = Finder(mode=mode, init_val=init)
            root = tempfile.mkdtemp(prefix="lt-bench-lightning-")
            try:
                trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                                     enable_checkpointing=False, enable_progress_bar=False,
                                     enable_model_summary=False, callbacks=[finder], default_root_dir=root,
                                     num_sanity_val_steps=0)
                crashed = None
                try:
                    trainer.fit(module)
                except RuntimeError as exc:
                    if not is_oom(exc):
                        raise
                    crashed = exc
            finally:
                shutil.rmtree(root, ignore_errors=True)
            search, train = module.calls["search"], module.calls["train"]
            run.trajectory.append({"fit": fit + 1, "search": _runs(search), "found": finder.optimal_batch_size,
                                   "train_steps": len(train), "crashed": crashed is not None})
            run.probe_steps += len(search)
            run.samples_wasted += sum(search)
            if crashed is None:
                run.final = module.batch_size
                break
            if module.phase == "search":        # an OOM the finder did not catch
                run.notes.append(f"fit {fit + 1}: crashed in the search")
            else:
                run.notes.append(f"fit {fit + 1}: size {module.batch_size} crashed at training step {len(train)} "
                                 f"of the epoch")
            run.brief["fits crashed in training"] = run.brief.get("fits crashed in training", 0) + 1
            run.probe_steps += len(train)
            run.samples_wasted += sum(train)
            run.restarts += 1 if fit + 1 < LIGHTNING_FITS else 0
        else:
            run.notes.append(f"no fit completed in {LIGHTNING_FITS}")
            run.brief["no fit completed"] = "yes"
        run.ooms = fake.ooms
    run.seconds = time.perf_counter() - t0
    return run


def _runs(sizes: list[int]) -> str:
    """[2, 2, 2, 4, 4, 4, 1024] -> '2x3 4x3 1024x1'"""
    out: list[list[int]] = []
    for s in sizes:
        if out and out[-1][0] == s:
            out[-1][1] += 1
        else:
            out.append([s, 1])
    return " ".join(f"{s}x{n}" for s, n in out)


@contextlib.contextmanager
def _quiet() -> Any:
    """Lightning's and Accelerate's info lines and warnings (the stand-in's 'GPU available but not used')."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "accelerate")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for n, lv in levels.items():
                logging.getLogger(n).setLevel(lv)


# ---- Accelerate ----

def run_accelerate(curve: Curve, capacity: int, start: int, seed: int, label: str) -> ToolRun:
    from accelerate.utils import find_executable_batch_size

    attempts: list[dict[str, Any]] = []

    t0 = time.perf_counter()
    with fc.FakeCuda(capacity) as fake, _quiet():
        @find_executable_batch_size(starting_batch_size=start)
        def train(batch_size: int) -> int:
            attempt = {"size": batch_size, "steps": 0, "samples": 0, "done": False}
            attempts.append(attempt)
            model = make_model(fake, curve)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            for x, y in loader(curve, batch_size, seed):
                attempt["steps"] += 1
                attempt["samples"] += int(x.shape[0])
                loss_fn(model(x), y).backward()
                opt.step()
                opt.zero_grad()
            attempt["done"] = True
            return batch_size

        run = ToolRun(label, curve.key, seed, start, None, 0, 0, 0, 0, 0.0)
        try:
            run.final = train()
        except RuntimeError as exc:
            run.notes.append(f"failed: {exc}")
        run.ooms = fake.ooms
    failed = [a for a in attempts if not a["done"]]
    run.probe_steps = sum(a["steps"] for a in failed)
    run.samples_wasted = sum(a["samples"] for a in failed)
    run.restarts = max(0, len(attempts) - 1)
    late = [a for a in failed if a["steps"] > 1]
    if late:
        run.notes.append("OOM after the first step: " + ", ".join(f"{a['size']} at step {a['steps']}" for a in late))
        run.brief["attempts out of memory after their first step"] = len(late)
    run.trajectory = [f"{a['size']}:{a['steps']}{'' if a['done'] else '!'}" for a in attempts]
    run.seconds = time.perf_counter() - t0
    return run


# ---- looptune ----

def looptune_available() -> str | None:
    """None when this checkout has the micro-batch API, else why not."""
    from looptune import Hook
    if not hasattr(Hook, "accumulate"):
        return "Hook has no accumulate()"
    return None


def run_looptune(curve: Curve, capacity: int, seed: int, maxb: int, *, global_batch: int = GLOBAL_BATCH,
                 max_steps: int = 20000, seconds: float = 180.0, after_steps: int | None = None,
                 min_seconds: float = 0.0, label: str = "looptune") -> ToolRun:
    """looptune's micro-batch tuner on the stand-in: one global batch per optimizer step, split by
    hook.accumulate into micro-batches of at most hook.knobs["micro_batch_size"]. Runs until the knob
    reached REACH x the maximum, then `after_steps` more (default one epoch) and at least `min_seconds`
    in all (time for the engine's trials), within the caps `max_steps` and `seconds`."""
    from looptune import Hook

    after = after_steps if after_steps is not None else math.ceil(N / global_batch)
    state = tempfile.mkdtemp(prefix="lt-bench-batch-")
    t0 = time.perf_counter()
    run = ToolRun(label, curve.key, seed, global_batch, None, 0, 0, 0, 0, 0.0)
    try:
        config = {"tuners": {"state_file": os.path.join(state, "best.json")}}
        with fc.FakeCuda(capacity) as fake, \
                Hook(run=f"bench-batch-{curve.key}", socket=os.path.join(state, "no-daemon.sock"),
                     tune=["batch_size"], config=config) as hook:
            if hook.mode != "embedded" or hook.disabled:
                raise RuntimeError(f"hook is {hook.mode}, disabled={hook.disabled}: expected embedded")
            model = hook.watch(make_model(fake, curve))
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            calls: list[tuple[int, int]] = []        # this step's micro-batches: (rows, OOMs at entry)
            fed = 0

            def micro_loss(mb: Any) -> torch.Tensor:
                nonlocal fed
                rows = int(mb[0].shape[0])
                fed += rows
                calls.append((rows, fake.ooms))
                return loss_fn(model(mb[0]), mb[1])

            used = 0
            reached = None
            stable_from, last_knob = 0, None
            steps = 0
            done = False
            watched = hook.watch(loader(curve, global_batch, seed))
            while not done:                      # epochs
                for batch in watched:
                    calls.clear()
                    hook.accumulate(batch, micro_loss)
                    opt.step()
                    opt.zero_grad()
                    hook.step()
                    steps += 1
                    used += int(batch[0].shape[0])
                    knob = hook.knobs.get("micro_batch_size")
                    record_step(run, knob, calls, fake.ooms)
                    if reached is None and isinstance(knob, int) and knob >= REACH * maxb:
                        reached = steps
                    if knob != last_knob or not hook.microbatcher.fitted:
                        stable_from, last_knob = steps, knob
                    elapsed = time.perf_counter() - t0
                    # until the fit is done and its size held for `after` steps: a later probe's OOM counts
                    if (reached is not None and steps >= stable_from + after and elapsed >= min_seconds) \
                            or steps >= max_steps or elapsed > seconds:
                        done = True
                        break
            run.ooms = fake.ooms
            run.final = run.knobs[-1] if isinstance(run.knobs[-1], int) else None
            run.samples_wasted = fed - used
            engine = hook.engine
            trials = [dict(h) for j in engine.jobs.values() for h in j.history] if engine is not None else []
            if hook.errors:
                run.notes.append(f"hook errors: {hook.errors}")
            if hook.disabled:
                run.notes.append("the hook turned itself off")
        # looptune's probes are splits of training steps: none is spent on the search alone
        run.probe_steps = 0
        run.steps_to_final = next((k + 1 for k, v in enumerate(run.knobs) if v == run.final), len(run.knobs))
        run.trajectory = _knob_path(run.knobs)
        last = [c[0] for c in calls]
        run.notes.append(f"{steps} steps, {time.perf_counter() - t0:.0f} s")
        run.notes.append(f"knob >= {REACH:.0%} of the maximum at step {reached}" if reached is not None
                         else f"knob never reached {REACH:.0%} of the maximum")
        run.notes.append(f"last step's micro-batches: {_runs(last)}")
        run.brief[f"knob >= {REACH:.0%} at step"] = reached if reached is not None else "never"
        run.brief["last step's micro-batches"] = _runs(last)
        for h in trials:
            gain = f"{h['gain']:+.1%}" if isinstance(h.get("gain"), (int, float)) else "-"
            run.notes.append(f"engine trial {h.get('old')} -> {h.get('new')}: {h.get('outcome')} ({gain})")
        run.brief["engine trials"] = ", ".join(f"{h.get('old')}->{h.get('new')} {h.get('outcome')}"
                                               for h in trials) or "none"
    finally:
        shutil.rmtree(state, ignore_errors=True)
    run.seconds = time.perf_counter() - t0
    return run


def record_step(run: ToolRun, knob: Any, calls: list[tuple[int, int]], ooms: int) -> None:
    """A looptune row's figures after one optimizer step (the hand-written loop's, and the Lightning
    and HF Trainer rows'): the knob, the OOMs so far, and the step's micro-batches `calls` as (rows,
    OOMs at its start); one ran when no OOM came between its start and the next one's."""
    run.knobs.append(knob)
    run.ooms_at.append(ooms)
    ends = [c[1] for c in calls[1:]] + [ooms]
    run.sizes.append(max((r for (r, o0), o1 in zip(calls, ends) if o1 == o0), default=0))
    run.ran.extend((r, o0) for (r, o0), o1 in zip(calls, ends) if o1 == o0)
    run.splits.append(len(calls))


def _knob_path(knobs: list[Any]) -> list[str]:
    out: list[str] = []
    prev: Any = object()
    for k, v in enumerate(knobs):
        if v != prev:
            out.append(f"{v}@{k + 1}")
            prev = v
    return out


# ---- the report ----

def _span(values: list[Any], fmt: Callable[[Any], str] = str) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return fmt(lo) if lo == hi else f"{fmt(lo)}–{fmt(hi)}"


def _joined(values: list[Any]) -> str:
    """One value when every seed had it, else each seed's in seed order."""
    return str(values[0]) if len(set(map(str, values))) == 1 else " / ".join(map(str, values))


# looptune's rows and the peers each is judged against: the hand-written loop against every peer,
# looptune inside a framework's Trainer against that framework's own search
GOAL_PAIRS: list[tuple[str, Callable[[str], bool]]] = [
    ("looptune", lambda tool: not tool.startswith("looptune")),
    ("looptune in lightning", lambda tool: tool.startswith("lightning ")),
    ("looptune in HF", lambda tool: tool.startswith("hf ")),
]


def goals(runs: list[ToolRun], maxb: dict[str, int]) -> list[tuple[str, bool, str]]:
    out = []
    for ours, is_peer in GOAL_PAIRS:
        tuned = {(r.curve, r.seed): r for r in runs if r.tool == ours}
        for p in runs:
            if not is_peer(p.tool):
                continue
            lt = tuned.get((p.curve, p.seed))
            if lt is None:
                continue
            m = maxb[p.curve]
            peer_share = min(1.0, p.share(m) or 0.0)
            lt_share = lt.share(m) or 0.0
            steps = lt.steps_to(peer_share * m) if peer_share > 0 else 0
            ok_share = lt_share >= peer_share
            ok_steps = lt.probe_steps <= p.probe_steps
            # OOMs at equal share: those looptune spent before a micro-batch of the peer's final size ran
            # (its whole run's OOMs are in the table; a peer that did no search never pays for one)
            ooms_to = lt.ooms_to(peer_share * m) if peer_share > 0 else 0
            ok_ooms = ooms_to is not None and ooms_to <= p.ooms
            why = [w for w, ok in (("share", ok_share), ("steps", ok_steps), ("OOMs", ok_ooms)) if not ok]
            out.append((f"{p.curve}, seed {p.seed}: {ours} vs {p.tool}", not why,
                        f"share {lt_share:.2f} vs {peer_share:.2f}; steps spent probing {lt.probe_steps} vs "
                        f"{p.probe_steps}; looptune's training steps to {peer_share:.2f}: "
                        f"{steps if steps is not None else 'never'}; "
                        f"OOMs to the peer's share {ooms_to if ooms_to is not None else 'never'} (whole run {lt.ooms}) "
                        f"vs {p.ooms}" + (f"; behind on {', '.join(why)}" if why else "")
                        + ("; the peer did no search (it kept its start)" if p.probe_steps == 0 and p.ooms == 0
                           else "")))
    return out


# the table's row order; a tool not named here follows in the order it ran
ORDER = ["lightning power", "lightning binsearch", "accelerate above", "accelerate below", "hf auto_find above",
         "hf auto_find below", "looptune", TRIALS_LABEL, "looptune in lightning", "looptune in HF"]
TABLE_HEAD = ["| curve (maximum) | tool (start) | steps spent probing | steps until the final size | OOMs | "
              "final size (share of max) | samples wasted | restarts | notes |",
              "|---|---|---|---|---|---|---|---|---|"]


def table_rows(runs: list[ToolRun], maxb: dict[str, int], curve: str) -> list[str]:
    """The table's rows of one curve, every tool that ran (ranges over the seeds)."""
    lines = []
    m = maxb[curve]
    ran = list(dict.fromkeys(r.tool for r in runs if r.curve == curve))
    for tool in [t for t in ORDER if t in ran] + [t for t in ran if t not in ORDER]:
        rs = [r for r in runs if r.curve == curve and r.tool == tool]
        finals = [r.final for r in rs]
        shares = [r.share(m) for r in rs]
        final = (f"{_span(finals)} ({_span(shares, lambda s: f'{s:.2f}')})" if any(f is not None for f in finals)
                 else "none")
        if any(f is None for f in finals) and any(f is not None for f in finals):
            final += f"; none in {sum(f is None for f in finals)} of {len(rs)}"
        keys = list(dict.fromkeys(k for r in rs for k in r.brief))
        notes = "; ".join(f"{k}: {_joined([r.brief.get(k, '-') for r in rs])}" for k in keys)
        lines.append(f"| {CURVES[curve].title} ({m}) | {tool} ({_span([r.start for r in rs])}) | "
                     f"{_span([r.probe_steps for r in rs])} | "
                     f"{_span([r.probe_steps if r.steps_to_final is None else r.steps_to_final for r in rs])} | "
                     f"{_span([r.ooms for r in rs])} | {final} | "
                     f"{_span([r.samples_wasted for r in rs], lambda v: f'{v:,}')} | "
                     f"{_span([r.restarts for r in rs])} | {notes} |")
    return lines


def table(runs: list[ToolRun], maxb: dict[str, int], curves: list[str]) -> str:
    return "\n".join(TABLE_HEAD + [line for ck in curves for line in table_rows(runs, maxb, ck)])


def report(runs: list[ToolRun], maxb: dict[str, int], args: argparse.Namespace, versions: dict[str, str],
           missing: list[str]) -> str:
    lines = [f"# batch-size benchmark: {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
             + ", ".join(f"{k} {v}" for k, v in versions.items()),
             f"stand-in GPU: FakeCuda {args.capacity_mib} MiB; N={N}; seeds {', '.join(map(str, args.seed_list))}; "
             f"Lightning init_val {args.lightning_init}, steps_per_trial 3, margin 0.05; Accelerate and HF "
             f"auto_find_batch_size from {args.accelerate_above} and {args.accelerate_below}; looptune global batch "
             f"{args.global_batch}; tools {', '.join(args.tool_list)}",
             ""]
    lines.extend(TABLE_HEAD)
    for ck in args.curve_list:
        m = maxb[ck]
        lines.extend(table_rows(runs, maxb, ck))
        if "looptune" in missing and "looptune" in args.tool_list:
            lines.append(f"| {CURVES[ck].title} ({m}) | looptune | looptune: not available in this checkout "
                         "| | | | | |")
    lines.append("")
    lines.append("Per run (Lightning: sizes x steps per fit; Accelerate: size:steps per attempt, ! = ended in OOM; "
                 "looptune: micro_batch_size@step):")
    for r in runs:
        lines.append(f"- {r.curve} {r.tool} seed {r.seed}: {r.trajectory} ({r.seconds:.1f} s)")
    lines.append("")
    lines.append("Goals (looptune ahead of each peer: share >= the peer's, steps spent probing <= the peer's, "
                 "OOMs by the peer's share <= the peer's OOMs):")
    for peer in (m for m in missing if not m.startswith("looptune")):
        lines.append(f"- not checked against {peer}: not installed here")
    if "looptune" in missing:
        lines.append("- not checked: looptune: not available in this checkout")
    elif "looptune" not in args.tool_list:
        lines.append("- not checked: looptune not run (--tools)")
    elif not any(not r.tool.startswith("looptune") for r in runs):
        lines.append("- not checked: no peer ran")
    for name, ok, value in goals(runs, maxb):
        lines.append(f"- {name}: {'PASS' if ok else 'FAIL'} ({value})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed and shorter looptune caps, a smoke check")
    p.add_argument("--curves", default="straight,jump,padded", help="comma list of straight, jump, padded")
    p.add_argument("--tools", default="lightning,accelerate,looptune", help="comma list of " + ", ".join(TOOLS)
                   + " (the framework rows: hf, looptune-lightning, looptune-hf), or all")
    p.add_argument("--seeds", type=int, default=None, help="runs per tool and curve, data order seeds 1.. "
                   "(default 3; --quick 1)")
    p.add_argument("--capacity-mib", type=int, default=CAPACITY_MIB, help="the stand-in's memory (default 2001)")
    p.add_argument("--lightning-init", type=int, default=2, help="BatchSizeFinder init_val (default 2)")
    p.add_argument("--accelerate-above", type=int, default=4096, help="starting_batch_size above the maximum")
    p.add_argument("--accelerate-below", type=int, default=512, help="starting_batch_size below the maximum")
    p.add_argument("--global-batch", type=int, default=GLOBAL_BATCH, help="looptune's batch per optimizer step")
    p.add_argument("--looptune-steps", type=int, default=None, help="looptune step cap (default 20000; --quick 2000)")
    p.add_argument("--looptune-after", type=int, default=None, help="looptune steps after a micro-batch of 90%% of "
                   "the maximum completed (default one epoch)")
    p.add_argument("--looptune-seconds", type=float, default=60.0, help="looptune time cap (default 60)")
    p.add_argument("--trials-seconds", type=float, default=None, help="the extra looptune run that includes the "
                   "engine's trials lasts at least this long, seed 1 only (default 20; --quick 0: not run)")
    p.add_argument("--json", default="", help="also write the raw figures here")
    args = p.parse_args(argv)
    args.seed_list = list(range(1, 1 + (args.seeds if args.seeds is not None else (1 if args.quick else 3))))
    args.looptune_steps = args.looptune_steps or (2000 if args.quick else 20000)
    if args.trials_seconds is None:
        args.trials_seconds = 0.0 if args.quick else 20.0
    args.curve_list = [c.strip() for c in args.curves.split(",") if c.strip()]
    args.tool_list = [t.strip() for t in args.tools.split(",") if t.strip()]
    if "all" in args.tool_list:
        args.tool_list = list(TOOLS)
    bad = [c for c in args.curve_list if c not in CURVES] + [t for t in args.tool_list if t not in TOOLS]
    if bad:
        p.error(f"unknown curve(s) or tool(s): {bad}")
    torch.set_num_threads(1)
    capacity = args.capacity_mib * MiB

    versions: dict[str, str] = {}
    missing: list[str] = []
    for tool in args.tool_list:
        for module in TOOLS[tool]:
            try:
                versions[module] = __import__(module).__version__
            except ImportError:
                print(f"{tool}: {module} is not installed here; see this script's docstring for its environment",
                      file=sys.stderr)
                missing.append(tool)
                break
    if any(t.startswith("looptune") for t in args.tool_list):
        why = looptune_available()
        if why is not None:
            print(f"looptune: not available in this checkout ({why})", file=sys.stderr, flush=True)
            missing.extend(t for t in args.tool_list if t.startswith("looptune") and t not in missing)
        else:
            import looptune
            versions["looptune"] = looptune.__version__
    ok = [t for t in args.tool_list if t not in missing]
    lit = hf = None
    if {"hf", "looptune-hf", "looptune-lightning"} & set(ok):
        # the framework rows live in batch_size_lightning.py / batch_size_transformers.py, which import
        # this module as `batch_size`: run as a script, this is __main__, so they get this very module
        sys.modules.setdefault("batch_size", sys.modules[__name__])
        if str(Path(__file__).resolve().parent) not in sys.path:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
    if "looptune-lightning" in ok:
        import batch_size_lightning as lit
    if {"hf", "looptune-hf"} & set(ok):
        import batch_size_transformers as hf

    maxb: dict[str, int] = {}
    runs: list[ToolRun] = []

    def done(r: ToolRun) -> None:
        runs.append(r)
        m = maxb[r.curve]
        share = f"{r.final / m:.2f}" if r.final is not None else "-"
        print(f"[{r.curve}] {r.tool} seed {r.seed}: probe steps {r.probe_steps}, OOMs {r.ooms}, final {r.final} "
              f"({share}), wasted {r.samples_wasted}, restarts {r.restarts}, {r.seconds:.1f} s {r.notes}",
              file=sys.stderr, flush=True)

    for ck in args.curve_list:
        curve = CURVES[ck]
        maxb[ck] = maximum(curve, capacity)
        extra = f", longest sample {dataset(curve).longest}" if curve.padded else ""
        print(f"[{ck}] maximum {maxb[ck]} ({curve.detail}{extra})", file=sys.stderr, flush=True)
        for seed in args.seed_list:
            if "lightning" in args.tool_list and "lightning" not in missing:
                for mode in ("power", "binsearch"):
                    done(run_lightning(curve, capacity, mode, seed, args.lightning_init))
            if "accelerate" in args.tool_list and "accelerate" not in missing:
                done(run_accelerate(curve, capacity, args.accelerate_above, seed, "accelerate above"))
                done(run_accelerate(curve, capacity, args.accelerate_below, seed, "accelerate below"))
            if hf is not None and "hf" in ok:
                done(hf.run_hf_auto(curve, capacity, seed, args.accelerate_above, hf.LABEL_ABOVE))
                done(hf.run_hf_auto(curve, capacity, seed, args.accelerate_below, hf.LABEL_BELOW))
            if "looptune" in ok:
                done(run_looptune(curve, capacity, seed, maxb[ck], global_batch=args.global_batch,
                                  max_steps=args.looptune_steps, seconds=args.looptune_seconds,
                                  after_steps=args.looptune_after))
                if args.trials_seconds > 0 and seed == args.seed_list[0]:
                    done(run_looptune(curve, capacity, seed, maxb[ck], global_batch=args.global_batch,
                                      max_steps=10**9, seconds=max(args.looptune_seconds, args.trials_seconds + 30),
                                      after_steps=args.looptune_after, min_seconds=args.trials_seconds,
                                      label=TRIALS_LABEL))
            if lit is not None:
                done(lit.run_looptune_lightning(curve, capacity, seed, maxb[ck], global_batch=args.global_batch,
                                                max_steps=args.looptune_steps, seconds=args.looptune_seconds,
                                                after_steps=args.looptune_after))
            if hf is not None and "looptune-hf" in ok:
                done(hf.run_looptune_hf(curve, capacity, seed, maxb[ck], global_batch=args.global_batch,
                                        max_steps=args.looptune_steps, seconds=args.looptune_seconds,
                                        after_steps=args.looptune_after))

    print(report(runs, maxb, args, versions, missing), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"maximum": maxb, "missing": missing, "runs": [
            {k: v for k, v in vars(r).items()} for r in runs], "goals": goals(runs, maxb)}, indent=1, default=str))
    if missing:
        return 2
    return 0 if all(ok for _, ok, _ in goals(runs, maxb)) else 1


if __name__ == "__main__":
    sys.exit(main())
