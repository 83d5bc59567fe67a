"""Whom the hook trusts, and which knob values it takes (issue 10, finding 2).

A fake "daemon" (FAKE below, stdlib only) runs as its own process, as root or as another uid: it
listens, answers any hello with `welcome` and a decision num_workers=48, and prints every line it
receives. Against it:

- a hook speaks only to a daemon of root or of its own uid (SO_PEERCRED), and says nothing to any
  other: no hello, no report, no decision taken; one log line names the path and the uid;
- a hook looks in a default directory (/tmp/looptune-UID, $XDG_RUNTIME_DIR/looptune) only if root
  or its own user owns it and nobody else may write in it;
- the daemon makes such a directory 0700 and refuses one another user owns;
- a decision's value is bounded where the DataLoader actuator applies it: a worker count above the
  job's cap, negative or not an integer (True too) is refused (`failed`), never applied.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import looptune.tuners.hook.actuators.loader as loader_mod
from daemon_proc import ROOT, DaemonPool
from looptune import protocol
from looptune.daemon import config as cfg
from looptune.tuners.hook import Hook

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a second user (uid 65534)")

NOBODY = 65534
OTHER = 65533          # a third user, for a hook that runs as NOBODY
FAST = {"hook": {"report_interval_seconds": 0.1, "reconnect_max_seconds": 0.2}}

FAKE = r'''
import json, os, socket, sys, threading
path, uid = sys.argv[1], int(sys.argv[2])
if uid >= 0:                      # drop privileges for real: groups, gid, then uid
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
os.chmod(path, 0o666)
srv.listen(16)
print("ready", flush=True)

def serve(c):
    buf = b""
    try:
        while True:
            chunk = c.recv(65536)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                print("got " + line.decode("utf-8", "replace"), flush=True)
                if json.loads(line).get("type") == "hello":
                    c.sendall(b'{"v":1,"type":"welcome","report_interval_seconds":0.1}\n'
                              b'{"v":1,"type":"decision","id":1,"knob":"num_workers","value":48,'
                              b'"reason":"more is better","tuner":"workers"}\n')
    except OSError:
        pass

while True:
    conn, _ = srv.accept()
    print("connected", flush=True)
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''


class Fake:
    """FAKE as a process: `lines()` is what it printed (ready, connected, got ...)."""

    def __init__(self, path: Path, uid: int, out: Path) -> None:
        self.path, self.out_path = path, out
        with open(out, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-I", "-c", FAKE, str(path), str(uid)],
                                         stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                         cwd="/", start_new_session=True)
        deadline = time.monotonic() + 10
        while "ready" not in self.lines():
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                f"the fake daemon did not start: {self.out_path.read_text(errors='replace')}"
            time.sleep(0.02)

    def lines(self) -> list[str]:
        return self.out_path.read_text(errors="replace").splitlines()

    def received(self) -> list[str]:
        return [line for line in self.lines() if line != "ready"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def fakes(short_tmp: Path) -> Iterator[Callable[[Path, int], Fake]]:
    started: list[Fake] = []

    def start(path: Path, uid: int) -> Fake:
        f = Fake(path, uid, short_tmp / f"fake-{len(started)}.out")
        started.append(f)
        return f

    yield start
    for f in started:
        f.close()


@pytest.fixture
def hooks() -> Iterator[Callable[..., Hook]]:
    made: list[Hook] = []

    def make(**kwargs: Any) -> Hook:
        kwargs.setdefault("config", FAST)
        kwargs.setdefault("tune", False)       # no decision but the test's (or the fake's)
        h = Hook(run="victim", **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture
def no_defaults(monkeypatch: pytest.MonkeyPatch, short_tmp: Path) -> None:
    """The hook's default candidates without this machine's: no /run/looptune, no $XDG_RUNTIME_DIR."""
    monkeypatch.setattr(cfg, "SYSTEM_SOCKET_DIR", str(short_tmp / "no-run"), raising=False)
    for var in ("XDG_RUNTIME_DIR", "LOOPTUNE_SOCKET", "RUNTIME_DIRECTORY", "LOOPTUNE_CONFIG"):
        monkeypatch.delenv(var, raising=False)


class Items(Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i])


def shared_dir(short_tmp: Path, owner: int) -> Path:
    """A directory under short_tmp that `owner` can write in (short_tmp opened for traversal)."""
    os.chmod(short_tmp, 0o711)
    d = short_tmp / "shared"
    d.mkdir()
    os.chown(d, owner, owner)
    return d


def refusals(caplog: pytest.LogCaptureFixture, *needles: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "looptune.hook" and all(n in r.getMessage() for n in needles)]


# ---- (1) a daemon of another user ----

def test_a_daemon_of_another_user_gets_nothing_and_decides_nothing(
        hooks: Callable[..., Hook], fakes: Callable[[Path, int], Fake], short_tmp: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    path = shared_dir(short_tmp, NOBODY) / "looptune.sock"
    fake = fakes(path, NOBODY)
    caplog.set_level(logging.WARNING, logger="looptune.hook")
    hook = hooks(socket=str(path))
    assert hook.mode == "embedded"
    loader = hook.watch(DataLoader(Items(), batch_size=4))
    for _ in range(3):                 # a second of reconnect attempts: still refused, logged once
        for _ in loader:
            hook.step()
            time.sleep(0.03)
    hook.close()
    assert hook.mode == "embedded"
    assert [d for d in hook.decisions if d.knob == "num_workers"] == []
    assert loader.active.num_workers == 0 and hook.knobs["num_workers"] == 0
    # connected (the kernel's record is read after connect), then closed before any hello
    assert all(line == "connected" for line in fake.received()), fake.received()
    logged = refusals(caplog, str(path), f"uid {NOBODY}")
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert "neither root nor this job's uid 0" in logged[0]


# The interpreter's own files may be closed to other users (a pyenv under /root): everything the
# hook imports is imported before the process drops to the hook's uid.
HOOK_AS = r'''
import json, os, sys
from looptune.daemon import config as cfg
from looptune.tuners.hook import Hook, channel, embedded
cfg.parse({})
uid = int(sys.argv[2])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
h = Hook(run="job", socket=sys.argv[1], tune=False, config={})
print(json.dumps({"mode": h.mode}), flush=True)
h.close()
'''


@pytest.mark.parametrize("daemon_uid,trusted", [(NOBODY, True), (0, True), (OTHER, False)],
                         ids=["same-user", "root", "third-user"])
def test_a_non_root_hook_trusts_root_and_its_own_user_only(
        fakes: Callable[[Path, int], Fake], short_tmp: Path, daemon_uid: int, trusted: bool) -> None:
    path = shared_dir(short_tmp, daemon_uid) / "looptune.sock"
    fake = fakes(path, daemon_uid)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPTUNE_", "RANK", "WORLD_SIZE"))}
    env.update(HOME=str(short_tmp), PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run([sys.executable, "-c", HOOK_AS, str(path), str(NOBODY)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["mode"] == ("daemon" if trusted else "embedded"), out.stderr
    hello = [line for line in fake.received() if '"hello"' in line]
    assert bool(hello) == trusted
    if not trusted:
        assert f"uid {OTHER}" in out.stderr and str(path) in out.stderr


# ---- (2) a default directory another user prepared ----

@pytest.mark.parametrize("place", ["tmp", "xdg"])
@pytest.mark.parametrize("prepared", ["owned-by-another-user", "mode-0777", "symlink"])
def test_a_default_directory_prepared_by_another_user_is_not_used(
        hooks: Callable[..., Hook], fakes: Callable[[Path, int], Fake], short_tmp: Path, no_defaults: None,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, place: str, prepared: str) -> None:
    if place == "xdg":
        xdg = short_tmp / "xdg"
        xdg.mkdir(mode=0o700)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
        d = xdg / "looptune"
    else:
        d = Path(f"/tmp/looptune-{os.getuid()}")
        if os.path.lexists(d):
            pytest.skip(f"{d} exists on this machine; not touching it")
    try:
        if prepared == "symlink":
            target = short_tmp / "elsewhere"
            target.mkdir(mode=0o700)
            os.symlink(target, d)
            os.lchown(d, NOBODY, NOBODY)
        else:
            d.mkdir()
            if prepared == "owned-by-another-user":
                os.chown(d, NOBODY, NOBODY)
                os.chmod(d, 0o755)
            else:
                os.chmod(d, 0o777)
        # the one answering is root itself: only the directory tells that another user set the place
        fake = fakes(d / "looptune.sock", -1)
        caplog.set_level(logging.WARNING, logger="looptune.hook")
        hook = hooks()
        time.sleep(0.5)                       # retries: refused again, logged once
        assert hook.mode == "embedded"
        assert fake.received() == []          # never connected
        logged = refusals(caplog, str(d / "looptune.sock"), "not connecting")
        assert len(logged) == 1, [r.getMessage() for r in caplog.records]
        assert {"owned-by-another-user": f"uid {NOBODY}", "mode-0777": "mode 777",
                "symlink": "not a directory"}[prepared] in logged[0]
    finally:
        if os.path.islink(d):
            os.unlink(d)
        else:
            for p in d.glob("*"):
                p.unlink()
            d.rmdir()


def test_a_default_directory_of_its_own_user_closed_to_others_is_used(
        hooks: Callable[..., Hook], fakes: Callable[[Path, int], Fake], short_tmp: Path, no_defaults: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = short_tmp / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    (xdg / "looptune").mkdir(mode=0o700)
    fake = fakes(xdg / "looptune" / "looptune.sock", -1)
    hook = hooks()
    assert hook.mode == "daemon"
    assert any('"hello"' in line for line in fake.received())


# ---- (3) the daemon and its per-user directory ----

def test_the_daemon_refuses_a_fallback_directory_another_user_owns(daemons: DaemonPool, short_tmp: Path) -> None:
    xdg = short_tmp / "xdg"
    xdg.mkdir(mode=0o700)
    d = xdg / "looptune"
    d.mkdir()
    os.chown(d, NOBODY, NOBODY)
    os.chmod(d, 0o777)
    proc = daemons.start(socket_path=d / "looptune.sock", env={"XDG_RUNTIME_DIR": str(xdg)})
    assert proc.wait_exit(15) == 1
    assert f"belongs to uid {NOBODY}" in proc.stderr and str(d) in proc.stderr, proc.stderr
    assert list(d.iterdir()) == []
    assert os.stat(d).st_uid == NOBODY and stat.S_IMODE(os.stat(d).st_mode) == 0o777   # left as found


def test_the_daemon_makes_its_fallback_directory_0700(daemons: DaemonPool, short_tmp: Path) -> None:
    xdg = short_tmp / "xdg"
    xdg.mkdir(mode=0o755)
    d = xdg / "looptune"
    proc = daemons.start(socket_path=d / "looptune.sock", env={"XDG_RUNTIME_DIR": str(xdg)}).wait_ready()
    st = os.stat(d)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o700)
    assert proc.running()


def test_default_socket_paths_name_the_private_dirs(short_tmp: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(short_tmp)}
    assert cfg.is_private_socket_dir(str(short_tmp / "looptune"), env)
    assert cfg.is_private_socket_dir(f"/tmp/looptune-{os.getuid()}/", env)
    assert not cfg.is_private_socket_dir("/run/looptune", env)
    assert not cfg.is_private_socket_dir(str(short_tmp), env)


# ---- (4) bounded knob values ----

def _decision(knob: str, value: Any, id: int = 1) -> dict[str, Any]:
    return protocol.check_decision({"id": id, "knob": knob, "value": value, "reason": "test", "tuner": "test"})


@pytest.fixture
def watched(hooks: Callable[..., Hook], short_tmp: Path) -> tuple[Hook, Any]:
    hook = hooks(socket=str(short_tmp / "nobody.sock"), config={})
    return hook, hook.watch(DataLoader(Items(), batch_size=4, num_workers=1, prefetch_factor=2))


def _apply_before_the_first_epoch(hook: Hook, knob: str, value: Any) -> Any:
    # applied at a step boundary before any iteration: a value that got through changes the
    # loader the next epoch would start, and starts no worker here
    hook._queue_decision(_decision(knob, value))
    hook.step()
    assert len(hook.decisions) == 1
    return hook.decisions[0]


@pytest.mark.parametrize("value", [10**9, 2**63, 48, -1, True, 4.0, "8"],
                         ids=["1e9", "2^63", "48-on-one-cpu", "negative", "True", "float", "string"])
def test_a_worker_count_out_of_bounds_is_refused(watched: tuple[Hook, Any], monkeypatch: pytest.MonkeyPatch,
                                                 value: Any) -> None:
    hook, loader = watched
    if value == 48 and not isinstance(value, bool):
        # cap: max(32, 16 * 1) = 32 < 48 (raising=False: the same test runs where no cap exists)
        monkeypatch.setattr(loader_mod, "_cpus_allowed", lambda: 1, raising=False)
    d = _apply_before_the_first_epoch(hook, "num_workers", value)
    assert (d.outcome, d.new) == ("failed", value), d
    assert loader.active.num_workers == 1 and hook.knobs["num_workers"] == 1
    assert "not applied" in d.detail
    assert [b.tolist() for b in loader] == [[[4 * i + j] for j in range(4)] for i in range(10)]
    assert loader.active.num_workers == 1


def test_the_cap_message_names_why(watched: tuple[Hook, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    hook, loader = watched
    monkeypatch.setattr(loader_mod, "_cpus_allowed", lambda: 2)
    d = _apply_before_the_first_epoch(hook, "num_workers", 33)
    assert d.outcome == "failed" and "cap of 32" in d.detail and "per CPU" in d.detail


def test_the_memory_available_lowers_the_cap(watched: tuple[Hook, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    hook, loader = watched
    monkeypatch.setattr(loader_mod, "_available_memory_bytes", lambda: 2 * loader_mod.WORKER_MIN_BYTES)
    d = _apply_before_the_first_epoch(hook, "num_workers", 4)       # 1 running + 2 more at most
    assert d.outcome == "failed" and "cap of 3" in d.detail and "memory" in d.detail
    assert loader.active.num_workers == 1
    hook._queue_decision(_decision("num_workers", 3, id=2))
    hook.step()
    assert hook.decisions[-1].outcome == "applied" and loader.active.num_workers == 3


def test_a_worker_count_within_the_cap_is_applied_and_lowering_always_is(
        watched: tuple[Hook, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    hook, loader = watched
    d = _apply_before_the_first_epoch(hook, "num_workers", 24)      # the held-out workload's 24 on 2 cores
    assert d.outcome == "applied" and loader.active.num_workers == 24
    monkeypatch.setattr(loader_mod, "_cpus_allowed", lambda: 1)
    monkeypatch.setattr(loader_mod, "_available_memory_bytes", lambda: 0)
    hook._queue_decision(_decision("num_workers", 2, id=2))          # above no cap that matters: fewer
    hook.step()
    assert hook.decisions[-1].outcome == "applied" and loader.active.num_workers == 2


@pytest.mark.parametrize("value", [0, 65, 10**9, True, 2.0])
def test_a_prefetch_factor_out_of_bounds_is_refused(watched: tuple[Hook, Any], value: Any) -> None:
    hook, loader = watched
    d = _apply_before_the_first_epoch(hook, "prefetch_factor", value)
    assert d.outcome == "failed" and "not applied" in d.detail, d
    assert loader.active.prefetch_factor == 2 and hook.knobs["prefetch_factor"] == 2
