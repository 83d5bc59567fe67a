"""looptune node daemon: config, socket server, main loop, CLI."""
from __future__ import annotations

from looptune import __version__

__all__ = ["__version__"]
