"""The network test bed (tests/netbed.py) does what the compression tests and benchmark rely on.

- Shaping: a TCP transfer from one namespace to the other over `tbf rate 1gbit` runs near 1 Gbit/s,
  and the same transfer over the unshaped veth is several times faster.
- Clean-up: no namespace is left after the bed closes, after an exception inside it, with a
  process still running inside it (killed), nor after its process was SIGKILLed (the next bed
  removes the leftover).
- Where the bed cannot be made, the test fails with the command's reason (never a skip).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from netbed import NetBed, NetBedUnavailable, bed_or_fail, netns_list

TESTS = Path(__file__).resolve().parent.parent
PORT = 5201
MB = 1 << 20

SERVER = textwrap.dedent("""
    import json, socket, sys, time
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept()
    buf = bytearray(1 << 20); n = 0; t0 = None
    while True:
        k = c.recv_into(buf)
        if not k:
            break
        if t0 is None:
            t0 = time.perf_counter()
        n += k
    print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t0}), flush=True)
""")

CLIENT = textwrap.dedent("""
    import socket, sys
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
    chunk = b"x" * (1 << 20)
    for _ in range(int(sys.argv[3])):
        c.sendall(chunk)
    c.close()
""")


def transfer(bed: NetBed, mib: int) -> float:
    """Bits per second of one TCP transfer of `mib` MiB from namespace 0 to namespace 1."""
    server = bed.popen(1, sys.executable, "-c", SERVER, str(PORT), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        client = bed.run(0, sys.executable, "-c", CLIENT, bed.addr(1), str(PORT), str(mib), timeout=30)
        assert client.returncode == 0, client.stderr
        out, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(5)
    got = json.loads(out.strip().splitlines()[-1])
    assert got["bytes"] == mib * MB
    return got["bytes"] * 8 / got["seconds"]


def test_the_shaped_link_runs_near_its_rate_and_the_unshaped_one_far_faster() -> None:
    with bed_or_fail("1gbit") as bed:
        shaped = transfer(bed, 48)
    with bed_or_fail(None) as bed:
        free = transfer(bed, 48)
    # goodput: TCP/IP and Ethernet headers take ~5% of what tbf counts
    assert 0.75e9 <= shaped <= 1.05e9, f"shaped to 1gbit, measured {shaped / 1e9:.2f} Gbit/s"
    assert free >= 2.5 * shaped, f"unshaped {free / 1e9:.2f} Gbit/s vs shaped {shaped / 1e9:.2f} Gbit/s"


def test_each_end_has_its_address_and_its_token_bucket() -> None:
    with bed_or_fail("1gbit") as bed:
        for side in (0, 1):
            addr = bed.run(side, "ip", "-o", "-4", "addr", "show", "dev", bed.ifname(side)).stdout
            assert f"{bed.addr(side)}/24" in addr
            qdisc = bed.run(side, "tc", "qdisc", "show", "dev", bed.ifname(side)).stdout
            assert "tbf" in qdisc and "rate 1Gbit" in qdisc, qdisc
        ping = bed.run(0, "ping", "-c", "1", "-W", "2", bed.addr(1)) if _has("ping") else None
        assert ping is None or ping.returncode == 0, ping.stdout


def _has(tool: str) -> bool:
    import shutil
    return shutil.which(tool) is not None


def test_nothing_is_left_behind() -> None:
    # closed normally, with a process still running inside (it is killed)
    with bed_or_fail(None) as bed:
        names = set(bed.ns)
        assert names <= set(netns_list())
        sleeper = bed.popen(0, "sleep", "600")
    assert sleeper.wait(10) != 0                  # killed by close()
    assert not names & set(netns_list())
    # an exception inside the bed
    with pytest.raises(RuntimeError, match="boom"):
        with bed_or_fail("1gbit") as bed:
            names = set(bed.ns)
            raise RuntimeError("boom")
    assert not names & set(netns_list())
    # a process SIGKILLed with its bed open: the next bed removes the leftover
    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); from netbed import NetBed; "
            "b = NetBed(None).open(); print(' '.join(b.ns), flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(TESTS)], capture_output=True, text=True, timeout=30)
    left = set(proc.stdout.split())
    assert len(left) == 2 and left <= set(netns_list()), (proc.stdout, proc.stderr)
    with bed_or_fail(None):
        assert not left & set(netns_list())
    mine = f"lt{os.getpid()}x"
    assert not [n for n in netns_list() if n.startswith(mine)]


def test_a_bed_that_cannot_be_made_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    t = time.monotonic()
    with pytest.raises(NetBedUnavailable, match="iproute2"):
        NetBed("1gbit").open()
    assert time.monotonic() - t < 5
