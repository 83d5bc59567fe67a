"""`python -m looptune.daemon` runs the looptune CLI, as `python -m looptune` does."""
from __future__ import annotations

import sys

from looptune.daemon.cli import main

sys.exit(main())
