"""What the hook needs to know about its job before the first step: the run's name, the
config, the daemon's socket paths, the process's memory peaks."""
from __future__ import annotations

import logging
import os
import resource
import sys
from typing import Any

log = logging.getLogger("looptune.hook")


def default_run() -> str:
    """TORCHELASTIC_RUN_ID, else a name derived from the command line, as the daemon derives it."""
    from looptune.collectors.jobs import _clean, derive_run
    rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if rid and rid != "none":
        return _clean(rid)
    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) == "__main__.py":
        # `python -m pkg`: sys.argv[0] is .../pkg/__main__.py; name the run `pkg`, as the daemon does
        # from the command line, not `__main__`
        argv = ["-m", os.path.basename(os.path.dirname(os.path.abspath(argv[0])))] + argv[1:]
    return derive_run([sys.executable] + argv)


def load_config(config: Any) -> Any:
    """Hook(config=...): None (the config file the daemon would read), a Config, a dict or a path."""
    from looptune.daemon import config as cfg
    if config is None:
        try:
            return cfg.load_resolved(None)[0]
        except cfg.ConfigError as exc:
            log.warning("looptune config ignored, using defaults: %s", exc)
            return cfg.Config()
    if isinstance(config, cfg.Config):
        return config
    if isinstance(config, dict):
        return cfg.parse(config, "Hook(config=...)")
    return cfg.load(config)


def socket_paths(explicit: str | None, config: Any) -> list[str]:
    if explicit:
        return [explicit]
    if os.environ.get("LOOPTUNE_SOCKET"):
        return [os.environ["LOOPTUNE_SOCKET"]]
    if config.daemon.socket:
        return [config.daemon.socket]
    from looptune.daemon.config import default_socket_paths
    paths = [os.path.join("/run/looptune", "looptune.sock")]
    paths += [p for p in default_socket_paths({k: v for k, v in os.environ.items()
                                               if k != "RUNTIME_DIRECTORY"}) if p not in paths]
    return paths


def memory_peaks() -> dict[str, int]:
    peaks = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            peaks["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
            peaks["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    except Exception:  # noqa: BLE001 - peaks are optional
        pass
    return peaks
