"""looptune node daemon: config, socket server, main loop, CLI."""
from __future__ import annotations

__version__ = "0.1.0"
