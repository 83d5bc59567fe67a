"""Tuner plugins (tuners.registry) and the best settings kept on disk (tuners.memory).

Plugins are real: temporary modules on sys.path, and for the entry-point group a temporary
`*.dist-info` directory with an `entry_points.txt`, which importlib.metadata finds on sys.path
exactly as it finds an installed distribution.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from looptune.tuners import registry
from looptune.tuners.memory import BestSettings, default_path
from looptune.tuners.registry import GROUP, TunerLoadError, available, load_factory, make_tuners
from looptune.tuners.workers import WorkersOptions, WorkersTuner


# ---- registry ----

def test_the_builtin_workers_tuner_loads() -> None:
    assert available()["workers"] == "looptune.tuners.workers:WorkersTuner"
    assert load_factory("workers") is WorkersTuner
    (t,) = make_tuners(["workers"], {"workers": WorkersOptions(max_workers=5)})
    assert isinstance(t, WorkersTuner) and t.max_workers == 5 and t.name == "workers" and t.knob == "num_workers"
    (t,) = make_tuners(["workers"], {})
    assert t.max_workers == 32


def test_an_unknown_tuner_is_an_error_naming_it() -> None:
    with pytest.raises(TunerLoadError) as info:
        make_tuners(["workers", "no-such-tuner"], {})
    assert info.value.name == "no-such-tuner"
    msg = str(info.value)
    assert "'no-such-tuner'" in msg and "unknown" in msg and "workers" in msg


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A directory on sys.path; `add(module_source)` writes a uniquely named module and returns its
    name; `dist(entry_points)` writes a dist-info registering entry points in looptune.tuners."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    class Dir:
        path = tmp_path

        def add(self, source: str) -> str:
            name = f"lt_plugin_{uuid.uuid4().hex[:8]}"
            (tmp_path / f"{name}.py").write_text(source)
            names.append(name)
            return name

        def dist(self, entries: dict[str, str]) -> None:
            d = tmp_path / f"looptune_test_plugins_{uuid.uuid4().hex[:6]}-1.0.dist-info"
            d.mkdir()
            (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {d.name.split('-')[0]}\nVersion: 1.0\n")
            (d / "entry_points.txt").write_text(f"[{GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))

    yield Dir()
    for n in names:
        sys.modules.pop(n, None)


GOOD = '''
from looptune.tuners.engine import TunerBase


class Echo(TunerBase):
    name = "echo"
    knob = "prefetch_factor"

    def __init__(self, options=None):
        self.options = options

    def propose(self, ctx):
        return None

    def result(self, proposal, outcome, gain, ctx):
        pass
'''


def test_a_plugin_whose_import_fails_is_an_error_naming_it(plugin_dir: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = plugin_dir.add("import no_such_dependency_xyz\n")
    monkeypatch.setitem(registry.BUILTIN, "broken", f"{mod}:Tuner")
    with pytest.raises(TunerLoadError) as info:
        load_factory("broken")
    assert info.value.name == "broken"
    assert "ModuleNotFoundError" in str(info.value) and "no_such_dependency_xyz" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)

    mod = plugin_dir.add("raise RuntimeError('plugin exploded at import')\n")
    monkeypatch.setitem(registry.BUILTIN, "exploding", f"{mod}:Tuner")
    with pytest.raises(TunerLoadError, match="'exploding'.*RuntimeError: plugin exploded at import"):
        make_tuners(["exploding"], {})

    mod = plugin_dir.add(GOOD)
    monkeypatch.setitem(registry.BUILTIN, "misnamed", f"{mod}:NoSuchClass")
    with pytest.raises(TunerLoadError, match="'misnamed'.*AttributeError"):
        load_factory("misnamed")


def test_a_factory_that_raises_is_an_error_naming_it(plugin_dir: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = plugin_dir.add("class Picky:\n    def __init__(self, options):\n        raise ValueError('bad options')\n")
    monkeypatch.setitem(registry.BUILTIN, "picky", f"{mod}:Picky")
    with pytest.raises(TunerLoadError, match="'picky'.*ValueError: bad options"):
        make_tuners(["picky"], {})


def test_entry_point_plugins_are_listed_and_load(plugin_dir: Any) -> None:
    good = plugin_dir.add(GOOD)
    bad = plugin_dir.add("import no_such_dependency_abc\n")
    plugin_dir.dist({"echo": f"{good}:Echo", "broken-ep": f"{bad}:Tuner", "workers": f"{good}:Echo"})
    found = available()
    assert found["echo"] == f"{good}:Echo"
    assert found["broken-ep"] == f"{bad}:Tuner"
    assert found["workers"] == "looptune.tuners.workers:WorkersTuner"     # a plugin cannot shadow a built-in
    (t,) = make_tuners(["echo"], {"echo": {"x": 1}})
    assert type(t).__name__ == "Echo" and t.options == {"x": 1}
    with pytest.raises(TunerLoadError) as info:
        make_tuners(["echo", "broken-ep"], {})
    assert info.value.name == "broken-ep" and "no_such_dependency_abc" in str(info.value)
    # and the engine's config check sees it too
    from looptune.daemon.config import ConfigError, parse
    assert parse({"tuners": {"enabled": ["workers", "echo"]}}).tuners.enabled == ["workers", "echo"]
    with pytest.raises(ConfigError, match="not a known tuner"):
        parse({"tuners": {"enabled": ["nope"]}})


def test_from_config_fails_at_once_naming_a_plugin_that_does_not_load(plugin_dir: Any, tmp_path: Path) -> None:
    from looptune.daemon.config import parse
    from looptune.tuners.engine import from_config
    bad = plugin_dir.add("raise ImportError('missing native library')\n")
    plugin_dir.dist({"native": f"{bad}:Tuner"})
    config = parse({"tuners": {"enabled": ["workers", "native"], "state_file": str(tmp_path / "best.json")}})
    with pytest.raises(TunerLoadError, match="'native'.*missing native library"):
        from_config(config, lambda key, d: True, daemon=False)
    config = parse({"tuners": {"enabled": ["workers"], "state_file": str(tmp_path / "best.json"),
                               "workers": {"max_workers": 3}}})
    engine = from_config(config, lambda key, d: True, daemon=False)
    (t,) = engine._make_tuners(None)
    assert isinstance(t, WorkersTuner) and t.max_workers == 3
    assert engine._make_tuners([]) == []


# ---- best settings on disk ----

def _temps(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".best.")]


def test_put_get_round_trip_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "best.json"          # the directory is created on the first put
    a = BestSettings(str(path))
    assert a.get("exp-1", "sig", "num_workers") is None
    a.put("exp-1", "sig", "num_workers", 6)
    a.put("exp-1", "sig", "prefetch_factor", 4)
    a.put("exp-2", "sig", "num_workers", 2)
    b = BestSettings(str(path))
    assert b.get("exp-1", "sig", "num_workers") == 6
    assert b.get("exp-1", "sig", "prefetch_factor") == 4
    assert b.get("exp-2", "sig", "num_workers") == 2
    assert b.get("exp-1", "other", "num_workers") is None and b.get("exp-3", "sig", "num_workers") is None
    assert json.loads(path.read_text()) == {"exp-1|sig": {"num_workers": 6, "prefetch_factor": 4},
                                            "exp-2|sig": {"num_workers": 2}}


def test_put_is_atomic_and_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "best.json"
    mem = BestSettings(str(path))
    mem.put("exp-1", "sig", "num_workers", 1)
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def replace(src: str, dst: Any) -> None:
        # at the rename, the new content is complete in a temp file of the same directory and
        # the target still holds the previous version: a reader sees one or the other, whole
        assert Path(src).parent == path.parent and Path(dst) == path
        assert json.loads(Path(src).read_text()) == {"exp-1|sig": {"num_workers": 8}}
        assert json.loads(path.read_text()) == {"exp-1|sig": {"num_workers": 1}}
        renames.append((src, str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr("looptune.tuners.memory.os.replace", replace)
    mem.put("exp-1", "sig", "num_workers", 8)
    assert len(renames) == 1
    assert json.loads(path.read_text()) == {"exp-1|sig": {"num_workers": 8}}
    assert _temps(tmp_path) == []


def test_a_failed_write_is_logged_and_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "best.json"
    mem = BestSettings(str(path))
    mem.put("exp-1", "sig", "num_workers", 1)

    def fail(src: str, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("looptune.tuners.memory.os.replace", fail)
    with caplog.at_level(logging.WARNING, logger="looptune.memory"):
        mem.put("exp-1", "sig", "num_workers", 8)        # never raises
    assert "cannot save best settings" in caplog.text and "No space left" in caplog.text
    assert _temps(tmp_path) == []
    assert json.loads(path.read_text()) == {"exp-1|sig": {"num_workers": 1}}   # the old file, whole
    assert mem.get("exp-1", "sig", "num_workers") == 8                   # this process still knows it

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    BestSettings(str(blocked / "best.json")).put("r", "s", "num_workers", 1)   # parent is a file: logged


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'"text"',
                                     b'{"exp-1|sig": 5, "exp-2|sig": {"num_workers": 3}}'])
def test_a_corrupt_file_is_ignored_with_a_log(tmp_path: Path, content: bytes,
                                              caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "best.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="looptune.memory"):
        mem = BestSettings(str(path))
    assert str(path) in caplog.text
    assert mem.get("exp-1", "sig", "num_workers") is None
    assert mem.get("exp-2", "sig", "num_workers") == (3 if content.startswith(b'{"exp-1') else None)   # good entries kept
    mem.put("exp-1", "sig", "num_workers", 4)            # and the next put writes a good file
    assert BestSettings(str(path)).get("exp-1", "sig", "num_workers") == 4
    assert isinstance(json.loads(path.read_text()), dict)


def test_two_instances_do_not_drop_each_others_entries(tmp_path: Path) -> None:
    # two jobs on one node, each with an embedded hook and its own BestSettings of the same file
    path = str(tmp_path / "best.json")
    a, b = BestSettings(path), BestSettings(path)
    a.put("exp-a", "sig", "num_workers", 4)
    b.put("exp-b", "sig", "num_workers", 8)
    a.put("exp-a", "sig", "prefetch_factor", 3)
    fresh = BestSettings(path)
    assert fresh.get("exp-a", "sig", "num_workers") == 4 and fresh.get("exp-b", "sig", "num_workers") == 8
    assert fresh.get("exp-a", "sig", "prefetch_factor") == 3


def test_default_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/state:/other")
    assert default_path(daemon=True) == f"{tmp_path}/state/best.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_path(daemon=False) == str(tmp_path / "cache" / "looptune" / "best.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_path(daemon=False) == str(tmp_path / "home" / ".cache" / "looptune" / "best.json")
