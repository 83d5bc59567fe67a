"""LooptuneCallback inside real Lightning Trainers: CPU, tiny models built here, no downloads,
every test bounded in time.

- An input-bound fit (a Dataset that sleeps per item, several short epochs) reaches at least 2x
  the samples/s of the same fit without the callback, every epoch delivering every sample once in
  the untuned order, while a real daemon tunes it and shows it in /metrics and `looptune status`.
- On the stand-in GPU (tests/fakes/fake_cuda.py) the micro-batch split runs inside Lightning's
  closure: the largest fitting micro-batch within a few steps, out-of-memory errors recovered in
  their step, the global batch and the step count unchanged, parameters equal to an unsplit fit.
- The callback's state in a Lightning checkpoint: a resumed fit starts from the tuned setting.
- Two gloo ranks through Lightning's DDP strategy: the rank from the Trainer, every knob change
  (num_workers mid-epoch, grad_compression) applied at the same step on both, each rank's samples
  once in DistributedSampler's order, parameters equal across ranks.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from daemon_proc import ROOT, DaemonPool, Metrics, free_port  # noqa: E402 - tests/conftest.py provides it
from looptune.lightning import LooptuneCallback  # noqa: E402
from tests.fakes.fake_cuda import FakeCuda, MemoryLayer, MiB, straight  # noqa: E402
from tests.tuners.gloo_ranks import assert_split_like_unsplit, params_of, run_ranks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")   # Lightning's advice on workers, logging


# ---- a job that waits for its data ----

class Items(Dataset):
    """Item i is (x=[i], i); `delay` seconds of waiting per item (a read from slow storage)."""

    def __init__(self, n: int, delay: float) -> None:
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.delay:
            time.sleep(self.delay)
        return torch.tensor([float(i)]), i


class Lit(pl.LightningModule):
    """A linear model; records the sample indices of every epoch in the order trained on."""

    def __init__(self, n: int, delay: float, batch: int = 16, workers: int = 0, compute: float = 0.0) -> None:
        super().__init__()
        self.n, self.delay, self.batch, self.workers, self.compute = n, delay, batch, workers, compute
        self.lin = torch.nn.Linear(1, 1)
        self.seen: list[list[int]] = []

    def on_train_epoch_start(self) -> None:
        self.seen.append([])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, idx = batch
        self.seen[-1].extend(int(i) for i in idx)
        if self.compute:
            time.sleep(self.compute)            # the accelerator's share of a step
        # a loss that moves slowly and smoothly: the engine's loss guard judges trials by its trend
        return self.lin(torch.ones_like(x)).pow(2).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Items(self.n, self.delay), batch_size=self.batch, shuffle=True, num_workers=self.workers)


def make_trainer(root: Path, epochs: int, callbacks: list[Any], **kw: Any) -> Any:
    kw = {"accelerator": "cpu", "devices": 1, **kw}
    return pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root),
                      callbacks=callbacks, **kw)


def fit(root: Path, model: Any, epochs: int, callbacks: list[Any] = (), seed: int = 7, **kw: Any) -> Any:  # type: ignore[assignment]
    pl.seed_everything(seed, verbose=False)
    trainer = make_trainer(root, epochs, list(callbacks), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    return trainer


class Clock(pl.Callback):
    """Wall time of every training epoch; `at_epoch_end(epoch)` runs after the epoch is timed."""

    def __init__(self, at_epoch_end: Callable[[int], None] | None = None) -> None:
        self.seconds: list[float] = []
        self.at_epoch_end = at_epoch_end

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.seconds.append(time.perf_counter() - self.t0)
        if self.at_epoch_end is not None:
            self.at_epoch_end(trainer.current_epoch)


def quiet_config(tmp: Path, **hook: Any) -> dict[str, Any]:
    """Embedded, no engine trials (a test drives the decisions), a fresh memory."""
    return {"tuners": {"enabled": [], "state_file": str(tmp / "best.json")},
            "hook": {"report_interval_seconds": 0.2, **hook}}


def decision(knob: str, value: Any, reason: str = "test", trial: bool = False) -> dict[str, Any]:
    return {"id": None, "knob": knob, "value": value, "reason": reason, "tuner": "test", "trial": trial}


# ---- 1. input-bound: 2x, exactly once, in /metrics and `looptune status` ----

# 16 items x 2 ms of reading against 8 ms of compute a step: 4 workers or more make it 4x faster
N_ITEMS, DELAY, COMPUTE, BATCH, EPOCHS = 480, 0.003, 0.010, 16, 12
SPEED_DAEMON = {
    "collectors": {"interval_seconds": 0.2, "gpu": {"enabled": False}, "host": {"enabled": False}},
    "hook": {"report_interval_seconds": 0.2},
    "tuners": {"enabled": ["workers"], "window_seconds": 0.5, "baseline_windows": 2, "measure_windows": 2,
               "settle_windows": 1, "cooldown_windows": 1},
}


def test_input_bound_fit_doubles_samples_per_second_exactly_once_and_shows_in_the_daemon(
        daemons: DaemonPool, short_tmp: Path) -> None:
    run = "lit-speed"
    cfg = {**SPEED_DAEMON, "tuners": {**SPEED_DAEMON["tuners"], "state_file": str(short_tmp / "best.json")}}
    daemon = daemons.start(cfg, socket_path=short_tmp / "d.sock").wait_ready()

    # the untuned run's order (no waiting: the order does not depend on it) and its speed
    reference = Lit(N_ITEMS, 0.0)
    fit(short_tmp, reference, EPOCHS)
    untuned_clock = Clock()
    fit(short_tmp, Lit(N_ITEMS, DELAY, compute=COMPUTE), 2, [untuned_clock])
    untuned = N_ITEMS / (sum(untuned_clock.seconds) / len(untuned_clock.seconds))

    shown: dict[str, Any] = {}
    cb = LooptuneCallback(run=run, socket=str(daemon.socket_path), tune=["workers"])

    def look(epoch: int) -> None:      # while the job runs: the daemon's view of it
        if epoch != 3:
            return
        shown["metrics"] = daemon.wait_until(
            lambda m: m.get("looptune_job_info", run=run, rank="0", world_size="1", pid=str(os.getpid())) == 1
            and (m.get("looptune_job_samples_total", run=run, rank="0") or 0) > 0, f"{run} in /metrics", timeout=10)
        out = subprocess.run([sys.executable, "-m", "looptune", "status", "--socket", str(daemon.socket_path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=30)
        shown["status"] = out

    clock = Clock(look)
    tuned = Lit(N_ITEMS, DELAY, compute=COMPUTE)
    t0 = time.perf_counter()
    fit(short_tmp, tuned, EPOCHS, [cb, clock])
    whole = time.perf_counter() - t0
    hook = cb.hook

    # every epoch: each sample once, in the untuned order, through every change of num_workers
    assert len(tuned.seen) == EPOCHS
    for e in range(EPOCHS):
        assert tuned.seen[e] == reference.seen[e], f"epoch {e} differs from the untuned run"
    applied = [d for d in hook.decisions if d.knob == "num_workers" and d.outcome == "applied"]
    steps_per_epoch = N_ITEMS // BATCH
    assert applied, hook.decisions
    assert any(d.step % steps_per_epoch for d in applied), "no change came mid-epoch"

    rates = [N_ITEMS / s for s in clock.seconds]
    best_late = max(rates[EPOCHS // 2:])
    print(f"\nlightning input-bound: untuned {untuned:.0f} samples/s; tuned per epoch "
          f"{[round(r) for r in rates]}; best of the second half {best_late / untuned:.2f}x; whole tuned fit "
          f"{EPOCHS * N_ITEMS / whole / untuned:.2f}x; num_workers "
          f"{[(d.old, d.new, d.step, d.reason) for d in applied]}; final knobs {hook.knobs}")
    assert best_late >= 2.0 * untuned, (untuned, rates)

    # it was a job like any other for the daemon: /metrics and `looptune status` under its run name
    m: Metrics = shown["metrics"]
    assert m.get("looptune_job_knob", run=run, rank="0", knob="num_workers") is not None
    assert m.get("looptune_job_data_wait_seconds_total", run=run, rank="0") > 0
    out = shown["status"]
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(run)]
    assert len(rows) == 1 and rows[0][1:3] == ["0", str(os.getpid())], out.stdout
    assert hook.mode == "daemon" and hook.errors == 0


# ---- 2. batch size on the stand-in GPU ----

ROWS, BATCHES = 2048, 8


class LitMem(pl.LightningModule):
    """float64 MLP with a MemoryLayer: its activations take stand-in GPU memory."""

    def __init__(self, fake: FakeCuda, curve: Any) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), MemoryLayer(fake, curve),
                                       torch.nn.Linear(16, 1)).to(torch.float64)
        self.calls: list[tuple[int, int]] = []       # (optimizer step, rows) per training_step call
        g = torch.Generator().manual_seed(5)
        self.data = TensorDataset(torch.randn(ROWS * BATCHES, 8, generator=g, dtype=torch.float64),
                                  torch.randn(ROWS * BATCHES, 1, generator=g, dtype=torch.float64))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.calls.append((self.trainer.global_step, int(x.shape[0])))
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=ROWS, shuffle=False)


class OomsAndKnobs(pl.Callback):
    def __init__(self, fake: FakeCuda, cb: LooptuneCallback | None, inject: dict[int, str]) -> None:
        self.fake, self.cb, self.inject = fake, cb, inject
        self.knobs: list[Any] = []
        self.ooms: list[int] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        where = self.inject.get(trainer.global_step)
        if where:
            self.fake.inject(where, 2)          # the second micro-batch of this step runs out of memory

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ooms.append(self.fake.ooms)
        if self.cb is not None:
            self.knobs.append(self.cb.hook.knobs.get("micro_batch_size"))


def test_stand_in_gpu_micro_batches_inside_lightning_equal_an_unsplit_fit(tmp_path: Path) -> None:
    curve = straight(MiB // 2)
    with FakeCuda(10**12) as big:                      # the unsplit fit: everything fits
        ref = LitMem(big, curve)
        fit(tmp_path, ref, 2)
    assert {rows for _, rows in ref.calls} == {ROWS}

    with FakeCuda(1000 * MiB) as fake:
        fake.alloc(100 * MiB)                            # what the model and its optimizer would hold
        best = 900                                       # (1000 - 100) MiB / (0.5 MiB of activations + 0.5 of backward)
        cb = LooptuneCallback(run="lit-mb", socket=str(tmp_path / "none.sock"), tune=["batch_size"],
                              config=quiet_config(tmp_path))
        inject = {7: "forward", 10: "backward", 13: "forward"}          # after the fit: sizes that ran before
        probe = OomsAndKnobs(fake, cb, inject)
        split = LitMem(fake, curve)
        trainer = fit(tmp_path, split, 2, [cb, probe])

    hook = cb.hook
    assert trainer.global_step == 2 * BATCHES and not hook.disabled and hook.errors == 0
    assert trainer.train_dataloader.batch_size == ROWS          # the global batch is the loader's, unchanged
    first_good = next(i for i, v in enumerate(probe.knobs) if isinstance(v, int) and v >= 0.9 * best)
    assert first_good < 6, (probe.knobs, best)
    assert max(probe.knobs) <= best
    assert hook.microbatcher.recoveries >= len(inject) and fake.ooms >= len(inject)
    # each step's micro-batches cover its batch: exactly once where no error struck
    per_step: dict[int, list[int]] = {}
    for step, rows in split.calls:
        per_step.setdefault(step, []).append(rows)
    assert sorted(per_step) == list(range(2 * BATCHES))
    for step, rows in per_step.items():
        assert max(rows) < ROWS
        if step not in inject:
            assert sum(rows) == ROWS, (step, rows)
    rels = [float((a - b).abs().max() / a.abs().max()) for a, b in zip(ref.net.parameters(), split.net.parameters())]
    print(f"\nlightning stand-in GPU: micro_batch_size per step {probe.knobs} (largest that fits {best}; >= 90% "
          f"after step {first_good + 1}); OOMs {fake.ooms}, recovered {hook.microbatcher.recoveries}; "
          f"parameters vs unsplit: max relative difference {max(rels):.1e}")
    assert max(rels) < 1e-9, rels
    assert hook.report()["counters"]["oom_recoveries"] == hook.microbatcher.recoveries


def test_no_split_where_lightning_accumulates_or_the_module_steps_itself(tmp_path: Path) -> None:
    class Manual(LitMem):
        def __init__(self, fake: FakeCuda, curve: Any) -> None:
            super().__init__(fake, curve)
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            opt = self.optimizers()
            opt.zero_grad()
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            opt.step()
            return loss

    with FakeCuda(10**12) as fake:
        for make, kw, why in ((LitMem, {"accumulate_grad_batches": 2}, "accumulate_grad_batches"),
                              (Manual, {}, "manual optimization")):
            cb = LooptuneCallback(run="lit-nosplit", socket=str(tmp_path / "none.sock"), tune=["batch_size"],
                                  config=quiet_config(tmp_path))
            model = make(fake, straight(MiB))
            fit(tmp_path, model, 1, [cb], limit_train_batches=4, **kw)
            assert why in cb.hook.untunable["micro_batch_size"]
            assert {rows for _, rows in model.calls} == {ROWS}
            assert cb.hook.counters["steps"] == (2 if kw else 4)     # once per optimizer step


# ---- 3. checkpoints ----

class Decide(pl.Callback):
    """Hands the hook decisions at given global steps, as the engine or the daemon would."""

    def __init__(self, cb: LooptuneCallback, plan: dict[int, list[dict[str, Any]]]) -> None:
        self.cb, self.plan = cb, plan

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        for d in self.plan.get(trainer.global_step, []):
            self.cb.hook._queue_decision(d)


class FirstKnobs(pl.Callback):
    def __init__(self, cb: LooptuneCallback) -> None:
        self.cb = cb
        self.knobs: dict[str, Any] | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.knobs is None:
            self.knobs = dict(self.cb.hook.knobs)


def test_a_resumed_fit_starts_from_the_tuned_setting(tmp_path: Path) -> None:
    n = 256
    cb = LooptuneCallback(run="lit-ckpt", socket=str(tmp_path / "none.sock"), tune=["workers"],
                          config=quiet_config(tmp_path))
    plan = {3: [decision("num_workers", 2, "trial", trial=True)], 6: [decision("num_workers", 2, "kept: +40%")],
            10: [decision("num_workers", 3, "trial", trial=True)]}          # in flight when the fit ends
    first = Lit(n, 0.0)
    trainer = fit(tmp_path, first, 1, [cb, Decide(cb, plan)])
    assert cb.hook.knobs["num_workers"] == 3
    path = tmp_path / "after-epoch-0.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"][cb.state_key]
    assert state["knobs"]["num_workers"] == 2                 # the trial in flight is saved at its old value
    assert state["remembered"] == {"num_workers": 2}
    assert state["run"] == "lit-ckpt" and state["signature"] == cb.hook.signature

    def resume(callbacks: list[Any]) -> Lit:
        model = Lit(n, 0.0)
        pl.seed_everything(11, verbose=False)
        t = make_trainer(tmp_path, 2, callbacks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.fit(model, ckpt_path=str(path))
        return model

    plain = resume([])
    cb2 = LooptuneCallback(run="lit-ckpt", socket=str(tmp_path / "none.sock"), tune=["workers"],
                           config={**quiet_config(tmp_path), "tuners": {"enabled": [],
                                                                        "state_file": str(tmp_path / "best2.json")}})
    seen = FirstKnobs(cb2)
    resumed = resume([cb2, seen])
    assert seen.knobs is not None and seen.knobs["num_workers"] == 2     # from the resumed fit's first batch
    assert [(d.knob, d.old, d.new, d.outcome) for d in cb2.restored] == [("num_workers", 0, 2, "applied")]
    assert resumed.seen == plain.seen and len(resumed.seen) == 1 and sorted(resumed.seen[0]) == list(range(n))
    import json
    memory = json.loads((tmp_path / "best2.json").read_text())
    assert memory == {f"{os.getuid()}|lit-ckpt|{cb2.hook.signature}": {"num_workers": 2}}


def test_reloaded_loaders_keep_the_tuned_workers_and_the_order(tmp_path: Path) -> None:
    n = 128
    reference = Lit(n, 0.0)
    fit(tmp_path, reference, 4, reload_dataloaders_every_n_epochs=1)
    cb = LooptuneCallback(run="lit-reload", socket=str(tmp_path / "none.sock"), tune=["workers"],
                          config=quiet_config(tmp_path))
    model = Lit(n, 0.0)
    fit(tmp_path, model, 4, [cb, Decide(cb, {2: [decision("num_workers", 2)]})], reload_dataloaders_every_n_epochs=1)
    assert model.seen == reference.seen
    assert cb.hook.knobs["num_workers"] == 2 and cb.hook.errors == 0


# ---- 4. two gloo ranks through Lightning's DDP strategy ----

DDP_N, DDP_EPOCHS, DDP_TIMEOUT = 192, 2, 120
DDP_PLAN = {2: [decision("num_workers", 2)], 3: [decision("grad_compression", "fp16")],
            7: [decision("grad_compression", "powersgd")], 9: [decision("num_workers", 0)],
            13: [decision("grad_compression", "none"), decision("num_workers", 1)]}


def ddp_rank(port: int) -> Callable[..., dict[str, Any]]:
    def main(rank: int, store: str, tmp: str, results: Any) -> dict[str, Any]:
        from lightning.pytorch.strategies import DDPStrategy
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                          LOCAL_RANK=str(rank))
        os.environ.pop("RANK", None)
        torch.set_num_threads(1)
        root = Path(tmp)
        # made before the process group exists: rank and sync come from the Trainer once it does
        cb = LooptuneCallback(run="lit-ddp", socket=str(root / f"none-{rank}.sock"),
                              tune=["workers", "compression"],
                              config=quiet_config(root / f"r{rank}", sync_every_steps=2))
        (root / f"r{rank}").mkdir(exist_ok=True)
        if rank == 1:
            assert cb.hook.rank == 0        # its hook made now, before the group: RANK is not set yet
        callbacks: list[Any] = [cb]
        if rank == 0:
            callbacks.append(Decide(cb, DDP_PLAN))
        model = Lit(DDP_N, 0.0, batch=8)
        trainer = fit(root, model, DDP_EPOCHS, callbacks, seed=3, devices=2,
                      strategy=DDPStrategy(process_group_backend="gloo"))
        hook = cb.hook
        return {"rank": rank, "trainer_rank": trainer.global_rank, "hook_rank": hook.rank,
                "world": hook.world_size, "sync_every": hook._sync.every,
                "decisions": [(d.knob, d.new, d.step, d.outcome) for d in hook.decisions],
                "knobs": dict(hook.knobs), "seen": model.seen, "errors": hook.errors,
                "comm_bytes": hook.meter.comm_bytes,
                "params": [p.detach().tolist() for p in model.parameters()]}
    return main


def test_two_gloo_ranks_through_lightning_ddp_agree_on_every_knob_change() -> None:
    got = run_ranks(ddp_rank(free_port()), 2, DDP_TIMEOUT, prefix="lt-lit-ddp-")
    r0, r1 = got[0], got[1]
    for r, res in got.items():
        assert (res["trainer_rank"], res["hook_rank"], res["world"]) == (r, r, 2)
        assert res["sync_every"] == 2 and res["errors"] == 0
    # every change at the same step on both ranks, all applied
    assert r0["decisions"] == r1["decisions"]
    changes = [(k, v) for k, v, _, outcome in r0["decisions"] if outcome == "applied"]
    assert changes == [("num_workers", 2), ("grad_compression", "fp16"), ("grad_compression", "powersgd"),
                       ("num_workers", 0), ("grad_compression", "none"), ("num_workers", 1)], r0["decisions"]
    assert r0["knobs"]["grad_compression"] == r1["knobs"]["grad_compression"] == "none"
    assert r0["comm_bytes"] > 0
    assert r0["params"] == r1["params"]
    # each rank's samples: once per epoch, in the order of Lightning's DistributedSampler
    ds = Items(DDP_N, 0.0)
    for r, res in got.items():
        sampler = DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=3)
        for e in range(DDP_EPOCHS):
            sampler.set_epoch(e)
            assert res["seen"][e] == list(sampler), (r, e)


def ddp_split_rank(port: int, split: bool) -> Callable[..., dict[str, Any]]:
    """One rank of a 2-rank DDP fit of LitMem on its own stand-in GPU; `split`: with the callback
    (micro-batches, an out-of-memory error on rank 1 at step 3), else unsplit on a big one."""
    def main(rank: int, store: str, tmp: str, results: Any) -> dict[str, Any]:
        from lightning.pytorch.strategies import DDPStrategy
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                          LOCAL_RANK=str(rank))
        os.environ.pop("RANK", None)
        torch.set_num_threads(1)
        root = Path(tmp) / f"r{rank}"
        root.mkdir(exist_ok=True)
        fake = FakeCuda(1000 * MiB if split else 10**12).install()
        fake.alloc(100 * MiB)
        callbacks: list[Any] = []
        cb = None
        if split:
            cb = LooptuneCallback(run="lit-ddp-mb", socket=str(root / "none.sock"),
                                  tune=["batch_size", "compression"], config=quiet_config(root, sync_every_steps=2))
            callbacks = [cb, OomsAndKnobs(fake, cb, {3: "backward"} if rank == 1 else {})]
        model = LitMem(fake, straight(MiB // 2))
        fit(root, model, 1, callbacks, seed=3, devices=2, strategy=DDPStrategy(process_group_backend="gloo"))
        out = {"rank": rank, "params": params_of(model.net),
               "rows": sorted({r for _, r in model.calls}), "ooms": fake.ooms}
        if cb is not None:
            out.update(knob=cb.hook.knobs.get("micro_batch_size"), recoveries=cb.hook.microbatcher.recoveries,
                       errors=cb.hook.errors)
        return out
    return main


def test_two_gloo_ranks_split_micro_batches_inside_lightning_ddp_like_an_unsplit_fit() -> None:
    ref = run_ranks(ddp_split_rank(free_port(), False), 2, DDP_TIMEOUT, prefix="lt-lit-ddp-ref-")
    got = run_ranks(ddp_split_rank(free_port(), True), 2, DDP_TIMEOUT, prefix="lt-lit-ddp-mb-")
    assert_split_like_unsplit(ref, got, ROWS)          # an OOM on rank 1, recovered; equal to the unsplit fit
