"""What the hook needs to know about its job before the first step: the run's name, the
config, the daemon's socket paths, the process's memory peaks."""
from __future__ import annotations

import logging
import os
import resource
import stat
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


def socket_paths(explicit: str | None, config: Any) -> tuple[list[str], bool]:
    """(paths to try in order, named): `named` is True when the user named the socket (Hook(socket=),
    $LOOPTUNE_SOCKET, daemon.socket); otherwise the paths are the defaults, whose directories the
    channel checks (trusted_socket_dir) before it connects."""
    if explicit:
        return [explicit], True
    if os.environ.get("LOOPTUNE_SOCKET"):
        return [os.environ["LOOPTUNE_SOCKET"]], True
    if config.daemon.socket:
        return [config.daemon.socket], True
    from looptune.daemon import config as cfg
    paths = [os.path.join(cfg.SYSTEM_SOCKET_DIR, "looptune.sock")]
    paths += [p for p in cfg.default_socket_paths({k: v for k, v in os.environ.items()
                                                   if k != "RUNTIME_DIRECTORY"}) if p not in paths]
    return paths, False


def socket_dir_problem(path: str) -> str | None:
    """Why the directory `path` must not be trusted to hold the daemon's socket, or None.

    A default directory such as /tmp/looptune-UID can be created first by any user, who then
    answers in the daemon's place; the hook trusts one only if it is a real directory (not a
    symlink) owned by root or by this process's user and not writable by group or others. A
    missing directory is "" (nothing to connect to, nothing to report)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"cannot inspect it: {exc}"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory (a symlink or a file)"
    if st.st_uid not in (0, os.getuid()):
        return f"it belongs to uid {st.st_uid}, neither root nor this job's uid {os.getuid()}"
    if st.st_mode & 0o022:
        return f"group or others may write in it (mode {stat.S_IMODE(st.st_mode):o})"
    return None


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
