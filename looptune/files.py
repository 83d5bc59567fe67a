"""Small state files written atomically: a temp file in the same directory, fsync, rename. A
reader sees the old file or the new one, never half of one; a failed write leaves no temp file."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("looptune.files")


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write via a temp file in the same directory so readers never see half a file; raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)  # mkstemp creates 0600
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; not every filesystem allows it, which is harmless.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, data: Any, what: str) -> bool:
    """Write `data` as JSON to `path` (mode 0600: state of the daemon's users); False, logged
    naming `what`, if it could not be written."""
    try:
        atomic_write(path, json.dumps(data, indent=1, sort_keys=True).encode("utf-8"), mode=0o600)
        return True
    except OSError as exc:
        log.warning("cannot save %s to %s: %s", what, path, exc)
        return False


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; {} (logged) when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s %s: %s", what, path, exc)
        return {}
    if not isinstance(data, dict):
        log.warning("ignoring %s %s: a JSON object was expected, not %s", what, path, type(data).__name__)
        return {}
    return data
