"""The batch_size tuner after the hook's fit: the largest micro-batch that fits stays unless a
measured trial shows a smaller one at least as fast. Unit tests of its policy, then the embedded
engine on a real training loop (hook.accumulate on the stand-in GPU) where a smaller micro-batch
is slower (rolled back) or faster (kept)."""
from __future__ import annotations

import time
from typing import Any

import torch

from looptune import Hook
from looptune.tuners.batch_size import BatchSizeOptions, BatchSizeTuner
from looptune.tuners.bottleneck import Window
from looptune.tuners.engine import Context, Observation, Settings
from tests.fakes.fake_cuda import FakeCuda, MemoryLayer, MiB, straight


def ctx(knob: Any, settling: tuple[str, ...] = ()) -> Context:
    obs = Observation(time=0.0, counters={}, knobs={"micro_batch_size": knob} if knob is not None else {},
                      settling=settling)
    w = Window(seconds=1.0, samples_per_second=100.0, data_wait_share=0.0, step_seconds_mean=0.1)
    return Context("r", obs, w, [w], "gpu", Settings())


def test_no_trial_before_the_fit_then_half_once() -> None:
    t = BatchSizeTuner()
    assert t.propose(ctx(None)) is None                                  # no accumulate in this job
    assert t.propose(ctx(800, settling=("micro_batch_size",))) is None   # the hook still fits
    p = t.propose(ctx(800))
    assert p is not None and p.value == 400 and p.keep_if == "no_worse"
    assert t.propose(ctx(800)) is None                                   # not twice from the same size
    t.result(p, "kept", 0.01, ctx(400))
    p2 = t.propose(ctx(400))
    assert p2 is not None and p2.value == 200                            # kept: half again
    t.result(p2, "rolled_back", -0.2, ctx(400))
    assert t.propose(ctx(400)) is None                                   # rolled back: done
    assert BatchSizeTuner(BatchSizeOptions(try_smaller=False)).propose(ctx(800)) is None
    assert BatchSizeTuner(BatchSizeOptions(min_micro_batch=512)).propose(ctx(800)) is None


def done(hook: Hook) -> bool:
    """The first trial ended: kept (its confirmation) or rolled back."""
    return any(d.tuner == "batch_size" and not d.trial and d.reason.startswith(("kept", "roll back"))
               for d in hook.decisions)


def run(tmp_path: Any, seconds_per_micro_batch: Any, seconds: float = 30.0) -> Hook:
    """A job whose micro-batch costs seconds_per_micro_batch(rows); the embedded engine tunes it."""
    fake = FakeCuda(1000 * MiB).install()
    try:
        fake.alloc(100 * MiB)
        torch.manual_seed(0)

        class Model(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lin = torch.nn.Linear(4, 1)
                self.mem = MemoryLayer(fake, straight(MiB))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                time.sleep(seconds_per_micro_batch(x.shape[0]))
                return self.lin(self.mem(x))
        cfg = {"tuners": {"state_file": str(tmp_path / "best.json"), "window_seconds": 0.5, "enabled": ["batch_size"],
                          "baseline_windows": 5, "measure_windows": 5,
                          "cooldown_windows": 1},
               "hook": {"report_interval_seconds": 0.5}}
        hook = Hook(run="bs-tuner", tune=["batch_size"], socket=str(tmp_path / "none.sock"), config=cfg)
        with hook:
            model = hook.watch(Model())
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            # whole batches of 1024 rows, ready made: loading costs nothing beside the step
            data = [(torch.randn(1024, 4), torch.randn(1024, 1)) for _ in range(8)]
            loader = hook.watch(torch.utils.data.DataLoader(data, batch_size=None))   # counts the samples
            end = time.monotonic() + seconds
            while time.monotonic() < end and not done(hook):
                for x, y in loader:
                    hook.accumulate((x, y), lambda mb: torch.nn.functional.mse_loss(model(mb[0]), mb[1]))
                    opt.step()
                    opt.zero_grad()
                    hook.step()
        return hook
    finally:
        fake.uninstall()


def test_a_smaller_micro_batch_that_is_slower_is_rolled_back(tmp_path) -> None:
    # a fixed cost per micro-batch: halving doubles it
    hook = run(tmp_path, lambda rows: 0.02)
    trials = [d for d in hook.decisions if d.tuner == "batch_size" and d.trial]
    assert trials, hook.decisions
    back = [d for d in hook.decisions if d.tuner == "batch_size" and d.reason.startswith("roll back")]
    assert back and back[0].new == trials[0].old, (hook.decisions, hook.engine.jobs and [j.history for j in hook.engine.jobs.values()])
    assert hook.knobs["micro_batch_size"] == trials[0].old


def test_a_smaller_micro_batch_that_is_faster_is_kept(tmp_path) -> None:
    # time grows faster than the rows (a kernel that degrades at large sizes): halving pays
    hook = run(tmp_path, lambda rows: 0.02 * (rows / 400) ** 2)
    trials = [d for d in hook.decisions if d.tuner == "batch_size" and d.trial]
    assert trials, hook.decisions
    kept = [d for d in hook.decisions if d.tuner == "batch_size" and d.reason.startswith("kept")]
    assert kept and kept[0].new == trials[0].new, hook.decisions
    assert hook.knobs["micro_batch_size"] == trials[0].new
