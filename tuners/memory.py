"""The best knob values found per (owner uid, run, dataset signature, knob), kept on disk for the
next run.

One small JSON file, written atomically (temp file, fsync, rename); a corrupt or unreadable
file is logged and treated as empty, never fatal.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

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
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return {}
        if not isinstance(data, dict):
            log.warning("ignoring %s: a JSON object was expected, not %s", self.path, type(data).__name__)
            return {}
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
            data = json.dumps(self._data, indent=1, sort_keys=True)
            tmp = None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".best.", suffix=".tmp")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                tmp = None
            except OSError as exc:
                log.warning("cannot save best settings to %s: %s", self.path, exc)
            finally:
                if tmp is not None:          # never leave a temp file behind
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass
