"""Actuators: how each knob is read and changed inside the training process.

An actuator is a get/set pair (the old value is read before every write, so a roll back restores
it) plus, optionally, `settling()`: True while a new setting is still warming up (new loader
workers not all delivered yet), so the engine does not measure the ramp. `set` runs in the
training thread at a step boundary. `Hook.watch(obj)` picks the watcher for the object's type
from WATCHERS; a watcher wraps the object and registers its actuators with `hook.add_actuator`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Actuator:
    get: Callable[[], Any]
    set: Callable[[Any], None]
    settling: Callable[[], bool] | None = None
    collective: bool = False    # every rank must run the same value (DDP's comm hook): applied on all or none


def _is_loader(obj: Any) -> bool:
    return hasattr(obj, "__iter__") and not _is_module(obj)


def _is_module(obj: Any) -> bool:
    import sys
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _watch_loader(hook: Any, obj: Any) -> Any:
    from looptune.tuners.hook.actuators.loader import watch
    return watch(hook, obj)


def _watch_module(hook: Any, obj: Any) -> Any:
    from looptune.tuners.hook.actuators.ddp import watch
    return watch(hook, obj)


# (test, watcher), first match wins: a module (DistributedDataParallel) before anything iterable
WATCHERS: list[tuple[Callable[[Any], bool], Callable[[Any, Any], Any]]] = [
    (_is_module, _watch_module),
    (_is_loader, _watch_loader),
]
