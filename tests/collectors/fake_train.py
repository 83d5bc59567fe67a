"""A stand-in for a training process, for the jobs collector's tests; no torch.

    python fake_train.py --tag TAG [--workers N] [--burn SECONDS] [--launch K]

It forks N worker children through multiprocessing (like DataLoader workers: same command line
and environment as the parent); each burns SECONDS of CPU, reports ready, then sleeps until told
to stop. With --launch K it is a torchrun-like launcher instead: it starts K copies of itself
(without --launch) with RANK=0..K-1 and WORLD_SIZE=K, and has no workers of its own.

Protocol: one line on stdout when everything is ready, then one reply line per stdin command.
    ready PID CHILD_PIDS...      workers (or, for a launcher, the ranked children)
    exit    -> exited PID        stop the last worker and reap it
    burn S  -> burned            burn S seconds of CPU in this process
    quit or EOF                  stop the workers (or children) and exit
--tag only makes the command line unique to one test, so a test's pattern matches its own
processes and nothing else.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time
from multiprocessing.connection import Connection


def burn(seconds: float) -> None:
    """Spend `seconds` of this process's CPU time (user), whatever the machine's load."""
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        for i in range(10_000):
            x += i * i


def worker(conn: Connection, seconds: float) -> None:
    burn(seconds)
    conn.send("ready")
    try:
        conn.recv()          # "stop", or EOF when the parent goes away
    except EOFError:
        pass


def reply(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_workers(n: int, seconds: float) -> None:
    ctx = mp.get_context("fork")   # pipes only: no semaphore, so no resource-tracker process
    workers: list[tuple[mp.process.BaseProcess, Connection]] = []
    for _ in range(n):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker, args=(child, seconds), daemon=True)
        p.start()
        child.close()
        workers.append((p, parent))
    for _, conn in workers:
        conn.recv()
    reply("ready %d %s" % (os.getpid(), " ".join(str(p.pid) for p, _ in workers)))
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "exit":
            p, conn = workers.pop()
            conn.send("stop")
            p.join()
            reply(f"exited {p.pid}")
        elif cmd[0] == "burn":
            burn(float(cmd[1]))
            reply("burned")
    for p, conn in workers:
        conn.send("stop")
    for p, _ in workers:
        p.join()


def run_launcher(k: int, argv: list[str]) -> None:
    children = []
    for rank in range(k):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(k), LOCAL_RANK=str(rank))
        children.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for c in children:
        assert c.stdout is not None and c.stdout.readline().startswith("ready")
    reply("ready %d %s" % (os.getpid(), " ".join(str(c.pid) for c in children)))
    sys.stdin.read()          # until EOF or quit
    for c in children:
        assert c.stdin is not None
        c.stdin.close()
    for c in children:
        c.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", required=True)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--burn", type=float, default=0.0)
    ap.add_argument("--launch", type=int, default=0)
    a = ap.parse_args()
    if a.launch:
        run_launcher(a.launch, ["--tag", a.tag, "--workers", str(a.workers), "--burn", str(a.burn)])
    else:
        burn(a.burn)
        run_workers(a.workers, a.burn)


if __name__ == "__main__":
    main()
