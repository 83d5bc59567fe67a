"""`looptune demo` end to end: an in-process daemon tunes a small input-bound loop (~20 s).

Runs the demo as its own process, the way a user would, with a bounded wait; checks it exits 0,
prints the before/after table, a decision that raised num_workers above 0, and where /metrics
was served, and that it left no process behind.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT

pytest.importorskip("torch")

# what the test runner's environment must not hand to the demo
_SCRUB = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
          "TORCHELASTIC_RUN_ID", "LOOPTUNE_SOCKET", "LOOPTUNE_CONFIG", "NOTIFY_SOCKET")


def test_demo_raises_num_workers_and_cleans_up() -> None:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    marker = f"# test_demo {os.getpid()} {time.time_ns()}"     # DataLoader workers share this command line
    proc = subprocess.Popen(
        [sys.executable, "-c", "from looptune.daemon.demo import main; raise SystemExit(main(['--seconds','20']))\n" + marker],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for p in _marked(marker):
            p.kill()
        out, err = proc.communicate()
        pytest.fail(f"demo did not finish in 120 s\nstdout:\n{out}\nstderr:\n{err}")
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err, err

    # the live line: one per second (not a terminal here, so one per line)
    assert len(re.findall(r"samples/s\s+data wait", out)) >= 15, out
    # the before/after table
    assert re.search(r"^\| samples/s\s+\| [\d,]+ \| [\d,]+ \|", out, re.M), out
    assert re.search(r"^\| data-wait share \| \d+% \| \d+% \|", out, re.M), out
    assert re.search(r"^\| num_workers\s+\| 0\b", out, re.M), out
    # a decision that raised num_workers above 0
    raised = [(int(old), int(new)) for old, new in
              re.findall(r"^\| \d+ s \| num_workers \| (\d+) \| (\d+) \| applied \|", out, re.M)]
    assert any(new > old and new > 0 for old, new in raised), out
    # where /metrics was, and what it showed for the demo's job
    m = re.search(r"/metrics was served at (http://127\.0\.0\.1:\d+/metrics)", out)
    assert m, out
    assert 'looptune_job_knob{' in out and 'knob="num_workers"' in out, out

    # the last line says whether tuning helped (daemon.demo.outcome_line, tested in tests/daemon/)
    assert re.match(r"result: tuning (helped|did not help)", out.rstrip().splitlines()[-1]), out

    # nothing left: the demo checked its own children, and no process with its command line remains
    assert "cleaned up: daemon stopped, no worker process left" in out, out
    deadline = time.monotonic() + 5
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _marked(marker)
    for p in left:
        p.kill()
    assert not left, left


def _marked(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            pass
    return found
