"""A test bed for the network: two network namespaces joined by a veth pair, both ends shaped.

    from netbed import NetBed, NetBedUnavailable

    with NetBed(rate="1gbit") as bed:          # or rate=None: the same link, unshaped
        bed.run(1, "python3", "server.py")      # `ip netns exec <namespace 1> python3 server.py`
        bed.addr(0), bed.ifname(0)              # "10.77.X.1", the veth end in namespace 0
        ...                                     # or, in a forked child: bed.enter(0), then sockets

Each bed has its own namespaces `lt<pid><n>a` / `...b` (unique per process and bed), one veth pair
created directly inside them (`<ns>0` / `<ns>1`, never in the host's namespace), addresses
10.77.X.1/24 and 10.77.X.2/24, lo and the veth ends up, and with a rate a token bucket on the
egress of both ends: `tc qdisc add dev <end> root tbf rate R burst B latency L` (so each direction
is limited to R). Everything is removed on exit, on an exception too: processes still running in
a namespace (ours: nothing else can be in it) are killed, then `ip netns del` removes each
namespace and the veth with it. A bed left by a process that was killed (SIGKILL skips every
clean-up) is removed by the next NetBed of any process: its name carries the dead pid.

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2 (`ip`, `tc`). Where a namespace cannot be
made, NetBed raises NetBedUnavailable with the failing command and its stderr: a test that needs
the bed fails with that reason instead of skipping (CI runs as root, .ci/run installs iproute2).

Importable by tests (tests/ is on sys.path) and by benchmarks (with the repository root on
sys.path: `from tests.netbed import NetBed`).
"""
from __future__ import annotations

import atexit
import ctypes
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from typing import Any, Sequence

__all__ = ["NetBed", "NetBedUnavailable", "bed_or_fail", "netns_list", "remove_stale"]

PREFIX = "lt"
NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
_count = itertools.count()
_live: dict[int, NetBed] = {}        # id -> open beds of this process, removed at exit if still open


class NetBedUnavailable(RuntimeError):
    """The namespaces (or the shaping) could not be set up here; the message says which command
    failed and what it printed."""


def _ip(*args: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return _cmd(["ip", *args], check=check, timeout=timeout)


def _cmd(argv: Sequence[str], check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise NetBedUnavailable(f"{argv[0]} is not installed ({exc}); install iproute2 "
                                f"(apt-get install iproute2)") from None
    except subprocess.TimeoutExpired:
        raise NetBedUnavailable(f"`{' '.join(argv)}` did not finish within {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        raise NetBedUnavailable(f"`{' '.join(argv)}` failed (exit {proc.returncode}): "
                                f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def netns_list() -> list[str]:
    """Names of the network namespaces `ip netns` knows (empty where iproute2 is missing)."""
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_NAME = re.compile(rf"^{PREFIX}(\d+)x\d+[ab]$")


def remove_stale() -> list[str]:
    """Remove the namespaces of beds whose process is gone (killed before it could clean up)."""
    gone = []
    for name in netns_list():
        m = _NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_inside(name)
            if _ip("netns", "del", name, check=False).returncode == 0:
                gone.append(name)
    return gone


def _kill_inside(ns: str) -> None:
    """Kill what still runs in namespace `ns`: only a bed's own processes can be there."""
    proc = _ip("netns", "pids", ns, check=False)
    pids = [int(p) for p in proc.stdout.split() if p.strip().isdigit()]
    me = os.getpid()
    for pid in pids:
        if pid != me:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if p != me and _pid_alive(p) and not _zombie(p)]
        if pids:
            time.sleep(0.02)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _burst(rate: str) -> str:
    """A tbf bucket of about 4 ms at `rate` (at least 32 kB): big enough for the kernel's timer and
    a GSO packet, small enough that a transfer of megabytes runs at the rate."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)(bit|bps)", rate.strip().lower())
    if not m:
        raise ValueError(f"rate {rate!r}: a number and kbit, mbit, gbit (or kbps, mbps, gbps)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    bytes_per_s = float(m.group(1)) * scale / (8 if m.group(3) == "bit" else 1)
    return f"{max(32 * 1024, int(bytes_per_s * 0.004))}b"


class NetBed:
    """Two network namespaces joined by a veth pair, optionally shaped; see the module docstring.

    rate: a tc rate ("1gbit", "10gbit", "100mbit") applied to the egress of both veth ends, or None
    for the unshaped link. burst / latency: tbf's; burst defaults to ~4 ms of the rate.
    """

    def __init__(self, rate: str | None = "1gbit", *, burst: str | None = None, latency: str = "50ms") -> None:
        self.rate = rate
        self.burst = burst if burst is not None or rate is None else _burst(rate)
        self.latency = latency
        n = next(_count)
        tag = f"{PREFIX}{os.getpid()}x{n}"
        self.ns = (f"{tag}a", f"{tag}b")
        # interface names hold 15 characters: short ones, unique inside each namespace is enough
        self.ifnames = ("ltv0", "ltv1")
        self.subnet = n % 250
        self.addrs = (f"10.77.{self.subnet}.1", f"10.77.{self.subnet}.2")
        self.created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []     # started by popen(): killed at close()
        self._open = False
        self._owner = os.getpid()      # a forked child inherits the object, never the clean-up

    # ---- set up and tear down ----

    def __enter__(self) -> NetBed:
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> NetBed:
        if self._open:
            return self
        if os.geteuid() != 0:
            raise NetBedUnavailable(f"network namespaces need root (running as uid {os.geteuid()})")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise NetBedUnavailable(f"`{tool}` is not installed; install iproute2 (apt-get install iproute2)")
        try:
            remove_stale()
        except NetBedUnavailable:
            pass
        self._open = True
        _live[id(self)] = self
        try:
            for ns in self.ns:
                _ip("netns", "add", ns)
                self.created.append(ns)
            a, b = self.ns
            _ip("link", "add", self.ifnames[0], "netns", a, "type", "veth", "peer", "name", self.ifnames[1],
                "netns", b)
            for side, ns in enumerate(self.ns):
                _ip("-n", ns, "addr", "add", f"{self.addrs[side]}/24", "dev", self.ifnames[side])
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", self.ifnames[side], "up")
                if self.rate is not None:
                    _cmd(["tc", "-n", ns, "qdisc", "add", "dev", self.ifnames[side], "root", "tbf",
                          "rate", self.rate, "burst", str(self.burst), "latency", self.latency])
            self._wait_link()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_link(self, timeout: float = 5.0) -> None:
        """Until the veth carries packets (its carrier comes up a moment after `link set up`)."""
        deadline = time.monotonic() + timeout
        while True:
            proc = _ip("-n", self.ns[0], "-o", "link", "show", self.ifnames[0], check=False)
            if "LOWER_UP" in proc.stdout:
                return
            if time.monotonic() > deadline:
                raise NetBedUnavailable(f"veth {self.ifnames[0]} in {self.ns[0]} did not come up: {proc.stdout.strip()}")
            time.sleep(0.02)

    def close(self) -> None:
        """Kill what still runs inside, delete both namespaces (the veth goes with them); idempotent."""
        if not self._open or os.getpid() != self._owner:
            return
        self._open = False
        _live.pop(id(self), None)
        for p in self._procs:       # by pid too: one may not have entered its namespace yet (ip netns exec)
            if p.poll() is None:
                p.kill()
        self._procs = []
        for ns in self.created:
            _kill_inside(ns)
        for ns in self.created:
            _ip("netns", "del", ns, check=False)
        self.created = []

    # ---- what runs inside ----

    def addr(self, side: int) -> str:
        return self.addrs[side]

    def ifname(self, side: int) -> str:
        return self.ifnames[side]

    def argv(self, side: int, *cmd: str) -> list[str]:
        """The command line that runs `cmd` inside namespace `side` (0 or 1)."""
        return ["ip", "netns", "exec", self.ns[side], *cmd]

    def run(self, side: int, *cmd: str, timeout: float = 60.0, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run `cmd` inside namespace `side` to completion (text output captured unless told)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(side, *cmd), timeout=timeout, **kw)

    def popen(self, side: int, *cmd: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start `cmd` inside namespace `side`; it is killed at close() if still running."""
        p = subprocess.Popen(self.argv(side, *cmd), **kw)
        self._procs.append(p)
        return p

    def enter(self, side: int) -> None:
        """Move the calling thread into namespace `side` (setns): for a freshly forked child, whose
        one thread then opens every socket (and starts every thread) inside it."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(os.path.join(NETNS_DIR, self.ns[side]), os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetBedUnavailable(f"setns into {self.ns[side]} failed: {os.strerror(err)}")
        finally:
            os.close(fd)

    def __repr__(self) -> str:
        return (f"NetBed({self.ns[0]} {self.ifnames[0]} {self.addrs[0]} <-> {self.ns[1]} {self.ifnames[1]} "
                f"{self.addrs[1]}, rate {self.rate or 'unshaped'})")


def bed_or_fail(rate: str | None = "1gbit", **kw: Any) -> NetBed:
    """For tests: an open NetBed (close it, or use it in a `with`), or the test FAILS with the
    reason it could not be made: never a skip, so a CI that lost root or iproute2 says so."""
    import pytest
    try:
        return NetBed(rate, **kw).open()
    except NetBedUnavailable as exc:
        pytest.fail(f"the network test bed could not be set up: {exc}", pytrace=False)


@atexit.register
def _close_all() -> None:
    for bed in list(_live.values()):
        try:
            bed.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
