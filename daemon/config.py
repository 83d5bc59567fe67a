"""Typed, validated configuration.

The dataclasses below are the single source of truth: their defaults are the built-in
configuration, their field metadata is the allowed range and the comment that
`render_default()` writes into config.yaml. Validation collects every problem, each naming
the key path, the value and what is allowed, and raises them together.
"""
from __future__ import annotations

import dataclasses
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from looptune.options import opt, section

__all__ = ["Config", "ConfigError", "opt", "section", "parse", "load", "load_resolved"]

DEFAULT_PORT = 19400
SYSTEM_CONFIG = "/etc/looptune/config.yaml"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """One or more problems in a config file; `problems` holds one line each."""

    def __init__(self, problems: list[str], source: str = "<config>") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def _check_listen(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return "is not HOST:PORT with a port in 1..65535"
    return None


def _check_regex(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"is not a valid regular expression: {exc}"
    return None


def _check_listen_or_empty(value: str) -> str | None:
    return _check_listen(value) if value else None


@dataclass
class TLS:
    cert_file: str = opt("", "PEM certificate for HTTPS on /metrics; empty serves plain HTTP.")
    key_file: str = opt("", "PEM private key matching cert_file.")
    client_ca_file: str = opt("", "CA bundle to verify scraper client certificates (mutual TLS).")
    client_auth_required: bool = opt(False, "Refuse scrapers without a client certificate signed by client_ca_file.")


@dataclass
class DaemonConfig:
    listen: str = opt(f"0.0.0.0:{DEFAULT_PORT}",
                      f"HOST:PORT of the Prometheus endpoint (/metrics). {DEFAULT_PORT} sits outside "
                      "the 9100-9999 range that well-known exporters occupy. All interfaces by default, "
                      "because Prometheus scrapes from another host; the endpoint is read-only, drops a "
                      "client that has not sent its request 5 seconds after connecting and holds at most 1024 "
                      "connections. Use 127.0.0.1:PORT where the scraper runs on this node, a firewall "
                      "to admit only the Prometheus servers, and daemon.tls for HTTPS and client "
                      "certificates. Changes need a restart.",
                      check=_check_listen)
    socket: str = opt("", "Unix socket the training hooks talk to. Empty: $RUNTIME_DIRECTORY/looptune.sock "
                          "(systemd), else /run/looptune/looptune.sock, else for a non-root daemon "
                          "$XDG_RUNTIME_DIR/looptune/looptune.sock or /tmp/looptune-UID/looptune.sock. "
                          "Changes need a restart.")
    log_level: str = opt("info", "Log verbosity.", choices=LOG_LEVELS)
    allowed_uids: list[int] = opt([], "Users (uids) that may connect to the socket. Empty: any local user, "
                                      "each seeing and tuning only its own jobs.", lo=0, hi=2**32 - 1)
    tls: TLS = section(TLS, "Optional TLS for /metrics, through prometheus-client's own support.")


@dataclass
class CollectorToggle:
    enabled: bool = opt(True, "Run this collector.")
    interval_seconds: float | None = opt(None, "Sampling interval; null uses collectors.interval_seconds.",
                                         lo=0.1, hi=60)


@dataclass
class CollectorsConfig:
    interval_seconds: float = opt(1.0, "Default sampling interval of every collector.", lo=0.1, hi=60)
    timeout_seconds: float = opt(5.0, "A sample still running after this long marks its collector down "
                                      "(a hung NVML call, say); the others keep sampling.", lo=0.1, hi=300)
    host: CollectorToggle = section(CollectorToggle, "Host CPU, memory and swap (psutil).")
    jobs: CollectorToggle = section(CollectorToggle, "Process trees of training jobs (psutil).")
    gpu: CollectorToggle = section(CollectorToggle, "GPUs through NVML; reports itself down where no "
                                                     "driver or GPU is present.")


@dataclass
class JobsConfig:
    match: list[str] = opt(
        [r"(^|/)torchrun(\s|$)", r"-m\s+torch\.distributed\.(run|launch)\b",
         r"(^|[/\s])train[\w.-]*\.py\b"],
        "Regular expressions searched in each process's command line; a match (or a process holding a "
        "GPU context) is a training job. Its DataLoader workers and other children belong to it.",
        check=_check_regex)
    gpu_processes: bool = opt(True, "Also count any process holding a GPU context as a job.")
    discover_after_seconds: float = opt(10.0, "A process found by pattern or GPU context becomes a job only "
                                              "after running this long, so a hook starting up names it first "
                                              "(and short-lived commands never show).", lo=0, hi=600)
    memory_detail_interval_seconds: float = opt(
        10.0, "How often USS/PSS are read per process; they walk the page tables, so slower than RSS.",
        lo=1, hi=600)
    max_jobs: int = opt(64, "At most this many jobs are exported, to bound label values.", lo=1, hi=4096)
    grace_seconds: float = opt(60.0, "A job whose hook disconnected stays exported this long with its last "
                                     "counters, then is dropped.", lo=1, hi=3600)


@dataclass
class HookConfig:
    report_interval_seconds: float = opt(1.0, "How often the hook sends its counters to the daemon.",
                                         lo=0.1, hi=60)
    reconnect_max_seconds: float = opt(2.0, "Longest wait between attempts to reach a daemon that went away.",
                                       lo=0.1, hi=60)
    max_failures: int = opt(10, "Exceptions inside the hook before it disables itself; training goes on "
                                "untouched.", lo=1, hi=1000)
    sync_every_steps: int = opt(8, "Under torch.distributed, rank 0 shares its pending decisions with every "
                                   "rank every this many steps (one small broadcast), so all apply at the "
                                   "same step.", lo=1, hi=100000)
    embedded_metrics_listen: str = opt("", "HOST:PORT where a hook that found no daemon serves its own "
                                           "/metrics. Empty: off.", check=_check_listen_or_empty)


def _check_tuner(name: str) -> str | None:
    from looptune.tuners.registry import available
    known = available()
    return None if name in known else f"is not a known tuner; known: {', '.join(sorted(known))}"


@dataclass
class TunersConfig:
    enabled: list[str] = opt(["workers"], "Tuner plugins to run (built-in: workers; more through the "
                                          "entry-point group looptune.tuners).", check=_check_tuner)
    window_seconds: float = opt(1.0, "Length of one measurement window.", lo=0.2, hi=60)
    baseline_windows: int = opt(3, "Windows at the current setting a trial compares against.", lo=1, hi=60)
    measure_windows: int = opt(3, "Windows measured at the new setting before keep or roll back.", lo=1, hi=60)
    settle_windows: int = opt(1, "Windows skipped after a change at least.", lo=0, hi=60)
    max_settle_windows: int = opt(10, "Windows a change may take to warm up (every new loader worker delivered, "
                                      "samples/s no longer climbing) before it is measured anyway.", lo=0, hi=600)
    min_gain: float = opt(0.03, "Relative samples/s gain a change must show to be kept.", lo=0, hi=1)
    max_extensions: int = opt(3, "Times a gain above min_gain but inside the job's own noise is measured again "
                                 "(measure_windows each) before it is kept or rolled back.", lo=0, hi=20)
    regression_bound: float = opt(0.25, "A window this far below the baseline (twice) rolls back at once.",
                                  lo=0.01, hi=1)
    cooldown_windows: int = opt(3, "Windows without trials after a roll back.", lo=0, hi=600)
    state_file: str = opt("", "Where the best settings per run and dataset are kept. Empty: "
                              "$STATE_DIRECTORY/best.json or /var/lib/looptune/best.json for the daemon, "
                              "~/.cache/looptune/best.json for an embedded hook.")
    # Each tuner's own section, tuners.<name>, validated against the tuner's Options dataclass;
    # filled by _build from the keys that name tuners (see _tuner_options).
    options: dict[str, Any] = field(default_factory=lambda: _builtin_tuner_options(),
                                    metadata={"tuner_sections": True})


@dataclass
class Config:
    daemon: DaemonConfig = section(DaemonConfig, "The service itself.")
    collectors: CollectorsConfig = section(CollectorsConfig, "What is sampled and how often.")
    jobs: JobsConfig = section(JobsConfig, "How training jobs are recognised before their hook registers them.")
    hook: HookConfig = section(HookConfig, "The in-process hook (tuners.hook.Hook) of each training job.")
    tuners: TunersConfig = section(TunersConfig, "Bottleneck detection and the tuners that act on it.")


# ---- loading and validation ----

def _type_name(tp: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, path: str, meta: dict, problems: list[str]) -> Any:
    """Check one scalar against its declared type and bounds; returns the value or None on error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: {value!r} is not a list")
            return None
        out = [_coerce(v, args[0], f"{path}[{i}]", meta, problems) for i, v in enumerate(value)]
        return out
    ok = (isinstance(value, bool) if tp is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float else
          isinstance(value, int) and not isinstance(value, bool) if tp is int else
          isinstance(value, str) if tp is str else True)
    allowed = _allowed(meta)
    if not ok:
        problems.append(f"{path}: {value!r} is not {_type_name(tp)}" + (f"; allowed {allowed}" if allowed else ""))
        return None
    if tp is float:
        value = float(value)
    lo, hi, choices, check = meta.get("lo"), meta.get("hi"), meta.get("choices"), meta.get("check")
    # `not lo <= value`, not `value < lo`: NaN fails every comparison and must not slip through
    if (lo is not None and not lo <= value) or (hi is not None and not value <= hi):
        problems.append(f"{path}: {_fmt(value)} is out of range; allowed {allowed}")
        return None
    if choices and value not in choices:
        problems.append(f"{path}: {value!r} is not allowed; allowed {allowed}")
        return None
    if check and (msg := check(value)):
        problems.append(f"{path}: {value!r} {msg}")
        return None
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)   # never show 60.0000001 as 60
    return str(value)


def _allowed(meta: dict) -> str:
    if meta.get("choices"):
        return ", ".join(meta["choices"])
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None or hi is not None:
        return f"{_fmt(lo) if lo is not None else ''}..{_fmt(hi) if hi is not None else ''}"
    return ""


def _build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    prefix = f"{path}." if path else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path or '<top>'}: {data!r} is not a mapping of keys")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("tuner_sections")}
    sections = next((f.name for f in dataclasses.fields(cls) if f.metadata.get("tuner_sections")), None)
    kwargs: dict[str, Any] = {}
    if sections is not None:
        kwargs[sections] = _builtin_tuner_options()
    for key in data:
        if key in fields:
            continue
        if sections is not None and isinstance(key, str):
            options_cls = _tuner_options(key, prefix, problems)
            if options_cls is not None:
                kwargs[sections][key] = _build(options_cls, data[key], prefix + key, problems)
            continue
        problems.append(f"{prefix}{key}: unknown key; allowed keys here: {', '.join(fields)}")
    for name, f in fields.items():
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], prefix + name, problems)
        else:
            value = _coerce(data[name], tp, prefix + name, dict(f.metadata), problems)
            if value is not None or data[name] is None:
                kwargs[name] = value
    return cls(**kwargs)


def _builtin_tuner_options() -> dict[str, Any]:
    """Each built-in tuner's options at their defaults (a plugin's: when its section is given)."""
    from looptune.tuners.registry import BUILTIN, load_factory
    out = {}
    for name in sorted(BUILTIN):
        cls = getattr(load_factory(name), "Options", None)
        if cls is not None:
            out[name] = cls()
    return out


def _tuner_options(name: str, prefix: str, problems: list[str]) -> type | None:
    """The Options dataclass of tuner `name` (a tuners.<name> section), or None with the problem noted."""
    from looptune.tuners.registry import TunerLoadError, available, load_factory
    fields = [f.name for f in dataclasses.fields(TunersConfig) if not f.metadata.get("tuner_sections")]
    if name not in available():
        problems.append(f"{prefix}{name}: unknown key; allowed keys here: {', '.join(fields)}, or a tuner's "
                        f"name for its options ({', '.join(sorted(available()))})")
        return None
    try:
        options_cls = getattr(load_factory(name), "Options", None)
    except TunerLoadError as exc:
        problems.append(f"{prefix}{name}: {exc}")
        return None
    if options_cls is None or not dataclasses.is_dataclass(options_cls):
        problems.append(f"{prefix}{name}: tuner {name!r} takes no options")
        return None
    return options_cls


def parse(data: Any, source: str = "<config>") -> Config:
    """Validate a decoded YAML document; raises ConfigError listing every problem."""
    problems: list[str] = []
    config = _build(Config, data, "", problems)
    if problems:
        raise ConfigError(problems, source)
    return config


def load(path: str | os.PathLike) -> Config:
    """Load and validate one file. Missing keys take their defaults; an empty file is all defaults."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror}"], source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}not valid YAML: {getattr(exc, 'problem', exc)}"], source) from None
    return parse(data, source)


def resolve_path(cli_path: str | None, environ: typing.Mapping[str, str] = os.environ,
                 system_path: str = SYSTEM_CONFIG) -> str | None:
    """Lookup order: --config, $LOOPTUNE_CONFIG, /etc/looptune/config.yaml, else None (built-in defaults)."""
    if cli_path:
        return cli_path
    if environ.get("LOOPTUNE_CONFIG"):
        return environ["LOOPTUNE_CONFIG"]
    if os.path.exists(system_path):
        return system_path
    return None


def load_resolved(cli_path: str | None, environ: typing.Mapping[str, str] = os.environ,
                  system_path: str = SYSTEM_CONFIG) -> tuple[Config, str | None]:
    path = resolve_path(cli_path, environ, system_path)
    return (load(path) if path else Config()), path


def socket_path(config: Config, environ: typing.Mapping[str, str] = os.environ) -> str:
    """Where the daemon listens and the hook connects: the config key, else the first usable default."""
    if config.daemon.socket:
        return config.daemon.socket
    return default_socket_paths(environ)[0]


def default_socket_paths(environ: typing.Mapping[str, str] = os.environ) -> list[str]:
    """Candidates in order: $RUNTIME_DIRECTORY (systemd), /run/looptune, then per-user places for a
    daemon started by hand without root. The first whose directory exists or can be made is used."""
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    dirs = [runtime] if runtime else []
    dirs.append("/run/looptune")
    if environ.get("XDG_RUNTIME_DIR"):
        dirs.append(os.path.join(environ["XDG_RUNTIME_DIR"], "looptune"))
    dirs.append(f"/tmp/looptune-{os.getuid()}")
    usable = [d for d in dirs if _dir_usable(d)]
    return [os.path.join(d, "looptune.sock") for d in usable or dirs[-1:]]


def _dir_usable(path: str) -> bool:
    if os.path.isdir(path):
        return os.access(path, os.W_OK | os.X_OK)
    parent = os.path.dirname(path.rstrip("/")) or "/"
    return os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


# ---- rendering the documented default file ----

def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # single quotes: regex backslashes stay literal
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def _render(obj: Any, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    for f in dataclasses.fields(obj):
        meta = f.metadata
        if meta.get("tuner_sections"):
            _render_tuner_sections(getattr(obj, f.name), indent, lines)
            continue
        doc = meta.get("doc", "")
        allowed = _allowed(dict(meta))
        if allowed:
            doc += f" Allowed: {allowed}."
        for line in textwrap.wrap(doc, 96 - len(pad)):
            lines.append(f"{pad}# {line}")
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            _render(value, indent + 1, lines)
        elif isinstance(value, list):
            lines.append(f"{pad}{f.name}:" + ("" if value else " []"))
            lines.extend(f"{pad}  - {_yaml_scalar(v)}" for v in value)
        else:
            lines.append(f"{pad}{f.name}: {_yaml_scalar(value)}")
        if indent == 0:
            lines.append("")


def _render_tuner_sections(options: dict[str, Any], indent: int, lines: list[str]) -> None:
    """tuners.<name> for every built-in tuner that has options (plugins document their own)."""
    from looptune.tuners.registry import BUILTIN, load_factory
    pad = "  " * indent
    for name in sorted(BUILTIN):
        factory = load_factory(name)
        cls = getattr(factory, "Options", None)
        if cls is None:
            continue
        doc = f"Options of the {name} tuner: {(factory.__doc__ or '').strip().splitlines()[0]}"
        for line in textwrap.wrap(doc, 96 - len(pad)):
            lines.append(f"{pad}# {line}")
        lines.append(f"{pad}{name}:")
        _render(options.get(name) or cls(), indent + 1, lines)
        if indent == 0:
            lines.append("")


def render_default() -> str:
    """The full default configuration as commented YAML (what config.yaml at the top holds)."""
    lines = ["# looptune daemon configuration: every key with its default.",
             "# Lookup order: --config FILE, $LOOPTUNE_CONFIG, /etc/looptune/config.yaml, built-in defaults.",
             "# Check a file with `looptune config check FILE`; reload a running daemon with SIGHUP.",
             ""]
    _render(Config(), 0, lines)
    return "\n".join(lines).rstrip() + "\n"
