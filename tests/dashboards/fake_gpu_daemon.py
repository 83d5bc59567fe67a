"""`looptune daemon` on two fake GPUs: the fake NVML of tests/fakes replays a hand-written H200
trace in real time (energy and PCIe counters grow with the clock), so the GPU panels and
rules of the dashboards have data on a machine without a GPU.

    python fake_gpu_daemon.py TRACE PIDFILE daemon --config ... --listen ... --socket ...

Once PIDFILE holds a pid, GPU 0 lists that process as its compute process (so the training
job holds GPU 0 with a per-process utilization sample), and one XID 79 is injected on GPU 1
as soon as the daemon's GPU collector listens for XID events. Everything after PIDFILE is the
looptune command line.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.fakes.fake_pynvml import FakeNVML  # noqa: E402

JOB_GPU_MEMORY = 38 * 2**30


def feed(fake: FakeNVML, pidfile: Path, stop: threading.Event) -> None:
    attached = injected = False
    deadline = time.monotonic() + 600
    while not stop.wait(0.1) and time.monotonic() < deadline and not (attached and injected):
        if not attached:
            try:
                pid = int(pidfile.read_text())
            except (OSError, ValueError):
                pid = 0
            if pid:
                fake.set_processes(0, [{"pid": pid, "used_gpu_memory": JOB_GPU_MEMORY, "sm_util": 91,
                                        "mem_util": 37, "enc_util": 0, "dec_util": 0}])
                attached = True
        if not injected:
            injected = fake.inject_xid(1, 79) > 0


def main(argv: list[str]) -> int:
    trace, pidfile, rest = argv[0], Path(argv[1]), argv[2:]
    fake = FakeNVML.from_trace(trace, realtime=True)
    for dev in fake.state.devices:
        dev["processes"] = []
    sys.modules["pynvml"] = fake
    stop = threading.Event()
    threading.Thread(target=feed, args=(fake, pidfile, stop), name="fake-gpu-feed", daemon=True).start()
    from looptune.daemon.cli import main as looptune
    try:
        return looptune(rest)
    finally:
        stop.set()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
