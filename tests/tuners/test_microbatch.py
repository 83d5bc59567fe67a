"""hook.accumulate on the stand-in GPU (tests/fakes/fake_cuda.py): the split, the fit, the
out-of-memory recovery in the step, exactness against an unsplit run, and what the job reports."""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
from typing import Any

import pytest
import torch

from looptune import Hook
from looptune.tuners.hook.actuators import split
from looptune.tuners.memfit import MemoryFit
from tests.fakes.fake_cuda import FakeCuda, MemoryLayer, MiB, per_element, straight, with_jump


@pytest.fixture
def fake() -> Any:
    f = FakeCuda(1000 * MiB).install()
    f.alloc(100 * MiB)          # what the model and its optimizer would hold
    yield f
    f.uninstall()


def hook_for(tmp_path: Any, tune: Any = ("batch_size",), **hook_cfg: Any) -> Hook:
    # the hook's own fit only: no engine trials on the knob here (test_batch_size_tuner.py has those)
    cfg = {"tuners": {"state_file": str(tmp_path / "best.json"), "enabled": []},
           "hook": {"report_interval_seconds": 0.2, **hook_cfg}}
    return Hook(run="mb-test", tune=list(tune) if isinstance(tune, tuple) else tune,
                socket=str(tmp_path / "nodaemon.sock"), config=cfg)


def mlp(fake: FakeCuda, curve: Any, dtype: Any = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), MemoryLayer(fake, curve),
                               torch.nn.Linear(16, 1)).to(dtype)


def mse(model: Any) -> Any:
    return lambda mb: torch.nn.functional.mse_loss(model(mb[0]), mb[1])


# ---- the split ----

Pair = collections.namedtuple("Pair", "x y")


@dataclasses.dataclass
class Sample:
    x: torch.Tensor
    ids: list[int]
    name: str = "s"


def test_split_cuts_every_tensor_of_the_batch_length_and_passes_the_rest() -> None:
    x, y = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    shared = torch.ones(3)
    batch = {"pair": Pair(x, y), "items": [x, "text", 7], "sample": Sample(x, [1, 2]), "shared": shared}
    assert split.rows(batch) == 10
    assert split.elements(batch, 10) == 20 + 10 + 20 + 20
    got = split.part(batch, 10, 4, 7)
    assert isinstance(got["pair"], Pair) and torch.equal(got["pair"].x, x[4:7]) and torch.equal(got["pair"].y, y[4:7])
    assert got["items"][1:] == ["text", 7] and torch.equal(got["items"][0], x[4:7])
    assert isinstance(got["sample"], Sample) and torch.equal(got["sample"].x, x[4:7]) and got["sample"].ids == [1, 2]
    assert got["shared"] is shared
    assert got["pair"].x.data_ptr() == x[4].data_ptr()       # a view: no copy


def test_sizes_are_as_equal_as_they_come_and_cover_the_batch() -> None:
    assert split.sizes(10, 4) == [4, 3, 3]
    assert split.sizes(4096, 846) == [820, 819, 819, 819, 819]
    assert split.sizes(7, 100) == [7]
    for n, most in [(1, 1), (97, 13), (1000, 999)]:
        s = split.sizes(n, most)
        assert sum(s) == n and max(s) <= most and max(s) - min(s) <= 1


# ---- the fit ----

def test_memory_fit_predicts_a_straight_curve_with_its_margin_and_searches_a_jump() -> None:
    f = MemoryFit()
    assert f.largest(1000) is None
    f.ran(10, 100)
    assert f.largest(10_000) == 20                    # one point: at most 2x further
    f.ran(40, 400)
    assert f.largest(1000) == 80
    f.ran(80, 800)
    assert f.largest(1000) == 97                      # (1000 x 0.97) / 10 per element
    f.oom(97)                                         # a jump the line did not see
    assert f.largest(1000) == 84                      # creep up 5% at a time from what ran
    for size in (84, 88):
        f.ran(size, size * 10)
    assert f.largest(1000) == 92
    f.oom(92)
    assert f.largest(1000) == 88                      # 90 is within 2.5% of 88: not worth another error
    f.oom(88)                                         # it fit before: a bigger input, or less memory
    assert f.largest(1000) == 79                      # sizes above 79 (10% below 88) no longer proven,
    assert f.largest_ok == 40                         # and never more than that cap


def run_job(tmp_path: Any, fake: FakeCuda, curve: Any, *, batch: int = 4096, steps: int = 8,
            lengths: Any = None) -> dict[str, Any]:
    """A job of `steps` batches; returns what each step's micro-batches were and the OOMs."""
    model = mlp(fake, curve)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    limits, ooms, fitted = [], [], []
    with hook_for(tmp_path) as hook:
        model = hook.watch(model)
        for step in range(steps):
            n = batch
            width = lengths[step] if lengths is not None else 1
            x, y = torch.randn(n, width, 8, generator=g), torch.randn(n, width, 1, generator=g)
            hook.accumulate((x, y), mse(model))
            opt.step()
            opt.zero_grad()
            hook.step()
            limits.append(hook.knobs["micro_batch_size"])
            ooms.append(fake.ooms)
            fitted.append(hook.microbatcher.fitted)
        report = hook.report()
    return {"limits": limits, "ooms": ooms, "fitted": fitted, "report": report, "hook": hook}


def largest_fitting(capacity: int, base: int, curve: Any, width: int = 1, factor: float = 2.0) -> int:
    """Rows of the largest micro-batch that fits: activations held, plus the backward's workspace
    of the same size (MemoryLayer's default), over what stays allocated."""
    lo, hi = 1, 1 << 20
    while lo < hi:
        mid = (lo + hi + 1) // 2
        need = curve(torch.empty(mid, width, 8)) * factor
        if base + need <= capacity:
            lo = mid
        else:
            hi = mid - 1
    return lo


def test_straight_curve_reaches_90_percent_of_the_largest_fit_within_6_steps_without_an_oom(tmp_path, fake) -> None:
    curve = straight(MiB // 2)
    best = largest_fitting(fake.capacity, fake.allocated, curve)
    got = run_job(tmp_path, fake, curve)
    first_good = next(i for i, v in enumerate(got["limits"]) if v >= 0.9 * best)
    assert first_good < 6, (got["limits"], best)
    assert max(got["limits"]) <= best                     # never set above what fits
    assert got["ooms"][-1] == 0
    assert got["fitted"][first_good]
    assert len(set(got["limits"][first_good:])) == 1      # steady once fitted


def test_a_workspace_jump_costs_at_most_a_few_ooms_and_none_after_the_fit(tmp_path, fake) -> None:
    # from 600 rows a kernel takes 300 MiB more: the largest that fits is just under the jump
    curve = with_jump(MiB // 2, 600, 300 * MiB)
    best = largest_fitting(fake.capacity, fake.allocated, curve)
    assert best == 599
    got = run_job(tmp_path, fake, curve, steps=10)
    fit_step = got["fitted"].index(True)
    assert fit_step < 6
    assert got["ooms"][-1] == got["ooms"][fit_step] <= 2          # none after the fit
    assert got["limits"][-1] >= 0.9 * best, got["limits"]
    assert got["report"]["counters"]["oom_recoveries"] == got["ooms"][-1]


def test_a_wider_padded_batch_that_does_not_fit_is_recovered_in_its_step(tmp_path, fake, caplog) -> None:
    # padded sequences: memory grows with rows x the longest length in the batch
    lengths = [4, 4, 4, 4, 9, 4, 9, 9]
    caplog.set_level(logging.WARNING, logger="looptune.hook")
    got = run_job(tmp_path, fake, per_element(MiB // 64), batch=1024, lengths=lengths)
    assert got["ooms"][3] == 0 or got["ooms"][3] <= 1
    wide = lengths.index(9)
    # the wider batch forced a lower micro-batch, learned: the later wide ones fit at once
    assert got["limits"][wide] < got["limits"][wide - 1]
    assert got["ooms"][-1] == got["ooms"][wide]
    warnings = [r for r in caplog.records if "out of device memory" in r.getMessage()]
    assert len({r.getMessage().split("(")[-1] for r in warnings}) == len(warnings)   # once per kind


def test_one_row_that_does_not_fit_raises_the_original_error_with_a_note(tmp_path, fake) -> None:
    model = mlp(fake, straight(2000 * MiB))
    with hook_for(tmp_path) as hook:
        model = hook.watch(model)
        with pytest.raises(torch.cuda.OutOfMemoryError) as info:
            hook.accumulate((torch.randn(16, 8), torch.randn(16, 1)), mse(model))
    assert "CUDA out of memory" in str(info.value)
    assert any("one row does not fit" in n for n in info.value.__notes__)


# ---- exactness ----

def train_exact(fake: FakeCuda | None, tmp_path: Any, split_it: bool, steps: int = 200,
                inject: dict[int, str] | None = None) -> list[torch.Tensor]:
    curve = straight(MiB // 2)
    ref_fake = fake or FakeCuda(10**12)
    model = mlp(ref_fake, curve, dtype=torch.float64, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(2048, 8, generator=g, dtype=torch.float64),
                torch.randn(2048, 1, generator=g, dtype=torch.float64)) for _ in range(16)]
    if not split_it:
        for step in range(steps):
            x, y = batches[step % len(batches)]
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]
    with hook_for(tmp_path) as hook:
        model = hook.watch(model)
        for step in range(steps):
            if inject and step in inject:
                fake.inject(inject[step], 2)
            hook.accumulate(batches[step % len(batches)], mse(model))
            opt.step()
            opt.zero_grad()
            hook.step()
        assert hook.microbatcher.recoveries >= len(inject or {})
    return [p.detach().clone() for p in model.parameters()]


def test_split_training_equals_unsplit_within_1e9_with_oom_recoveries(tmp_path, fake) -> None:
    ref = train_exact(None, tmp_path, split_it=False)
    got = train_exact(fake, tmp_path, split_it=True, inject={1: "forward", 50: "backward", 120: "forward"})
    assert fake.ooms >= 3
    for a, b in zip(ref, got):
        rel = (a - b).abs().max() / a.abs().max()
        assert rel < 1e-9, float(rel)


# ---- switches ----

def test_with_tuning_off_accumulate_does_not_split(tmp_path, fake) -> None:
    model = mlp(fake, straight(MiB // 16))
    seen = []
    with hook_for(tmp_path, tune=False) as hook:
        model = hook.watch(model)
        hook.accumulate((torch.randn(4096, 8), torch.randn(4096, 1)),
                        lambda mb: seen.append(len(mb[0])) or mse(model)(mb))
        assert "micro_batch_size" not in hook.knobs
    assert seen == [4096]


def test_batchnorm_is_untunable_with_the_reason_unless_opted_in(tmp_path, fake) -> None:
    def bn_model() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                   MemoryLayer(fake, straight(MiB // 16)), torch.nn.Linear(16, 1))
    seen: list[int] = []
    with hook_for(tmp_path) as hook:
        m = hook.watch(bn_model())
        hook.accumulate((torch.randn(4096, 8), torch.randn(4096, 1)), lambda mb: seen.append(len(mb[0])) or mse(m)(mb))
        assert "BatchNorm" in hook.untunable["micro_batch_size"]
        assert hook.report()["untunable"]["micro_batch_size"] == hook.untunable["micro_batch_size"]
    assert seen == [4096]
    seen.clear()
    with hook_for(tmp_path, micro_batch_split_batch_norm=True) as hook:
        m = hook.watch(bn_model())
        hook.accumulate((torch.randn(4096, 8), torch.randn(4096, 1)), lambda mb: seen.append(len(mb[0])) or mse(m)(mb))
        assert "micro_batch_size" not in hook.untunable
    assert len(seen) > 1 and sum(seen) == 4096


def test_without_a_watched_model_there_is_no_split(tmp_path, fake) -> None:
    model = mlp(fake, straight(MiB // 2))
    with hook_for(tmp_path) as hook:
        hook.accumulate((torch.randn(64, 8), torch.randn(64, 1)), mse(model))
        assert "watch(model)" in hook.untunable["micro_batch_size"]


# ---- gradient noise scale ----

def test_gradient_noise_scale_matches_a_known_problem(tmp_path) -> None:
    # per-sample loss 0.5 |w - x_i|^2 with x_i ~ N(mu, s^2 I) in d dims and w held still (lr 0):
    # per-sample gradient w - x_i, so |G|^2 = |w - mu|^2, tr(cov) = d s^2, B_simple = d s^2 / |w - mu|^2
    d, s = 64, 1.0
    fake = FakeCuda(1000 * MiB).install()
    try:
        w = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
        mu = torch.full((d,), 0.05, dtype=torch.float64)      # B_simple = 400, near the batch sizes
        layer = MemoryLayer(fake, straight(MiB))

        class M(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.w, self.mem = w, layer

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return 0.5 * (self.w - self.mem(x)).pow(2).sum(1).mean()
        g = torch.Generator().manual_seed(0)
        with hook_for(tmp_path) as hook:
            model = hook.watch(M())
            for _ in range(400):
                x = mu + s * torch.randn(1024, d, generator=g, dtype=torch.float64)
                hook.accumulate(x, model)
                w.grad = None
                hook.step()
            est = hook.report()["counters"]["gradient_noise_scale"]
    finally:
        fake.uninstall()
    true = d * s * s / float((mu ** 2).sum())
    assert math.isclose(est, true, rel_tol=0.3), (est, true)
