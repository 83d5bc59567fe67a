"""Tuner plugins: a built-in name table plus the entry-point group `looptune.tuners`.

A plugin that fails to load is an error naming it, never silently skipped.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Callable

BUILTIN = {"workers": "looptune.tuners.workers:WorkersTuner",
           "batch_size": "looptune.tuners.batch_size:BatchSizeTuner",
           "compression": "looptune.tuners.compression:CompressionTuner"}
GROUP = "looptune.tuners"


class TunerLoadError(Exception):
    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"tuner {name!r} failed to load: {why}")
        self.name = name


def available() -> dict[str, str]:
    """name -> "module:attribute" of every known tuner."""
    found = dict(BUILTIN)
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def load_factory(name: str) -> Callable[..., Any]:
    target = available().get(name)
    if target is None:
        raise TunerLoadError(name, f"unknown; known tuners: {', '.join(sorted(available()))}")
    module, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # noqa: BLE001 - any import failure names the plugin
        raise TunerLoadError(name, f"{type(exc).__name__}: {exc}") from exc
    return obj


def make_tuners(names: list[str], options: dict[str, Any]) -> list[Any]:
    """Instances of the named tuners; `options[name]` holds each one's settings (a dataclass)."""
    out = []
    for name in names:
        factory = load_factory(name)
        try:
            tuner = factory(options.get(name))
        except Exception as exc:  # noqa: BLE001
            raise TunerLoadError(name, f"{type(exc).__name__}: {exc}") from exc
        why = _incomplete(tuner)
        if why:
            raise TunerLoadError(name, why)
        out.append(tuner)
    return out


def _incomplete(tuner: Any) -> str | None:
    """What a tuner lacks of the engine's Tuner protocol (subclass engine.TunerBase for the defaults)."""
    import dataclasses

    from looptune.tuners.bottleneck import Window
    missing = [a for a in ("name", "knob", "objective", "guards", "propose", "result") if not hasattr(tuner, a)]
    if missing:
        return f"lacks {', '.join(missing)} (subclass looptune.tuners.engine.TunerBase for defaults)"
    figures = [f.name for f in dataclasses.fields(Window)]
    if tuner.objective not in figures:
        return f"objective {tuner.objective!r} is not a window figure; one of {', '.join(figures)}"
    if not all(callable(getattr(g, "check", None)) for g in tuner.guards):
        return "every guard needs a check(trial, obs, window, settings) method"
    return None
