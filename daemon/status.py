"""`looptune status`: the jobs on this node as the daemon sees them, once or refreshing like top."""
from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any, TextIO

from looptune import protocol


def fetch(paths: list[str], timeout: float = 2.0) -> list[dict[str, Any]]:
    """Ask the daemon for the jobs this user may see; raises OSError if no daemon answers."""
    last: OSError | None = None
    for path in paths:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(protocol.encode({"type": "status"}))
            buf = bytearray()
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > 16 * protocol.MAX_MESSAGE_BYTES:
                    break
            msg = protocol.decode(bytes(buf).partition(b"\n")[0], protocol.SERVER_TYPES)
            if msg["type"] != "status_reply" or not isinstance(msg.get("jobs"), list):
                raise OSError(f"unexpected reply from {path}: {msg.get('type')}")
            return msg["jobs"]
        except (OSError, protocol.ProtocolError) as exc:
            last = exc if isinstance(exc, OSError) else OSError(str(exc))
        finally:
            s.close()
    raise last or OSError("no socket path")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return "-"


def render(jobs: list[dict[str, Any]], width: int = 160) -> str:
    head = ["RUN", "RANK", "PID", "SAMPLES/S", "DATA WAIT", "CPU", "GPU SM", "GPU MEM", "RSS", "DEV PEAK", "OOMS",
            "GNS", "KNOBS", "LAST DECISION"]
    rows = [head]
    for j in jobs:
        gpus = j.get("gpu") or {}
        sm = [g.get("sm_ratio") for g in gpus.values() if g.get("sm_ratio") is not None]
        mem = [g.get("memory_bytes") for g in gpus.values() if g.get("memory_bytes") is not None]
        knobs = " ".join(f"{k}={v}" for k, v in sorted((j.get("knobs") or {}).items()) if v is not None)
        d = j.get("last_decision")
        last = f"{d.get('knob')} {d.get('old', '')}->{d.get('value')} {d.get('outcome', '')}" if d else "-"
        state = "" if j.get("hook") else " (no hook)"
        if j.get("disabled"):
            state = " (hook off)"
        elif j.get("hook") and not j.get("connected"):
            state = " (gone)"
        rows.append([str(j.get("run")) + state, str(j.get("rank")), str(j.get("pid")),
                     _num(j.get("samples_per_second")), _pct(j.get("data_wait_share")),
                     _num(j.get("cpu_cores"), "{:.2f}"), _pct(sum(sm) / len(sm) if sm else None),
                     _bytes(sum(mem) if mem else None), _bytes(j.get("rss_bytes")),
                     _bytes(j.get("device_peak_bytes")), _num(j.get("oom_recoveries"), "{:.0f}"),
                     _num(j.get("gradient_noise_scale"), "{:.0f}"), knobs or "-", last])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()[:width] for r in rows]
    if len(rows) == 1:
        lines.append("(no training jobs on this node)")
    return "\n".join(lines)


def main(paths: list[str], watch: float | None, out: TextIO = sys.stdout) -> int:
    try:
        while True:
            try:
                jobs = fetch(paths)
            except OSError as exc:
                print(f"looptune status: no daemon answered at {', '.join(paths)}: {exc}", file=sys.stderr)
                return 1
            text = render(jobs, os.get_terminal_size().columns if out.isatty() else 400)
            if watch:
                out.write("\x1b[H\x1b[2J" if out.isatty() else "\n")
                out.write(time.strftime("%H:%M:%S") + f"  looptune status (every {watch:g}s, Ctrl-C quits)\n")
            out.write(text + "\n")
            out.flush()
            if not watch:
                return 0
            time.sleep(watch)
    except KeyboardInterrupt:
        return 0
