"""looptune inside a Lightning Trainer: `LooptuneCallback`, a thin layer over `looptune.Hook`.

    from looptune.lightning import LooptuneCallback
    trainer = lightning.pytorch.Trainer(..., callbacks=[LooptuneCallback(run="exp-1")])

The callback owns a Hook (`callback.hook`: made when the fit starts, or at first use) with the
Hook's arguments (run, socket, tune, config); it talks to the daemon, or runs embedded, exactly as
a hook in a hand-written loop does, under the same metric names and run/rank labels. What it
does with the Trainer:

- rank and world size: `trainer.global_rank` / `trainer.world_size` (`hook.rank_source`), right
  before torch.distributed is up too; the rank sync is decided when the model is watched (the fit
  has started: the process group exists by then).
- the model (`on_fit_start`): `hook.watch(trainer.strategy.model)`: under Lightning's DDP strategy
  the DistributedDataParallel model gets `grad_compression` (looptune's comm hook from the first
  switch) and its communication timed.
- the train DataLoader (`on_train_start`): Lightning's own CombinedLoader is given the watched
  loader in place of the DataLoader, and the epoch Lightning already started (it calls iter() on
  its loader before any callback runs) goes on watched (`WatchedLoader.adopt`): data wait and
  samples are measured from the first batch, and `num_workers` / `prefetch_factor` change mid-epoch
  with the loader actuator (every sample once, in the untuned order). Exception: a loader whose
  workers were already running when training started (num_workers > 0 in the user's loader)
  changes from the next epoch on in its first epoch (its sampler has drawn already: the replay
  could not be checked). A loader rebuilt by `reload_dataloaders_every_n_epochs` is watched
  again at its epoch start with the setting tuned so far. Several train loaders (a dict or a
  CombinedLoader of them) are left alone (`num_workers` untunable, with that reason).
- the step: `hook.step(loss=...)` after each optimizer step (`on_train_batch_end` when
  `trainer.global_step` moved: with accumulate_grad_batches=k, once every k batches).
- the batch (`batch_size` tuner, needs CUDA): Lightning's closure for a batch (training_step,
  zero_grad, backward) is done as `hook.accumulate` micro-batches: zero_grad first, then the
  training_step on each micro-batch and Lightning's own backward (precision plugin, loss scaling,
  on_before/after_backward hooks) on its share of the loss; the optimizer step, gradient clipping
  and on_before_optimizer_step see the whole batch's gradient. The loader's batch stays the batch
  per optimizer step (the global batch is unchanged); an out-of-memory error is recovered inside
  the step (no restart). Untunable, with the reason, under manual optimization,
  accumulate_grad_batches > 1 (a recovery would drop the window's earlier gradients: give the
  loader the batch per optimizer step instead), a strategy that accumulates itself (DeepSpeed), or
  a training_step that takes `dataloader_iter`.
- checkpoints: `state_dict()` holds the settled knob values (a trial in flight is saved at its
  old value) and the settings a tuner kept ("remembered"); `load_state_dict()` (Lightning calls
  it when a fit resumes from `ckpt_path`) applies them at `on_train_start`, so the resumed run
  starts from the tuned setting, and puts the remembered ones back into an embedded hook's memory.
- the end of the fit (`teardown`, or `on_exception`): the Trainer gets its own loader back and the
  hook closes (a last report, workers stopped); `callback.hook.knobs` / `.decisions` stay readable.

Lightning's private loop attributes used (checked against lightning 2.6): fit_loop._combined_loader
(its `flattened` and running `_iterator.iterators`) and the automatic optimization loop's
`_make_closure` / `_training_step`. Where one is missing, that part is left alone with a logged
reason and training goes on.
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loops.optimization.automatic import Closure, ClosureResult
except ImportError:  # the standalone `pytorch-lightning` distribution
    import pytorch_lightning as pl  # type: ignore[no-redef]
    from pytorch_lightning.loops.optimization.automatic import Closure, ClosureResult  # type: ignore[no-redef]

from looptune import protocol
from looptune.tuners.hook import Decision, Hook
from looptune.tuners.hook.actuators.loader import WatchedLoader

log = logging.getLogger("looptune.lightning")

__all__ = ["LooptuneCallback"]

STATE_VERSION = 1
LOADER_KNOBS = ("num_workers", "prefetch_factor")


class LooptuneCallback(pl.Callback):
    """Measure and tune a Lightning fit with looptune (see the module docstring)."""

    def __init__(self, run: str | None = None, socket: str | None = None, tune: bool | list[str] = True,
                 config: Any = None) -> None:
        super().__init__()
        if run is not None and not protocol.NAME_RE.match(run):
            raise ValueError(f"run {run!r} must match {protocol.NAME_RE.pattern}")
        self.run, self.socket, self.tune, self.config = run, socket, tune, config
        self._hook: Hook | None = None
        self._trainer: Any = None               # weakref to the Trainer of the fit in progress
        self._watched: WatchedLoader | None = None
        self._combined: Any = None              # Lightning's CombinedLoader holding self._watched
        self._user_loader: Any = None           # what it held before
        self._auto: Any = None                  # the automatic optimization loop whose closures we make
        self._last_step: int | None = None
        self._restore: dict[str, Any] = {}      # knob -> value from a checkpoint, not applied yet
        self._remembered: dict[str, Any] = {}   # knob -> value a tuner kept (this fit or a resumed one's)
        self.restored: list[Decision] = []      # what a checkpoint's state changed in this fit

    # ---- the hook ----

    @property
    def hook(self) -> Hook:
        """The looptune Hook of this callback, made at first use (the fit's `setup`)."""
        if self._hook is None:
            self._hook = Hook(run=self.run, socket=self.socket, tune=self.tune, config=self.config)
            self._attach_rank()
        return self._hook

    def _attach_rank(self) -> None:
        ref = self._trainer
        if self._hook is None or ref is None:
            return

        def framework_rank() -> tuple[int, int]:
            trainer = ref()
            if trainer is None:
                raise LookupError("the Trainer is gone")
            return int(trainer.global_rank), int(trainer.world_size)
        self._hook.rank_source = framework_rank
        self._hook.rank, self._hook.world_size = self._hook.rank_world()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(run=self.run)

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the Trainer and its callbacks into each rank: a rank makes its own hook
        state = self.__dict__.copy()
        for name in ("_hook", "_trainer", "_watched", "_combined", "_user_loader", "_auto"):
            state[name] = None
        return state

    # ---- the fit ----

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self._hook is not None and self._hook._closed:
            self._hook = None                  # an earlier fit's: this fit is a new job
        self._trainer = weakref.ref(trainer)
        self.restored = []
        self._attach_rank()
        self.hook                              # noqa: B018 - made now: its hello names the Trainer's rank

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        hook = self.hook
        model = trainer.strategy.model
        if model is not None and hook.module is None:
            hook.watch(model)       # DDP: grad_compression; every rank is here at the same point

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_step = trainer.global_step
        self._watch_loader(trainer)
        self._install_split(trainer, pl_module)
        self._apply_restore()
        self._put_remembered()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        combined = getattr(trainer.fit_loop, "_combined_loader", None)
        w = self._watched
        if w is None or combined is None or combined is self._combined:
            return
        # reload_dataloaders_every_n_epochs: Lightning built a new train loader for this epoch
        flat = list(combined.flattened)
        if len(flat) != 1 or isinstance(flat[0], WatchedLoader):
            return
        try:
            w.replace(flat[0])
            combined.flattened = [w]
            self._combined, self._user_loader = combined, flat[0]
            self.hook.refresh_knobs()
        except Exception as exc:  # noqa: BLE001 - the new loader runs unwatched
            self._watched = None
            self.hook._failed(exc)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        hook = self._hook
        if hook is None:
            return
        step = trainer.global_step
        if step == self._last_step:
            return                  # gradients still accumulating: no optimizer step yet
        self._last_step = step
        if isinstance(outputs, Mapping):
            loss = outputs.get("loss")
        else:
            loss = outputs if isinstance(outputs, torch.Tensor) else None
        hook.step(loss=loss)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        # validation inside the fit (val_check_interval) is not step time
        if self._hook is not None and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._hook.meter.restart_step_clock()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._uninstall_split()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._detach()

    def _detach(self) -> None:
        self._uninstall_split()
        combined, w = self._combined, self._watched
        if combined is not None and w is not None:
            try:
                if list(combined.flattened) == [w]:
                    combined.flattened = [w.loader]     # a later fit of this Trainer gets its own loader
            except Exception:  # noqa: BLE001
                pass
        self._combined = self._watched = self._user_loader = None
        if self._hook is not None:
            self._remembered.update(self._kept())
            self._hook.close()

    # ---- the train loader ----

    def _watch_loader(self, trainer: Any) -> None:
        hook = self.hook
        combined = getattr(trainer.fit_loop, "_combined_loader", None)
        flat = list(getattr(combined, "flattened", None) or [])
        if len(flat) != 1:
            why = ("no train dataloader" if not flat else
                   f"{len(flat)} train dataloaders (a CombinedLoader): left alone")
            for knob in LOADER_KNOBS:
                hook.untunable[knob] = why
            log.info("looptune: train loader not watched: %s", why)
            return
        if isinstance(flat[0], WatchedLoader):
            return
        w = hook.watch(flat[0])
        if not isinstance(w, WatchedLoader) or hook.loader is not w:
            return                              # the hook is off, or watched another loader first
        combined.flattened = [w]
        self._watched, self._combined, self._user_loader = w, combined, flat[0]
        # the epoch Lightning has started already (FitLoop.setup_data called iter()): go on in it, watched
        running = getattr(combined, "_iterator", None)
        iters = getattr(running, "iterators", None)
        if isinstance(iters, list) and len(iters) == 1:
            iters[0] = w.adopt(iters[0])
            running.iterables = [w]

    # ---- the batch: looptune's micro-batches inside Lightning's closure ----

    def _install_split(self, trainer: Any, pl_module: Any) -> None:
        hook = self.hook
        if hook.disabled or not hook._tunes("batch_size") or self._auto is not None:
            return
        why = _why_no_split(trainer, pl_module)
        if why is None and hook.module is None:
            why = "the Trainer's model could not be watched"
        if why is None:
            if hook.microbatcher is None:
                from looptune.tuners.hook.actuators.microbatch import MicroBatcher
                hook.microbatcher = MicroBatcher(hook, split_batch_norm=hook.config.hook.micro_batch_split_batch_norm)
            if not hook.microbatcher.splitting:
                return                          # the reason is in hook.untunable already
        if why is not None:
            hook.untunable["micro_batch_size"] = why
            log.info("looptune: micro_batch_size not tuned: %s", why)
            return
        auto = trainer.fit_loop.epoch_loop.automatic_optimization
        original = auto._make_closure
        me = weakref.ref(self)

        def make_closure(kwargs: OrderedDict, optimizer: Any, batch_idx: int) -> Any:
            closure = original(kwargs, optimizer, batch_idx)
            cb = me()
            if cb is None or cb._hook is None or "batch" not in kwargs or closure._backward_fn is None:
                return closure
            return _SplitClosure(closure, auto, kwargs, cb._hook)

        auto._make_closure = make_closure
        self._auto = auto

    def _uninstall_split(self) -> None:
        auto, self._auto = self._auto, None
        if auto is not None:
            auto.__dict__.pop("_make_closure", None)   # the class's own again

    # ---- checkpoints ----

    def state_dict(self) -> dict[str, Any]:
        hook = self._hook
        knobs: dict[str, Any] = {}
        if hook is not None:
            for knob in hook.actuators:
                value = hook._provisional.get(knob, hook.knobs.get(knob))   # a trial in flight: its old value
                if _plain(value):
                    knobs[knob] = value
            remembered = {**self._remembered, **self._kept()}
        else:
            knobs, remembered = dict(self._restore), dict(self._remembered)
        return {"version": STATE_VERSION, "run": hook.run if hook is not None else self.run,
                "signature": hook.signature if hook is not None else "", "knobs": knobs,
                "remembered": {k: v for k, v in remembered.items() if _plain(v)}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, Mapping) or state_dict.get("version") != STATE_VERSION:
            log.warning("looptune: checkpoint state of another version ignored: %r", state_dict)
            return
        knobs = state_dict.get("knobs") or {}
        self._restore = {k: v for k, v in knobs.items() if isinstance(k, str) and _plain(v)}
        self._remembered = {k: v for k, v in (state_dict.get("remembered") or {}).items()
                            if isinstance(k, str) and _plain(v)}

    def _kept(self) -> dict[str, Any]:
        """Settings a tuner kept in this fit (the engine's confirmations), latest per knob."""
        hook = self._hook
        out: dict[str, Any] = {}
        if hook is not None:
            for d in hook.decisions:
                if d.outcome == "applied" and not d.trial and d.reason.startswith("kept"):
                    out[d.knob] = d.new
        return out

    def _apply_restore(self) -> None:
        """The checkpoint's knob values, through the knobs' actuators (on every rank alike: each
        loads the same checkpoint at the same point of the fit)."""
        hook = self._hook
        if hook is None or not self._restore:
            return
        restore, self._restore = self._restore, {}
        for knob, value in restore.items():
            act = hook.actuators.get(knob)
            if act is None:
                continue                    # not a knob of this fit (no DDP, no CUDA, ...): nothing to restore
            outcome, detail, old = "applied", "", None
            try:
                old = act.get()
                if old == value:
                    continue
                act.set(value)
            except Exception as exc:  # noqa: BLE001 - a setting this run cannot take: it keeps its own
                outcome, detail = "failed", f"{type(exc).__name__}: {exc}"
                log.warning("looptune: %s=%r from the checkpoint not applied: %s", knob, value, detail)
            rec = Decision(knob=knob, old=old, new=value, reason="restored from the checkpoint", outcome=outcome,
                           time=time.time(), step=hook.meter.steps, detail=detail)
            hook.decisions.append(rec)
            self.restored.append(rec)
        hook.refresh_knobs()

    def _put_remembered(self) -> None:
        """An embedded hook's memory gets the checkpoint's kept settings it does not hold: its
        tuners then start from them, as they would from their own (README "Remembered settings")."""
        hook = self._hook
        if hook is None or not self._remembered or hook.mode != "embedded" or not hook.signature:
            return
        try:
            engine = hook.engine
            if engine is not None and engine.memory is not None:
                memory = engine.memory
            else:
                from looptune.tuners.memory import BestSettings, default_path
                memory = BestSettings(hook.config.tuners.state_file or default_path(False))
            for knob, value in self._remembered.items():
                if memory.get(hook.run, hook.signature, knob, owner=os.getuid()) is None:
                    memory.put(hook.run, hook.signature, knob, value, owner=os.getuid())
        except Exception as exc:  # noqa: BLE001 - a memory that cannot be written costs the head start only
            hook._failed(exc)


class _SplitClosure(Closure):
    """Lightning's closure for one batch done as looptune's micro-batches (module docstring)."""

    def __init__(self, inner: Any, auto: Any, kwargs: OrderedDict, hook: Hook) -> None:
        super().__init__(inner._step_fn, inner._backward_fn, inner._zero_grad_fn)
        self._auto = auto
        self._kwargs = kwargs
        self._hook = hook

    @torch.enable_grad()
    def closure(self, *args: Any, **kwargs: Any) -> Any:
        # zero_grad before the micro-batches (Lightning's own order: after training_step, before backward)
        if self._zero_grad_fn is not None:
            self._zero_grad_fn()
        last: list[Any] = []

        def compute(micro_batch: Any) -> Any:
            kw = OrderedDict(self._kwargs)
            kw["batch"] = micro_batch
            out = self._auto._training_step(kw)     # training_step and its output handling, as Lightning's
            last[:] = [out]
            if out.closure_loss is None:            # a skipped micro-batch: nothing to back-propagate
                return torch.zeros((), requires_grad=True)
            return out.closure_loss

        total = self._hook.accumulate(self._kwargs["batch"], compute, backward=self._backward_fn)
        out = last[0] if last else None
        if out is None or out.loss is None:
            return ClosureResult(None, extra=out.extra if out is not None else {})
        return ClosureResult(torch.tensor(total, dtype=out.loss.dtype, device=out.loss.device), extra=out.extra)


def _why_no_split(trainer: Any, pl_module: Any) -> str | None:
    if not pl_module.automatic_optimization:
        return "manual optimization: the LightningModule runs its own backward"
    if trainer.accumulate_grad_batches != 1:
        return ("Trainer(accumulate_grad_batches>1): an out-of-memory recovery would drop the gradients of the "
                "window's earlier batches; let the loader's batch be the batch per optimizer step instead")
    if getattr(trainer.strategy, "handles_gradient_accumulation", False):
        return "the strategy accumulates gradients itself"
    try:
        import inspect
        if "dataloader_iter" in inspect.signature(pl_module.training_step).parameters:
            return "training_step takes dataloader_iter: Lightning does not hand it a batch"
    except (TypeError, ValueError):
        pass
    auto = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "automatic_optimization", None)
    if auto is None or not hasattr(auto, "_make_closure") or not hasattr(auto, "_training_step"):
        return "this Lightning version's optimization loop is not the one looptune knows (2.6)"
    return None


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
