from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from looptune import files
from looptune.daemon import install
from looptune.daemon.install import install_service, read_unit_template, render_unit

UNIT = Path("etc/systemd/system/looptune.service")
CONFIG = Path("etc/looptune/config.yaml")
SYSTEMCTL_COMMANDS = (
    "systemctl daemon-reload",
    "systemctl enable --now looptune",
    "systemctl status looptune",
    "journalctl -u looptune -f",
)


def parse_unit(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment; keys may repeat."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(entries: list[tuple[str, str, str]], section: str, key: str) -> list[str]:
    return [v for s, k, v in entries if s == section and k == key]


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    path = tmp_path / "venv" / "bin" / "looptune"
    path.parent.mkdir(parents=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def config_source(tmp_path: Path) -> Path:
    path = tmp_path / "default_config.yaml"
    path.write_text("interval_s: 5\n")
    return path


def run_install(root: Path, **kwargs: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = install_service(root=root, out=out, err=err, **kwargs)  # type: ignore[arg-type]
    return rc, out.getvalue(), err.getvalue()


# --- install_service ---------------------------------------------------------


def test_writes_unit_with_bin_path(tmp_path: Path, fake_bin: Path, config_source: Path) -> None:
    root = tmp_path / "root"
    rc, out, err = run_install(root, bin_path=fake_bin, config_source=config_source)
    assert rc == 0, err
    text = (root / UNIT).read_text()
    assert "@LOOPTUNE_BIN@" not in text
    assert values(parse_unit(text), "Service", "ExecStart") == [f"{fake_bin} daemon"]
    assert oct((root / UNIT).stat().st_mode & 0o777) == "0o644"
    assert str(root / UNIT) in out
    for command in SYSTEMCTL_COMMANDS:
        assert command in out


def test_no_temp_files_left(tmp_path: Path, fake_bin: Path, config_source: Path) -> None:
    rc, _, _ = run_install(tmp_path, bin_path=fake_bin, config_source=config_source)
    assert rc == 0
    assert os.listdir(tmp_path / UNIT.parent) == ["looptune.service"]
    assert os.listdir(tmp_path / CONFIG.parent) == ["config.yaml"]


def test_relative_bin_path_made_absolute(
    tmp_path: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(fake_bin.parent)
    rc, _, _ = run_install(tmp_path / "root", bin_path="looptune", config_source=None)
    assert rc == 0
    entries = parse_unit((tmp_path / "root" / UNIT).read_text())
    assert values(entries, "Service", "ExecStart") == [f"{fake_bin} daemon"]


def test_bin_found_on_path(
    tmp_path: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(install.shutil, "which", lambda name: str(fake_bin))
    assert install.resolve_exec() == str(fake_bin)


def test_falls_back_to_python_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install.shutil, "which", lambda name: None)
    monkeypatch.setattr(install.sys, "executable", "/usr/bin/python3")
    assert install.resolve_exec() == "/usr/bin/python3 -m looptune"


def test_exec_path_is_quoted_for_systemd() -> None:
    assert install.resolve_exec("/opt/my tools/looptune") == '"/opt/my tools/looptune"'
    assert install.resolve_exec("/opt/100%/$HOME/looptune") == "/opt/100%%/$$HOME/looptune"


def test_config_copied_when_absent(tmp_path: Path, fake_bin: Path, config_source: Path) -> None:
    rc, out, _ = run_install(tmp_path, bin_path=fake_bin, config_source=config_source)
    assert rc == 0
    assert (tmp_path / CONFIG).read_text() == "interval_s: 5\n"
    assert f"wrote {tmp_path / CONFIG}" in out


def test_existing_config_not_overwritten(
    tmp_path: Path, fake_bin: Path, config_source: Path
) -> None:
    (tmp_path / CONFIG).parent.mkdir(parents=True)
    (tmp_path / CONFIG).write_text("mine: true\n")
    rc, out, _ = run_install(tmp_path, bin_path=fake_bin, config_source=config_source)
    assert rc == 0
    assert (tmp_path / CONFIG).read_text() == "mine: true\n"
    assert "kept existing" in out
    # The unit, unlike the config, is always refreshed.
    assert (tmp_path / UNIT).is_file()


def test_no_config_source_skips_config(tmp_path: Path, fake_bin: Path) -> None:
    rc, out, _ = run_install(tmp_path, bin_path=fake_bin, config_source=None)
    assert rc == 0
    assert not (tmp_path / CONFIG).exists()
    assert "skipped" in out


def test_default_config_is_the_documented_defaults(tmp_path: Path, fake_bin: Path) -> None:
    from looptune.daemon import config

    rc, _, _ = run_install(tmp_path, bin_path=fake_bin)
    assert rc == 0
    written = tmp_path / CONFIG
    assert written.read_text() == config.render_default()
    assert config.load(written) == config.Config()


def test_missing_config_source_fails(tmp_path: Path, fake_bin: Path) -> None:
    rc, _, err = run_install(tmp_path, bin_path=fake_bin, config_source=tmp_path / "nope.yaml")
    assert rc == 1
    assert "cannot read default config" in err


def test_unwritable_root(tmp_path: Path, fake_bin: Path) -> None:
    """A real EACCES: as root (which ignores directory modes) a forked child drops to `nobody`."""
    import io
    import json
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="lt-ro-", dir="/tmp"))
    base.chmod(0o755)
    root = base / "ro"
    root.mkdir()
    root.chmod(0o555)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # child: no pytest machinery from here on, only os._exit
        code = 99
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            out, err = io.StringIO(), io.StringIO()
            rc = install.install_service(root=root, bin_path=fake_bin, config_source=None, out=out, err=err)
            os.write(w, json.dumps([rc, out.getvalue(), err.getvalue()]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    shutil.rmtree(base, ignore_errors=True)
    assert os.waitstatus_to_exitcode(status) == 0, data
    rc, out, err = json.loads(data)
    assert rc == 1
    assert "Permission denied; run as root or pass --root DIR" in err
    assert "systemctl" not in out


def test_permission_error_message(
    tmp_path: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated so the test also means something when run as root.
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(files.tempfile, "mkstemp", denied)    # where install writes through
    rc, out, err = run_install(tmp_path, bin_path=fake_bin, config_source=None)
    assert rc == 1
    assert (
        f"cannot write {tmp_path / UNIT}: Permission denied; run as root or pass --root DIR"
        in err
    )
    assert "systemctl" not in out


def test_failed_write_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(install.os, "replace", boom)
    with pytest.raises(OSError):
        install.atomic_write(tmp_path / "x" / "f", b"data")
    assert os.listdir(tmp_path / "x") == []


# --- the unit file -------------------------------------------------------------


def test_unit_template_settings() -> None:
    text = read_unit_template()
    entries = parse_unit(text)
    service = {k: v for s, k, v in entries if s == "Service"}
    assert text.count("@LOOPTUNE_BIN@") == 1
    assert values(entries, "Unit", "Description")
    assert values(entries, "Unit", "Documentation")
    assert values(entries, "Install", "WantedBy") == ["multi-user.target"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "@LOOPTUNE_BIN@ daemon",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "EnvironmentFile": "-/etc/default/looptune",
        "Restart": "on-failure",
        "RestartSec": "2s",
        "WatchdogSec": "30s",
        "TimeoutStopSec": "10s",
        "LimitNOFILE": "65536",
        "RuntimeDirectory": "looptune",
        "RuntimeDirectoryMode": "0755",
        "RuntimeDirectoryPreserve": "yes",     # /run/looptune stays, root's, while the daemon is down
        "StateDirectory": "looptune",
        "NoNewPrivileges": "true",
        "ProtectSystem": "strict",
        "ProtectHome": "read-only",
        "PrivateTmp": "true",
        "DevicePolicy": "auto",
        "SystemCallArchitectures": "native",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "CapabilityBoundingSet": "CAP_SYS_PTRACE CAP_DAC_READ_SEARCH",
    }
    for key, value in expected.items():
        assert service.get(key) == value, key
    for key in (
        "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
        "ProtectControlGroups", "ProtectClock", "ProtectHostname", "RestrictNamespaces",
        "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
    ):
        assert service.get(key) == "true", key
    assert sorted(values(entries, "Service", "DeviceAllow")) == sorted([
        "/dev/nvidiactl rw",
        "/dev/nvidia-uvm rw",
        "/dev/nvidia-uvm-tools rw",
        "/dev/nvidia-modeset rw",
        "char-nvidia-frontend rw",
        "char-nvidia-caps rw",
    ])


def test_unit_template_keeps_gpus_and_processes_visible() -> None:
    keys = {k for _, k, _ in parse_unit(read_unit_template())}
    assert "PrivateDevices" not in keys  # would hide /dev/nvidia*
    assert "ProtectProc" not in keys  # invisible would hide training jobs
    assert "ProcSubset" not in keys  # pid is required to read /proc/PID
    # NVML's ctypes callbacks need W+X memory.
    assert ("Service", "MemoryDenyWriteExecute", "true") not in parse_unit(read_unit_template())


def test_unit_template_is_packaged() -> None:
    # setuptools package-data must ship the template next to the code.
    import importlib.resources

    assert (importlib.resources.files("daemon") / "systemd" / "looptune.service").is_file()


# --- systemd-analyze verify ----------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
PROBLEM_WORDS = ("unknown", "invalid", "failed", "ignoring", "not executable", "deprecated")


def verify(unit_path: Path) -> tuple[int, list[str], str]:
    """Run `systemd-analyze verify`; returns rc, problem lines naming the unit, output."""
    assert SYSTEMD_ANALYZE is not None
    # --man=no: Documentation=man:... would otherwise fail on hosts without man pages.
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit_path)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice", "SYSTEMD_PAGER": ""},
    )
    output = proc.stdout + proc.stderr
    problems = [
        line for line in output.splitlines()
        if unit_path.name in line and any(w in line.lower() for w in PROBLEM_WORDS)
    ]
    return proc.returncode, problems, output


def write_unit(directory: Path, text: str) -> Path:
    path = directory / "looptune.service"
    path.write_text(text)
    return path


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = write_unit(tmp_path, render_unit(install.resolve_exec(sys.executable)))
    rc, problems, output = verify(unit)
    assert rc == 0, output
    assert problems == [], output


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_catches_bad_keys(tmp_path: Path) -> None:
    # Guards against a verify() that silently checks nothing.
    text = render_unit(install.resolve_exec(sys.executable))
    text = text.replace("Type=notify\n", "Type=notify\nNoSuchSetting=1\nProtectProc=sideways\n")
    _, problems, output = verify(write_unit(tmp_path, text))
    assert any("NoSuchSetting" in line for line in problems), output
    assert any("sideways" in line for line in problems), output
