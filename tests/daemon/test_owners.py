"""daemon.owners.RunOwners on its own: the first uid owns a run, across instances (restarts),
until the claim lapses; the table is bounded without one user evicting another's claims."""
from __future__ import annotations

import json
from pathlib import Path

from looptune.daemon.owners import RunOwners


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_the_first_uid_owns_a_run_across_restarts(tmp_path: Path) -> None:
    clock, path = Clock(), str(tmp_path / "owners.json")
    a = RunOwners(path, ttl_seconds=3600, clock=clock)
    assert a.claim("exp", 0) == 0
    assert a.claim("exp", 65534) == 0                      # refused: root's
    b = RunOwners(path, ttl_seconds=3600, clock=clock)     # the daemon restarted
    assert b.owner("exp") == 0 and b.claim("exp", 65534) == 0 and b.claim("exp", 0) == 0
    clock.t += 3601                                        # unused for longer than the ttl: free again
    assert b.owner("exp") is None and b.claim("exp", 65534) == 65534


def test_claims_are_refreshed_without_a_write_per_registration(tmp_path: Path) -> None:
    clock, path = Clock(), tmp_path / "owners.json"
    o = RunOwners(str(path), ttl_seconds=7200, clock=clock)
    o.claim("exp", 0)
    mtime = path.stat().st_mtime_ns
    clock.t += 60
    o.claim("exp", 0)
    assert path.stat().st_mtime_ns == mtime                # a reconnect an hour later writes nothing new
    clock.t += 3601                                        # more than an hour after the last write
    o.claim("exp", 0)
    assert json.loads(path.read_text())["exp"] == [0, clock.t]


def test_one_user_with_many_names_evicts_its_own_claims(tmp_path: Path) -> None:
    clock = Clock()
    o = RunOwners(str(tmp_path / "owners.json"), max_runs=10, clock=clock)
    for i in range(3):
        clock.t += 1
        o.claim(f"root-{i}", 0)
    for i in range(50):
        clock.t += 1
        o.claim(f"spam-{i}", 65534)
    assert all(o.owner(f"root-{i}") == 0 for i in range(3))
    assert sum(o.owner(f"spam-{i}") == 65534 for i in range(50)) == 7


def test_a_corrupt_file_is_an_empty_table(tmp_path: Path) -> None:
    path = tmp_path / "owners.json"
    path.write_text('{"exp": "not a claim", "ok": [5, 1.0e9], "x": [1]}')
    o = RunOwners(str(path), ttl_seconds=10**12)
    assert o.owner("exp") is None and o.owner("ok") == 5 and o.owner("x") is None
