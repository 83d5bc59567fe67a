"""A config reload with a trial in flight: the daemon rolls the trial back before the new engine
takes over (its settings would judge a trial they did not start), and the decision counters go on."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port
from looptune.daemon import config as cfg
from looptune.daemon.service import Daemon
from looptune.tuners.engine import Engine, Phase, Settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tuners"))
from test_engine import KEY, RUN, Clock, FakeJob, ScriptTuner, rates  # noqa: E402


@pytest.fixture
def daemon(short_tmp: Path) -> Any:
    config = cfg.parse({"collectors": {"host": {"enabled": False}, "jobs": {"enabled": False},
                                       "gpu": {"enabled": False}},
                        "tuners": {"state_file": str(short_tmp / "best.json")}})
    d = Daemon(config, listen=f"127.0.0.1:{free_port()}", socket_path=str(short_tmp / "d.sock"), environ={})
    d.start()
    try:
        yield d
    finally:
        d.shutdown()


def test_a_reload_rolls_back_the_trial_in_flight(daemon: Daemon, short_tmp: Path) -> None:
    clock = Clock()
    job = FakeJob(clock=clock, curve=rates({0: 100.0, 4: 200.0}))
    engine = Engine(lambda names: [ScriptTuner([4])], job.send, Settings(measure_windows=10), clock=clock)
    job.engine = engine
    daemon.engine = engine                     # the running engine, with a job mid-trial
    for _ in range(8):
        job.tick()
    assert engine.jobs[KEY].trial is not None and engine.jobs[KEY].trial.phase is Phase.MEASURE
    path = short_tmp / "new.yaml"
    path.write_text("tuners:\n  min_gain: 0.05\n  state_file: %s\n" % (short_tmp / "best.json"))
    daemon.config_cli_path = str(path)
    assert daemon.reload()
    rollback = job.sent[-1]
    assert rollback["value"] == 0 and rollback["reason"] == "roll back: config reloaded"
    assert daemon.engine is not engine and daemon.engine.settings.min_gain == 0.05
    # the new engine's counters go on from the old ones: the roll back is counted once
    assert daemon.engine.outcomes[(RUN, "script", "num_workers", "rolled_back")] == 1


def test_a_reload_that_keeps_the_tuner_settings_keeps_the_trial(daemon: Daemon, short_tmp: Path) -> None:
    clock = Clock()
    job = FakeJob(clock=clock, curve=rates({0: 100.0, 4: 200.0}))
    engine = Engine(lambda names: [ScriptTuner([4])], job.send, Settings(measure_windows=10), clock=clock)
    job.engine = engine
    daemon.engine = engine
    for _ in range(8):
        job.tick()
    path = short_tmp / "same.yaml"
    path.write_text("daemon:\n  log_level: debug\ntuners:\n  state_file: %s\n" % (short_tmp / "best.json"))
    daemon.config_cli_path = str(path)
    assert daemon.reload()
    assert daemon.engine is engine and len(job.sent) == 1
