"""`looptune install-service`: install the systemd unit and a default config."""
from __future__ import annotations

import errno
import importlib.resources
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TextIO

from looptune.files import atomic_write

PLACEHOLDER = "@LOOPTUNE_BIN@"
UNIT_PATH = Path("etc/systemd/system/looptune.service")
CONFIG_PATH = Path("etc/looptune/config.yaml")
# Sentinel default for config_source: the documented defaults rendered by daemon.config.
PACKAGED_CONFIG = object()

_NEXT_STEPS = (
    "systemctl daemon-reload",
    "systemctl enable --now looptune",
    "systemctl status looptune",
    "journalctl -u looptune -f",
)


class InstallError(Exception):
    """A file could not be written; the message is meant for the user."""


def read_unit_template() -> str:
    return (importlib.resources.files("looptune.daemon") / "systemd" / "looptune.service").read_text(
        encoding="utf-8"
    )


def _packaged_config() -> bytes:
    from looptune.daemon.config import render_default
    return render_default().encode("utf-8")


def _quote_exec_word(word: str) -> str:
    """Escape one word for ExecStart= (systemd.service(5) "Command lines")."""
    word = word.replace("%", "%%").replace("$", "$$")  # specifiers / env expansion
    if re.search(r'[\s"\'\\;]', word):
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def resolve_exec(bin_path: str | os.PathLike[str] | None = None) -> str:
    """The ExecStart= prefix that runs looptune: script path, else `python -m looptune`."""
    script = os.fspath(bin_path) if bin_path is not None else shutil.which("looptune")
    if script:
        return _quote_exec_word(os.path.abspath(script))
    return f"{_quote_exec_word(sys.executable)} -m looptune"


def render_unit(exec_prefix: str) -> str:
    return read_unit_template().replace(PLACEHOLDER, exec_prefix)


def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write(path, data)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        hint = ""
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = "; run as root or pass --root DIR"
        raise InstallError(f"cannot write {path}: {reason}{hint}") from exc


def install_service(
    root: str | os.PathLike[str] = "/",
    bin_path: str | os.PathLike[str] | None = None,
    config_source: str | os.PathLike[str] | bytes | None | object = PACKAGED_CONFIG,
    out: TextIO | None = None,
    *,
    err: TextIO | None = None,
) -> int:
    """Install the unit (always) and the config (only if absent) under `root`.

    Returns 0 on success, 1 (after printing the reason to `err`) on failure.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    root_dir = Path(root)
    if config_source is PACKAGED_CONFIG:
        config_source = _packaged_config()
    try:
        _install_unit(root_dir / UNIT_PATH, resolve_exec(bin_path), out)
        _install_config(root_dir / CONFIG_PATH, config_source, out)
    except InstallError as exc:
        print(f"looptune install-service: {exc}", file=err)
        return 1
    _print_next_steps(root_dir, out)
    return 0


def _install_unit(unit_path: Path, exec_prefix: str, out: TextIO) -> None:
    _write(unit_path, render_unit(exec_prefix).encode("utf-8"))
    print(f"wrote {unit_path} (ExecStart={exec_prefix} daemon)", file=out)


def _install_config(config_path: Path, source: object, out: TextIO) -> None:
    if source is None:
        print(f"no default config available; skipped {config_path}", file=out)
        return
    if config_path.exists():
        print(f"kept existing {config_path}", file=out)
        return
    if isinstance(source, bytes):
        data = source
    else:
        source_path = Path(os.fspath(source))  # type: ignore[arg-type]
        try:
            data = source_path.read_bytes()
        except OSError as exc:
            raise InstallError(f"cannot read default config {source_path}: {exc.strerror}") from exc
    _write(config_path, data)
    print(f"wrote {config_path}", file=out)


def _print_next_steps(root: Path, out: TextIO) -> None:
    if root.resolve() != Path("/"):
        print(f"files were written under {root}; on the target system run:", file=out)
    else:
        print("now run:", file=out)
    for command in _NEXT_STEPS:
        print(f"  {command}", file=out)
