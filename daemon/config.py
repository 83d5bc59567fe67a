"""Typed, validated configuration.

The dataclasses below are the single source of truth: their defaults are the built-in
configuration, their field metadata is the allowed range and the comment that
`render_default()` writes into config.yaml. Validation collects every problem, each naming
the key path, the value and what is allowed, and raises them together.
"""
from __future__ import annotations

import contextvars
import dataclasses
import os
import re
import reprlib
import stat
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from looptune.options import opt, section

__all__ = ["Config", "ConfigError", "opt", "section", "parse", "load", "load_resolved"]

DEFAULT_PORT = 19400
SYSTEM_CONFIG = "/etc/looptune/config.yaml"
LOG_LEVELS = ("debug", "info", "warning", "error")

# Bounds on what a config file may hold. A config is a few dozen keys of a few KiB; these stop a
# hostile or broken file from costing the daemon seconds, gigabytes or a crash at start or reload.
MAX_FILE_BYTES = 1 << 20        # read at most this much; a larger file is refused before parsing
MAX_DEPTH = 16                  # nesting of mappings and lists (config.yaml needs 4)
MAX_NODES = 10_000              # values, keys, lists and mappings together (config.yaml has about 60)
MAX_STRING_CHARS = 4096         # one string value (PATH_MAX is 4096)
MAX_ITEMS = 1024                # items of one list, keys of one mapping
MAX_NUMBER_CHARS = 64           # an integer written longer than this is out of range of every key
MAX_SHOWN_CHARS = 80            # a value quoted in a problem is cut to this, so a problem stays one short line
MAX_PROBLEMS = 20               # problems listed; the rest are counted
SOCKET_PATH_MAX_BYTES = 107     # sun_path holds 108 bytes with the terminating NUL
INT_LIMIT = 2**63 - 1           # the range of a number whose key gives no bound of its own


class ConfigError(ValueError):
    """One or more problems in a config file; `problems` holds one line each."""

    def __init__(self, problems: list[str], source: str = "<config>") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def _check_listen(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    # ASCII digits only: str.isdigit() is true of "²", which int() refuses
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        return "is not HOST:PORT with a port in 1..65535"
    return None


def _check_regex(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"is not a valid regular expression: {exc}"
    except RecursionError:
        return "is not a valid regular expression: nested too deeply"
    except (OverflowError, ValueError) as exc:     # a{99999999999}: "the repetition number is too large"
        return f"is not a valid regular expression: {exc}"
    return None


def _check_socket(value: str) -> str | None:
    if not value:
        return None
    try:
        size = len(os.fsencode(value))
    except UnicodeError:
        return "cannot be written as a file name"
    if size > SOCKET_PATH_MAX_BYTES:
        return f"is {size} bytes long; a unix socket path is at most {SOCKET_PATH_MAX_BYTES} bytes"
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
                          "Changes need a restart.", check=_check_socket)
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
    max_jobs: int = opt(256, "At most this many jobs on the node, all users together: hook registrations beyond "
                             "it are refused (counted as too_many_jobs) and process trees beyond it are not "
                             "exported, to bound label values.", lo=1, hi=4096)
    max_jobs_per_user: int = opt(64, "At most this many hooked jobs (ranks) per uid; the socket takes a few more "
                                     "connections per uid than this, for `looptune status`.", lo=1, hi=4096)
    run_owner_days: float = opt(7.0, "A run name belongs to the uid that first registered it, across daemon restarts, "
                                     "until it has gone unused this long (kept beside the remembered settings).",
                                lo=0.001, hi=3650)
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
    micro_batch_split_batch_norm: bool = opt(False, "Let hook.accumulate split batches of a model with "
                                                    "BatchNorm layers (their batch statistics then come from "
                                                    "micro-batches: the training changes).")


def _check_tuner(name: str) -> str | None:
    known = _known_tuners()
    return None if name in known else f"is not a known tuner; known: {', '.join(sorted(known))}"


@dataclass
class TunersConfig:
    enabled: list[str] = opt(["workers", "batch_size", "compression"], "Tuner plugins to run (built-in: workers, "
                             "batch_size, compression; more through the entry-point group looptune.tuners).",
                             check=_check_tuner)
    window_seconds: float = opt(1.0, "Length of one measurement window.", lo=0.2, hi=60)
    baseline_windows: int = opt(3, "Windows at the current setting a trial compares against.", lo=1, hi=60)
    measure_windows: int = opt(3, "Windows measured at the new setting before keep or roll back.", lo=1, hi=60)
    settle_windows: int = opt(1, "Windows skipped after a change at least.", lo=0, hi=60)
    max_settle_windows: int = opt(10, "Windows a change may take to warm up (every new loader worker delivered, "
                                      "samples/s no longer climbing) before it is measured anyway.", lo=0, hi=600)
    min_gain: float = opt(0.03, "Relative samples/s gain a change must show to be kept.", lo=0, hi=1)
    max_extensions: int = opt(3, "Times a gain above min_gain but inside the job's own noise (or, on a job "
                                 "with a noisy neighbour, a shortfall its bursts explain) is measured again "
                                 "(measure_windows each) before it is kept or rolled back.", lo=0, hi=20)
    regression_bound: float = opt(0.25, "A window this far below the baseline (twice) rolls back at once; "
                                        "further where the job's jitter over its last 60 windows explains more.",
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

class HugeNumber:
    """An integer in the file too long to be read (more than MAX_NUMBER_CHARS digits): out of range of
    every key. Never converted: int() of a 5,000-digit string raises, and float() of a 400-digit int."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"a {self.digits}-digit number"


def _int_text(value: int) -> str:
    """An int as written, or "a 400-digit number" when it is long (str() of a huge int may raise)."""
    if value.bit_length() <= 128:      # up to 39 digits
        return str(value)
    if value.bit_length() < 4000 * 3:
        return f"a {len(str(abs(value)))}-digit number"
    return f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"


class _ShortRepr(reprlib.Repr):
    """repr() that never renders more than a bounded part of a value (strings, lists, huge ints)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdict = 8
        self.maxstring = self.maxother = MAX_SHOWN_CHARS

    def repr_str(self, x: str, level: int) -> str:
        return repr(x) if len(x) <= self.maxstring else repr(x[:self.maxstring]) + "…"

    def repr_int(self, x: int, level: int) -> str:
        return _int_text(x)

    def repr_instance(self, x: Any, level: int) -> str:
        try:
            return _cut(repr(x))
        except Exception:  # noqa: BLE001 - a value that cannot be shown must not hide the problem
            return f"<{type(x).__name__}>"


_SHORT_REPR = _ShortRepr()


def _cut(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _show(value: Any) -> str:
    """A value for a problem line: its repr, at most MAX_SHOWN_CHARS characters."""
    return _cut(_SHORT_REPR.repr(value))


def _show_key(key: Any) -> str:
    """A key in a path: as written when it is a short printable string, else its shortened repr."""
    if isinstance(key, str) and key.isprintable() and 0 < len(key) <= MAX_SHOWN_CHARS:
        return key
    return _show(key)


def _text_problem(value: str) -> str | None:
    """What makes a string value unusable whatever its key: length, NUL, lone surrogates."""
    if len(value) > MAX_STRING_CHARS:
        return f"a string of {len(value)} characters is too long; at most {MAX_STRING_CHARS}"
    if "\0" in value:
        return f"{_show(value)} holds a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{_show(value)} is not text: character {exc.start + 1} is a lone surrogate"
    return None


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
            problems.append(f"{path}: {_show(value)} is not a list")
            return None
        if len(value) > MAX_ITEMS:
            problems.append(f"{path}: a list of {len(value)} items is too long; at most {MAX_ITEMS}")
            return None
        out = [_coerce(v, args[0], f"{path}[{i}]", meta, problems) for i, v in enumerate(value)]
        return out
    number = tp is float or tp is int
    huge = number and isinstance(value, HugeNumber)
    ok = (isinstance(value, bool) if tp is bool else
          huge or isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float else
          huge or isinstance(value, int) and not isinstance(value, bool) if tp is int else
          isinstance(value, str) if tp is str else True)
    allowed = _allowed(meta)
    if not ok:
        problems.append(f"{path}: {_show(value)} is not {_type_name(tp)}" + (f"; allowed {allowed}" if allowed else ""))
        return None
    if isinstance(value, str) and (msg := _text_problem(value)):
        problems.append(f"{path}: {msg}")
        return None
    lo, hi, choices, check = meta.get("lo"), meta.get("hi"), meta.get("choices"), meta.get("check")
    if number:
        # a key without bounds still takes no number beyond 64 bits (nor inf or NaN)
        lo_eff = lo if lo is not None else -INT_LIMIT
        hi_eff = hi if hi is not None else INT_LIMIT
        # compared before float(): an int compares exactly with a float, float() of a huge int raises.
        # `not lo <= value`, not `value < lo`: NaN fails every comparison and must not slip through
        if huge or not lo_eff <= value or not value <= hi_eff:
            problems.append(f"{path}: {_fmt(value)} is out of range; allowed {_fmt(lo_eff)}..{_fmt(hi_eff)}")
            return None
        if tp is float:
            value = float(value)
    if choices and value not in choices:
        problems.append(f"{path}: {_show(value)} is not allowed; allowed {allowed}")
        return None
    if check and (msg := check(value)):
        problems.append(f"{path}: {_show(value)} {msg}")
        return None
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)   # never show 60.0000001 as 60
    if isinstance(value, int) and not isinstance(value, bool):
        return _int_text(value)
    return _show(value)


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
        problems.append(f"{path or '<top>'}: {_show(data)} is not a mapping of keys")
        return cls()
    if len(data) > MAX_ITEMS:
        problems.append(f"{path or '<top>'}: a mapping of {len(data)} keys is too long; at most {MAX_ITEMS}")
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
        problems.append(f"{prefix}{_show_key(key)}: unknown key; allowed keys here: {', '.join(fields)}")
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


# The known tuners, looked up once per parse(): the lookup reads every entry point (about a
# millisecond), and a file may name a thousand.
_KNOWN_TUNERS: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("_KNOWN_TUNERS",
                                                                                     default=None)


def _known_tuners() -> dict[str, str]:
    known = _KNOWN_TUNERS.get()
    if known is None:
        from looptune.tuners.registry import available
        known = available()
    return known


def _tuner_options(name: str, prefix: str, problems: list[str]) -> type | None:
    """The Options dataclass of tuner `name` (a tuners.<name> section), or None with the problem noted."""
    from looptune.tuners.registry import TunerLoadError, load_factory
    fields = [f.name for f in dataclasses.fields(TunersConfig) if not f.metadata.get("tuner_sections")]
    known = _known_tuners()
    if name not in known:
        problems.append(f"{prefix}{_show_key(name)}: unknown key; allowed keys here: {', '.join(fields)}, or a "
                        f"tuner's name for its options ({', '.join(sorted(known))})")
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
    """Validate a decoded YAML document; raises ConfigError listing every problem (the first
    MAX_PROBLEMS of them, and how many more)."""
    from looptune.tuners.registry import available
    problems: list[str] = []
    token = _KNOWN_TUNERS.set(available())
    try:
        config = _build(Config, data, "", problems)
    finally:
        _KNOWN_TUNERS.reset(token)
    if problems:
        if len(problems) > MAX_PROBLEMS:
            more = len(problems) - MAX_PROBLEMS
            problems = problems[:MAX_PROBLEMS] + [f"and {more} more problem{'s' if more > 1 else ''} not shown"]
        raise ConfigError(problems, source)
    return config


class _LoadError(yaml.YAMLError):
    """A file the config loader refuses: `problem` at `problem_mark`, like PyYAML's own errors."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    text = str(loader.construct_scalar(node))
    digits = text.replace("_", "").lstrip("+-")
    if len(digits) > MAX_NUMBER_CHARS:
        return HugeNumber(len(digits))
    return loader.construct_yaml_int(node)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without what a config never needs and an attacker would use: anchors and
    aliases (a few hundred bytes of aliases expand to gigabytes), nesting deeper than MAX_DEPTH (the
    composer recurses), more than MAX_NODES nodes, integers too long to read."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _LoadError(f"aliases are not allowed (*{_cut(str(event.anchor), 40)})", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise _LoadError(f"anchors and aliases are not allowed (&{_cut(str(event.anchor), 40)})",
                             event.start_mark)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _LoadError(f"more than {MAX_NODES} values", event.start_mark)
        if not isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _LoadError(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
            # an explicit tag on a value it does not fit: `!!int abc`, `!!bool maybe`, `!!timestamp x`
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            raise _LoadError(f"{_show(getattr(node, 'value', ''))} cannot be read as {_cut(tag, 40)}",
                             node.start_mark) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _read_bounded(path: str | os.PathLike, source: str) -> bytes:
    """At most MAX_FILE_BYTES of the file; a larger one is refused from its size, unread. Non-blocking
    open: a FIFO in place of the file must not hang the daemon's reload."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror}"], source) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            raise ConfigError(["is not a regular file"], source)
        size = st.st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError([f"file is {size} bytes; at most {MAX_FILE_BYTES}"], source)
        chunks: list[bytes] = []
        total = 0
        while total <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > MAX_FILE_BYTES:      # grew since fstat, or not a regular file (a device, a pipe)
            raise ConfigError([f"file is more than {MAX_FILE_BYTES} bytes; at most {MAX_FILE_BYTES}"], source)
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror}"], source) from None
    finally:
        os.close(fd)


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([f"line {line} column {column}: byte 0x{raw[exc.start]:02x} is not UTF-8; "
                           "a config file is UTF-8 text"], source) from None


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    if isinstance(exc, yaml.reader.ReaderError):     # a control character: its position, not a mark
        pos = exc.position
        line = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f"line {line} column {column}: not valid YAML: character #x{char:04x} is not allowed"
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
    if isinstance(exc, _LoadError):
        return where + exc.problem
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"{where}not valid YAML: {_cut(str(problem), 200)}"


def load(path: str | os.PathLike) -> Config:
    """Load and validate one file. Missing keys take their defaults; an empty file is all defaults.

    Whatever the file holds, the only error is a ConfigError: at start, on reload and in
    `looptune config check` alike."""
    source = str(path)
    try:
        text = _decode(_read_bounded(path, source), source)
        try:
            data = yaml.load(text, Loader=_Loader)   # noqa: S506 - _Loader is a SafeLoader
        except yaml.YAMLError as exc:
            raise ConfigError([_yaml_problem(exc, text)], source) from None
        return parse(data, source)
    except ConfigError:
        raise
    except (RecursionError, MemoryError, ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        # the last line of defence: nothing a file holds may crash the daemon or print a traceback
        raise ConfigError([f"cannot be loaded: {type(exc).__name__}: {_cut(str(exc), 200)}"], source) from None


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


SYSTEM_SOCKET_DIR = "/run/looptune"   # only root can create it; the systemd unit keeps it (RuntimeDirectory=)


def default_socket_paths(environ: typing.Mapping[str, str] = os.environ) -> list[str]:
    """Candidates in order: $RUNTIME_DIRECTORY (systemd), /run/looptune, then per-user places for a
    daemon started by hand without root. The first whose directory exists or can be made is used."""
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    dirs = [runtime] if runtime else []
    dirs.append(SYSTEM_SOCKET_DIR)
    dirs += private_socket_dirs(environ)
    usable = [d for d in dirs if _dir_usable(d)]
    return [os.path.join(d, "looptune.sock") for d in usable or dirs[-1:]]


def private_socket_dirs(environ: typing.Mapping[str, str] = os.environ) -> list[str]:
    """The per-user fallback directories ($XDG_RUNTIME_DIR/looptune, /tmp/looptune-UID). Any user
    could create one first (/tmp is shared), so the daemon makes them 0700 and refuses one that
    another user owns, and a hook trusts one only if root or its own user owns it, closed to others."""
    dirs = []
    if environ.get("XDG_RUNTIME_DIR"):
        dirs.append(os.path.join(environ["XDG_RUNTIME_DIR"], "looptune"))
    dirs.append(f"/tmp/looptune-{os.getuid()}")
    return dirs


def is_private_socket_dir(path: str, environ: typing.Mapping[str, str] = os.environ) -> bool:
    """Whether `path` (a socket's directory) is one of private_socket_dirs, however it was named."""
    real = os.path.normpath(os.path.abspath(path))
    return any(real == os.path.normpath(os.path.abspath(d)) for d in private_socket_dirs(environ))


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
