"""looptune.protocol on its own: framing, decoding and the field checks, by example and fuzzed.

Every rejection must be a ProtocolError with the reason the daemon counts it under
(collectors.hookjobs.REJECT_REASONS); nothing a peer sends may raise anything else.
"""
from __future__ import annotations

import copy
import json
import math
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from looptune.collectors.hookjobs import REJECT_REASONS
from looptune import protocol
from looptune.protocol import MAX_MESSAGE_BYTES, ProtocolError, STEP_BUCKETS

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

NBUCKETS = len(STEP_BUCKETS) + 1


def hello(**over: Any) -> dict[str, Any]:
    msg = {"v": 1, "type": "hello", "run": "exp-1", "rank": 0, "world_size": 2, "pid": 4242,
           "tuners": ["num_workers"], "tune": True}
    msg.update(over)
    return msg


def report(**over: Any) -> dict[str, Any]:
    msg = {"v": 1, "type": "report", "pid": 4242, "world_size": 2,
           "counters": {"samples": 64, "batches": 2, "steps": 2, "data_wait_seconds": 0.5, "step_seconds": 1.25},
           "step_hist": [0] * NBUCKETS, "knobs": {"num_workers": 4, "pin_memory": True, "prefetch": None,
                                                 "lr": 0.001, "mode": "fast"},
           "memory": {"max_rss_bytes": 1 << 30, "cuda_max_allocated_bytes": None},
           "hook_errors": 0, "disabled": False, "signature": "0123456789abcdef",
           "untunable": {"prefetch_factor": "IterableDataset"}}
    msg.update(over)
    return msg


def applied(**over: Any) -> dict[str, Any]:
    msg = {"v": 1, "type": "applied", "id": 7, "outcome": "applied", "detail": "", "step": 120}
    msg.update(over)
    return msg


def decision(**over: Any) -> dict[str, Any]:
    msg = {"v": 1, "type": "decision", "id": 7, "knob": "num_workers", "value": 8, "reason": "data wait 40%",
           "tuner": "workers", "at_step": 100}
    msg.update(over)
    return msg


def without(msg: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k != key}


def _changed(msg: dict[str, Any], base: dict[str, Any]) -> str:
    """A short test id: the fields that differ from the valid message."""
    diff = {k: msg.get(k, "<missing>") for k in {*msg, *base} if msg.get(k, "<missing>") != base.get(k)}
    return json.dumps(diff, default=str, sort_keys=True)[:60]


def rejects(check: Callable[[dict[str, Any]], Any], msg: dict[str, Any], reason: str = "invalid") -> str:
    with pytest.raises(ProtocolError) as info:
        check(msg)
    assert info.value.reason == reason, info.value
    assert info.value.reason in REJECT_REASONS
    return info.value.detail


# ---- framing: encode / decode ----

@pytest.mark.parametrize("msg", [hello(), report(), applied(), {"type": "bye"}, {"type": "status"}])
def test_round_trip_client_messages(msg: dict[str, Any]) -> None:
    data = protocol.encode(msg)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    back = protocol.decode(data[:-1])
    assert back == {**msg, "v": 1}


@pytest.mark.parametrize("msg", [{"type": "welcome", "report_interval_seconds": 1.0}, decision(),
                                 {"type": "status_reply", "jobs": []},
                                 {"type": "error", "reason": "invalid", "detail": "x"}])
def test_round_trip_server_messages(msg: dict[str, Any]) -> None:
    back = protocol.decode(protocol.encode(msg)[:-1], protocol.SERVER_TYPES)
    assert back == {**msg, "v": 1}


def test_encode_sets_version_and_is_compact() -> None:
    data = protocol.encode({"type": "status", "v": 99})
    assert json.loads(data) == {"v": 99, "type": "status"}   # an explicit v wins; the daemon never sets one
    assert protocol.encode({"type": "bye"}) == b'{"v":1,"type":"bye"}\n'


def test_encode_refuses_nan_and_oversized() -> None:
    with pytest.raises(ValueError):
        protocol.encode({"type": "report", "x": float("nan")})
    with pytest.raises(ProtocolError) as info:
        protocol.encode({"type": "status", "pad": "x" * MAX_MESSAGE_BYTES})
    assert info.value.reason == "oversized"


def test_encode_size_limit_includes_the_newline() -> None:
    base = len(protocol.encode({"type": "status", "pad": ""}))
    fits = protocol.encode({"type": "status", "pad": "x" * (MAX_MESSAGE_BYTES - base)})
    assert len(fits) == MAX_MESSAGE_BYTES
    protocol.decode(fits[:-1])
    with pytest.raises(ProtocolError):
        protocol.encode({"type": "status", "pad": "x" * (MAX_MESSAGE_BYTES - base + 1)})


@pytest.mark.parametrize("line", [b"", b"   ", b"{", b"not json", b"\xff\xfe\x00garbage", b'{"v":1,"type":"hello"',
                                  b'{"v":1,"type":"\xff"}', b"[1,2]", b"1", b'"str"', b"null", b"true",
                                  b'{"v":1,"type":"status"} trailing'])
def test_decode_malformed(line: bytes) -> None:
    rejects(lambda _: protocol.decode(line), {}, "malformed")


@pytest.mark.parametrize("const", ["NaN", "Infinity", "-Infinity"])
def test_decode_rejects_non_finite_constants(const: str) -> None:
    rejects(lambda _: protocol.decode(f'{{"v":1,"type":"report","x":{const}}}'.encode()), {}, "malformed")


def test_decode_deep_nesting_is_malformed_not_recursion_error() -> None:
    depth = 50_000
    rejects(lambda _: protocol.decode(b"[" * depth + b"]" * depth), {}, "oversized")
    depth = 30_000
    line = b'{"v":1,"type":"hello","run":' + b"[" * depth + b"]" * depth + b"}"
    assert len(line) < MAX_MESSAGE_BYTES
    rejects(lambda _: protocol.decode(line), {}, "malformed")
    line = b'{"v":1,"type":"hello","run":' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"}"
    rejects(lambda _: protocol.decode(line), {}, "malformed")


@pytest.mark.parametrize("v", [0, 2, -1, 1.5, "1", None, True, False, [1], {"v": 1}])
def test_decode_wrong_version(v: Any) -> None:
    rejects(lambda _: protocol.decode(json.dumps({"v": v, "type": "status"}).encode()), {}, "version")


def test_decode_missing_version() -> None:
    rejects(lambda _: protocol.decode(b'{"type":"status"}'), {}, "version")


def test_decode_version_checked_before_type() -> None:
    rejects(lambda _: protocol.decode(b'{"v":2,"type":"nonsense"}'), {}, "version")


@pytest.mark.parametrize("kind", ["welcome", "decision", "error", "status_reply", "HELLO", "", None, 1, ["hello"],
                                  {"a": 1}])
def test_decode_unknown_client_type(kind: Any) -> None:
    rejects(lambda _: protocol.decode(json.dumps({"v": 1, "type": kind}).encode()), {}, "unknown_type")


def test_decode_missing_type() -> None:
    rejects(lambda _: protocol.decode(b'{"v":1}'), {}, "unknown_type")


def test_decode_server_types_are_separate() -> None:
    rejects(lambda _: protocol.decode(b'{"v":1,"type":"hello"}', protocol.SERVER_TYPES), {}, "unknown_type")
    assert protocol.decode(b'{"v":1,"type":"decision"}', protocol.SERVER_TYPES)["type"] == "decision"


def test_decode_size_limit() -> None:
    pad = MAX_MESSAGE_BYTES - len(b'{"v":1,"type":"status","p":""}') - 1
    ok = b'{"v":1,"type":"status","p":"' + b"x" * pad + b'"}'
    assert len(ok) == MAX_MESSAGE_BYTES - 1            # plus its newline: exactly 64 KiB
    assert protocol.decode(ok)["type"] == "status"
    big = b'{"v":1,"type":"status","p":"' + b"x" * (pad + 1) + b'"}'
    rejects(lambda _: protocol.decode(big), {}, "oversized")
    rejects(lambda _: protocol.decode(b"x" * (10 * MAX_MESSAGE_BYTES)), {}, "oversized")


def test_decode_accepts_whitespace_and_crlf() -> None:
    assert protocol.decode(b' { "v" : 1 , "type" : "bye" } \r')["type"] == "bye"


# ---- hello ----

def test_check_hello_good() -> None:
    out = protocol.check_hello(hello())
    assert out == {"run": "exp-1", "rank": 0, "world_size": 2, "pid": 4242, "tuners": ["num_workers"], "tune": True}
    minimal = protocol.check_hello(without(without(hello(), "tuners"), "tune"))
    assert minimal["tuners"] == [] and minimal["tune"] is True
    edge = protocol.check_hello(hello(run="A.b:c-d_1", rank=1 << 20, world_size=1 << 20, pid=1 << 31))
    assert edge["rank"] == 1 << 20 and edge["pid"] == 1 << 31


@pytest.mark.parametrize("field,value", [
    ("run", ""), ("run", "x" * 129), ("run", "has space"), ("run", "slash/no"), ("run", 'quote"'),
    ("run", "run\n"), ("run", "\nrun"), ("run", "é"), ("run", 5), ("run", None), ("run", ["exp-1"]),
    ("rank", -1), ("rank", (1 << 20) + 1), ("rank", 1.0), ("rank", True), ("rank", "0"), ("rank", None),
    ("rank", 10 ** 400),
    ("world_size", 0), ("world_size", -3), ("world_size", False), ("world_size", 2.5), ("world_size", (1 << 20) + 1),
    ("pid", 0), ("pid", -1), ("pid", (1 << 31) + 1), ("pid", True), ("pid", 1.0), ("pid", "123"),
    ("pid", float("inf")), ("pid", float("nan")),
    ("tuners", "num_workers"), ("tuners", ["Bad"]), ("tuners", [1]), ("tuners", ["a"] * 17), ("tuners", None),
    ("tuners", ["a\n"]),
    ("tune", "false"), ("tune", 0), ("tune", None),
], ids=lambda v: repr(v)[:24])
def test_check_hello_rejects(field: str, value: Any) -> None:
    rejects(protocol.check_hello, hello(**{field: value}))


@pytest.mark.parametrize("field", ["run", "rank", "world_size", "pid"])
def test_check_hello_requires(field: str) -> None:
    rejects(protocol.check_hello, without(hello(), field))


# ---- report ----

def test_check_report_good() -> None:
    out = protocol.check_report(report())
    assert out["counters"]["samples"] == 64 and out["step_hist"] == [0] * NBUCKETS
    assert out["memory"] == {"max_rss_bytes": 1 << 30}            # null memory entries are dropped
    assert out["knobs"]["prefetch"] is None and out["hook_errors"] == 0 and out["disabled"] is False
    assert out["signature"] == "0123456789abcdef" and out["untunable"] == {"prefetch_factor": "IterableDataset"}
    minimal = report()
    for key in ("knobs", "memory", "hook_errors", "disabled", "signature", "untunable"):
        minimal = without(minimal, key)
    out = protocol.check_report(minimal)
    assert out["knobs"] == {} and out["memory"] == {} and out["hook_errors"] == 0 and out["disabled"] is False
    assert out["signature"] == "" and out["untunable"] == {}
    # the float counters may be integers too
    c = dict(report()["counters"], data_wait_seconds=3, step_seconds=0)
    assert protocol.check_report(report(counters=c))["counters"]["step_seconds"] == 0


def _counters(**over: Any) -> dict[str, Any]:
    return dict(report()["counters"], **over)


@pytest.mark.parametrize("msg", [
    report(counters=None), report(counters=[1, 2]), report(counters={}),
    report(counters=without(report()["counters"], "steps")),
    report(counters=_counters(samples=-1)), report(counters=_counters(samples=1.5)),
    report(counters=_counters(batches=True)), report(counters=_counters(steps="3")),
    report(counters=_counters(samples=10 ** 400)), report(counters=_counters(samples=10 ** 19)),
    report(counters=_counters(data_wait_seconds=-0.1)), report(counters=_counters(data_wait_seconds=float("nan"))),
    report(counters=_counters(step_seconds=float("inf"))), report(counters=_counters(step_seconds=1e19)),
    report(step_hist=[0] * (NBUCKETS - 1)), report(step_hist=[0] * (NBUCKETS + 1)), report(step_hist=None),
    report(step_hist=[-1] + [0] * (NBUCKETS - 1)), report(step_hist=[0.5] + [0] * (NBUCKETS - 1)),
    report(step_hist=[True] + [0] * (NBUCKETS - 1)), report(step_hist=[1 << 53] + [0] * (NBUCKETS - 1)),
    report(step_hist={"0": 1}),
    report(knobs=[]), report(knobs=None), report(knobs={f"k{i}": 1 for i in range(33)}),
    report(knobs={"Bad": 1}), report(knobs={"1abc": 1}), report(knobs={"a" * 65: 1}), report(knobs={"": 1}),
    report(knobs={"trailing\n": 1}), report(knobs={"x": float("nan")}), report(knobs={"x": float("inf")}),
    report(knobs={"x": "y" * 65}), report(knobs={"x": [1]}), report(knobs={"x": {"a": 1}}),
    report(knobs={"x": 1 << 64}), report(knobs={"x": -(10 ** 400)}),
    report(memory=[]), report(memory={"gpu_bytes": 1}), report(memory={"max_rss_bytes": -1}),
    report(memory={"max_rss_bytes": 1.5}), report(memory={"max_rss_bytes": 10 ** 30}),
    report(memory={"max_rss_bytes": True}),
    report(world_size=0), report(world_size=None), without(report(), "world_size"),
    report(hook_errors=-1), report(hook_errors=1.0), report(hook_errors=None), report(hook_errors=True),
    report(disabled="no"), report(disabled=1),
    report(signature=5), report(signature=None), report(signature="s" * 65),
    report(untunable=[]), report(untunable=None), report(untunable={"Bad": "x"}), report(untunable={"a": 1}),
    report(untunable={"a": "r" * 201}), report(untunable={f"k{i}": "" for i in range(33)}),
], ids=lambda m: _changed(m, report()))
def test_check_report_rejects(msg: dict[str, Any]) -> None:
    rejects(protocol.check_report, msg)


def test_check_report_knob_limits_are_inclusive() -> None:
    knobs = {"k" + "x" * 63: "y" * 64, **{f"k{i}": i for i in range(31)}}
    assert len(knobs) == 32
    assert protocol.check_report(report(knobs=knobs))["knobs"] == knobs
    assert protocol.check_report(report(knobs={"seed": (1 << 64) - 1}))["knobs"]["seed"] == (1 << 64) - 1


# ---- applied ----

def test_check_applied_good() -> None:
    assert protocol.check_applied(applied()) == {"id": 7, "outcome": "applied", "detail": "", "step": 120}
    assert protocol.check_applied(without(without(applied(), "step"), "detail"))["step"] is None


@pytest.mark.parametrize("msg", [
    applied(outcome="done"), applied(outcome=None), without(applied(), "outcome"), applied(detail=5),
    applied(detail="x" * 513), applied(id=-1), applied(id="7"), applied(id=True), applied(id=1.0),
    without(applied(), "id"), applied(id=(1 << 53) + 1), applied(step=-1), applied(step=None), applied(step=2.0),
])
def test_check_applied_rejects(msg: dict[str, Any]) -> None:
    rejects(protocol.check_applied, msg)


# ---- decision (hook side) ----

def test_check_decision_good() -> None:
    out = protocol.check_decision(decision())
    assert out == {"id": 7, "knob": "num_workers", "value": 8, "reason": "data wait 40%", "tuner": "workers",
                   "at_step": 100, "trial": False}
    assert protocol.check_decision(decision(trial=True))["trial"] is True
    assert protocol.check_decision(decision(at_step=None, tuner="t" * 100))["tuner"] == "t" * 64


@pytest.mark.parametrize("msg", [
    decision(knob="NumWorkers"), decision(knob=None), decision(knob="a\n"), decision(knob="x" * 65),
    decision(value=float("nan")), decision(value=[1]), decision(value="v" * 65), decision(value=1 << 64),
    decision(reason=3), decision(reason="r" * 513), decision(id=-1), decision(id=None), decision(id=True),
    decision(at_step=-5), decision(at_step=1.5),
])
def test_check_decision_rejects(msg: dict[str, Any]) -> None:
    rejects(protocol.check_decision, msg)


# ---- fuzzed: validates or ProtocolError, nothing else ----

# values at the edges the checks care about: bool-for-int, limits, non-finite floats, and integers
# too large for a float (math.isfinite(10**400) raises OverflowError, not ProtocolError)
edge_values = st.one_of(st.sampled_from([
    True, False, None, 0, -1, 1, 1 << 20, (1 << 20) + 1, 1 << 31, (1 << 31) + 1, 1 << 53, (1 << 53) + 1,
    1 << 64, -(1 << 64), 10 ** 18, 10 ** 18 + 1, 1.0, 0.5, -0.0, 1e18, 1e19, 1e308,
    float("inf"), float("-inf"), float("nan"), "", "0", "exp-1", "num_workers", "a\n", "x" * 65, "x" * 600,
]), st.integers(min_value=1 << 1024, max_value=10 ** 1000),
    st.integers(min_value=-(10 ** 1000), max_value=-(1 << 1024)))
json_scalars = st.one_of(edge_values, st.none(), st.booleans(), st.integers(),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=20), st.dictionaries(st.text(max_size=10), inner, max_size=6)), max_leaves=12)
any_key = st.one_of(st.text(max_size=12), st.sampled_from(
    ["v", "type", "run", "rank", "world_size", "pid", "tuners", "tune", "counters", "step_hist", "knobs",
     "memory", "hook_errors", "disabled", "id", "outcome", "detail", "step", "knob", "value", "reason",
     "tuner", "at_step", *protocol.COUNTERS, *protocol.MEMORY_KINDS]))


def _slots(node: Any) -> list[tuple[Any, Any]]:
    """(container, key or index) of every value inside a message, nested ones included."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    out = []
    for k, v in items:
        out.append((node, k))
        out.extend(_slots(v))
    return out


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message of some type with a few values (nested ones too) replaced, deleted or added."""
    base = copy.deepcopy(draw(st.sampled_from([hello(), report(), applied(), decision()])))
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(base)
        action = draw(st.sampled_from(["set", "set", "del", "add"]))
        if action == "add" or not slots:
            base[draw(any_key)] = draw(json_values)
            continue
        container, key = draw(st.sampled_from(slots))
        if action == "del":
            if isinstance(container, dict):
                del container[key]
            else:
                container.pop(key)
        else:
            container[key] = draw(st.one_of(edge_values, json_values))
    return base


@st.composite
def one_edge(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message with exactly one value (nested ones too) set to an edge value."""
    base = copy.deepcopy(draw(st.sampled_from([hello(), report(), applied(), decision()])))
    container, key = draw(st.sampled_from(_slots(base)))
    container[key] = draw(edge_values)
    return base


messages = st.one_of(one_edge(), mutated(), st.dictionaries(any_key, json_values, max_size=12))


CHECKS = (protocol.check_hello, protocol.check_report, protocol.check_applied, protocol.check_decision)


def _only_protocol_errors(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except ProtocolError as exc:
        assert exc.reason in REJECT_REASONS


@FUZZ
@given(msg=messages)
def test_fuzz_checks_raise_only_protocol_errors(msg: dict[str, Any]) -> None:
    for check in CHECKS:
        _only_protocol_errors(lambda: check(copy.deepcopy(msg)))
    # what passes is what the registry and the exporter can use: bounded, finite, typed
    try:
        out = protocol.check_report(copy.deepcopy(msg))
    except ProtocolError:
        return
    for v in out["counters"].values():
        assert not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1e18
    for v in out["knobs"].values():
        if isinstance(v, (int, float)):
            float(v)   # the exporter's conversion must not overflow
    assert len(out["step_hist"]) == NBUCKETS


@FUZZ
@given(line=st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.one_of(one_edge(), mutated()).map(lambda m: json.dumps(m).encode()),
    st.dictionaries(any_key, json_values, max_size=8).map(lambda m: json.dumps(m).encode()),
))
def test_fuzz_decode_then_check(line: bytes) -> None:
    def run() -> None:
        msg = protocol.decode(line)
        check = {"hello": protocol.check_hello, "report": protocol.check_report,
                 "applied": protocol.check_applied}.get(msg["type"])
        if check is not None:
            check(msg)
    _only_protocol_errors(run)
    _only_protocol_errors(lambda: protocol.decode(line, protocol.SERVER_TYPES))
