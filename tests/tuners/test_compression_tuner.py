"""The compression tuner's policy: a trial only on the communication verdict, the cheap settings
first, one 16-bit cast at most, PowerSGD retried at a higher rank only after its loss failed it."""
from __future__ import annotations

from typing import Any

import pytest

from looptune.tuners.bottleneck import Window
from looptune.tuners.compression import CompressionOptions, CompressionTuner
from looptune.tuners.engine import Context, Observation, Settings


def window(share: float) -> Window:
    return Window(seconds=1.0, samples_per_second=100.0, data_wait_share=0.0, step_seconds_mean=0.1, comm_share=share)


def ctx(setting: Any = "none", verdict: str = "communication", share: float = 0.5, rank: int = 1,
        untunable: dict[str, str] | None = None, steps: int = 5000, before: tuple[float, ...] = (0.5, 0.5)) -> Context:
    """The latest window at `share`, after windows at `before`."""
    obs = Observation(time=0.0, counters={"steps": steps}, knobs={"grad_compression": setting, "powersgd_rank": rank},
                      untunable=untunable or {})
    w = window(share)
    return Context("r", obs, w, [*map(window, before), w], verdict, Settings())


def test_no_trial_unless_communication_bound() -> None:
    t = CompressionTuner()
    assert t.propose(ctx(verdict="gpu")) is None
    assert t.propose(ctx(verdict="input")) is None
    assert t.propose(ctx(share=0.05)) is None             # below min_comm_share
    assert t.propose(ctx(setting=None)) is None           # no DDP model watched


def test_one_slow_window_starts_no_trial() -> None:
    t = CompressionTuner()
    assert t.propose(ctx(share=0.4, before=(0.05, 0.07))) is None     # a stall in one window: median 7%
    assert t.propose(ctx(share=0.4, before=(0.5,))) is None           # not three windows yet
    p = t.propose(ctx(share=0.4, before=(0.05, 0.3)))                 # median 30%: it holds
    assert p is not None and p.value == "bf16" and "30%" in p.reason


def test_cheap_settings_first_and_one_cast_at_most() -> None:
    t = CompressionTuner()
    p = t.propose(ctx())
    assert (p.knob, p.value) == ("grad_compression", "bf16")
    t.result(p, "failed", None, ctx())                     # gloo without bf16: the next one
    p = t.propose(ctx())
    assert p.value == "fp16"
    t.result(p, "kept", 0.4, ctx("fp16"))
    p = t.propose(ctx("fp16"))
    assert p.value == "powersgd"                           # not bf16: fp16 already halves the bytes
    t.result(p, "kept", 0.2, ctx("powersgd"))
    assert t.propose(ctx("powersgd")) is None              # the most compressed one holds


def test_powersgd_waits_for_the_steps_of_early_training() -> None:
    t = CompressionTuner(CompressionOptions(powersgd_after_steps=1000))
    p = t.propose(ctx(steps=10))
    t.result(p, "kept", 0.5, ctx("bf16", steps=10))
    assert t.propose(ctx("bf16", steps=999)) is None       # fp16 pointless beside bf16; PowerSGD waits
    assert t.propose(ctx("bf16", steps=1000)).value == "powersgd"
    t = CompressionTuner(CompressionOptions(settings=["powersgd"], powersgd_after_steps=0))
    assert t.propose(ctx(steps=0)).value == "powersgd"


def test_its_trials_are_judged_by_the_loss_per_step_too() -> None:
    assert any(g.name == "progress" for g in CompressionTuner().guards)


def test_powersgd_failed_by_its_loss_is_retried_once_at_a_higher_rank() -> None:
    t = CompressionTuner()
    for value in ("bf16", "fp16"):
        p = t.propose(ctx())
        assert p.value == value
        t.result(p, "rolled_back", 0.0, ctx())
    p = t.propose(ctx())
    assert p.value == "powersgd"
    t.result(p, "rolled_back", 0.3, ctx())                 # faster, rolled back: the loss guard
    p = t.propose(ctx())
    assert (p.knob, p.value, p.keep_if) == ("powersgd_rank", 4, "no_worse")
    t.result(p, "kept", 0.0, ctx(rank=4))
    p = t.propose(ctx(rank=4))
    assert p.value == "powersgd"
    t.result(p, "rolled_back", 0.3, ctx(rank=4))
    assert t.propose(ctx(rank=4)) is None                  # once only


def test_powersgd_rolled_back_as_too_slow_is_not_retried() -> None:
    t = CompressionTuner(CompressionOptions(settings=["powersgd"]))
    p = t.propose(ctx())
    t.result(p, "rolled_back", -0.1, ctx())
    assert t.propose(ctx()) is None


def test_the_settings_to_try_can_be_configured() -> None:
    # the config checker applies a list's check to each item: 'bf16' was once judged letter by letter,
    # which refused every value, the shipped config.yaml included
    from looptune.daemon import config as cfg
    c = cfg.parse({"tuners": {"compression": {"settings": ["fp16", "bf16"]}}}, "t")
    assert c.tuners.options["compression"].settings == ["fp16", "bf16"]
    assert CompressionTuner(c.tuners.options["compression"]).order == ["fp16", "bf16"]
    with pytest.raises(cfg.ConfigError, match=r"settings\[1\]: 'zz' is not a setting to try; allowed: fp16, bf16, "
                                               r"powersgd"):
        cfg.parse({"tuners": {"compression": {"settings": ["fp16", "zz"]}}}, "t")
