"""looptune in a Hugging Face `transformers.Trainer`: one callback.

    from looptune.transformers import LooptuneCallback

    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds,
                                   callbacks=[LooptuneCallback(run="exp-1")])
    trainer.train()

`LooptuneCallback(run=None, socket=None, tune=True, config=None)` takes the arguments of
`looptune.Hook` and owns one (`callback.hook`): it reports to the node daemon, or runs the tuners
in-process, exactly as a hook in a hand-written loop does, under the same metric names and
run/rank labels. Thin over the hook; what it does through the Trainer:

- **Measurement.** `hook.step()` at every optimizer step (`on_step_end`) with the step's loss
  (the sum over its gradient-accumulation steps of what `training_step` returned, as the Trainer
  logs it; kept as a tensor, read once a second in the background). Data wait and samples come
  from the train DataLoader (below). Rank and world size are the Trainer's own
  (`args.process_index`, `args.world_size`); the rank sync starts at `on_train_begin`, once the
  Trainer set up `torch.distributed`, so a callback made before the process group exists is right.
- **DataLoader workers, mid-epoch.** The Trainer's train loader is Accelerate's `DataLoaderShard`,
  which iterates `base_dataloader`, the torch DataLoader it wraps: the callback watches that
  DataLoader with the hook's loader actuator and hands the shard the watched one, so
  `num_workers` / `prefetch_factor` change at a step boundary, mid-epoch, every sample exactly once
  and in the order of an untuned run. A train loader that is no `DataLoaderShard` (a
  `get_train_dataloader` override returning a plain DataLoader) changes them at epoch boundaries
  instead (set on the loader before the next epoch's `iter()`), the order kept; its data wait is
  then the time from one step's end to the next step's start. A stateful DataLoader
  (`use_stateful_dataloader`), an IterableDataset, and persistent workers on a plain loader are left
  alone, with the reason in `untunable`. Samples are counted as the shard fetches them: one batch
  ahead of the steps in the middle of an epoch.
- **Batch size.** The global batch stays `per_device_train_batch_size x
  gradient_accumulation_steps x world size` (what the learning rate was tuned for): the callback
  wraps the Trainer's `training_step` so that `hook.accumulate` cuts each per-device batch into
  micro-batches that fit the device. Every micro-batch goes through the Trainer's own
  `training_step` (its `compute_loss`, loss normalisation, `accelerator.backward`, loss scaler),
  its loss scaled by its share of the batch (not where the loss is already normalised by the
  batch's token count: `num_items_in_batch`); an out-of-memory error is recovered inside the step,
  training never restarts. Left unsplit (with the reason) under DeepSpeed, FSDP and other
  non-DDP setups, DataParallel, and a Trainer subclass with its own `training_step`.
- **Gradient compression.** The DDP-wrapped model (`trainer.model_wrapped`) is watched:
  `grad_compression` / `powersgd_rank`, switched on every rank at the same
  step.
- **Checkpoints.** The callback is an `ExportableState`: the Trainer writes `hook.state_dict()`
  (each knob's settled value) into `trainer_state.json` of every checkpoint, and a run resumed
  from one starts from those values (`on_train_begin`), whether or not
  `restore_callback_states_from_checkpoint` is set.

The callback finds its Trainer from the Trainer's own calls (`on_init_end` is called from
`Trainer.__init__`): no argument to pass. `import transformers` here is the library (absolute
imports: this module is `looptune.transformers`).
"""
from __future__ import annotations

import logging
import sys
import time
import weakref
from typing import Any

import transformers
from transformers import TrainerCallback

from looptune.tuners.hook import Hook

try:
    from transformers.trainer_callback import ExportableState
except ImportError:          # transformers before 4.44: no callback state in checkpoints
    ExportableState = object  # type: ignore[misc,assignment]

log = logging.getLogger("looptune.hook")

__all__ = ["LooptuneCallback"]

STATE = "looptune_state"      # the attribute the Trainer's checkpoint stores


class LooptuneCallback(TrainerCallback, ExportableState):
    """A `transformers.TrainerCallback` that runs a looptune `Hook` (`self.hook`) in the Trainer."""

    # callbacks alive in this process, by run name: a Trainer restoring callback states re-creates a
    # callback from the checkpoint's arguments (`restore_callback_states_from_checkpoint`); that
    # gives back the live one, which keeps its hook (one connection per rank, never two)
    _live: weakref.WeakValueDictionary[str, LooptuneCallback] = weakref.WeakValueDictionary()

    def __new__(cls, *args: Any, _resume: bool = False, **kwargs: Any) -> LooptuneCallback:
        if _resume:
            live = cls._live.get(kwargs.get("run") or "")
            if live is not None:
                return live
        return super().__new__(cls)

    def __init__(self, run: str | None = None, socket: str | None = None, tune: bool | list[str] = True,
                 config: Any = None, *, _resume: bool = False) -> None:
        if getattr(self, "hook", None) is not None:
            return           # the live callback handed back by __new__: already set up
        self.hook = Hook(run=run, socket=socket, tune=tune, config=config)
        self.trainer: Any = None              # found at on_init_end / on_train_begin
        self.loader_mode = ""                 # "mid-epoch", "epoch", or "" (not watched)
        self.looptune_state: dict[str, Any] | None = None   # a checkpoint's, applied at on_train_begin
        self._loss: Any = None                # this optimizer step's loss so far (a tensor)
        self._log_loss: float | None = None   # the Trainer's logged loss, where training_step is not ours
        self._wrapped = False
        self._watched = False
        self._split = False
        self._epoch_loader: _EpochWorkers | None = None
        self._t_step_end: float | None = None
        LooptuneCallback._live[self.hook.run] = self

    # ---- checkpoint state (ExportableState) ----

    def state(self) -> dict[str, Any]:
        """What the Trainer writes into each checkpoint's trainer_state.json for this callback."""
        return {"args": {"run": self.hook.run, "_resume": True}, "attributes": {STATE: self.state_dict()}}

    def state_dict(self) -> dict[str, Any]:
        try:
            return self.hook.state_dict()
        except Exception as exc:  # noqa: BLE001 - a checkpoint without our state still saves
            self.hook._failed(exc)
            return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start from a checkpoint's knob values (call at a step boundary, on every rank)."""
        self.hook.load_state_dict(state)

    # ---- the Trainer's events ----

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        try:
            self.trainer = _find_trainer() or self.trainer
            self._rank_from(args)
        except Exception as exc:  # noqa: BLE001
            self.hook._failed(exc)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        hook = self.hook
        try:
            self.trainer = _find_trainer() or self.trainer
            self._rank_from(args)
            if not self._watched:
                self._watched = True
                wrapped = getattr(self.trainer, "model_wrapped", None)
                hook.watch(wrapped if wrapped is not None else model)    # DDP: grad_compression
                if train_dataloader is not None:
                    self._watch_loader(train_dataloader)
                hook._decide_sync()          # torch.distributed is up now (the Trainer set it up)
            # the batch as the Trainer sees it (the DataLoader under Accelerate may hold a batch sampler)
            hook.knobs["batch_size"] = int(args.per_device_train_batch_size)
            hook.knobs["gradient_accumulation_steps"] = int(args.gradient_accumulation_steps)
            if self.trainer is not None and not self._wrapped:
                self._wrap_training_step(self.trainer, args)
            saved = self.looptune_state or _saved_state(state, type(self).__name__)
            self.looptune_state = None
            if saved:
                hook.load_state_dict(saved)
        except Exception as exc:  # noqa: BLE001 - training goes on without what failed
            hook._failed(exc)
        self._t_step_end = None

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._epoch_loader is not None:
            try:
                self._epoch_loader.begin_epoch()
            except Exception as exc:  # noqa: BLE001
                self.hook._failed(exc)
        # the epoch's first fetch (workers starting) is data wait too, in epoch mode
        self._t_step_end = time.perf_counter() if self._epoch_loader is not None else None
        self.hook.meter.restart_step_clock()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._epoch_loader is not None:
            try:
                self._epoch_loader.end_epoch()
            except Exception as exc:  # noqa: BLE001
                self.hook._failed(exc)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._epoch_loader is not None and self._t_step_end is not None:
            self._epoch_loader.waited(time.perf_counter() - self._t_step_end)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loss, self._loss = self._loss, None
        if loss is None:
            loss, self._log_loss = self._log_loss, None
        if self._epoch_loader is not None and not self._wrapped:
            self._epoch_loader.count(args)     # batches as the arguments say (training_step not ours)
        self.hook.step(loss=loss)
        if self._epoch_loader is not None:
            self._t_step_end = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not self._wrapped and isinstance(logs, dict) and isinstance(logs.get("loss"), (int, float)):
            self._log_loss = float(logs["loss"])

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._pause_ended()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._pause_ended()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loader = self.hook.loader
        if loader is not None:
            try:           # persistent workers would otherwise idle until the process ends
                loader.stop_workers()
            except Exception as exc:  # noqa: BLE001
                self.hook._failed(exc)

    def close(self) -> None:
        """Flush a last report and leave the daemon (also done at exit)."""
        self.hook.close()

    # ---- helpers ----

    def _pause_ended(self) -> None:
        """Evaluation or a checkpoint just ran between two steps: not step time, not data wait."""
        self.hook.meter.restart_step_clock()
        if self._t_step_end is not None:
            self._t_step_end = time.perf_counter()

    def _rank_from(self, args: Any) -> None:
        if getattr(args, "process_index", None) is None:
            return

        def rank_world() -> tuple[int, int]:
            return int(args.process_index), int(args.world_size)
        self.hook.rank_source = rank_world
        self.hook.rank, self.hook.world_size = rank_world()

    def _watch_loader(self, loader: Any) -> None:
        hook = self.hook
        from torch.utils.data import DataLoader
        try:
            from accelerate.data_loader import DataLoaderShard
        except ImportError:
            DataLoaderShard = None  # noqa: N806
        base = vars(loader).get("base_dataloader") if hasattr(loader, "__dict__") else None
        if DataLoaderShard is not None and issubclass(type(loader), DataLoaderShard) and isinstance(base, DataLoader):
            if getattr(loader, "use_stateful_dataloader", False):
                why = "a stateful DataLoader (use_stateful_dataloader): its own state_dict resumes it; left alone"
                hook.untunable["num_workers"] = hook.untunable["prefetch_factor"] = why
                return
            watched = hook.watch(base)
            if watched is not base:
                loader.base_dataloader = _Base(watched)    # the shard iterates the watched loader
                self.loader_mode = "mid-epoch"
            return
        if type(loader) is DataLoader or (isinstance(loader, DataLoader) and DataLoaderShard is not None
                                          and not isinstance(loader, DataLoaderShard)):
            self._epoch_loader = _EpochWorkers(hook, loader)
            self.loader_mode = "epoch"
            return
        why = f"the Trainer's train loader is a {type(loader).__name__}, not a torch DataLoader it iterates"
        hook.untunable.setdefault("num_workers", why)
        hook.untunable.setdefault("prefetch_factor", why)

    def _wrap_training_step(self, trainer: Any, args: Any) -> None:
        """trainer.training_step, as an instance attribute: the step's loss for the report, and, where
        the batch_size tuner runs, the per-device batch in micro-batches through hook.accumulate."""
        self._wrapped = True
        hook = self.hook
        original = trainer.training_step
        why = _why_not_split(trainer, args) if hook._tunes("batch_size") else None
        if why is not None:
            hook.untunable["micro_batch_size"] = why
            log.info("looptune: micro_batch_size not tuned: %s", why)
        self._split = hook._tunes("batch_size") and why is None and not hook.disabled
        me = weakref.ref(self)

        def training_step(model: Any, inputs: Any, num_items_in_batch: Any = None, *rest: Any, **kw: Any) -> Any:
            cb = me()
            if cb is None:
                return original(model, inputs, num_items_in_batch, *rest, **kw)
            if cb._epoch_loader is not None:
                cb._epoch_loader.took(inputs)
            if cb._split:
                out = cb._split_step(trainer, original, model, inputs, num_items_in_batch, rest, kw)
            else:
                out = original(model, inputs, num_items_in_batch, *rest, **kw)
            cb._loss = out if cb._loss is None else cb._loss + out
            return out

        trainer.training_step = training_step

    def _split_step(self, trainer: Any, original: Any, model: Any, inputs: Any, num_items_in_batch: Any,
                    rest: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        import torch

        from looptune.tuners.hook.actuators import split
        hook = self.hook
        n = split.rows(inputs)
        # a loss normalised over the whole accumulated batch (by num_items_in_batch, the Trainer's
        # loss_is_scaled_for_ga) is each micro-batch's share already; a per-batch mean is not
        normalised = getattr(trainer, "loss_is_scaled_for_ga", None)
        if normalised is None:
            accepts = bool(getattr(trainer, "model_accepts_loss_kwargs", False))
            normalised = (accepts and num_items_in_batch is not None) or \
                getattr(trainer, "compute_loss_func", None) is not None
        compute_loss = trainer.compute_loss
        scale: list[float] = [1.0]
        device: list[Any] = [None]

        def scaled_compute_loss(*a: Any, **k: Any) -> Any:
            out = compute_loss(*a, **k)
            if scale[0] == 1.0:
                return out
            if isinstance(out, tuple):          # return_outputs=True: (loss, outputs)
                return (out[0] * scale[0], *out[1:])
            return out * scale[0]

        def micro(mb: Any) -> Any:
            share = split.rows(mb) / n if n else 1.0
            scale[0] = 1.0 if normalised else share
            out = original(model, mb, num_items_in_batch, *rest, **kw)     # forward and the Trainer's backward
            device[0] = out
            return out / share if share != 1.0 else out

        # gradients of earlier accumulation steps of this optimizer step: set aside, so that an
        # out-of-memory recovery (which drops the gradients) redoes only this batch
        params = [p for p in model.parameters() if p.requires_grad]
        kept = [p.grad for p in params]
        held = any(g is not None for g in kept)
        if held:
            for p in params:
                p.grad = None
        own = trainer.__dict__.get("compute_loss", _MISSING)      # an instance attribute of the job's own
        trainer.compute_loss = scaled_compute_loss
        try:
            total = hook.accumulate(inputs, micro, backward=_done)
        finally:
            if own is _MISSING:
                trainer.__dict__.pop("compute_loss", None)
            else:
                trainer.compute_loss = own
            if held:
                for p, g in zip(params, kept):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad.add_(g)
        mb = hook.microbatcher
        if mb is not None and not mb.splitting:
            self._split = False          # no device memory to fit (no CUDA): the Trainer's own step from now
        ref = device[0]
        return torch.tensor(total, dtype=ref.dtype if ref is not None else torch.float32,
                            device=ref.device if ref is not None else None)


_MISSING = object()


def _done(loss: Any) -> None:
    """hook.accumulate's backward: the Trainer's training_step back-propagated already."""


def _why_not_split(trainer: Any, args: Any) -> str | None:
    if type(trainer).training_step is not transformers.Trainer.training_step:
        return f"{type(trainer).__name__} has its own training_step: micro-batches would not go through it"
    acc = getattr(trainer, "accelerator", None)
    kind = str(getattr(getattr(acc, "distributed_type", None), "value", getattr(acc, "distributed_type", "NO")))
    if kind.upper() not in ("NO", "MULTI_CPU", "MULTI_GPU"):
        return f"{kind} keeps gradients of its own: micro-batches need plain DDP or one process"
    if getattr(args, "n_gpu", 1) > 1:
        return "DataParallel (several GPUs in one process): use DDP (torchrun) for micro-batches"
    return None


def _saved_state(state: Any, name: str) -> dict[str, Any] | None:
    """This callback's state in a checkpoint's trainer_state.json (TrainerState.stateful_callbacks)."""
    entry = (getattr(state, "stateful_callbacks", None) or {}).get(name)
    for item in entry if isinstance(entry, list) else [entry]:
        if isinstance(item, dict) and isinstance(item.get("attributes"), dict):
            saved = item["attributes"].get(STATE)
            if isinstance(saved, dict) and saved.get("knobs"):
                return saved
    return None


def _find_trainer(depth: int = 16) -> Any:
    """The transformers.Trainer whose method is calling this callback (up the call stack)."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if isinstance(obj, transformers.Trainer):
            return obj
        frame = frame.f_back
    return None


class _Base:
    """What Accelerate's DataLoaderShard iterates (its `base_dataloader`): the watched loader's
    iterator; every other attribute is the wrapped DataLoader's, and num_workers / prefetch_factor
    are the setting running now (Accelerate's skip_first_batches copies them on a resume)."""

    def __init__(self, watched: Any) -> None:
        self._watched = watched

    def __iter__(self) -> Any:
        return iter(self._watched)

    def __len__(self) -> int:
        return len(self._watched.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "_watched":
            raise AttributeError(name)
        if name in ("num_workers", "prefetch_factor"):
            return getattr(self._watched.active, name)
        return getattr(self._watched.loader, name)

    @property  # type: ignore[misc]
    def __class__(self) -> type:          # isinstance(shard, DataLoader) stays true, as Accelerate means it
        return type(self._watched.loader)


class _EpochWorkers:
    """num_workers / prefetch_factor of a train DataLoader the Trainer iterates itself: a change is
    set on the loader at the next epoch's start (the Trainer's iterator is never swapped).

    The Trainer takes exactly the epoch's batches and never asks for one more, so with no workers
    the sampler is not run to its end, while workers prefetch indices up to it: a sampler whose end
    draws on its generator (RandomSampler's last, empty randperm) would leave the next epoch another
    order. At the end of an epoch run with another setting than the loader's own, the samplers'
    generators and epochs are set to what the loader's own setting leaves: replayed from the
    epoch's start, consuming as that setting consumes (the batches taken, plus its prefetch)."""

    def __init__(self, hook: Any, loader: Any) -> None:
        from looptune.tuners.hook.actuators import loader as actuator
        self.hook = hook
        self.loader = loader
        self.pending: dict[str, int] = {}
        self._a = actuator
        self._own = (loader.num_workers, loader.prefetch_factor)   # the setting the order is defined by
        self._start: tuple[Any, ...] | None = None
        self.taken = 0
        why = actuator.why_not_tunable(loader)
        hook.knobs.update(actuator.loader_knobs(loader))
        hook.signature = actuator.signature(loader)
        if why is None and loader.persistent_workers:
            why = "persistent_workers on a loader the Trainer iterates itself; left alone"
        if why is not None:
            hook.untunable["num_workers"] = hook.untunable["prefetch_factor"] = why[:200]
            return
        for knob in ("num_workers", "prefetch_factor"):
            hook.add_actuator(knob, lambda k=knob: self.pending.get(k, getattr(loader, k)),
                              lambda v, k=knob: self.set(k, v), settling=lambda: bool(self.pending))

    def set(self, knob: str, value: Any) -> None:
        a = self._a
        v = a._integer(knob, value)
        if knob == "num_workers":
            current = self.loader.num_workers
            if v < 0:
                raise a.KnobRefused(f"num_workers must be >= 0, got {v}; not applied")
            if v > current:
                cap, why = a.worker_cap(current)
                if v > cap:
                    raise a.KnobRefused(f"num_workers {v} is above this job's cap of {cap} ({why}); not applied")
        elif not 1 <= v <= a.MAX_PREFETCH_FACTOR:
            raise a.KnobRefused(f"prefetch_factor must be within 1..{a.MAX_PREFETCH_FACTOR}, got {v}; not applied")
        self.pending[knob] = v

    def begin_epoch(self) -> None:
        """Epoch start, before the Trainer's iter(): the pending setting takes effect; the samplers'
        random state is noted for the epoch's end."""
        loader = self.loader
        if self.pending:
            workers = self.pending.pop("num_workers", loader.num_workers)
            prefetch = self.pending.pop("prefetch_factor", loader.prefetch_factor)
            loader.num_workers = workers
            loader.prefetch_factor = (prefetch or 2) if workers > 0 else None
            self.hook.refresh_knobs()
        self.taken = 0
        self._start = (self._a._rng_snapshot(None), _generator_states(loader),
                       self._a._sampler_epochs(loader._index_sampler))

    def end_epoch(self) -> None:
        loader, a = self.loader, self._a
        own_workers, own_prefetch = self._own
        if self._start is None or (loader.num_workers, loader.prefetch_factor) == self._own or \
                (loader.num_workers == 0 and own_workers == 0):
            return
        glob, gens, epochs = self._start
        self._start = None
        try:
            n = len(loader)
        except TypeError:
            return
        taken = min(self.taken, n)
        pull = taken if own_workers == 0 else taken + own_workers * (own_prefetch or 2)
        now_glob, now_epochs = a._rng_snapshot(None), a._sampler_epochs(loader._index_sampler)
        try:
            a._rng_restore(glob, None)
            for g, state in gens:
                g.set_state(state)
            a._set_epochs(epochs)
            import torch
            torch.empty((), dtype=torch.int64).random_(generator=loader.generator)   # the iterator's base seed
            it = iter(loader._index_sampler)
            # workers ask for `pull` index batches, the last one past the end when pull > n: then the
            # sampler runs to its end; without workers only the batches taken are asked for
            for _ in range(min(pull, n + 1)):
                try:
                    next(it)
                except StopIteration:
                    break
            after = [(g, g.get_state()) for g, _ in gens]
            after_epochs = a._sampler_epochs(loader._index_sampler)
        finally:
            a._rng_restore(now_glob, None)            # the training's own draws stay as they are
            a._set_epochs(now_epochs)
        for g, state in after:
            g.set_state(state)
        a._set_epochs(after_epochs)

    def waited(self, seconds: float) -> None:
        """From one step's end to the next step's start: the Trainer fetched the step's batches."""
        if not self.hook.meter.off:
            self.hook.meter.data_wait += max(0.0, seconds)

    def took(self, batch: Any) -> None:
        """One batch the Trainer took from the loader (its training_step): counted."""
        from looptune.tuners.hook.meter import batch_size
        m = self.hook.meter
        self.taken += 1
        if not m.off:
            m.batches += 1
            m.pending_samples += batch_size(batch)

    def count(self, args: Any) -> None:
        """One optimizer step where training_step is not ours: batches as the arguments say."""
        m = self.hook.meter
        steps = int(args.gradient_accumulation_steps)
        self.taken += steps
        m.batches += steps
        m.pending_samples += int(args.per_device_train_batch_size) * steps


def _generator_states(loader: Any) -> list[tuple[Any, Any]]:
    """(generator, its state) of the loader and of every sampler along its index sampler's chain."""
    import torch
    found: list[Any] = []
    objs = [loader, loader._index_sampler]
    for obj in objs:
        for name in ("sampler", "batch_sampler"):
            child = getattr(obj, name, None)
            if child is not None and len(objs) < 8 and all(child is not o for o in objs):
                objs.append(child)
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return [(g, g.get_state()) for g in found]
