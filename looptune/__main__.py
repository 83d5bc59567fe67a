"""`python -m looptune` runs the looptune CLI (the unit file's fallback when no script is on PATH)."""
from looptune.daemon.cli import main

raise SystemExit(main())
