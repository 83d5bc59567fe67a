"""`python -m daemon` runs the looptune CLI (the unit file's fallback when no script is on PATH)."""
from __future__ import annotations

import sys

from daemon.cli import main

sys.exit(main())
