"""The control hook without a daemon: what it measures, what it applies, how it fails.

Every hook here is given a socket path where nothing listens, so it runs embedded; every hook
is closed at teardown. DataLoaders use real worker processes where the issue asks for them.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import looptune.tuners.hook.api as api_mod
import looptune.tuners.hook.meter as meter_mod
from conftest import free_port
from looptune.daemon.config import ConfigError
from daemon_proc import Metrics, http_get
from looptune import protocol
from looptune.tuners.hook import Decision, Hook


@pytest.fixture
def make_hook(short_tmp: Path) -> Iterator[Callable[..., Hook]]:
    """Hook(...) with a socket where nothing listens and the built-in config unless given; closed after."""
    hooks: list[Hook] = []

    def make(run: str | None = "exp-1", **kwargs: Any) -> Hook:
        kwargs.setdefault("socket", str(short_tmp / "nobody.sock"))
        kwargs.setdefault("config", {})
        h = Hook(run=run, **kwargs)
        hooks.append(h)
        return h

    yield make
    for h in hooks:
        h.close()


class Items(Dataset):
    """Item i is (features, i, pid of the process that produced it); optionally slow.
    `slept` adds up how long __getitem__ really slept (in this process, num_workers=0)."""

    def __init__(self, n: int, delay: float = 0.0) -> None:
        self.n, self.delay = n, delay
        self.slept = 0.0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        if self.delay:
            t0 = time.perf_counter()
            time.sleep(self.delay)
            self.slept += time.perf_counter() - t0
        return torch.full((2,), float(i)), i, os.getpid()


def _loader(n: int, seed: int, **kwargs: Any) -> DataLoader:
    return DataLoader(Items(n), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(seed),
                      **kwargs)


# ---- the loader wrapper: same batches, exact counts ----

def test_watched_loader_with_worker_processes_yields_the_same_batches(make_hook: Callable[..., Hook]) -> None:
    n, epochs = 23, 2
    plain = _loader(n, 1234, num_workers=2)
    hook = make_hook()
    assert hook.mode == "embedded"
    watched = hook.watch(_loader(n, 1234, num_workers=2))
    assert {k: hook.knobs.get(k) for k in ("num_workers", "prefetch_factor", "batch_size")} == \
        {"num_workers": 2, "prefetch_factor": 2, "batch_size": 5}
    assert len(watched) == math.ceil(n / 5)
    for _ in range(epochs):
        expected = list(plain)
        got = []
        for batch in watched:
            got.append(batch)
            hook.step()
        assert len(got) == len(expected)
        for (x0, i0, _), (x1, i1, pids) in zip(expected, got):
            assert torch.equal(x0, x1) and torch.equal(i0, i1)
            assert os.getpid() not in pids.tolist()      # made by worker processes
        assert sorted(torch.cat([b[1] for b in got]).tolist()) == list(range(n))
    c = hook.counters
    assert c["samples"] == epochs * n
    assert c["batches"] == epochs * math.ceil(n / 5)
    assert c["steps"] == c["batches"]


def test_samples_count_only_batches_a_step_consumed(make_hook: Callable[..., Hook]) -> None:
    """Gradient accumulation: step() every 2 batches; samples are counted at step()."""
    hook = make_hook()
    loader = hook.watch(DataLoader(Items(10), batch_size=2))    # 5 batches of 2
    sizes = []
    for i, (x, _, _) in enumerate(loader):
        sizes.append(len(x))
        if i % 2 == 1:
            before = hook.counters["samples"]
            hook.step()
            assert hook.counters["samples"] == before + 4
        else:
            assert hook.counters["samples"] == 2 * i      # the batch just delivered is not counted yet
    c = hook.counters
    assert (c["batches"], c["steps"], c["samples"]) == (5, 2, 8)   # the 5th batch saw no step
    hook.step()
    assert (hook.counters["steps"], hook.counters["samples"]) == (3, 10)


def test_accumulation_over_a_whole_epoch_counts_every_sample(make_hook: Callable[..., Hook]) -> None:
    hook = make_hook()
    loader = hook.watch(DataLoader(Items(20), batch_size=2, num_workers=2))
    for i, _ in enumerate(loader):
        if i % 2 == 1:
            hook.step()
    assert hook.counters["samples"] == 20
    assert hook.counters["batches"] == 10
    assert hook.counters["steps"] == 5


@pytest.mark.parametrize("batch, size", [
    (torch.zeros(7, 3), 7),
    (torch.tensor(3.0), 1),
    ((torch.zeros(4, 2), torch.zeros(4)), 4),
    ([torch.zeros(3), torch.zeros(3)], 3),
    ({"x": torch.zeros(6, 2), "y": torch.zeros(6)}, 6),
    (["a", "b", "c"], 3),
    ({"text": ["a", "b"], "ids": torch.zeros(2, 5)}, 2),
    (((torch.zeros(5, 1), torch.zeros(5)), torch.zeros(5)), 5),
], ids=["tensor", "scalar", "tuple", "list", "dict", "strings", "dict-of-strings", "nested"])
def test_batch_size_of_common_batch_shapes(make_hook: Callable[..., Hook], batch: Any, size: int) -> None:
    hook = make_hook()
    for b in hook.watch([batch, batch]):
        assert b is batch
        hook.step()
    assert hook.counters["samples"] == 2 * size
    assert hook.counters["batches"] == 2


def test_batch_size_of_a_collated_dict_with_strings(make_hook: Callable[..., Hook]) -> None:
    class Texts(Dataset):
        def __len__(self) -> int:
            return 7

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"text": f"item {i}", "x": torch.zeros(4)}

    hook = make_hook()
    for _ in hook.watch(DataLoader(Texts(), batch_size=3)):
        hook.step()
    assert hook.counters["samples"] == 7
    assert hook.counters["batches"] == 3


# ---- timing ----

def test_data_wait_and_step_time(make_hook: Callable[..., Hook]) -> None:
    n, delay, compute = 50, 0.01, 0.002
    hook = make_hook(tune=False)
    ds = Items(n, delay=delay)
    loader = hook.watch(DataLoader(ds, batch_size=1, num_workers=0))
    for _ in loader:
        time.sleep(compute)          # the "training" part of the step
        hook.step()
    c = hook.counters
    assert c["steps"] == n
    # never less than N * delay, and within 20% of what the dataset really slept: time.sleep()
    # overshoots under load (this machine's other jobs), which is not the hook's error
    assert n * delay <= ds.slept <= c["data_wait_seconds"] <= 1.2 * ds.slept
    # a step is data wait plus the work after it
    assert c["step_seconds"] >= c["data_wait_seconds"] + n * compute
    hist = hook.meter.hist
    assert len(hist) == len(protocol.STEP_BUCKETS) + 1
    assert sum(hist) == n
    # every step took more than 10 ms: nothing in the buckets up to le=0.005
    assert sum(hist[:protocol.STEP_BUCKETS.index(0.01)]) == 0


def test_time_between_epochs_is_not_a_step(make_hook: Callable[..., Hook]) -> None:
    hook = make_hook()
    loader = hook.watch(DataLoader(Items(4), batch_size=2))
    in_loops = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        for _ in loader:
            hook.step()
        in_loops += time.perf_counter() - t0
        time.sleep(0.3)              # evaluation, checkpointing: outside the loop
    assert hook.counters["steps"] == 4
    assert hook.counters["step_seconds"] <= in_loops


# ---- failures inside the hook ----

def _boom(*_: Any) -> Any:
    raise RuntimeError("boom inside the hook")


def test_failing_measurement_never_stops_training(make_hook: Callable[..., Hook], monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="looptune.hook")
    hook = make_hook(config={"hook": {"max_failures": 3}})
    monkeypatch.setattr(meter_mod, "batch_size", _boom)
    plain = list(DataLoader(Items(20), batch_size=2))
    got, errors_seen = [], []
    for batch in hook.watch(DataLoader(Items(20), batch_size=2)):
        got.append(batch)
        hook.step()
        errors_seen.append(hook.errors)
    assert len(got) == len(plain) == 10
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plain, got))
    assert errors_seen[:4] == [1, 2, 3, 3]          # counted, then off: no more errors
    assert hook.errors == 3
    assert hook.disabled
    assert hook.counters["steps"] == 2                 # the steps before the third failure
    frozen = hook.counters
    for _ in range(5):
        hook.step()
    assert hook.counters == frozen
    errors_logged = [r for r in caplog.records if "hook error" in r.getMessage()]
    disabled_logged = [r for r in caplog.records if "disabled" in r.getMessage()]
    assert len(errors_logged) == 1 and len(disabled_logged) == 1   # logged once, not per failure


def test_failing_step_disables_the_hook_after_max_failures(make_hook: Callable[..., Hook],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    hook = make_hook(config={"hook": {"max_failures": 3}})
    monkeypatch.setattr(meter_mod, "bisect_left", _boom)
    batches = 0
    for _ in hook.watch(DataLoader(Items(16), batch_size=2)):
        batches += 1
        hook.step()
    assert batches == 8
    assert hook.errors == 3 and hook.disabled
    frozen = hook.counters
    assert frozen["steps"] == 3
    hook.step()
    assert hook.counters == frozen
    # a disabled hook wraps nothing new
    loader = DataLoader(Items(4), batch_size=2)
    assert hook.watch(loader) is loader


def test_a_broken_environment_at_start_leaves_the_hook_off(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_mod, "Channel", _boom)
    hook = Hook(run="exp-1", socket=str(short_tmp / "none.sock"), config={})
    try:
        assert hook.disabled and hook.errors == 1
        loader = DataLoader(Items(6), batch_size=2)
        assert hook.watch(loader) is loader
        for _ in loader:
            hook.step()
        assert hook.counters["steps"] == 0
    finally:
        hook.close()


# ---- decisions ----

def _decision(knob: str, value: Any, id: int) -> dict[str, Any]:
    return protocol.check_decision({"id": id, "knob": knob, "value": value, "reason": "test says so",
                                    "tuner": "test"})


def test_a_decision_is_applied_at_the_next_step(make_hook: Callable[..., Hook]) -> None:
    hook = make_hook(tune=False)     # no decisions but the test's own
    state = {"value": 1}
    hook.add_actuator("test_knob", lambda: state["value"], lambda v: state.update(value=v))
    loader = hook.watch(DataLoader(Items(8), batch_size=2))
    it = iter(loader)
    next(it)
    hook.step()
    t = threading.Thread(target=hook._queue_decision, args=(_decision("test_knob", 5, 7),))
    t.start()
    t.join(5)
    next(it)                              # a batch arrives; no step boundary yet
    assert state["value"] == 1 and hook.decisions == []
    hook.step()
    assert state["value"] == 5
    assert len(hook.decisions) == 1
    d = hook.decisions[0]
    assert isinstance(d, Decision)
    assert (d.knob, d.old, d.new, d.outcome, d.reason, d.id, d.tuner) == \
        ("test_knob", 1, 5, "applied", "test says so", 7, "test")
    assert d.step == 2 and abs(d.time - time.time()) < 60
    assert hook.knobs["test_knob"] == 5
    for _ in it:
        hook.step()
    assert len(hook.decisions) == 1       # applied once
    assert hook.errors == 0


def test_unknown_knob_is_skipped_and_a_failing_actuator_fails(make_hook: Callable[..., Hook]) -> None:
    hook = make_hook(tune=False)

    def refuse(v: Any) -> None:
        raise RuntimeError(f"cannot set {v}")

    hook.add_actuator("stubborn", lambda: 3, refuse)
    batches = 0
    for i, _ in enumerate(hook.watch(DataLoader(Items(12), batch_size=2))):
        batches += 1
        if i == 1:
            hook._queue_decision(_decision("no_such_knob", 4, 1))
            hook._queue_decision(_decision("stubborn", 9, 2))
        hook.step()
    assert batches == 6 and hook.counters["steps"] == 6
    assert [(d.knob, d.outcome) for d in hook.decisions] == [("no_such_knob", "skipped"), ("stubborn", "failed")]
    skipped, failed = hook.decisions
    assert "no_such_knob" in skipped.detail
    assert failed.old == 3 and failed.new == 9 and "cannot set 9" in failed.detail
    assert hook.knobs.get("stubborn") != 9 and "no_such_knob" not in hook.knobs
    assert not hook.disabled


# ---- embedded /metrics ----

def test_embedded_metrics(make_hook: Callable[..., Hook]) -> None:
    port = free_port()
    hook = make_hook(config={"hook": {"embedded_metrics_listen": f"127.0.0.1:{port}"}})
    assert hook.mode == "embedded"
    for _ in hook.watch(DataLoader(Items(12), batch_size=4, num_workers=2)):
        hook.step()
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    m = Metrics(body)
    assert m.get("looptune_job_samples_total", run="exp-1", rank="0") == 12
    assert m.get("looptune_job_batches_total", run="exp-1", rank="0") == 3
    assert m.get("looptune_job_optimizer_steps_total", run="exp-1", rank="0") == 3
    assert m.get("looptune_job_step_seconds_count", run="exp-1", rank="0") == 3
    assert m.get("looptune_job_knob", run="exp-1", rank="0", knob="num_workers") == hook.knobs["num_workers"]
    assert m.get("looptune_job_info", run="exp-1", rank="0", world_size="1", pid=str(os.getpid())) == 1
    assert m.get("looptune_job_hook_connected", run="exp-1", rank="0") == 0
    hook.close()
    with pytest.raises(OSError):
        http_get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_busy_metrics_port_does_not_stop_the_measurement(make_hook: Callable[..., Hook]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        hook = make_hook(config={"hook": {"embedded_metrics_listen": f"127.0.0.1:{port}"}})
        assert not hook.disabled and hook.errors == 1
        for _ in hook.watch(DataLoader(Items(6), batch_size=2)):
            hook.step()
        assert hook.counters["samples"] == 6


# ---- names, ranks, configuration ----

def test_run_name_from_torchelastic(make_hook: Callable[..., Hook], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-42")
    assert make_hook(run=None).run == "job-42"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "my job/7")
    assert make_hook(run=None).run == "my_job_7"
    assert make_hook(run="explicit").run == "explicit"


@pytest.mark.parametrize("argv, run", [
    (["/home/u/train_resnet.py", "--lr", "0.1"], "train_resnet"),
    (["/opt/venv/lib/python3.11/site-packages/mytrainer/__main__.py", "--epochs", "3"], "mytrainer"),
])
def test_run_name_from_the_command(make_hook: Callable[..., Hook], monkeypatch: pytest.MonkeyPatch,
                                   argv: list[str], run: str) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(sys, "argv", argv)
    assert make_hook(run=None).run == run
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")       # torchrun's placeholder is not a name
    assert make_hook(run=None).run == run


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "run\n", "a/b"])
def test_a_bad_run_name_is_a_clear_error(make_hook: Callable[..., Hook], bad: str) -> None:
    with pytest.raises(ValueError, match="must match") as exc:
        make_hook(run=bad)
    assert repr(bad)[:40] in str(exc.value)


@pytest.mark.parametrize("config, key", [
    ({"hook": {"max_failures": 0}}, "hook.max_failures"),
    ({"hook": {"bogus": 1}}, "hook.bogus"),
    ({"hook": {"embedded_metrics_listen": "nowhere"}}, "hook.embedded_metrics_listen"),
])
def test_a_bad_config_is_a_clear_error(make_hook: Callable[..., Hook], config: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        make_hook(config=config)
    assert key in str(exc.value)


def test_rank_and_world_size_from_the_environment(make_hook: Callable[..., Hook],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    h = make_hook()
    assert (h.rank, h.world_size) == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    h = make_hook()
    assert (h.rank, h.world_size) == (3, 4)
    assert h.hello()["rank"] == 3 and h.report()["world_size"] == 4


def test_rank_and_world_size_from_torch_distributed(make_hook: Callable[..., Hook], short_tmp: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist
    monkeypatch.setenv("RANK", "5")           # torch.distributed wins over the environment
    monkeypatch.setenv("WORLD_SIZE", "8")
    store = dist.FileStore(str(short_tmp / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        h = make_hook()
        assert (h.rank, h.world_size) == (0, 1)
    finally:
        dist.destroy_process_group()


# ---- fork ----

def test_a_forked_child_has_the_hook_off(make_hook: Callable[..., Hook]) -> None:
    hook = make_hook()
    for _ in hook.watch([torch.zeros(2)]):
        hook.step()
    assert not hook.disabled
    pid = os.fork()
    if pid == 0:       # the child: report through the exit status only, never return into pytest
        code = 1
        try:
            ok = hook.disabled and hook._channel is not None and hook._channel.sock is None
            before = hook.counters
            hook.step()
            hook.close()
            code = 0 if ok and hook.counters == before else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("forked child did not exit")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not hook.disabled                      # the parent's hook is untouched
    hook.step()
    assert hook.counters["steps"] == 2


class HookState(Dataset):
    """Each item says what the hook looks like from inside the DataLoader worker."""

    def __init__(self, hook: Hook) -> None:
        self.hook = hook

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> tuple[bool, bool, int]:
        self.hook.step()               # a stray call from a worker does nothing
        return self.hook.disabled, self.hook._channel.sock is None, os.getpid()


def test_a_fork_dataloader_worker_has_the_hook_off(make_hook: Callable[..., Hook]) -> None:
    hook = make_hook()
    loader = DataLoader(HookState(hook), batch_size=2, num_workers=2, multiprocessing_context="fork")
    items = [x for disabled, no_sock, pids in hook.watch(loader)
             for x in zip(disabled.tolist(), no_sock.tolist(), pids.tolist())]
    assert len(items) == 6
    assert all(d and s and p != os.getpid() for d, s, p in items)
    assert not hook.disabled
    assert hook.counters["steps"] == 0             # the workers' step() calls counted nowhere here


def test_a_watched_loader_can_be_copied(make_hook: Callable[..., Hook]) -> None:
    hook = make_hook()
    watched = hook.watch(DataLoader(Items(6), batch_size=2))
    dup = copy.copy(watched)
    assert [b[1].tolist() for b in dup] == [[0, 1], [2, 3], [4, 5]]
    assert dup.batch_size == 2
    assert hook.counters["batches"] == 3


# ---- the hook's shape: actuators, models, decisions for a later step ----

def test_add_actuator_checks_the_knob_name(make_hook: Callable[..., Hook]) -> None:
    hook = make_hook(tune=False)
    with pytest.raises(ValueError, match="knob 'Bad Knob'"):
        hook.add_actuator("Bad Knob", lambda: 1, lambda v: None)
    hook.add_actuator("good_knob", lambda: 7, lambda v: None)
    assert hook.knobs["good_knob"] == 7 and "good_knob" in hook.actuators


def test_a_decision_for_a_later_step_waits_for_it(make_hook: Callable[..., Hook]) -> None:
    hook = make_hook(tune=False)
    state = {"value": 1}
    hook.add_actuator("test_knob", lambda: state["value"], lambda v: state.update(value=v))
    hook._queue_decision(protocol.check_decision({"id": 3, "knob": "test_knob", "value": 4, "at_step": 5}))
    seen = []
    for _ in range(7):
        hook.step()
        seen.append(state["value"])
    # applied at the boundary of step 5, before the 6th step's batch
    assert seen == [1, 1, 1, 1, 4, 4, 4]
    assert [(d.knob, d.step) for d in hook.decisions] == [("test_knob", 5)]


def test_watching_a_model_returns_it_unchanged(make_hook: Callable[..., Hook]) -> None:
    hook = make_hook(tune=False)
    model = torch.nn.Linear(4, 2)
    assert hook.watch(model) is model and hook.module is model
    assert hook.errors == 0
    assert "comm_seconds" not in hook.report()["counters"]       # not DDP: no communication figure


def test_the_loader_reports_settling_until_every_new_worker_delivered(make_hook: Callable[..., Hook]) -> None:
    hook = make_hook(tune=False)
    loader = hook.watch(DataLoader(Items(64), batch_size=2))
    settling = []
    for i, _ in enumerate(loader):
        if i == 3:
            hook._queue_decision(_decision("num_workers", 3, 1))
        hook.step()
        settling.append(hook.report()["settling"])
        if i == 12:
            break
    assert hook.knobs["num_workers"] == 3
    # applied at the step after batch 3; its 3 new workers deliver the next 3 batches
    assert settling[:3] == [[]] * 3
    assert settling[3:6] == [["num_workers", "prefetch_factor"]] * 3
    assert settling[6:] == [[]] * 7
    hook.close()


def test_embedded_mode_has_the_gpu_figures_of_its_own_process(make_hook: Callable[..., Hook],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from fakes.fake_pynvml import TRACE_DIR, FakeNVML, install
    fake = install(monkeypatch, FakeNVML.from_trace(TRACE_DIR / "h200_x2.json"))
    fake.set_processes(0, [{"pid": os.getpid(), "used_gpu_memory": 75 * 2**30, "sm_util": 40, "mem_util": 10}])
    fake.set_processes(1, [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    hook = make_hook(tune=False)
    assert hook.mode == "embedded"
    hook._channel.stop()                   # the test drives the embedded ticks itself
    for _ in hook.watch(DataLoader(Items(8), batch_size=2)):
        hook.step()
    for _ in range(3):
        fake.advance(1.0)
        hook.embedded.tick()
    obs = hook.engine.jobs[("self",)].last_obs
    assert obs.gpu_utilization == pytest.approx(0.40)
    total = fake.device(0)["memory"]["total"]
    assert obs.gpu_memory_used_share == pytest.approx(75 * 2**30 / total)
