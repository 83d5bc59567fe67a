"""A small, input-bound training job with the looptune hook, for the live dashboard test.

    python live_train.py --socket PATH --run RUN --pidfile PATH [--sleep SECONDS] [--samples N]

Every sample's __getitem__ sleeps (4 ms by default) and the model is tiny, so with the
DataLoader's num_workers=0 the loop spends most of its time waiting for data: the `workers`
tuner raises num_workers through the hook's DataLoader actuator. Epochs are short (320
samples, about a second) because the actuator applies only the first change of an epoch at
once and defers later ones to the next epoch. The job trains until its stdin closes (or 300 s,
a safety net).

The model is DistributedDataParallel over a one-rank gloo group, so the job has the real
grad_compression knob (textual), communication time and gradient bytes; it trains through
hook.accumulate on the
stand-in GPU (tests/fakes/fake_cuda.py, small enough that each batch of 8 is split), so the
micro-batch size, device memory peak, gradient noise scale and one recovered out-of-memory error
(injected at step 30) reach /metrics.

Protocol on stdout: `ready PID` after the first optimizer step, `knob num_workers N` each
time the hook's num_workers changes, `done STEPS` at exit.
"""
from __future__ import annotations

import argparse
import os
import select
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def stdin_closed() -> bool:
    ready, _, _ = select.select([sys.stdin], [], [], 0)
    return bool(ready) and not sys.stdin.readline()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--pidfile", required=True)
    ap.add_argument("--sleep", type=float, default=0.004, help="seconds per sample in __getitem__")
    ap.add_argument("--samples", type=int, default=320, help="samples per epoch")
    a = ap.parse_args()
    tmp = a.pidfile + ".tmp"
    Path(tmp).write_text(str(os.getpid()))
    os.replace(tmp, a.pidfile)

    import torch
    from torch.utils.data import DataLoader, Dataset

    from looptune.tuners.hook import Hook

    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    class Slow(Dataset):
        def __len__(self) -> int:
            return a.samples

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            time.sleep(a.sleep)
            return torch.full((16,), float(i % 7)), torch.tensor(i % 2)

    from tests.fakes.fake_cuda import FakeCuda, MemoryLayer, MiB, straight
    fake = FakeCuda(100 * MiB).install()       # after the device choice: the model stays on the CPU
    fake.alloc(10 * MiB)
    model = torch.nn.Sequential(torch.nn.Linear(16, 2), MemoryLayer(fake, straight(10 * MiB))).to(device)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo", init_method=f"file://{a.pidfile}.store", rank=0, world_size=1)
    model = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    deadline = time.monotonic() + 300
    steps = 0
    workers = 0
    with Hook(run=a.run, socket=a.socket) as hook:
        model = hook.watch(model)
        loader = hook.watch(DataLoader(Slow(), batch_size=8, shuffle=True, num_workers=0))
        while time.monotonic() < deadline:
            for x, y in loader:
                if steps == 30:
                    fake.inject("backward", 1)
                opt.zero_grad()
                hook.accumulate((x.to(device), y.to(device)),
                                lambda mb: torch.nn.functional.cross_entropy(model(mb[0]), mb[1]))
                opt.step()
                hook.step()                      # a tuner's change to num_workers lands here
                steps += 1
                if steps == 1:
                    say(f"ready {os.getpid()}")
                if hook.knobs.get("num_workers") != workers:
                    workers = hook.knobs.get("num_workers")
                    say(f"knob num_workers {workers}")
                if steps % 20 == 0 and (stdin_closed() or time.monotonic() > deadline):
                    deadline = 0
                    break
    say(f"done {steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
