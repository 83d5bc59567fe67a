"""Embedded mode: no daemon answered, so the same engine runs in this process, on the figures of
this process tree (psutil) and of its GPUs (NVML, where a driver is there), and the hook can
serve its own /metrics. Runs in the channel's thread; decisions reach the training thread
through the hook's queue, as a daemon's would."""
from __future__ import annotations

import logging
import os
import time
import weakref
from typing import Any, Iterable

log = logging.getLogger("looptune.hook")


class Embedded:
    def __init__(self, hook: Any) -> None:
        self._hook = weakref.ref(hook)
        self.engine: Any = None
        self._tree: Any = None
        self._gpu: Any = None
        self.metrics_server: Any = None

    def _start(self, hook: Any) -> None:
        from looptune.collectors.gpu import GpuCollector
        from looptune.collectors.jobs import JobsCollector
        from looptune.tuners.engine import from_config
        self.engine = from_config(hook.config, lambda _key, d: (hook._queue_decision(d), True)[1], daemon=False)
        if hook.config.collectors.gpu.enabled and _uses_cuda():
            self._gpu = GpuCollector()
        me = os.getpid()
        # self_pid=-1: a collector leaves out the process it runs in (the daemon); here that process is the job
        self._tree = JobsCollector([], registered=lambda: {me: (hook.run, str(hook.rank), str(hook.world_size))},
                                   gpu_processes=self._gpu_processes, memory_detail_interval=2.0, self_pid=-1,
                                   # the training process's own USS (torch maps much: a smaps walk costs ms)
                                   # only as often as the daemon reads it; its loader workers' (the workers
                                   # tuner's memory budget) every 2 s
                                   root_detail_interval=hook.config.jobs.memory_detail_interval_seconds)

    def _gpu_processes(self) -> list[Any]:
        snap = self._gpu.last if self._gpu is not None else None
        return snap.processes if snap is not None else []

    def tick(self) -> None:
        import psutil

        from looptune.tuners.observe import build
        hook = self._hook()
        if hook is None:
            return
        if self.engine is None:
            self._start(hook)
        gpu_total: dict[int, float] = {}
        if self._gpu is not None:
            try:
                snap = self._gpu.sample()
                gpu_total = {g.index: g.values.get("memory_total_bytes", 0.0) for g in snap.gpus}
            except Exception:  # noqa: BLE001 - NVML failures are logged by the collector; no GPU figures then
                self._gpu.last = None
        tree = self._tree.sample()
        job = tree.jobs[0] if tree.jobs else None
        obs = build(time.monotonic(), hook.report(), job, host_available_bytes=psutil.virtual_memory().available,
                    gpu_memory_total=gpu_total, pid=os.getpid())
        names: list[str] | None = None if hook.tune is True else list(hook.tuners)
        if not hook.tune or hook.rank != 0:
            names = []          # verdicts only: rank 0 decides for every rank
        self.engine.observe(("self",), hook.run, obs, tuners=names, owner=os.getuid())

    def ack(self, rec: Any) -> None:
        if self.engine is not None and rec.id is not None:
            self.engine.applied(("self",), rec.id, rec.outcome, rec.detail)

    def serve_metrics(self, listen: str) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        from looptune.collectors.hookjobs import hook_families, tuner_families
        from looptune.daemon.config import split_listen
        ref = self._hook
        me = self

        class _Own:
            def collect(self) -> Iterable[Any]:
                h = ref()
                if h is None:
                    return []
                fams = list(hook_families([h.view()], with_info=True))
                eng = me.engine
                if eng is not None:
                    verdicts = {(h.run, str(h.rank)): v for v in eng.verdicts().values()}
                    fams.extend(tuner_families(dict(eng.outcomes), verdicts))
                return fams

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Own())
        host, port = split_listen(listen)
        self.metrics_server, _ = start_http_server(port, addr=host, registry=registry)
        log.info("looptune embedded mode: /metrics on %s", listen)

    def close(self) -> None:
        if self.metrics_server is not None:
            try:
                self.metrics_server.shutdown()
                self.metrics_server.server_close()
            except Exception:  # noqa: BLE001
                pass
        if self._gpu is not None:
            try:
                self._gpu.close()
            except Exception:  # noqa: BLE001
                pass


def _uses_cuda() -> bool:
    """A job that has CUDA (torch imported, a device there): only then is NVML worth starting."""
    import sys
    torch = sys.modules.get("torch")
    try:
        return torch is not None and torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False
