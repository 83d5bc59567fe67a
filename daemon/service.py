"""The node daemon: samplers, the /metrics endpoint, the hook socket, reloads and systemd.

Signal handlers only set events; `run()` is the main loop that does the work: reload on
SIGHUP (repeated HUPs merge into one), stop on SIGTERM/SIGINT, and ping systemd's watchdog
only while no sampler is hung.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector

from looptune.collectors.base import Collector, Sampler
from looptune.collectors.exporter import DaemonExporter, ReloadState
from looptune.collectors.gpu import GpuCollector
from looptune.collectors.host import HostCollector
from looptune.collectors.jobs import JobsCollector
from looptune.daemon import __version__
from looptune.daemon import config as cfg
from looptune.daemon import http as metrics_http
from looptune.daemon.sdnotify import Notifier
from looptune.collectors.hookjobs import HookJobsCollector, TunerCollector
from looptune.daemon.hooks import HookRegistry
from looptune.daemon.owners import RunOwners
from looptune.daemon.server import HookServer
from looptune.tuners import engine as tuning
from looptune.tuners import observe

log = logging.getLogger("looptune.daemon")

TICK_SECONDS = 0.25
STATUS_EVERY_SECONDS = 5.0


def _owned_by(pid: int, uid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == uid
    except OSError:
        return False


def set_log_level(level: str) -> None:
    logging.getLogger("looptune").setLevel(level.upper())


class Daemon:
    def __init__(self, config: cfg.Config, *, config_cli_path: str | None = None,
                 config_path: str | None = None, listen: str | None = None, socket_path: str | None = None,
                 environ: Mapping[str, str] = os.environ, notifier: Notifier | None = None,
                 nvml_module: Any = None, extra_collectors: Callable[[], list[Collector]] | None = None) -> None:
        self.config = config
        self.config_cli_path = config_cli_path
        self.config_path = config_path
        self.listen = listen or config.daemon.listen
        self.socket_path = socket_path or cfg.socket_path(config, environ)
        self.environ = environ
        self.notifier = notifier if notifier is not None else Notifier.from_env(environ)
        self._nvml_module = nvml_module
        self._extra_collectors = extra_collectors
        self.reload_state = ReloadState()
        self.reload_state.last_success_time = time.time()
        self.samplers: dict[str, Sampler] = {}
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.http_server: Any = None
        self.metrics_app: metrics_http.CachedMetricsApp | None = None
        self.socket_server: HookServer | None = None
        self.hooks = HookRegistry(grace_seconds=config.jobs.grace_seconds, max_jobs_per_uid=config.jobs.max_jobs_per_user,
                                  max_jobs=config.jobs.max_jobs, owners=RunOwners(
                                      owners_path(config), ttl_seconds=config.jobs.run_owner_days * 86400))
        self.engine: tuning.Engine | None = None
        self._logged: set[str] = set()
        self._engine_lock = threading.Lock()     # the main loop observes, the socket thread acknowledges
        self._seen: dict[tuple[str, int], int] = {}
        self.address: tuple[str, int] | None = None
        self._started = False

    # ---- collectors ----

    def _make(self, name: str) -> Collector:
        c = self.config
        if name == "host":
            return HostCollector()
        if name == "gpu":
            return GpuCollector(module=self._nvml_module)
        if name == "jobs":
            gpu = self.samplers.get("gpu")

            def gpu_processes() -> list[Any]:
                snap = gpu.collector.last if gpu is not None else None   # type: ignore[attr-defined]
                return snap.processes if snap is not None else []

            return JobsCollector(c.jobs.match, gpu_processes=gpu_processes if c.jobs.gpu_processes else None,
                                 registered=self.hooks.registered_pids,
                                 discover_after=c.jobs.discover_after_seconds,
                                 memory_detail_interval=c.jobs.memory_detail_interval_seconds,
                                 max_jobs=c.jobs.max_jobs)
        if name == "hooks":
            return HookJobsCollector(self.hooks.views, self._rejected, self._connections)
        if name == "tuners":
            return TunerCollector(self._tuner_state)
        raise KeyError(name)

    def _rejected(self) -> dict[str, int]:
        return dict(self.socket_server.rejected) if self.socket_server is not None else {}

    def _connections(self) -> int:
        return self.socket_server.connections() if self.socket_server is not None else 0

    def _interval(self, name: str) -> float:
        toggle = getattr(self.config.collectors, name, None)
        own = toggle.interval_seconds if toggle is not None else None
        return own if own is not None else self.config.collectors.interval_seconds

    def _sync_samplers(self) -> None:
        """Start, stop and re-time samplers to match the config (at start and on reload)."""
        col = self.config.collectors
        timeout = col.timeout_seconds
        for name in ("host", "gpu", "jobs", "hooks", "tuners"):   # gpu before jobs: jobs reads GPU processes
            enabled = getattr(col, name).enabled if name in ("host", "gpu", "jobs") else True
            s = self.samplers.get(name)
            if enabled and s is None:
                s = Sampler(self._make(name), self._interval(name), timeout)
                self.samplers[name] = s
                s.start()
            elif not enabled and s is not None:
                self.samplers.pop(name).stop()
            elif s is not None:
                s.set_interval(self._interval(name), timeout)
        self.hooks.grace_seconds = self.config.jobs.grace_seconds
        jobs = self.samplers.get("jobs")
        if jobs is not None:
            j = self.config.jobs
            jobs.collector.configure(j.match, j.memory_detail_interval_seconds, j.max_jobs,  # type: ignore[attr-defined]
                                     j.discover_after_seconds)
        if self._extra_collectors is not None:
            for c in self._extra_collectors():
                if c.name not in self.samplers:
                    s = Sampler(c, self.config.collectors.interval_seconds, timeout)
                    self.samplers[c.name] = s
                    s.start()

    # ---- lifecycle ----

    def start(self) -> None:
        set_log_level(self.config.daemon.log_level)
        self.engine = tuning.from_config(self.config, self._send_decision, daemon=True)
        self.hooks.on_applied = self._on_applied
        self._sync_samplers()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(DaemonExporter(lambda: list(self.samplers.values()), __version__, self.reload_state))
        ProcessCollector(namespace="looptune_daemon", registry=registry)
        self.registry = registry
        # every idle scraper connection holds a descriptor: take what the hard limit allows
        # (the unit sets LimitNOFILE=); /metrics then sizes its connection bound to it
        metrics_http.raise_nofile_limit()
        host, port = cfg.split_listen(self.listen)
        tls = self.config.daemon.tls
        self.http_server, self.metrics_app = metrics_http.start(host, port, registry, self._generation, tls)
        self.address = self.http_server.server_address[:2]
        try:
            self.socket_server = HookServer(self.socket_path, self.hooks,
                                            allowed_uids=self.config.daemon.allowed_uids,
                                            report_interval=self.config.hook.report_interval_seconds,
                                            status_provider=self.status_jobs,
                                            # every rank of a user's jobs connects, plus a few for `status`
                                            max_per_uid=self.config.jobs.max_jobs_per_user + 8,
                                            max_connections=self.config.jobs.max_jobs + 64,
                                            private_dir=cfg.is_private_socket_dir(
                                                os.path.dirname(self.socket_path), self.environ))
        except Exception:
            self.http_server.shutdown()
            self.http_server.server_close()
            raise
        self.socket_server.start()
        scheme = "https" if tls.cert_file else "http"
        log.info("looptune %s: metrics on %s://%s:%d/metrics, socket %s, config %s", __version__, scheme,
                 self.address[0], self.address[1], self.socket_path, self.config_path or "built-in defaults")
        self._started = True
        self.notifier.ready()
        self.notifier.status(self.summary())

    def request_stop(self) -> None:
        self._stop.set()

    def _log_once(self, kind: str, what: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.exception("%s (logged once; the daemon goes on)", what)

    def request_reload(self) -> None:
        self._reload.set()

    def run(self) -> int:
        """Main loop until a stop is requested; returns the exit status."""
        next_ping = next_status = 0.0
        ping_every = self.notifier.watchdog_interval_seconds
        while not self._stop.wait(TICK_SECONDS):
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if self.metrics_app is not None:
                try:
                    self.metrics_app.prerender()
                except Exception:  # noqa: BLE001 - a scrape renders again; the daemon stays up
                    self._log_once("prerender", "rendering /metrics ahead failed")
            try:
                self.tune_tick()
            except Exception:  # noqa: BLE001 - a tuning bug must not stop the monitoring
                log.exception("tuning failed this tick")
            now = time.monotonic()
            if ping_every and now >= next_ping and self.healthy():
                self.notifier.watchdog()
                next_ping = now + ping_every
            if now >= next_status:
                self.notifier.status(self.summary())
                next_status = now + STATUS_EVERY_SECONDS
        self.shutdown()
        return 0

    # ---- tuning ----

    def tune_tick(self) -> None:
        """Feed each hooked job's new report to the engine (rank 0 decides; other ranks get verdicts)."""
        if self.engine is None:
            return
        jobs_s, host_s, gpu_s = (self.samplers.get(n) for n in ("jobs", "host", "gpu"))
        tree_snap = jobs_s.status().snapshot if jobs_s is not None else None
        tree = {(j.run, j.rank): j for j in (tree_snap.jobs if tree_snap is not None else [])}
        host = host_s.status().snapshot if host_s is not None else None
        gpu = gpu_s.status().snapshot if gpu_s is not None else None
        gpu_total = {g.index: g.values.get("memory_total_bytes", 0.0) for g in gpu.gpus} if gpu is not None else {}
        live = set()
        for job in self.hooks.connected():
            key = (job.run, job.rank)
            live.add(key)
            if self._seen.get(key) == job.seq:
                continue
            self._seen[key] = job.seq
            obs = observe.build(job.report_mono, job.report, tree.get((job.run, str(job.rank))),
                                host_available_bytes=host.memory_available_bytes if host is not None else None,
                                gpu_memory_total=gpu_total, pid=job.pid)
            names = (job.tuners or None) if job.tune and job.rank == 0 else []
            with self._engine_lock:
                self.engine.observe(key, job.run, obs, tuners=names, owner=job.uid)
        with self._engine_lock:
            for key in [k for k in self.engine.jobs if k not in live]:
                self.engine.forget(key)
                self._seen.pop(key, None)
            # decision counters of runs no longer on the node (grace period over) leave /metrics too
            self.engine.prune_outcomes(self.hooks.runs())

    def _send_decision(self, key: tuple[str, int], decision: dict[str, Any]) -> bool:
        job = self.hooks.find(*key)
        return job is not None and self.socket_server is not None and \
            self.socket_server.send_decision(job, decision)

    def _on_applied(self, job: Any, applied: dict[str, Any]) -> None:
        if self.engine is not None:
            with self._engine_lock:
                self.engine.applied((job.run, job.rank), applied["id"], applied["outcome"], applied["detail"])

    def _tuner_state(self) -> tuple[dict[Any, int], dict[tuple[str, str], str]]:
        if self.engine is None:
            return {}, {}
        with self._engine_lock:
            return dict(self.engine.outcomes), {(k[0], str(k[1])): v for k, v in self.engine.verdicts().items()}

    def _generation(self) -> tuple[Any, ...]:
        """Changes whenever what a scrape would show changes (the exposition cache's key)."""
        r = self.reload_state
        gen: list[Any] = [r.successful, r.reloads, r.failures]
        for name, s in self.samplers.items():
            st = s.status()
            gen.append((name, s.generation, st.up, st.hung, st.errors))
        return tuple(gen)

    def healthy(self) -> bool:
        return all(not s.status().hung for s in self.samplers.values())

    def summary(self) -> str:
        parts = []
        for name, s in self.samplers.items():
            st = s.status()
            parts.append(f"{name} {'up' if st.up else ('hung' if st.hung else 'down')}")
        jobs = self.samplers.get("jobs")
        snap = jobs.status().snapshot if jobs is not None else None
        njobs = len(snap.jobs) if snap is not None else 0
        return f"{njobs} job(s); collectors: {', '.join(parts) or 'none'}"

    def reload(self) -> bool:
        """Load the config again; a bad one leaves the running config in force."""
        self.notifier.reloading()
        try:
            new, path = cfg.load_resolved(self.config_cli_path, self.environ)
        except cfg.ConfigError as exc:
            self.reload_state.successful = False
            self.reload_state.failures += 1
            self.reload_state.reloads += 1     # counted last: a scrape never sees the count before the outcome
            for problem in exc.problems:
                log.error("config reload rejected, keeping the running config: %s: %s", exc.source, problem)
            self.notifier.ready()
            return False
        old = self.config
        if new.tuners != old.tuners:
            try:
                engine = tuning.from_config(new, self._send_decision, daemon=True)
            except Exception as exc:  # noqa: BLE001 - a plugin that fails to load rejects the reload
                self.reload_state.successful = False
                self.reload_state.failures += 1
                self.reload_state.reloads += 1
                log.error("config reload rejected, keeping the running config: %s", exc)
                self.notifier.ready()
                return False
            with self._engine_lock:
                if self.engine is not None:
                    # a trial in flight is judged by the settings it started under: roll it back first
                    n = self.engine.abort("config reloaded")
                    if n:
                        log.info("config reload: %d trial(s) in flight rolled back", n)
                    engine.outcomes.update(self.engine.outcomes)     # counters stay monotonic
                self.engine = engine
        self.hooks.grace_seconds = new.jobs.grace_seconds
        self.hooks.owners.ttl_seconds = new.jobs.run_owner_days * 86400
        self.hooks.max_jobs_per_uid, self.hooks.max_jobs = new.jobs.max_jobs_per_user, new.jobs.max_jobs
        if self.socket_server is not None:
            self.socket_server.set_allowed_uids(new.daemon.allowed_uids)
            self.socket_server.report_interval = new.hook.report_interval_seconds
            self.socket_server.max_per_uid = new.jobs.max_jobs_per_user + 8
            self.socket_server.max_connections = new.jobs.max_jobs + 64
        for key in ("listen", "socket", "tls"):
            if getattr(new.daemon, key) != getattr(old.daemon, key):
                log.warning("daemon.%s changed; it takes effect at the next restart", key)
        self.config, self.config_path = new, path
        set_log_level(new.daemon.log_level)
        self._sync_samplers()
        self.reload_state.successful = True
        self.reload_state.last_success_time = time.time()
        self.reload_state.reloads += 1
        log.info("config reloaded from %s", path or "built-in defaults")
        self.notifier.ready()
        return True

    def status_jobs(self, uid: int) -> list[dict[str, Any]]:
        """What `looptune status` shows: hook figures joined with process-tree figures, own jobs only
        (root sees all)."""
        views = {(v.run, v.rank): v for v in self.hooks.views(None if uid == 0 else uid)}
        jobs_sampler = self.samplers.get("jobs")
        snap = jobs_sampler.status().snapshot if jobs_sampler is not None else None
        tree = {(j.run, j.rank): j for j in (snap.jobs if snap is not None else [])}
        out = []
        for key in sorted(set(views) | set(tree)):
            v, t = views.get(key), tree.get(key)
            if v is None and uid != 0 and not _owned_by(t.root_pid, uid):
                continue
            out.append({
                "run": key[0], "rank": key[1], "hook": v is not None,
                "pid": v.pid if v else t.root_pid,
                "samples_per_second": v.samples_per_second if v else None,
                "data_wait_share": v.data_wait_share if v else None,
                "knobs": v.knobs if v else {}, "last_decision": v.last_decision if v else None,
                "oom_recoveries": v.counters.get("oom_recoveries") if v else None,
                "device_peak_bytes": v.counters.get("device_memory_peak_bytes") if v else None,
                "gradient_noise_scale": v.counters.get("gradient_noise_scale") if v else None,
                "connected": v.connected if v else None, "disabled": v.disabled if v else None,
                "cpu_cores": t.cpu_cores if t else None, "processes": t.processes if t else None,
                "rss_bytes": t.rss_bytes if t else None,
                "gpu": {str(g): {"memory_bytes": m, "sm_ratio": sm} for g, (m, sm) in t.gpu.items()} if t else {},
            })
        return out

    def shutdown(self) -> None:
        self.notifier.stopping()
        if self.http_server is not None:
            self.http_server.shutdown()
            self.http_server.server_close()
        if self.socket_server is not None:
            self.socket_server.stop()
        for s in self.samplers.values():
            s.request_stop()
        deadline = time.monotonic() + 1.0
        for s in self.samplers.values():
            s.stop(join_timeout=max(0.0, deadline - time.monotonic()))
        if self._started:
            log.info("looptune stopped")


def owners_path(config: cfg.Config) -> str:
    """owners.json beside the remembered settings (the daemon's state directory)."""
    from looptune.tuners.memory import default_path
    return os.path.join(os.path.dirname(config.tuners.state_file or default_path(True)), "owners.json")
