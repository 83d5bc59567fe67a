"""The `looptune` command line, run as `python -m daemon ...` in a subprocess."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from looptune.daemon import __version__

ROOT = Path(__file__).resolve().parents[2]


def looptune(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("LOOPTUNE_CONFIG", "NOTIFY_SOCKET")}
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "looptune", *args], cwd=ROOT, env=base, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_config_check_good(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("collectors:\n  interval_seconds: 2\njobs:\n  max_jobs: 8\n")
    r = looptune("config", "check", str(good))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert f"{good}: ok" in r.stdout


def test_config_check_the_shipped_file() -> None:
    r = looptune("config", "check", str(ROOT / "config.yaml"))
    assert r.returncode == 0, r.stderr


def test_config_check_bad_lists_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("daemon:\n  listen: nowhere\n  log_level: loud\n"
                   "collectors:\n  interval_seconds: -1\n  host:\n    bogus: 1\n"
                   "jobs:\n  match: ['(']\n")
    r = looptune("config", "check", str(bad))
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 5, r.stderr
    assert all(line.startswith(f"{bad}: ") for line in lines), r.stderr
    assert f"{bad}: collectors.interval_seconds: -1 is out of range; allowed 0.1..60" in lines
    for key in ("daemon.listen: 'nowhere'", "daemon.log_level: 'loud'", "collectors.host.bogus: unknown key",
                "jobs.match[0]: '('"):
        assert any(key in line for line in lines), (key, r.stderr)


def test_config_check_yaml_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("daemon:\n  listen: [1, 2\n")
    r = looptune("config", "check", str(bad))
    assert r.returncode == 1
    assert "not valid YAML" in r.stderr and "line " in r.stderr


def test_config_check_missing_file(tmp_path: Path) -> None:
    r = looptune("config", "check", str(tmp_path / "absent.yaml"))
    assert r.returncode == 1
    assert "cannot read" in r.stderr and "absent.yaml" in r.stderr


def test_config_show_defaults_is_config_yaml() -> None:
    r = looptune("config", "show", "--defaults")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (ROOT / "config.yaml").read_text(encoding="utf-8")


def test_config_show_effective(tmp_path: Path) -> None:
    import yaml

    f = tmp_path / "c.yaml"
    f.write_text("collectors:\n  interval_seconds: 7\n")
    r = looptune("config", "show", "--config", str(f))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"# from {f}\n")
    shown = yaml.safe_load(r.stdout)
    assert shown["collectors"]["interval_seconds"] == 7.0
    assert shown["daemon"]["log_level"] == "info"


def test_config_show_reads_env(tmp_path: Path) -> None:
    f = tmp_path / "env.yaml"
    f.write_text("jobs:\n  max_jobs: 3\n")
    r = looptune("config", "show", env={"LOOPTUNE_CONFIG": str(f)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"# from {f}\n") and "max_jobs: 3" in r.stdout


def test_config_show_bad(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("collectors:\n  interval_seconds: -1\n")
    r = looptune("config", "show", "--config", str(f))
    assert r.returncode == 1
    assert "collectors.interval_seconds: -1 is out of range" in r.stderr


def test_install_service(tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = looptune("install-service", "--root", str(root), "--bin", "/usr/bin/true")
    assert r.returncode == 0, r.stderr
    unit = root / "etc/systemd/system/looptune.service"
    text = unit.read_text()
    assert "ExecStart=/usr/bin/true daemon\n" in text
    assert "@LOOPTUNE_BIN@" not in text
    assert (root / "etc/looptune/config.yaml").read_text() == (ROOT / "config.yaml").read_text()
    assert str(unit) in r.stdout


def test_install_service_keeps_existing_config(tmp_path: Path) -> None:
    root = tmp_path / "root"
    conf = root / "etc/looptune/config.yaml"
    conf.parent.mkdir(parents=True)
    conf.write_text("jobs:\n  max_jobs: 2\n")
    r = looptune("install-service", "--root", str(root), "--bin", "/usr/bin/true")
    assert r.returncode == 0, r.stderr
    assert conf.read_text() == "jobs:\n  max_jobs: 2\n"
    assert (root / "etc/systemd/system/looptune.service").exists()


def test_version() -> None:
    r = looptune("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"looptune {__version__}"


def test_daemon_bad_listen_flag(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("")
    r = looptune("daemon", "--config", str(f), "--listen", "nowhere", "--socket", str(tmp_path / "s.sock"),
                 timeout=15)
    assert r.returncode == 2
    assert "--listen 'nowhere'" in r.stderr


@pytest.mark.parametrize("argv", [[], ["config"], ["nope"]])
def test_usage_errors(argv: list[str]) -> None:
    r = looptune(*argv)
    assert r.returncode == 2
    assert "usage: looptune" in r.stderr


def test_config_help_explains_every_argument() -> None:
    r = looptune("config", "check", "--help")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\s+FILE\s+\S", r.stdout, re.M), r.stdout     # FILE, then its help on the line
    assert "config file to validate" in r.stdout, r.stdout
    r = looptune("config", "show", "--help")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\s+--config FILE\s+\S", r.stdout, re.M), r.stdout


def _parsers(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_argument_has_help() -> None:
    from looptune.daemon.cli import build_parser

    missing = [f"{name}: {action.option_strings or action.dest}"
               for name, parser in _parsers(build_parser(), "looptune")
               for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction)
               and (not action.help or action.help == argparse.SUPPRESS)]
    assert not missing, "arguments without help text: " + "; ".join(missing)
