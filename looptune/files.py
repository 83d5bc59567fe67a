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


def write_json(path: Path, data: Any, what: str) -> bool:
    """Write `data` as JSON to `path`; False (logged, naming `what`) if it could not be written."""
    text = json.dumps(data, indent=1, sort_keys=True)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        return True
    except OSError as exc:
        log.warning("cannot save %s to %s: %s", what, path, exc)
        return False
    finally:
        if tmp is not None:          # never leave a temp file behind
            try:
                os.unlink(tmp)
            except OSError:
                pass


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
