"""The hook <-> daemon wire protocol: newline-delimited JSON over a Unix stream socket.

One definition for both ends: message builders for the hook, strict validation for the
daemon. Every message is a JSON object with `v` (the protocol version) and `type`; a line is
at most MAX_MESSAGE_BYTES including its newline. docs/protocol.md describes the schema.
Pure Python: the daemon imports this without torch.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from looptune import schema

VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
# fixed step-time histogram buckets (upper bounds, seconds); +Inf is implied after the last
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

CLIENT_TYPES = ("hello", "report", "applied", "bye", "status")   # hook or CLI -> daemon
SERVER_TYPES = ("welcome", "decision", "status_reply", "error")  # daemon -> hook or CLI
COUNTERS = schema.REQUIRED     # the figures every report carries; schema.FIGURES has the optional ones too
MEMORY_KINDS = ("max_rss_bytes", "cuda_max_allocated_bytes", "cuda_max_reserved_bytes")
# \Z, not $: `$` also matches before a trailing newline, which let "run\n" through
NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")
KNOB_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")
MAX_KNOB_INT = 1 << 64      # integer knob values are exported as floats
MAX_KNOBS = 32
MAX_TUNERS = 16


class ProtocolError(Exception):
    """A message that must be rejected; `reason` is the bounded label it is counted under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode(msg: dict[str, Any]) -> bytes:
    data = json.dumps({"v": VERSION, **msg}, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("oversized", f"{len(data)} bytes > {MAX_MESSAGE_BYTES}")
    return data


def decode(line: bytes, types: tuple[str, ...] = CLIENT_TYPES) -> dict[str, Any]:
    """Parse one line (without its newline) into a message of a known version and one of `types`."""
    if len(line) >= MAX_MESSAGE_BYTES:
        raise ProtocolError("oversized", f"{len(line)} bytes")
    try:
        msg = json.loads(line, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("malformed", f"not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("malformed", "not a JSON object")
    if msg.get("v") != VERSION or isinstance(msg.get("v"), bool):
        raise ProtocolError("version", f"unsupported version {msg.get('v')!r}; this daemon speaks {VERSION}")
    if msg.get("type") not in types:
        raise ProtocolError("unknown_type", f"type {str(msg.get('type'))[:32]!r}")
    return msg


def text_ok(v: Any, limit: int, printable: bool = True) -> bool:
    """A string from a peer: at most `limit` characters and encodable as UTF-8 (JSON lets a lone
    surrogate such as \\ud800 through, which the exposition and the logs cannot encode); a value
    that may become a label is also printable (no control characters)."""
    if not isinstance(v, str) or len(v) > limit:
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return v.isprintable() or not printable


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# ---- field checks (daemon side) ----

def _num(msg: dict, key: str, *, lo: float = 0.0, hi: float = 1e18, integer: bool = False) -> float:
    v = msg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ProtocolError("invalid", f"{key} must be {'an integer' if integer else 'a number'}")
    # no math.isfinite() on an int: a huge JSON integer would raise OverflowError instead of ProtocolError
    if (isinstance(v, float) and not math.isfinite(v)) or not lo <= v <= hi:
        raise ProtocolError("invalid", f"{key} out of range")
    return v


def _name(msg: dict, key: str) -> str:
    v = msg.get(key)
    if not isinstance(v, str) or not NAME_RE.match(v):
        raise ProtocolError("invalid", f"{key} must match {NAME_RE.pattern}")
    return v


def _knobs(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or len(v) > MAX_KNOBS:
        raise ProtocolError("invalid", f"knobs must be an object of at most {MAX_KNOBS} entries")
    for k, val in v.items():
        if not isinstance(k, str) or not KNOB_RE.match(k):
            raise ProtocolError("invalid", "knob names are lower_snake_case, at most 64 characters")
        ok = val is None or isinstance(val, bool) or (isinstance(val, int) and abs(val) < MAX_KNOB_INT) \
            or (isinstance(val, float) and math.isfinite(val)) or text_ok(val, 64)
        if not ok:
            raise ProtocolError("invalid", f"knob {k} must be null, a number, a boolean or a short printable string")
    return v


def _bool(msg: dict, key: str, default: bool) -> bool:
    v = msg.get(key, default)
    if not isinstance(v, bool):      # bool("false") is True: a string must not opt a job into tuning
        raise ProtocolError("invalid", f"{key} must be a boolean")
    return v


def _short(msg: dict, key: str, limit: int) -> str:
    v = msg.get(key, "")
    if not text_ok(v, limit):
        raise ProtocolError("invalid", f"{key} must be a printable string of at most {limit} characters")
    return v


def _reasons(v: Any) -> dict[str, str]:
    if not isinstance(v, dict) or len(v) > MAX_KNOBS or not all(
            isinstance(k, str) and KNOB_RE.match(k) and text_ok(r, 200, printable=False) for k, r in v.items()):
        raise ProtocolError("invalid", "untunable must map knob names to short reasons")
    return v


def check_hello(msg: dict[str, Any]) -> dict[str, Any]:
    tuners = msg.get("tuners", [])
    if not isinstance(tuners, list) or len(tuners) > MAX_TUNERS or not all(
            isinstance(t, str) and KNOB_RE.match(t) for t in tuners):
        raise ProtocolError("invalid", "tuners must be a short list of tuner names")
    return {
        "run": _name(msg, "run"),
        "rank": int(_num(msg, "rank", hi=1 << 20, integer=True)),
        "world_size": int(_num(msg, "world_size", lo=1, hi=1 << 20, integer=True)),
        "pid": int(_num(msg, "pid", lo=1, hi=1 << 31, integer=True)),
        "tuners": tuners,
        "tune": _bool(msg, "tune", True),
    }


def check_report(msg: dict[str, Any]) -> dict[str, Any]:
    counters = msg.get("counters")
    if not isinstance(counters, dict):
        raise ProtocolError("invalid", "counters must be an object")
    out_counters = _figures(counters)
    hist = msg.get("step_hist")
    if not isinstance(hist, list) or len(hist) != len(STEP_BUCKETS) + 1 or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 1 << 53 for c in hist):
        raise ProtocolError("invalid", f"step_hist must be {len(STEP_BUCKETS) + 1} non-negative integers")
    memory = msg.get("memory", {})
    if not isinstance(memory, dict) or set(memory) - set(MEMORY_KINDS):
        raise ProtocolError("invalid", f"memory keys must be among {', '.join(MEMORY_KINDS)}")
    mem = {k: int(_num(memory, k, integer=True)) for k in memory if memory[k] is not None}
    return {
        "counters": out_counters,
        "step_hist": hist,
        "knobs": _knobs(msg.get("knobs", {})),
        "memory": mem,
        "world_size": int(_num(msg, "world_size", lo=1, hi=1 << 20, integer=True)),
        "hook_errors": int(_num(msg, "hook_errors", integer=True)) if "hook_errors" in msg else 0,
        "disabled": _bool(msg, "disabled", False),
        "mode": "daemon",
        "signature": _short(msg, "signature", 64),
        "untunable": _reasons(msg.get("untunable", {})),
        "settling": _knob_list(msg, "settling"),
    }


def _figures(counters: dict[str, Any]) -> dict[str, float]:
    """The report's figures, each checked as schema.FIGURES declares it; unknown keys are dropped."""
    out: dict[str, float] = {}
    for f in schema.FIGURES:
        if f.optional and counters.get(f.name) is None:
            continue
        if f.kind == schema.COUNTER:
            out[f.name] = _num(counters, f.name, integer=f.integer)
        else:
            out[f.name] = _num(counters, f.name, lo=-1e18, integer=f.integer)
    return out


def _knob_list(msg: dict, key: str) -> list[str]:
    v = msg.get(key, [])
    if not isinstance(v, list) or len(v) > MAX_KNOBS or not all(isinstance(k, str) and KNOB_RE.match(k) for k in v):
        raise ProtocolError("invalid", f"{key} must be a list of at most {MAX_KNOBS} knob names")
    return v


def check_applied(msg: dict[str, Any]) -> dict[str, Any]:
    outcome = msg.get("outcome")
    if outcome not in ("applied", "failed", "skipped"):
        raise ProtocolError("invalid", "outcome must be applied, failed or skipped")
    detail = msg.get("detail", "")
    if not text_ok(detail, 512, printable=False):
        raise ProtocolError("invalid", "detail must be a UTF-8 string of at most 512 characters")
    return {"id": int(_num(msg, "id", hi=1 << 53, integer=True)), "outcome": outcome, "detail": detail,
            "step": int(_num(msg, "step", hi=1 << 53, integer=True)) if "step" in msg else None}


# ---- daemon -> hook ----

def check_decision(msg: dict[str, Any]) -> dict[str, Any]:
    """Validate a decision on the hook side: a bad one is refused, never applied."""
    knob = msg.get("knob")
    if not isinstance(knob, str) or not KNOB_RE.match(knob):
        raise ProtocolError("invalid", "decision knob must be lower_snake_case")
    _knobs({knob: msg.get("value")})
    reason = msg.get("reason", "")
    if not text_ok(reason, 512, printable=False):
        raise ProtocolError("invalid", "reason must be a UTF-8 string of at most 512 characters")
    return {"id": int(_num(msg, "id", hi=1 << 53, integer=True)), "knob": knob, "value": msg.get("value"),
            "reason": reason, "tuner": str(msg.get("tuner", ""))[:64],
            "trial": _bool(msg, "trial", False),
            "at_step": int(_num(msg, "at_step", hi=1 << 53, integer=True)) if msg.get("at_step") is not None
            else None}
