"""10,000 hostile messages through the daemon's whole message path, in-process: decode, the
field checks, the job registry, and the Prometheus rendering of what was accepted. Only
ProtocolError (a counted rejection) may come out; whatever is accepted must render. A lone
surrogate in a knob string once passed every check and crashed the exposition: strings here
include them, control characters and huge numbers on purpose. (test_socket_security.py sends
fuzzed messages over the real socket to a daemon subprocess, fewer of them.)"""
from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from looptune import protocol, schema
from looptune.collectors.hookjobs import hook_families
from looptune.daemon.hooks import HookRegistry

NB = len(protocol.STEP_BUCKETS) + 1
EXAMPLES = 10_000

hostile_text = st.text(st.characters(codec=None, categories=None), max_size=80) | \
    st.sampled_from(["\ud800", "a\udfffb", "\x00", "\n", "exp-1", "num_workers", "x" * 70, "é", "\u2028"])
numbers = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
                    st.sampled_from([0, 1, -1, 2**53, 2**64, 10**18, 10**19, 1e308]))
scalars = st.one_of(st.none(), st.booleans(), numbers, hostile_text)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(hostile_text, inner, max_size=4)),
                      max_leaves=8)


@st.composite
def counters(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(values)
    out = {f.name: draw(st.one_of(numbers, scalars)) for f in schema.FIGURES if draw(st.integers(0, 5))}
    return out


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(protocol.CLIENT_TYPES + ("report", "report", "nonsense")))
    msg: dict[str, Any] = {"v": draw(st.sampled_from([1, 1, 1, 2, "1", None])), "type": kind}
    if kind == "hello":
        msg.update(run=draw(hostile_text), rank=draw(numbers), world_size=draw(numbers), pid=draw(numbers),
                   tuners=draw(st.lists(hostile_text, max_size=3)), tune=draw(scalars))
    elif kind == "report":
        msg.update(counters=draw(counters()),
                   step_hist=draw(st.one_of(st.just([1] * NB), st.lists(numbers, max_size=NB + 1))),
                   knobs=draw(st.dictionaries(hostile_text, scalars, max_size=4)),
                   world_size=draw(st.one_of(st.just(1), numbers)),
                   memory=draw(st.one_of(st.just({}), st.dictionaries(hostile_text, numbers, max_size=3))),
                   signature=draw(hostile_text), untunable=draw(st.dictionaries(hostile_text, hostile_text, max_size=2)),
                   settling=draw(st.lists(hostile_text, max_size=3)), disabled=draw(scalars))
    elif kind == "applied":
        msg.update(id=draw(numbers), outcome=draw(st.sampled_from(["applied", "failed", "x"])),
                   detail=draw(hostile_text), step=draw(numbers))
    extra = draw(st.dictionaries(hostile_text, values, max_size=2))
    return {**extra, **msg}


def render(registry_of_jobs: HookRegistry) -> bytes:
    reg = CollectorRegistry(auto_describe=False)

    class C:
        def collect(self) -> Any:
            return hook_families(registry_of_jobs.views(), with_info=True)
    reg.register(C())
    return generate_latest(reg)


def test_ten_thousand_hostile_messages_are_rejected_or_rendered() -> None:
    reg = HookRegistry(max_jobs_per_uid=10**6, max_jobs=10**6)
    job = reg.register(1, 0, {"run": "fuzz", "rank": 0, "world_size": 1, "pid": 1, "tuners": [], "tune": False})
    tally = {"accepted": 0, "rejected": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(msg=messages())
    def check(msg: dict[str, Any]) -> None:
        line = json.dumps(msg).encode()             # ensure_ascii: a lone surrogate travels as \\ud800
        try:
            m = protocol.decode(line)
            if m["type"] == "hello":
                protocol.check_hello(m)
            elif m["type"] == "report":
                rep = protocol.check_report(m)
                job.report, job.prev = None, None    # counters may start anywhere for this one job
                reg.report(job, rep)
                render(reg)                          # what was accepted must render
            elif m["type"] == "applied":
                protocol.check_applied(m)
            tally["accepted"] += 1
        except protocol.ProtocolError as exc:
            assert exc.reason in ("malformed", "oversized", "version", "unknown_type", "invalid"), exc
            tally["rejected"] += 1

    check()
    assert sum(tally.values()) >= EXAMPLES
    assert tally["accepted"] > 100 and tally["rejected"] > 1000, tally
