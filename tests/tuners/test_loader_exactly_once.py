"""The DataLoader actuator's invariant, checked against untuned runs.

Every sample of an epoch is delivered exactly once, in the order of an untuned run with the same
seed and generator, whatever num_workers / prefetch_factor changes the hook applies at step
boundaries; a rebuild must not change later epochs' order either. Each test records the index
stream (the dataset returns its index) of an untuned run over a few epochs, then runs the same
loader watched by a hook (embedded: nothing listens on its socket; no tuner runs) and queues the
changes itself, exactly as the reporter thread would, and compares epoch by epoch.
"""
from __future__ import annotations

import gc
import itertools
import random
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, Sampler, SequentialSampler,
                              get_worker_info)

from looptune.tuners.hook import Hook
from looptune.tuners.hook.actuators.loader import _shutdown

EPOCHS = 3
Changes = dict[tuple[int, int], list[tuple[str, Any]]]   # (epoch, k) -> [(knob, value)]; see run_watched


class Indices(Dataset):
    """Item i is tensor(i); `tag` is -1 in the main process, set per worker by tag_worker."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.tag = -1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return torch.tensor(i)


class TaggedIndices(Indices):
    def __getitem__(self, i: int) -> Any:
        return torch.tensor([i, self.tag])


def tag_worker(worker_id: int) -> None:
    info = get_worker_info()
    assert info is not None
    info.dataset.tag = 100 + worker_id


def tagging_collate(items: list[torch.Tensor]) -> dict[str, Any]:
    stacked = torch.stack(items)
    return {"idx": stacked[:, 0], "tag": stacked[:, 1], "marker": "collated-by-user"}


def indices_of(batch: Any) -> list[int]:
    if isinstance(batch, dict):
        batch = batch["idx"]
    return [int(x) for x in batch.reshape(-1)]


@pytest.fixture
def make_hook() -> Iterator[Callable[..., Hook]]:
    """An embedded hook: a socket path where nothing listens, no tuner, state in a temp dir."""
    hooks: list[Hook] = []
    tmp = Path(tempfile.mkdtemp(prefix="lt-", dir="/tmp"))

    def make(**config: Any) -> Hook:
        h = new_hook(tmp, **config)
        hooks.append(h)
        return h

    yield make
    for h in hooks:
        close_hook(h)
    hooks.clear()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_worker_left() -> Iterator[None]:
    """Every loader worker a test started is gone after it: an iterator the watched loader
    replaced is shut down, not left to idle (or to be torn down at interpreter exit)."""
    yield
    gc.collect()        # a hook and its watched loader reference each other
    me = psutil.Process()
    deadline = time.monotonic() + 15
    while me.children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [c.pid for c in me.children() if _alive(c.pid)], "loader workers left running"


def close_hook(h: Hook) -> None:
    h.close()
    if h._channel is not None:
        h._channel._thread.join(10)
        assert not h._channel._thread.is_alive()


def new_hook(tmp: Path, **config: Any) -> Hook:
    cfg: dict[str, Any] = {"tuners": {"enabled": [], "state_file": str(tmp / "best.json")}}
    cfg.update(config)
    h = Hook(run="exactly-once", socket=str(tmp / "nobody.sock"), tune=False, config=cfg)
    assert h.mode == "embedded" and not h.disabled
    return h


def run_untuned(make_loader: Callable[[], Any], epochs: int = EPOCHS) -> list[list[int]]:
    loader = make_loader()
    return [[i for batch in loader for i in indices_of(batch)] for _ in range(epochs)]


def run_watched(hook: Hook, make_loader: Callable[[], Any], changes: Changes, epochs: int = EPOCHS,
                on_batch: Callable[[Any, int, int, Any], None] | None = None,
                on_epoch: Callable[[int, Any], None] | None = None) -> tuple[list[list[int]], Any]:
    """Changes at (epoch, k) are queued before the step() that follows the k-th batch of that
    epoch (k >= 1); (epoch, 0) queues them after the previous epoch's loop ended and applies them
    with one step() between epochs (an eval step, say)."""
    watched = hook.watch(make_loader())
    ids = itertools.count(1)

    def queue(key: tuple[int, int]) -> None:
        for knob, value in changes.get(key, []):
            hook._queue_decision({"id": next(ids), "knob": knob, "value": value, "reason": "test",
                                  "tuner": "test"})

    stream: list[list[int]] = []
    for epoch in range(epochs):
        if (epoch, 0) in changes:
            queue((epoch, 0))
            hook.step()
        got: list[int] = []
        for k, batch in enumerate(watched, start=1):
            got += indices_of(batch)
            if on_batch is not None:
                on_batch(watched, epoch, k, batch)
            queue((epoch, k))
            hook.step()
            if k < epoch_len(watched):
                # what runs is what the hook reports (and what a tuner measures), from this step on
                assert watched.it._num_workers == hook.knobs["num_workers"], (epoch, k)
                if hook.knobs["num_workers"]:
                    assert watched.it._prefetch_factor == hook.knobs["prefetch_factor"], (epoch, k)
        stream.append(got)
        if on_epoch is not None:
            on_epoch(epoch, watched)
    return stream, watched


def epoch_len(watched: Any) -> float:
    try:
        return len(watched)
    except TypeError:           # a batch sampler without __len__
        return float("inf")


def assert_same_stream(untuned: list[list[int]], tuned: list[list[int]], n: int, drop: int = 0) -> None:
    assert len(tuned) == len(untuned)
    for epoch, (want, got) in enumerate(zip(untuned, tuned)):
        assert len(got) == n - drop and len(set(got)) == len(got), f"epoch {epoch}: lost or repeated samples"
        assert got == want, f"epoch {epoch}: order differs from the untuned run"


def applied(hook: Hook, count: int) -> None:
    assert [d.outcome for d in hook.decisions] == ["applied"] * count, hook.decisions


# ---- loaders ----

N = 40


def shuffled(seed: int = 1234, **kw: Any) -> Callable[[], DataLoader]:
    def make() -> DataLoader:
        return DataLoader(Indices(N), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed),
                          **kw)
    return make


def shuffled_global(seed: int = 99, **kw: Any) -> Callable[[], DataLoader]:
    """generator=None: the sampler and the base seeds come from the global torch RNG."""
    def make() -> DataLoader:
        torch.manual_seed(seed)
        return DataLoader(Indices(N), batch_size=4, shuffle=True, **kw)
    return make


def test_untuned_epochs_differ() -> None:
    """The comparisons below mean something: the epochs of the untuned runs are distinct shuffles."""
    for make in (shuffled(), shuffled_global()):
        epochs = run_untuned(make)
        assert all(sorted(e) == list(range(N)) for e in epochs)
        assert len({tuple(e) for e in epochs}) == EPOCHS
        assert epochs == run_untuned(make)


CASES: dict[str, tuple[Callable[[], DataLoader], Changes, int]] = {
    "0->2 mid-epoch": (shuffled(), {(0, 3): [("num_workers", 2)]}, 1),
    "2->0 mid-epoch": (shuffled(num_workers=2), {(1, 4): [("num_workers", 0)]}, 1),
    "2->3 and prefetch 2->4": (shuffled(num_workers=2), {(0, 2): [("num_workers", 3)],
                                                          (1, 5): [("prefetch_factor", 4)]}, 2),
    "2->3 with prefetch in one step": (shuffled(num_workers=2),
                                       {(0, 6): [("num_workers", 3), ("prefetch_factor", 4)]}, 2),
    "two changes in one epoch": (shuffled(), {(0, 2): [("num_workers", 2)], (0, 6): [("num_workers", 1)]}, 2),
    "first and last step": (shuffled(), {(0, 1): [("num_workers", 2)], (1, 10): [("num_workers", 0)],
                                         (2, 1): [("num_workers", 1)]}, 3),
    "between epochs": (shuffled(), {(1, 0): [("num_workers", 2)], (2, 0): [("prefetch_factor", 3)]}, 2),
    "global RNG 0->2->0": (shuffled_global(), {(0, 3): [("num_workers", 2)], (1, 5): [("num_workers", 0)]}, 2),
    "global RNG, workers from the start": (shuffled_global(num_workers=2),
                                           {(0, 1): [("num_workers", 1)], (2, 0): [("num_workers", 2)]}, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_changes_keep_the_untuned_stream(case: str, make_hook: Callable[..., Hook]) -> None:
    make, changes, count = CASES[case]
    untuned = run_untuned(make)
    hook = make_hook()
    tuned, watched = run_watched(hook, make, changes)
    assert_same_stream(untuned, tuned, N)
    applied(hook, count)
    # the knobs report the last setting asked for, and the loader runs with it
    last: dict[str, Any] = {}
    for key in sorted(changes):
        last.update(dict(changes[key]))
    for knob, value in last.items():
        assert hook.knobs[knob] == value
        assert getattr(watched.active, knob) == value
    if last.get("num_workers") == 0:
        assert watched.active.prefetch_factor is None


# ---- sampler and collation variants ----

class RandomBatches(Sampler):
    """A user-written batch sampler: torch.randperm with the generator, then batch sizes drawn
    from it one batch at a time (draws interleaved with the iteration)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(self.n, generator=self.generator).tolist()
        while perm:
            size = int(torch.randint(1, 6, (1,), generator=self.generator))
            yield perm[:size]
            perm = perm[size:]


class PyRandomSampler(Sampler):
    """Python's `random` module, seeded once by the user; one draw per index, lazily."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        pool = list(range(self.n))
        for i in range(self.n):
            j = random.randrange(i, self.n)
            pool[i], pool[j] = pool[j], pool[i]
            yield pool[i]


class EpochSeeded(Sampler):
    """Seeds a private generator from its seed and epoch when an iteration starts, and advances its
    epoch when it runs out (Accelerate's SeedableRandomSampler): workers that prefetch to the end of
    the epoch have advanced it before a change mid-epoch replays the order."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self.generator = torch.Generator()

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        self.generator.manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.n, generator=self.generator).tolist()
        self.epoch += 1


def epoch_seeded() -> DataLoader:
    return DataLoader(Indices(N), batch_size=4, sampler=EpochSeeded(N, 9), num_workers=2)


def no_autocollation() -> DataLoader:
    return DataLoader(Indices(N), batch_size=None, shuffle=True, generator=torch.Generator().manual_seed(5))


def drop_last() -> DataLoader:
    return DataLoader(Indices(N + 3), batch_size=4, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(6))


def sequential_batches() -> DataLoader:
    ds = Indices(N)
    return DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 3, drop_last=False))


def user_batch_sampler() -> DataLoader:
    g = torch.Generator().manual_seed(7)
    # the same generator object for the loader's base seeds and the user's batch sampler
    return DataLoader(Indices(N), batch_sampler=RandomBatches(N, g), generator=g)


def python_random_sampler() -> DataLoader:
    random.seed(8)
    return DataLoader(Indices(N), batch_size=4, sampler=PyRandomSampler(N))


VARIANTS: dict[str, tuple[Callable[[], DataLoader], Changes, int]] = {
    # name: loader, changes, samples dropped per epoch
    "batch_size=None": (no_autocollation, {(0, 7): [("num_workers", 2)], (1, 23): [("num_workers", 1)],
                                           (2, 40): [("num_workers", 0)]}, 0),
    "drop_last": (drop_last, {(0, 4): [("num_workers", 2)], (1, 10): [("num_workers", 0)],
                              (2, 2): [("num_workers", 1)]}, 3),
    "BatchSampler(SequentialSampler)": (sequential_batches, {(0, 5): [("num_workers", 2)],
                                                            (1, 2): [("num_workers", 0)]}, 0),
    "user batch sampler with the generator": (user_batch_sampler, {(0, 2): [("num_workers", 2)],
                                                                   (1, 3): [("num_workers", 0)],
                                                                   (2, 0): [("num_workers", 1)]}, 0),
    "sampler on python random": (python_random_sampler, {(0, 3): [("num_workers", 2)],
                                                         (1, 6): [("num_workers", 0)]}, 0),
    # 2 workers x prefetch 2 ask for every index batch of the 10 by the 7th: the sampler advanced its epoch
    "sampler seeded by its epoch, run out by prefetching": (epoch_seeded, {(0, 8): [("num_workers", 0)],
                                                                          (1, 2): [("num_workers", 2)],
                                                                          (2, 8): [("num_workers", 1)]}, 0),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sampler_variants_keep_the_untuned_stream(variant: str, make_hook: Callable[..., Hook]) -> None:
    make, changes, drop = VARIANTS[variant]
    untuned = run_untuned(make)
    if variant != "BatchSampler(SequentialSampler)":
        assert len({tuple(e) for e in untuned}) == EPOCHS
    hook = make_hook()
    tuned, _ = run_watched(hook, make, changes)
    assert_same_stream(untuned, tuned, N + drop, drop)     # drop_last: a dataset of N + 3
    applied(hook, sum(len(v) for v in changes.values()))


def worker_pids(loader: DataLoader) -> list[int]:
    it = loader._iterator
    assert it is not None
    return [w.pid for w in it._workers]


def wait_dead(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("when", [(0, 4), (1, 0)], ids=["mid-epoch", "between epochs"])
def test_persistent_workers_persist_and_keep_the_order(when: tuple[int, int],
                                                        make_hook: Callable[..., Hook]) -> None:
    make = shuffled(num_workers=2, persistent_workers=True)
    untuned = run_untuned(make)
    hook = make_hook()
    seen: list[tuple[int, DataLoader, list[int]]] = []
    user_pids: list[int] = []

    def on_batch(watched: Any, epoch: int, k: int, batch: Any) -> None:
        if epoch == 0 and k == 1:
            user_pids.extend(worker_pids(watched.loader))

    def on_epoch(epoch: int, watched: Any) -> None:
        if epoch >= 1:     # a mid-epoch change: a one-off loader serves the rest of epoch 0
            seen.append((epoch, watched.active, worker_pids(watched.active)))

    tuned, watched = run_watched(hook, make, {when: [("num_workers", 3)]}, on_batch=on_batch,
                                 on_epoch=on_epoch)
    assert_same_stream(untuned, tuned, N)
    applied(hook, 1)
    assert watched.active.persistent_workers and watched.active.num_workers == 3
    # after the change the same three workers serve every epoch
    later = [(loader, pids) for _, loader, pids in seen]
    assert len(later) == EPOCHS - 1
    assert all(loader is watched.active for loader, _ in later)
    assert len(later[0][1]) == 3 and all(pids == later[0][1] for _, pids in later)
    assert not any(p in user_pids for p in later[0][1])
    assert all(_alive(p) for p in later[0][1])
    # the user's persistent workers of the old setting do not idle on for good
    assert len(user_pids) == 2
    assert wait_dead(user_pids), "the old setting's persistent workers are still running"
    # done with it: a persistent iterator left to the cyclic gc (the hook and its watched loader
    # reference each other) takes torch 5 s per worker to shut down
    _shutdown(watched.active._iterator)


def test_worker_init_fn_and_collate_fn_still_run_after_a_change(make_hook: Callable[..., Hook]) -> None:
    def make() -> DataLoader:
        return DataLoader(TaggedIndices(N), batch_size=4, shuffle=True, worker_init_fn=tag_worker,
                          collate_fn=tagging_collate, generator=torch.Generator().manual_seed(11))

    untuned = run_untuned(make)
    tags: dict[tuple[int, int], set[int]] = {}

    def on_batch(watched: Any, epoch: int, k: int, batch: Any) -> None:
        assert isinstance(batch, dict) and batch["marker"] == "collated-by-user"
        tags[(epoch, k)] = {int(t) for t in batch["tag"]}

    hook = make_hook()
    changes = {(0, 3): [("num_workers", 2)], (1, 5): [("num_workers", 0)], (2, 2): [("num_workers", 3)]}
    tuned, watched = run_watched(hook, make, changes, on_batch=on_batch)
    assert_same_stream(untuned, tuned, N)
    applied(hook, 3)
    assert watched.active.collate_fn is tagging_collate and watched.active.worker_init_fn is tag_worker

    def workers_of(epoch: int, first: int, last: int) -> set[int]:
        return set().union(*(tags[(epoch, k)] for k in range(first, last + 1)))

    assert workers_of(0, 1, 3) == {-1}                  # in the main process before the change
    assert workers_of(0, 4, 10) <= {100, 101}           # the new workers ran worker_init_fn
    assert workers_of(1, 1, 5) <= {100, 101}
    assert workers_of(1, 6, 10) == {-1}
    assert workers_of(2, 3, 10) <= {100, 101, 102} and len(workers_of(2, 3, 10)) >= 2


def test_pin_memory_is_kept(make_hook: Callable[..., Hook]) -> None:
    make = shuffled(pin_memory=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
        untuned = run_untuned(make)
        hook = make_hook()
        tuned, watched = run_watched(hook, make, {(0, 3): [("num_workers", 2)], (1, 7): [("num_workers", 1)]})
    assert_same_stream(untuned, tuned, N)
    applied(hook, 2)
    assert watched.active.pin_memory is True


@pytest.mark.parametrize("persistent", [False, True], ids=["0 workers", "2 persistent workers"])
def test_workers_that_do_not_start_lose_nothing(persistent: bool, make_hook: Callable[..., Hook],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import looptune.tuners.hook.actuators.loader as loader_mod
    real_iter = loader_mod._quiet_iter

    def no_new_workers(loader: DataLoader) -> Any:
        if loader.num_workers == 3:
            raise OSError("cannot fork")
        return real_iter(loader)

    make = shuffled(num_workers=2, persistent_workers=True) if persistent else shuffled()
    before = 2 if persistent else 0
    untuned = run_untuned(make)
    hook = make_hook()
    monkeypatch.setattr(loader_mod, "_quiet_iter", no_new_workers)
    tuned, watched = run_watched(hook, make, {(0, 4): [("num_workers", 3)]})
    assert_same_stream(untuned, tuned, N)
    [d] = hook.decisions
    assert d.outcome == "failed" and "cannot fork" in d.detail
    assert hook.knobs["num_workers"] == before and watched.active.num_workers == before
    if persistent:      # the old setting runs on, with workers of its own again
        assert len(worker_pids(watched.active)) == 2
        _shutdown(watched.active._iterator)


# ---- left alone ----

_draws = itertools.count()


class UnrepeatableSampler(Sampler):
    """Shuffles from the clock and a global counter: iterating it again never gives the same order."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.orders: list[list[int]] = []

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.n))
        random.Random(time.perf_counter_ns() * 1000 + next(_draws)).shuffle(order)
        self.orders.append(order)
        yield from order


def test_a_sampler_that_does_not_replay_is_left_alone(make_hook: Callable[..., Hook]) -> None:
    sampler = UnrepeatableSampler(N)
    hook = make_hook()
    tuned, watched = run_watched(hook, lambda: DataLoader(Indices(N), batch_size=4, sampler=sampler),
                                 {(0, 3): [("num_workers", 2)], (1, 8): [("num_workers", 1)]}, epochs=2)
    assert [d.outcome for d in hook.decisions] == ["failed", "failed"]
    for d in hook.decisions:
        assert d.detail.startswith("NotTunable:") and "replay" in d.detail
    assert hook.knobs["num_workers"] == 0 and watched.active is watched.loader
    # each epoch is the order the running iterator drew (the replay's draw is a different one),
    # every sample once
    assert len(sampler.orders) == 4          # two epochs, one replay each
    for epoch, got in enumerate(tuned):
        assert sorted(got) == list(range(N))
        assert got == sampler.orders[2 * epoch]
        assert got != sampler.orders[2 * epoch + 1]


class Stream(IterableDataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (torch.tensor(i) for i in range(self.n))


def test_an_iterable_dataset_is_left_alone(make_hook: Callable[..., Hook]) -> None:
    hook = make_hook()
    tuned, watched = run_watched(hook, lambda: DataLoader(Stream(N), batch_size=4),
                                 {(0, 3): [("num_workers", 2)], (1, 1): [("prefetch_factor", 4)]}, epochs=2)
    assert "IterableDataset" in hook.untunable["num_workers"]
    assert "IterableDataset" in hook.untunable["prefetch_factor"]
    assert "num_workers" not in hook.actuators
    assert [d.outcome for d in hook.decisions] == ["skipped", "skipped"]
    assert hook.knobs["num_workers"] == 0 and watched.active is watched.loader
    assert tuned == [list(range(N))] * 2


# ---- property ----

@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(n=st.integers(8, 90), batch_size=st.integers(1, 9), drop=st.booleans(), seed=st.integers(0, 2**31),
       data=st.data())
def test_property_random_changes_keep_the_untuned_stream(n: int, batch_size: int, drop: bool, seed: int,
                                                         data: st.DataObject) -> None:
    def make() -> DataLoader:
        return DataLoader(Indices(n), batch_size=batch_size, shuffle=True, drop_last=drop,
                          generator=torch.Generator().manual_seed(seed))

    epochs = 2
    per_epoch = len(make())
    steps = st.tuples(st.integers(0, epochs - 1), st.integers(0, per_epoch))
    changes: Changes = {}
    for key, workers in data.draw(st.lists(st.tuples(steps, st.integers(0, 2)), max_size=3), label="changes"):
        changes.setdefault(key, []).append(("num_workers", workers))
    untuned = run_untuned(make, epochs)
    tmp = Path(tempfile.mkdtemp(prefix="lt-", dir="/tmp"))
    hook = new_hook(tmp)
    try:
        tuned, _ = run_watched(hook, make, changes, epochs)
    finally:
        close_hook(hook)
        shutil.rmtree(tmp, ignore_errors=True)
    assert_same_stream(untuned, tuned, n, n % batch_size if drop else 0)
    assert all(d.outcome == "applied" for d in hook.decisions), hook.decisions
    assert len(hook.decisions) == sum(len(v) for v in changes.values())
