"""looptune.transformers.LooptuneCallback in a real `transformers.Trainer`: CPU, tiny models built
here (a dict with `loss`, as the Trainer expects), no downloads; every run is bounded.

- workers mid-epoch through Accelerate's DataLoaderShard, and at epoch boundaries for a plain
  DataLoader: every sample once, in the order of the same run without the callback;
- an input-bound run (items that sleep) at least 2x the samples/s of the same run without the
  callback, tuned by a real daemon, its job in /metrics and `looptune status` under the run name;
- micro-batches on the stand-in GPU (tests/fakes/fake_cuda.py): the largest fitting micro-batch
  within a few steps, out-of-memory errors recovered in the step, the global batch unchanged and the
  parameters those of the unsplit run;
- the callback's state in the Trainer's checkpoint: a resumed run starts from the tuned setting;
- two gloo ranks through the Trainer's DDP-wrapped model: every knob change on both at the same step;
  and the same two ranks splitting their per-device batches into micro-batches, an out-of-memory
  error on one rank recovered in its step, parameters equal to an unsplit 2-rank run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch.utils.data import DataLoader, Dataset  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from daemon_proc import ROOT, DaemonPool, Metrics  # noqa: E402
from looptune.transformers import LooptuneCallback  # noqa: E402
from tests.fakes.fake_cuda import FakeCuda, MemoryLayer, MiB, straight  # noqa: E402
from tests.tuners.gloo_ranks import assert_split_like_unsplit, params_of, run_ranks  # noqa: E402

DIM = 4


class Items(Dataset):
    """Item i: x (DIM,), labels (1,), ids i; `delay` seconds of sleep per item (storage latency)."""

    def __init__(self, n: int, delay: float = 0.0, dtype: Any = torch.float32) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, DIM, generator=g, dtype=torch.float64).to(dtype)
        self.y = torch.randn(n, 1, generator=g, dtype=torch.float64).to(dtype)
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.delay:
            time.sleep(self.delay)
        return {"x": self.x[i], "labels": self.y[i], "ids": torch.tensor(i)}


class Tiny(torch.nn.Module):
    """Linear -> tanh -> [MemoryLayer] -> Linear, MSE; records the ids it trains on."""

    def __init__(self, memory: Any = None, dtype: Any = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(DIM, 16)
        self.mem = memory
        self.out = torch.nn.Linear(16, 1)
        self.to(dtype)
        self.seen: list[int] = []
        self.rows: list[int] = []           # rows of every training forward

    def forward(self, x: Any, labels: Any = None, ids: Any = None) -> dict[str, Any]:
        if self.training:
            self.rows.append(int(x.shape[0]))
        if self.training and ids is not None:
            self.seen.extend(ids.tolist())
        h = torch.tanh(self.inp(x))
        if self.mem is not None:
            h = self.mem(h)
        out = self.out(h)
        loss = torch.nn.functional.mse_loss(out, labels) if labels is not None else None
        return {"loss": loss, "logits": out}


def training_args(out: Path, **kw: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=1,
                                learning_rate=0.05, logging_strategy="no", save_strategy="no", report_to="none",
                                disable_tqdm=True, use_cpu=True, seed=0, remove_unused_columns=False,
                                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def callback(tmp: Path, run: str, tune: Any = False, **hook_cfg: Any) -> LooptuneCallback:
    """Embedded (nothing listens on its socket), no engine trials unless `tune` names tuners."""
    cfg = {"tuners": {"state_file": str(tmp / "best.json"), "enabled": []},
           "hook": {"report_interval_seconds": 0.2, **hook_cfg}}
    return LooptuneCallback(run=run, socket=str(tmp / "nobody.sock"), tune=tune, config=cfg)


class Queue(TrainerCallback):
    """Hands knob changes to a callback's hook after given optimizer steps, as the reporter thread
    would; listed before the LooptuneCallback, so its hook.step applies them at that same step."""

    def __init__(self, cb: LooptuneCallback, changes: dict[int, list[tuple[str, Any]]]) -> None:
        self.cb, self.changes = cb, changes

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for knob, value in self.changes.get(state.global_step, []):
            self.cb.hook._queue_decision({"id": None, "knob": knob, "value": value, "reason": "test",
                                          "tuner": "test"})


class Epochs(TrainerCallback):
    """Samples and seconds of each epoch (on_epoch_begin to on_epoch_end)."""

    def __init__(self, per_epoch: int) -> None:
        self.per_epoch = per_epoch
        self.rates: list[float] = []
        self.t0 = 0.0

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.t0 = time.perf_counter()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rates.append(self.per_epoch / (time.perf_counter() - self.t0))


def train(out: Path, ds: Dataset, callbacks: list[Any], model: Any = None, trainer_cls: Any = Trainer,
          optimizers: Any = (None, None), resume: Any = None, **kw: Any) -> tuple[Trainer, Tiny]:
    model = model if model is not None else Tiny()
    trainer = trainer_cls(model=model, args=training_args(out, **kw), train_dataset=ds, callbacks=callbacks,
                          optimizers=optimizers)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def epochs_of(seen: list[int], n: int) -> list[list[int]]:
    return [seen[i:i + n] for i in range(0, len(seen), n)]


@pytest.fixture
def callbacks() -> Any:
    made: list[LooptuneCallback] = []
    yield made
    for cb in made:
        cb.close()


# ---- workers: mid-epoch, and at epoch boundaries ----

def test_workers_change_mid_epoch_every_sample_once_in_the_untuned_order(tmp_path: Path, callbacks: list) -> None:
    n, epochs = 60, 3                               # 15 steps of 4 per epoch
    _, base = train(tmp_path / "a", Items(n), [], num_train_epochs=epochs)
    cb = callback(tmp_path, "hf-order")
    callbacks.append(cb)
    changes = {3: [("num_workers", 2)], 7: [("prefetch_factor", 4)], 9: [("num_workers", 3)],
               18: [("num_workers", 0)], 22: [("num_workers", 2)], 40: [("num_workers", 1)]}
    _, tuned = train(tmp_path / "b", Items(n), [Queue(cb, changes), cb], num_train_epochs=epochs)
    assert cb.loader_mode == "mid-epoch"
    assert [(d.knob, d.new, d.outcome) for d in cb.hook.decisions] == \
        [(k, v, "applied") for s in sorted(changes) for k, v in changes[s]]
    assert [d.step for d in cb.hook.decisions] == [s for s in sorted(changes) for _ in changes[s]]
    got, want = epochs_of(tuned.seen, n), epochs_of(base.seen, n)
    assert len(got) == epochs and all(sorted(e) == list(range(n)) for e in got)   # each sample once per epoch
    assert got == want                                                           # in the untuned order
    assert want[0] != want[1]                                                    # (the order is shuffled)
    assert cb.hook.counters["samples"] == n * epochs and cb.hook.counters["steps"] == n * epochs // 4
    assert cb.hook.knobs["num_workers"] == 1 and cb.hook.knobs["batch_size"] == 4
    assert cb.hook.errors == 0 and not cb.hook.disabled


class PlainLoaderTrainer(Trainer):
    """A Trainer whose train loader is a plain DataLoader (no Accelerate DataLoaderShard)."""

    def get_train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(7)
        return DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size, shuffle=True,
                          generator=g, collate_fn=self.data_collator)


def test_a_plain_train_loader_changes_workers_at_epoch_boundaries(tmp_path: Path, callbacks: list) -> None:
    n, epochs = 40, 3                               # 10 steps per epoch
    _, base = train(tmp_path / "a", Items(n), [], trainer_cls=PlainLoaderTrainer, num_train_epochs=epochs)
    cb = callback(tmp_path, "hf-epochs")
    callbacks.append(cb)
    workers: list[int] = []

    class Look(TrainerCallback):
        def on_epoch_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None,
                           **kwargs: Any) -> None:
            workers.append(train_dataloader.num_workers)

    changes = {4: [("num_workers", 2)], 15: [("num_workers", 0), ("prefetch_factor", 3)]}
    _, tuned = train(tmp_path / "b", Items(n), [Queue(cb, changes), cb, Look()], trainer_cls=PlainLoaderTrainer,
                     num_train_epochs=epochs)
    assert cb.loader_mode == "epoch"
    assert [(d.knob, d.new, d.outcome) for d in cb.hook.decisions] == \
        [("num_workers", 2, "applied"), ("num_workers", 0, "applied"), ("prefetch_factor", 3, "applied")]
    assert workers == [0, 2, 0]                     # each change from the next epoch on
    assert epochs_of(tuned.seen, n) == epochs_of(base.seen, n)
    c = cb.hook.counters
    assert c["samples"] == n * epochs and c["steps"] == n * epochs // 4 and c["data_wait_seconds"] > 0


# ---- an input-bound run, tuned by a real daemon ----

DAEMON_CONFIG = {
    "collectors": {"interval_seconds": 0.2, "gpu": {"enabled": False}, "host": {"enabled": False}},
    "hook": {"report_interval_seconds": 0.1},
    "tuners": {"enabled": ["workers"], "window_seconds": 0.3, "baseline_windows": 2, "measure_windows": 2,
               "settle_windows": 1, "cooldown_windows": 1},
}


class SameItems(Items):
    """Every item the same x and label: every step's loss is the same (with learning_rate 0), so the
    engine's loss guard, which reads one step's loss per window, judges throughput trials alone."""

    def __init__(self, n: int, delay: float) -> None:
        super().__init__(n, delay)
        self.x[:] = self.x[0]
        self.y[:] = self.y[0]


def test_an_input_bound_run_is_twice_as_fast_and_shows_in_the_daemon(daemons: DaemonPool, tmp_path: Path,
                                                                    callbacks: list) -> None:
    n, delay, batch, epochs = 256, 0.008, 8, 5      # ~2.3 s an epoch untuned: storage latency per item
    config = dict(DAEMON_CONFIG, tuners=dict(DAEMON_CONFIG["tuners"], state_file=str(tmp_path / "best.json")))
    daemon = daemons.start(config).wait_ready()
    base_epochs = Epochs(n)
    t0 = time.perf_counter()
    kw = dict(per_device_train_batch_size=batch, num_train_epochs=epochs, learning_rate=0.0)
    train(tmp_path / "a", SameItems(n, delay), [base_epochs], **kw)
    base_s = time.perf_counter() - t0
    cb = LooptuneCallback(run="hf-input", socket=str(daemon.socket_path), tune=["workers"])
    callbacks.append(cb)
    assert cb.hook.mode == "daemon"
    tuned_epochs = Epochs(n)
    t0 = time.perf_counter()
    train(tmp_path / "b", SameItems(n, delay), [cb, tuned_epochs], **kw)
    tuned_s = time.perf_counter() - t0
    base_rate = sorted(base_epochs.rates)[len(base_epochs.rates) // 2]          # the median epoch
    last = 2 / sum(1 / r for r in tuned_epochs.rates[-2:])                       # samples/s over the last two
    ratio = last / base_rate
    kept = [(d.knob, d.old, d.new, d.reason[:60]) for d in cb.hook.decisions if d.outcome == "applied"]
    print(f"\nsamples/s: untuned median epoch {base_rate:.0f}, tuned last two epochs {last:.0f} (x{ratio:.2f}); "
          f"whole runs {base_s:.1f} s vs {tuned_s:.1f} s; epochs untuned {[round(r) for r in base_epochs.rates]}, "
          f"tuned {[round(r) for r in tuned_epochs.rates]}; changes {kept}")
    assert ratio >= 2.0, (base_epochs.rates, tuned_epochs.rates, kept)
    assert cb.hook.knobs["num_workers"] >= 2

    total = n * epochs

    def shown(m: Metrics) -> bool:
        return m.get("looptune_job_samples_total", run="hf-input", rank="0") == total and \
            m.get("looptune_job_optimizer_steps_total", run="hf-input", rank="0") == total // batch and \
            m.get("looptune_job_knob", run="hf-input", rank="0", knob="num_workers") == cb.hook.knobs["num_workers"]
    m = daemon.wait_until(shown, "the Trainer's job under run=hf-input", timeout=10)
    assert m.get("looptune_job_data_wait_seconds_total", run="hf-input", rank="0") > 0
    assert m.get("looptune_job_knob", run="hf-input", rank="0", knob="batch_size") == batch
    out = subprocess.run([sys.executable, "-m", "looptune", "status", "--socket", str(daemon.socket_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("hf-input")]
    assert len(rows) == 1 and rows[0][1:3] == ["0", str(os.getpid())], out.stdout


# ---- batch size: micro-batches on the stand-in GPU ----

def largest_fitting(capacity: int, base: int, per_row: int, factor: float = 2.0) -> int:
    """Rows of the largest micro-batch whose activations plus the backward's workspace fit."""
    return int((capacity - base) // (per_row * factor))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_micro_batches_on_the_stand_in_gpu_keep_the_global_batch_and_the_parameters(
        tmp_path: Path, callbacks: list, accumulation: int) -> None:
    n, batch, steps = 2048, 256 // accumulation, 8          # 8 optimizer steps of 256 rows
    capacity, base, per_row = 1000 * MiB, 100 * MiB, 8 * MiB
    best = largest_fitting(capacity, base, per_row)          # 56 rows
    kw = dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=steps,
              learning_rate=0.01)

    def run(fake: FakeCuda, cbs: list[Any]) -> tuple[Trainer, Tiny]:
        fake.alloc(base)                                     # what the model and its optimizer would hold
        model = Tiny(MemoryLayer(fake, straight(per_row)), dtype=torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        with fake:
            return train(tmp_path / f"r{len(cbs)}", Items(n, dtype=torch.float64), cbs, model=model,
                         optimizers=(opt, None), **kw)

    ref_trainer, ref = run(FakeCuda(10**15), [])             # unsplit: room for any batch
    cb = callback(tmp_path, f"hf-mb-{accumulation}", tune=["batch_size"])
    callbacks.append(cb)
    knobs: list[Any] = []

    class Knob(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            knobs.append(cb.hook.knobs.get("micro_batch_size"))
            if state.global_step == 5:
                # an out-of-memory error inside a later step: with accumulation, in its second batch
                # (3 micro-batches of the first batch before it), where the first batch's gradients are held
                fake.inject("backward", 2 if accumulation == 1 else 5)

    fake = FakeCuda(capacity)
    trainer, tuned = run(fake, [cb, Knob()])
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(tuned.parameters(), ref.parameters()))
    print(f"\nmicro_batch_size per step {knobs} (largest fit {best}); OOMs {fake.ooms}, recovered "
          f"{cb.hook.meter.oom_recoveries}; forwards' rows {len(tuned.seen)} vs unsplit {len(ref.seen)}; "
          f"largest parameter difference {diff:.2e}")
    assert trainer.state.global_step == steps                # no restart, no step lost
    assert trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps == 256
    assert cb.hook.meter.oom_recoveries >= 1 and fake.ooms >= 1
    first = next(k for k, v in enumerate(knobs) if isinstance(v, int) and v >= 0.9 * best)
    assert first <= 5, knobs                                 # 90% of the largest fit within 6 steps
    assert max(v for v in knobs if isinstance(v, int)) <= best
    assert set(tuned.seen) == set(ref.seen) and len(tuned.seen) > len(ref.seen)   # redone micro-batches
    for p, q in zip(tuned.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-9), (p - q).abs().max()
    assert cb.hook.errors == 0


def test_without_a_device_the_trainer_step_is_its_own(tmp_path: Path, callbacks: list) -> None:
    cb = callback(tmp_path, "hf-nocuda", tune=["batch_size"])
    callbacks.append(cb)
    _, ref = train(tmp_path / "a", Items(32), [], num_train_epochs=1)
    _, model = train(tmp_path / "b", Items(32), [cb], num_train_epochs=1)
    assert "no CUDA" in cb.hook.untunable["micro_batch_size"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


# ---- checkpoints ----

@pytest.mark.parametrize("restore_flag", [False, True])
def test_a_resumed_run_starts_from_the_tuned_setting(tmp_path: Path, callbacks: list, restore_flag: bool) -> None:
    n = 48                                            # 12 steps an epoch
    cb = callback(tmp_path, "hf-ckpt")
    callbacks.append(cb)
    kw = dict(num_train_epochs=2, save_strategy="steps", save_steps=6,
              restore_callback_states_from_checkpoint=restore_flag)
    train(tmp_path / "out", Items(n), [Queue(cb, {2: [("num_workers", 2)], 9: [("num_workers", 3)]}), cb], **kw)
    saved = json.loads((tmp_path / "out" / "checkpoint-6" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["LooptuneCallback"]["attributes"]["looptune_state"]["knobs"]["num_workers"] == 2
    cb.close()

    cb2 = callback(tmp_path, "hf-ckpt")
    callbacks.append(cb2)
    at_start: list[Any] = []

    class First(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not at_start:
                at_start.append((state.global_step, dict(cb2.hook.knobs)))

    trainer, _ = train(tmp_path / "out", Items(n), [cb2, First()], resume=str(tmp_path / "out" / "checkpoint-6"), **kw)
    assert trainer.state.global_step == 24
    assert at_start[0][0] == 7 and at_start[0][1]["num_workers"] == 2
    restored = [d for d in cb2.hook.decisions if d.reason == "restored from a checkpoint"]
    assert [(d.knob, d.old, d.new, d.outcome) for d in restored] == [("num_workers", 0, 2, "applied")]
    assert cb2 in trainer.callback_handler.callbacks         # the live callback, not a copy made from the file


# ---- two gloo ranks through the Trainer's DDP ----

SETTINGS = ("none", "fp16", "bf16", "powersgd")


def ddp_rank_env(rank: int, port: int) -> None:
    """A forked rank of the Trainer's own DDP: torchrun's variables, Accelerate's state forgotten."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)    # the parent's single-process state
    GradientState._reset_state()
    import torch.distributed as dist
    assert not dist.is_initialized()


def ddp_main(port: int, steps: int) -> Callable[..., dict[str, Any]]:
    def main(rank: int, store: str, tmp: str, results: Any) -> dict[str, Any]:
        ddp_rank_env(rank, port)
        # made before the process group exists: its rank comes from the Trainer
        # (tune names a tuner: a hook that tunes nothing syncs no decisions across ranks)
        cb = callback(Path(tmp), "hf-ddp", tune=["compression"], sync_every_steps=1)
        seen: list[Any] = []
        import random
        rng = random.Random(5)

        class Switch(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if rank == 0 and state.global_step % 2 == 0:
                    usable = [s for s in SETTINGS if s not in cb.hook.comm.unusable]
                    cb.hook._queue_decision({"id": None, "knob": "grad_compression", "value": rng.choice(usable),
                                             "reason": "test", "tuner": "test"})
                workers = {3: 2, 11: 1}.get(state.global_step)
                if rank == 0 and workers is not None:
                    cb.hook._queue_decision({"id": None, "knob": "num_workers", "value": workers,
                                             "reason": "test", "tuner": "test"})

        class Look(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                seen.append((state.global_step, cb.hook.knobs.get("grad_compression"),
                             cb.hook.knobs.get("num_workers")))

        model = Tiny()
        trainer = Trainer(model=model, args=training_args(Path(tmp) / f"out{rank}", max_steps=steps,
                                                          ddp_backend="gloo", ddp_timeout=60),
                          train_dataset=Items(256), callbacks=[Switch(), cb, Look()])
        trainer.train()
        result = {"rank": rank, "seen": seen, "world": (cb.hook.rank, cb.hook.world_size),
                  "ddp": type(trainer.model_wrapped).__name__, "errors": cb.hook.errors,
                  "decisions": [(d.step, d.knob, d.new, d.outcome) for d in cb.hook.decisions],
                  "samples": cb.hook.counters["samples"], "mode": cb.loader_mode,
                  "params": params_of(model)}
        cb.close()
        return result
    return main


def test_two_ranks_through_the_trainers_ddp_agree_on_every_change() -> None:
    from daemon_proc import free_port
    steps = 16
    got = run_ranks(ddp_main(free_port(), steps), 2, 120, prefix="lt-hf-ddp-")
    assert got[0]["ddp"] == "DistributedDataParallel" and got[0]["mode"] == "mid-epoch"
    assert [got[r]["world"] for r in (0, 1)] == [(0, 2), (1, 2)]
    assert got[0]["seen"] == got[1]["seen"] and len(got[0]["seen"]) == steps      # the same knobs at every step
    assert got[0]["decisions"] == got[1]["decisions"]
    assert len({s[1] for s in got[0]["seen"]}) >= 2                                # compression did switch
    assert {s[2] for s in got[0]["seen"]} == {0, 2, 1}                             # and so did the workers
    assert got[0]["params"] == got[1]["params"]
    # counted as Accelerate's DataLoaderShard fetches them: one batch ahead of the steps mid-epoch
    assert got[0]["samples"] == got[1]["samples"] == (steps + 1) * 4
    assert got[0]["errors"] == got[1]["errors"] == 0


DDP_MB_BATCH, DDP_MB_STEPS, DDP_MB_OOM_AFTER = 256, 8, 4     # per-device batch; the OOM in step 5, on rank 1


def ddp_split_main(port: int, split: bool) -> Callable[..., dict[str, Any]]:
    """One rank of the Trainer's own 2-rank DDP on its own stand-in GPU (float64, SGD with momentum):
    `split`, with the callback (micro-batches of at most 56 rows; an out-of-memory error in the
    backward of rank 1's second micro-batch of step 5), else unsplit without it on a big stand-in."""
    def main(rank: int, store: str, tmp: str, results: Any) -> dict[str, Any]:
        ddp_rank_env(rank, port)
        root = Path(tmp) / f"r{rank}-{split}"
        root.mkdir()
        fake = FakeCuda(1000 * MiB if split else 10**15).install()
        fake.alloc(100 * MiB)                       # what the model and its optimizer would hold
        model = Tiny(MemoryLayer(fake, straight(8 * MiB)), dtype=torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        cbs: list[Any] = []
        cb = None
        if split:
            cb = callback(root, "hf-ddp-mb", tune=["batch_size", "compression"], sync_every_steps=2)

            class Inject(TrainerCallback):
                def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                    if rank == 1 and state.global_step == DDP_MB_OOM_AFTER:
                        fake.inject("backward", 2)

            cbs = [cb, Inject()]
        n = 2 * DDP_MB_BATCH * DDP_MB_STEPS
        trainer = Trainer(model=model, args=training_args(root / "out", per_device_train_batch_size=DDP_MB_BATCH,
                                                          max_steps=DDP_MB_STEPS, learning_rate=0.01,
                                                          ddp_backend="gloo", ddp_timeout=60),
                          train_dataset=Items(n, dtype=torch.float64), callbacks=cbs, optimizers=(opt, None))
        trainer.train()
        out = {"rank": rank, "params": params_of(model), "rows": sorted(set(model.rows)), "ooms": fake.ooms,
               "seen": sorted(set(model.seen)), "forwarded": sum(model.rows), "steps": trainer.state.global_step,
               "ddp": type(trainer.model_wrapped).__name__}
        if cb is not None:
            hook = cb.hook
            out.update(knob=hook.knobs.get("micro_batch_size"), recoveries=hook.microbatcher.recoveries,
                       counted=hook.report()["counters"]["oom_recoveries"], errors=hook.errors,
                       untunable=dict(hook.untunable), batch=hook.knobs.get("batch_size"),
                       world=(hook.rank, hook.world_size), ddp_hooked=hook.microbatcher.ddp is not None)
            cb.close()
        fake.uninstall()
        return out
    return main


def test_two_ranks_split_micro_batches_in_the_trainers_ddp_like_an_unsplit_run() -> None:
    from daemon_proc import free_port
    ref = run_ranks(ddp_split_main(free_port(), False), 2, 120, prefix="lt-hf-ddp-ref-")
    got = run_ranks(ddp_split_main(free_port(), True), 2, 120, prefix="lt-hf-ddp-mb-")
    for r in (0, 1):
        assert got[r]["ddp"] == "DistributedDataParallel" and got[r]["world"] == (r, 2), got[r]
        assert got[r]["ddp_hooked"] and "micro_batch_size" not in got[r]["untunable"], got[r]["untunable"]
        # the global batch and the step count unchanged: every rank's per-device batch, every step
        assert got[r]["steps"] == ref[r]["steps"] == DDP_MB_STEPS and got[r]["batch"] == DDP_MB_BATCH
        assert got[r]["seen"] == ref[r]["seen"]                  # the same samples on each rank
        assert ref[r]["forwarded"] == DDP_MB_BATCH * DDP_MB_STEPS
    assert got[0]["ooms"] == 0                                   # the error was rank 1's alone
    assert got[0]["forwarded"] == DDP_MB_BATCH * DDP_MB_STEPS    # rank 0 did no batch twice
    assert got[1]["forwarded"] > DDP_MB_BATCH * DDP_MB_STEPS     # rank 1 redid its step-5 batch
    assert got[1]["counted"] == got[1]["recoveries"] >= 1        # and reports the recovery
    diff = assert_split_like_unsplit(ref, got, DDP_MB_BATCH)
    print(f"\nHF Trainer DDP, 2 gloo ranks: micro_batch_size {got[0]['knob']} / {got[1]['knob']} of "
          f"{DDP_MB_BATCH}; rank 1 OOMs {got[1]['ooms']}, recovered {got[1]['recoveries']}; parameters vs unsplit: "
          f"max relative difference {diff:.1e}")
