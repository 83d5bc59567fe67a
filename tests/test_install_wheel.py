"""Installed from a wheel, looptune is one top-level name and works without the repository.

Builds a wheel from a copy of the repository, installs it into a fresh venv (no system
site-packages, no torch) beside python-daemon, whose import name is `daemon`, and checks from a
directory outside the repository: only `looptune` (and its dist-info) sits at the top of
site-packages; python-daemon's `daemon` is python-daemon's; `from looptune import Hook` imports
and measures a loop without torch; `looptune --version` and `python -m looptune` run; the unit
file is packaged (install-service reads it with importlib.resources); the installed daemon
serves /metrics and stops cleanly on SIGTERM.

The dependencies come from pip's configured indexes and cache. python-daemon comes from PyPI:
where it cannot be fetched the tests skip, and under CI (CI=true or LOOPTUNE_REQUIRE_SERVERS=1)
they fail.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ROOT, free_port
from daemon_proc import http_get
from looptune import __version__

pytestmark = pytest.mark.e2e

OURS = {"looptune", f"looptune-{__version__}.dist-info"}
# ignored when the repository is copied to build from: what a build or a test run leaves behind
_LEFTOVERS = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".hypothesis", ".venv", "venv")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    site: Path
    outside: Path       # a working directory with nothing of the repository in it
    env: dict[str, str]

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), cwd=self.outside, env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def py(self, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run(self.python, "-c", code, timeout=timeout)


def _unavailable(msg: str) -> None:
    if os.environ.get("CI") == "true" or os.environ.get("LOOPTUNE_REQUIRE_SERVERS") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def _pip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _setuptools_at_least(major: int) -> bool:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0]) >= major
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    work = tmp_path_factory.mktemp("wheel")
    # python-daemon from PyPI (with its dependency, lockfile): the one thing that needs the network
    extra = work / "extra"
    r = _pip("download", "-q", "-d", str(extra), "python-daemon", timeout=180)
    if r.returncode != 0:
        _unavailable(f"cannot fetch python-daemon from PyPI:\n{r.stdout}{r.stderr}")

    # a wheel of a clean copy: setuptools' build/ keeps files the source no longer has
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=_LEFTOVERS)
    dist = work / "dist"
    # the running environment's setuptools if it meets pyproject.toml's >=68 (fast, offline), else
    # pip's isolated build (a venv made by python3 -m venv, as CI's, has setuptools 65)
    no_isolation = ["--no-build-isolation"] if _setuptools_at_least(68) else []
    r = _pip("wheel", "-q", "--no-deps", *no_isolation, "-w", str(dist), str(src))
    assert r.returncode == 0, f"pip wheel failed:\n{r.stdout}{r.stderr}"
    (wheel,) = dist.glob("looptune-*.whl")

    # a plain venv (no system site-packages, no pip of its own): this environment's pip installs into it
    venv = work / "venv"
    r = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = _pip("--python", str(venv / "bin" / "python"), "install", "-q", "--find-links", str(extra),
             str(wheel), "python-daemon")
    assert r.returncode == 0, f"pip install failed:\n{r.stdout}{r.stderr}"

    (site,) = venv.glob("lib/python3*/site-packages")
    outside = work / "outside"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "LOOPTUNE_", "VIRTUAL_ENV", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update(HOME=str(outside), XDG_CACHE_HOME=str(outside / "cache"), XDG_RUNTIME_DIR=str(outside),
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", PYTHONNOUSERSITE="1")
    yield Installed(wheel, venv, site, outside, env)


def test_wheel_has_one_top_level_name(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as z:
        names = z.namelist()
    assert {n.split("/")[0] for n in names} == OURS
    # every package of the repository is in it, under looptune
    for sub in ("daemon", "collectors", "tuners"):
        assert f"looptune/{sub}/__init__.py" in names, sub
    assert "looptune/daemon/systemd/looptune.service" in names


def test_site_packages_top_level(installed: Installed) -> None:
    record = (installed.site / f"looptune-{__version__}.dist-info" / "RECORD").read_text()
    ours = {line.split(",")[0].split("/")[0] for line in record.splitlines() if line}
    ours = {n for n in ours if not n.startswith("..")}      # ../../../bin/looptune
    assert ours == OURS
    top = {p.name for p in installed.site.iterdir()}
    assert "looptune" in top
    assert not {"collectors", "tuners"} & top, top
    # `daemon` is python-daemon's, not ours
    (pd,) = installed.site.glob("python_daemon-*.dist-info")
    assert "daemon/__init__.py" in (pd / "RECORD").read_text()
    r = installed.py("import daemon, json, looptune; daemon.DaemonContext; print(daemon.__file__); "
                     "print(json.dumps(list(looptune.__path__)))")
    assert r.returncode == 0, r.stderr
    daemon_file, path = r.stdout.splitlines()
    assert Path(daemon_file).parent == installed.site / "daemon"
    assert json.loads(path) == [str(installed.site / "looptune")]     # not extended to a checkout


def test_hook_imports_and_measures_without_torch(installed: Installed) -> None:
    r = installed.py(
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('torch') is None, 'torch is installed in the test venv'\n"
        "from looptune import Hook\n"
        "with Hook(run='wheel', socket='/nonexistent/looptune.sock', tune=False) as hook:\n"
        "    for batch in hook.watch([[1, 2], [3, 4], [5, 6]]):\n"
        "        hook.step()\n"
        "    print(hook.mode, hook.counters['samples'], hook.counters['steps'])\n"
        "print(Hook.__module__, 'torch' in sys.modules)\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["embedded", "6", "3", "looptune.tuners.hook.api", "False"], r.stdout + r.stderr


def test_cli_version(installed: Installed) -> None:
    for argv in ([str(installed.venv / "bin" / "looptune"), "--version"],
                 [installed.python, "-m", "looptune", "--version"]):
        r = installed.run(*argv)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"looptune {__version__}"


def test_packaged_unit_file(installed: Installed) -> None:
    root = installed.outside / "root"
    r = installed.run(str(installed.venv / "bin" / "looptune"), "install-service", "--root", str(root),
                      "--bin", "/usr/bin/looptune")
    assert r.returncode == 0, r.stdout + r.stderr
    template = (ROOT / "daemon" / "systemd" / "looptune.service").read_text(encoding="utf-8")
    unit = (root / "etc/systemd/system/looptune.service").read_text(encoding="utf-8")
    assert unit == template.replace("@LOOPTUNE_BIN@", "/usr/bin/looptune")
    assert (root / "etc/looptune/config.yaml").read_text(encoding="utf-8") == \
        (ROOT / "config.yaml").read_text(encoding="utf-8")


def test_installed_daemon_serves_metrics(installed: Installed) -> None:
    port = free_port()
    config = installed.outside / "empty.yaml"
    config.write_text("")
    log = installed.outside / "daemon.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [str(installed.venv / "bin" / "looptune"), "daemon", "--config", str(config),
             "--listen", f"127.0.0.1:{port}", "--socket", str(installed.outside / "lt.sock")],
            cwd=installed.outside, env=installed.env, stdout=f, stderr=f, stdin=subprocess.DEVNULL,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        body = ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=2)
                if status == 200 and "looptune_build_info" in body:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert f'looptune_build_info{{version="{__version__}"}} 1.0' in body, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
