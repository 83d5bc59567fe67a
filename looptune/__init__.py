"""looptune: watch PyTorch training jobs, find what holds them back, turn the knobs that fix it.

The folders daemon/, collectors/ and tuners/ of the repository install as looptune.daemon,
looptune.collectors and looptune.tuners (pyproject.toml maps them): only `looptune` sits at the
top of site-packages. The user API is `from looptune import Hook`; importing this package
imports no torch and no daemon code: Hook is loaded on first use.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Run from a source checkout without installing (benchmarks, `python -m looptune` in the repo):
# the sibling folders are this package's subpackages, as pyproject.toml maps them on install.
# Only where the parent is the looptune repository, never in site-packages.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_root, "pyproject.toml")) and os.path.isfile(os.path.join(_root, "tuners", "engine.py")):
    __path__.append(_root)  # noqa: F821 - a package's own __path__

__version__ = "0.1.0"
__all__ = ["Hook", "__version__"]

if TYPE_CHECKING:
    from looptune.tuners.hook import Hook


def __getattr__(name: str) -> Any:
    if name == "Hook":
        from looptune.tuners.hook import Hook
        return Hook
    raise AttributeError(f"module 'looptune' has no attribute {name!r}")
