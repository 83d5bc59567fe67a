"""The best knob values found per (owner uid, run, dataset signature, knob), kept on disk for the
next run.

One small JSON file, written atomically (temp file, fsync, rename); a corrupt or unreadable
file is logged and treated as empty, never fatal.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from looptune.files import read_json_object, write_json

log = logging.getLogger("looptune.memory")


def default_path(daemon: bool) -> str:
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]   # systemd StateDirectory=
    if daemon and (state or os.access("/var/lib", os.W_OK)):
        return os.path.join(state or "/var/lib/looptune", "best.json")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "looptune", "best.json")


class BestSettings:
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        data = read_json_object(self.path, "best settings")
        bad = [k for k, v in data.items() if not isinstance(v, dict)]
        if bad:
            log.warning("ignoring %d malformed entries in %s", len(bad), self.path)
        return {k: v for k, v in data.items() if isinstance(v, dict)}

    @staticmethod
    def _key(run: str, signature: str, owner: int | None) -> str:
        # the owner's uid first: another user's trials never become this user's remembered best
        return f"{run}|{signature}" if owner is None else f"{owner}|{run}|{signature}"

    def get(self, run: str, signature: str, knob: str, owner: int | None = None) -> Any:
        with self._lock:
            return self._data.get(self._key(run, signature, owner), {}).get(knob)

    def put(self, run: str, signature: str, knob: str, value: Any, owner: int | None = None) -> None:
        with self._lock:
            # merge with what is on disk now: another process (a second job's embedded hook, a
            # restarted daemon) may have saved its own entries since this one was read
            self._data = {**self._read(), **self._data}
            self._data.setdefault(self._key(run, signature, owner), {})[knob] = value
            write_json(self.path, self._data, "best settings")
