"""daemon.config: the generated config.yaml, validation messages, lookup order, socket path."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from looptune.daemon import config as cfg
from looptune.daemon.config import Config, ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIG_YAML = ROOT / "config.yaml"


def problems_of(data: object) -> list[str]:
    """The problems parse() reports for a decoded document (fails if it is accepted)."""
    with pytest.raises(ConfigError) as info:
        cfg.parse(data)
    return info.value.problems


def problems_of_text(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        cfg.load(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    return info.value.problems


def only(problems: list[str]) -> str:
    assert len(problems) == 1, problems
    return problems[0]


# ---- the default file ----

def test_config_yaml_is_render_default() -> None:
    assert CONFIG_YAML.read_text(encoding="utf-8") == cfg.render_default(), \
        "config.yaml is stale: regenerate with `python -m daemon config show --defaults > config.yaml`"


def test_config_yaml_loads_to_defaults() -> None:
    assert cfg.load(CONFIG_YAML) == Config()


def test_render_default_round_trips() -> None:
    assert cfg.parse(yaml.safe_load(cfg.render_default())) == Config()


def _leaf_lines(text: str) -> list[tuple[int, str]]:
    """(line index, key path) of every leaf key (`key: value`, or `key:` followed by a list)."""
    lines = text.splitlines()
    out: list[tuple[int, str]] = []
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z_][\w]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        nxt = next((ln for ln in lines[i + 1:] if ln.strip() and not ln.lstrip().startswith("#")), "")
        is_list = nxt.lstrip().startswith("- ")
        if rest or is_list:
            out.append((i, path))
        else:
            stack.append((indent, key))
    return out


def _leaf_paths(obj: object, prefix: str = "") -> set[str]:
    import dataclasses
    out = set()
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if f.metadata.get("tuner_sections"):        # tuners.<name>: each tuner's own options
            for name, options in value.items():
                out |= _leaf_paths(options, f"{prefix}{name}.")
        elif dataclasses.is_dataclass(value):
            out |= _leaf_paths(value, f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


def test_every_leaf_key_has_a_comment_above_it() -> None:
    text = CONFIG_YAML.read_text(encoding="utf-8")
    lines = text.splitlines()
    leaves = _leaf_lines(text)
    # the scan found every key of the dataclasses, so none escapes the check
    assert {p for _, p in leaves} == _leaf_paths(Config())
    for i, path in leaves:
        above = lines[i - 1].strip() if i else ""
        assert above.startswith("# ") and len(above) > 3, f"{path} (line {i + 1}) has no comment above it"


def test_ranges_are_documented_in_config_yaml() -> None:
    text = CONFIG_YAML.read_text(encoding="utf-8")
    assert "Allowed: 0.1..60." in text
    assert "Allowed: debug, info, warning, error." in text


# ---- empty, partial, whole ----

@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file_is_all_defaults(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert cfg.load(path) == Config()


def test_partial_file_takes_defaults_for_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("collectors:\n  interval_seconds: 2.5\n  gpu:\n    enabled: false\n")
    c = cfg.load(path)
    assert c.collectors.interval_seconds == 2.5
    assert c.collectors.gpu.enabled is False
    expected = Config()
    expected.collectors.interval_seconds = 2.5
    expected.collectors.gpu.enabled = False
    assert c == expected


def test_integer_is_accepted_for_a_float_and_stored_as_float() -> None:
    c = cfg.parse({"collectors": {"interval_seconds": 2}})
    assert c.collectors.interval_seconds == 2.0 and isinstance(c.collectors.interval_seconds, float)


def test_null_section_is_defaults() -> None:
    assert cfg.parse({"daemon": None, "collectors": {"host": None}}) == Config()


def test_per_collector_interval_null_and_value() -> None:
    c = cfg.parse({"collectors": {"host": {"interval_seconds": None}, "jobs": {"interval_seconds": 0.5}}})
    assert c.collectors.host.interval_seconds is None
    assert c.collectors.jobs.interval_seconds == 0.5


# ---- error messages: key path, value, what is allowed ----

def test_out_of_range_message_exact(tmp_path: Path) -> None:
    msg = only(problems_of_text(tmp_path, "collectors:\n  interval_seconds: -1\n"))
    assert "collectors.interval_seconds: -1 is out of range; allowed 0.1..60" in msg


@pytest.mark.parametrize("data, expected", [
    ({"collectors": {"timeout_seconds": 301}}, "collectors.timeout_seconds: 301 is out of range; allowed 0.1..300"),
    ({"collectors": {"gpu": {"interval_seconds": 0.05}}},
     "collectors.gpu.interval_seconds: 0.05 is out of range; allowed 0.1..60"),
    ({"jobs": {"max_jobs": 0}}, "jobs.max_jobs: 0 is out of range; allowed 1..4096"),
    ({"jobs": {"memory_detail_interval_seconds": 601}},
     "jobs.memory_detail_interval_seconds: 601 is out of range; allowed 1..600"),
    ({"tuners": {"compression": {"windows": 0}}}, "tuners.compression.windows: 0 is out of range; allowed 1..100"),
    ({"collectors": {"interval_seconds": float("inf")}},
     "collectors.interval_seconds: inf is out of range; allowed 0.1..60"),
])
def test_out_of_range(data: dict, expected: str) -> None:
    assert only(problems_of(data)) == expected


def test_nan_is_rejected() -> None:
    # YAML `.nan` is a float; NaN compares false with both bounds, so a plain `value < lo or
    # value > hi` lets it through -- and a NaN interval makes the sampler thread spin at 100% CPU.
    problems = problems_of(yaml.safe_load("collectors:\n  interval_seconds: .nan\n"))
    msg = only(problems)
    assert msg.startswith("collectors.interval_seconds: ")
    assert "nan" in msg and "allowed 0.1..60" in msg


def test_out_of_range_value_is_shown_exactly() -> None:
    # "60 is out of range; allowed 0.1..60" would contradict itself: the value must be shown as given
    msg = only(problems_of({"collectors": {"interval_seconds": 60.0000001}}))
    assert "collectors.interval_seconds: 60.0000001 is out of range; allowed 0.1..60" == msg


def test_unknown_top_level_key() -> None:
    msg = only(problems_of({"colectors": {}}))
    assert msg.startswith("colectors: unknown key")
    assert "daemon, collectors, jobs" in msg


def test_unknown_nested_key() -> None:
    msg = only(problems_of({"collectors": {"host": {"intervall_seconds": 2}}}))
    assert msg.startswith("collectors.host.intervall_seconds: unknown key")
    assert "enabled, interval_seconds" in msg


def test_unknown_key_in_tls() -> None:
    assert only(problems_of({"daemon": {"tls": {"cert": "x"}}})).startswith("daemon.tls.cert: unknown key")


@pytest.mark.parametrize("data, expected", [
    # string for float
    ({"collectors": {"interval_seconds": "fast"}},
     "collectors.interval_seconds: 'fast' is not a number; allowed 0.1..60"),
    ({"collectors": {"interval_seconds": "1.5"}},
     "collectors.interval_seconds: '1.5' is not a number; allowed 0.1..60"),
    # float for int
    ({"jobs": {"max_jobs": 64.5}}, "jobs.max_jobs: 64.5 is not an integer; allowed 1..4096"),
    ({"jobs": {"max_jobs": 64.0}}, "jobs.max_jobs: 64.0 is not an integer; allowed 1..4096"),
    # bool for number
    ({"collectors": {"interval_seconds": True}},
     "collectors.interval_seconds: True is not a number; allowed 0.1..60"),
    ({"jobs": {"max_jobs": False}}, "jobs.max_jobs: False is not an integer; allowed 1..4096"),
    # number for bool, string for bool
    ({"collectors": {"gpu": {"enabled": 1}}}, "collectors.gpu.enabled: 1 is not a boolean"),
    ({"jobs": {"gpu_processes": "yes please"}}, "jobs.gpu_processes: 'yes please' is not a boolean"),
    # non-list for jobs.match
    ({"jobs": {"match": "torchrun"}}, "jobs.match: 'torchrun' is not a list"),
    ({"jobs": {"match": {"a": 1}}}, "jobs.match: {'a': 1} is not a list"),
    # list element of the wrong type, with its index
    ({"jobs": {"match": ["ok", 3]}}, "jobs.match[1]: 3 is not a string"),
    # null where no null is allowed
    ({"collectors": {"interval_seconds": None}}, "collectors.interval_seconds: None is not a number; allowed 0.1..60"),
    # scalar where a section belongs
    ({"collectors": 5}, "collectors: 5 is not a mapping of keys"),
])
def test_wrong_types(data: dict, expected: str) -> None:
    assert only(problems_of(data)) == expected


def test_bad_regex_names_its_index() -> None:
    problems = problems_of({"jobs": {"match": ["torchrun", "(unclosed", "fine", "[a-"]}})
    assert len(problems) == 2, problems
    assert problems[0].startswith("jobs.match[1]: '(unclosed' is not a valid regular expression")
    assert problems[1].startswith("jobs.match[3]: '[a-' is not a valid regular expression")


@pytest.mark.parametrize("listen", ["localhost", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536",
                                    "127.0.0.1:http", "127.0.0.1:-5", "[::1]"])
def test_bad_listen(listen: str) -> None:
    msg = only(problems_of({"daemon": {"listen": listen}}))
    assert msg == f"daemon.listen: {listen!r} is not HOST:PORT with a port in 1..65535"


@pytest.mark.parametrize("listen", ["127.0.0.1:9", "0.0.0.0:19400", "[::1]:19400", "node-1.example:65535"])
def test_good_listen(listen: str) -> None:
    assert cfg.parse({"daemon": {"listen": listen}}).daemon.listen == listen


@pytest.mark.parametrize("listen, expected", [("127.0.0.1:80", ("127.0.0.1", 80)),
                                              ("[::1]:19400", ("::1", 19400)),
                                              (":19400", ("0.0.0.0", 19400))])
def test_split_listen(listen: str, expected: tuple[str, int]) -> None:
    assert cfg.split_listen(listen) == expected


@pytest.mark.parametrize("level", ["verbose", "INFO", ""])
def test_bad_log_level(level: str) -> None:
    msg = only(problems_of({"daemon": {"log_level": level}}))
    assert msg == f"daemon.log_level: {level!r} is not allowed; allowed debug, info, warning, error"


@pytest.mark.parametrize("level", cfg.LOG_LEVELS)
def test_good_log_level(level: str) -> None:
    assert cfg.parse({"daemon": {"log_level": level}}).daemon.log_level == level


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    text = "daemon:\n  log_level: info\ncollectors:\n  interval_seconds: 1\n   bad: indentation\n"
    msg = only(problems_of_text(tmp_path, text))
    assert msg.startswith("line 5 column "), msg
    assert "not valid YAML" in msg


def test_yaml_syntax_error_unclosed_flow(tmp_path: Path) -> None:
    msg = only(problems_of_text(tmp_path, "jobs:\n  match: ['a', 'b'\n  max_jobs: 3\n"))
    assert re.match(r"line \d+ column \d+: not valid YAML", msg), msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_top_level(tmp_path: Path, text: str) -> None:
    msg = only(problems_of_text(tmp_path, text))
    assert msg.startswith("<top>: ") and "is not a mapping of keys" in msg


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        cfg.load(tmp_path / "missing.yaml")
    assert info.value.problems == ["cannot read: No such file or directory"]


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    text = ("daemon:\n  listen: nowhere\n  log_level: loud\n  colour: blue\n"
            "collectors:\n  interval_seconds: -1\n  gpu:\n    enabled: maybe\n"
            "jobs:\n  match: ['(']\n  max_jobs: 1.5\n")
    problems = problems_of_text(tmp_path, text)
    keys = [p.split(":", 1)[0] for p in problems]
    assert sorted(keys) == sorted(["daemon.listen", "daemon.log_level", "daemon.colour",
                                   "collectors.interval_seconds", "collectors.gpu.enabled",
                                   "jobs.match[0]", "jobs.max_jobs"]), problems
    # every line of the exception text names the file
    for line in str(ConfigError(problems, "f.yaml")).splitlines():
        assert line.startswith("f.yaml: ")


# ---- hypothesis: interval range ----

@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.floats(min_value=0.1, max_value=60) | st.integers(min_value=1, max_value=60))
@example(0.1)
@example(60)
def test_interval_in_range_is_accepted(value: float) -> None:
    doc = yaml.safe_load(yaml.safe_dump({"collectors": {"interval_seconds": value}}))
    c = cfg.parse(doc)
    assert c.collectors.interval_seconds == value
    assert isinstance(c.collectors.interval_seconds, float)


@settings(max_examples=150, deadline=None, database=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                 st.integers(min_value=-10**6, max_value=10**6))
       .filter(lambda v: not (0.1 <= v <= 60)))
@example(float("nan"))       # neither below nor above: must still be rejected
@example(float("inf"))
@example(-1)
@example(0.09999999999999999)
@example(60.00000000000001)
def test_interval_out_of_range_is_rejected(value: float) -> None:
    with pytest.raises(ConfigError) as info:
        cfg.parse({"collectors": {"interval_seconds": value}})
    msg = only(info.value.problems)
    assert msg.startswith("collectors.interval_seconds: ")
    assert msg.endswith("allowed 0.1..60")


@settings(max_examples=50, deadline=None, database=None)
@given(st.sampled_from(["host", "jobs", "gpu"]), st.floats(allow_nan=False).filter(lambda v: not (0.1 <= v <= 60)))
def test_collector_interval_out_of_range_names_the_collector(name: str, value: float) -> None:
    with pytest.raises(ConfigError) as info:
        cfg.parse({"collectors": {name: {"interval_seconds": value}}})
    assert only(info.value.problems).startswith(f"collectors.{name}.interval_seconds: ")


# ---- lookup order ----

@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, interval in (("cli", 2.0), ("env", 3.0), ("system", 4.0)):
        p = tmp_path / f"{name}.yaml"
        p.write_text(f"collectors:\n  interval_seconds: {interval}\n")
        out[name] = p
    return out


def test_cli_beats_env_and_system(files: dict[str, Path]) -> None:
    env = {"LOOPTUNE_CONFIG": str(files["env"])}
    assert cfg.resolve_path(str(files["cli"]), env, str(files["system"])) == str(files["cli"])
    c, path = cfg.load_resolved(str(files["cli"]), env, str(files["system"]))
    assert (c.collectors.interval_seconds, path) == (2.0, str(files["cli"]))


def test_env_beats_system(files: dict[str, Path]) -> None:
    env = {"LOOPTUNE_CONFIG": str(files["env"])}
    c, path = cfg.load_resolved(None, env, str(files["system"]))
    assert (c.collectors.interval_seconds, path) == (3.0, str(files["env"]))


def test_empty_env_is_ignored(files: dict[str, Path]) -> None:
    c, path = cfg.load_resolved(None, {"LOOPTUNE_CONFIG": ""}, str(files["system"]))
    assert (c.collectors.interval_seconds, path) == (4.0, str(files["system"]))


def test_system_beats_defaults(files: dict[str, Path]) -> None:
    c, path = cfg.load_resolved(None, {}, str(files["system"]))
    assert (c.collectors.interval_seconds, path) == (4.0, str(files["system"]))


def test_nothing_found_is_built_in_defaults(tmp_path: Path) -> None:
    assert cfg.resolve_path(None, {}, str(tmp_path / "absent.yaml")) is None
    assert cfg.load_resolved(None, {}, str(tmp_path / "absent.yaml")) == (Config(), None)


def test_named_file_that_is_missing_is_an_error_not_defaults(tmp_path: Path, files: dict[str, Path]) -> None:
    # an explicit --config or $LOOPTUNE_CONFIG that does not exist must not fall through silently
    with pytest.raises(ConfigError):
        cfg.load_resolved(str(tmp_path / "nope.yaml"), {}, str(files["system"]))
    with pytest.raises(ConfigError):
        cfg.load_resolved(None, {"LOOPTUNE_CONFIG": str(tmp_path / "nope.yaml")}, str(files["system"]))


def test_bad_resolved_file_raises(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("collectors:\n  interval_seconds: -1\n")
    with pytest.raises(ConfigError) as info:
        cfg.load_resolved(None, {}, str(p))
    assert info.value.source == str(p)
    assert "collectors.interval_seconds: -1 is out of range" in only(info.value.problems)


# ---- socket path ----

def test_socket_path_config_key_wins(tmp_path: Path) -> None:
    c = cfg.parse({"daemon": {"socket": "/somewhere/else.sock"}})
    assert cfg.socket_path(c, {"RUNTIME_DIRECTORY": str(tmp_path)}) == "/somewhere/else.sock"


def test_socket_path_runtime_directory(tmp_path: Path) -> None:
    assert cfg.socket_path(Config(), {"RUNTIME_DIRECTORY": str(tmp_path)}) == str(tmp_path / "looptune.sock")


def test_socket_path_runtime_directory_first_of_several(tmp_path: Path) -> None:
    # systemd lists several RuntimeDirectory= entries separated by colons
    env = {"RUNTIME_DIRECTORY": f"{tmp_path}:/run/other"}
    assert cfg.socket_path(Config(), env) == str(tmp_path / "looptune.sock")


def test_default_socket_candidates_order(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    env = {"XDG_RUNTIME_DIR": str(xdg)}
    candidates = cfg.default_socket_paths(env)
    expected_all = ["/run/looptune/looptune.sock", str(xdg / "looptune" / "looptune.sock"),
                    f"/tmp/looptune-{os.getuid()}/looptune.sock"]
    # only usable places are listed, in the documented order
    assert candidates == [p for p in expected_all if p in candidates]
    assert str(xdg / "looptune" / "looptune.sock") in candidates
    assert cfg.socket_path(Config(), env) == candidates[0]


def test_socket_path_without_any_usable_dir_falls_back_to_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "_dir_usable", lambda path: False)
    assert cfg.socket_path(Config(), {"RUNTIME_DIRECTORY": "/nonexistent/rt"}) == \
        f"/tmp/looptune-{os.getuid()}/looptune.sock"


def test_socket_path_unusable_runtime_directory_is_skipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    usable = {"/run/looptune"}
    monkeypatch.setattr(cfg, "_dir_usable", lambda path: path in usable)
    assert cfg.socket_path(Config(), {"RUNTIME_DIRECTORY": str(tmp_path / "gone")}) == "/run/looptune/looptune.sock"


def test_dir_usable(tmp_path: Path) -> None:
    assert cfg._dir_usable(str(tmp_path))                      # exists, writable
    assert cfg._dir_usable(str(tmp_path / "new"))              # can be made
    assert not cfg._dir_usable(str(tmp_path / "a" / "b"))      # parent missing
