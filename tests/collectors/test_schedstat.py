"""CPU demand from schedstat: parsing one line, reading a process's threads from a fake /proc
(missing, malformed, zeroed, a thread that vanished), and against this very process."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from looptune.collectors.jobs import parse_schedstat, read_schedstat


@pytest.mark.parametrize("text, expected", [
    ("560074096 93051 18\n", (560074096, 93051)),
    ("1 2 3 4\n", (1, 2)),                # a field more in some later kernel: the first two still count
    ("0 0 0\n", (0, 0)),                  # parsed as it is; read_schedstat decides what zeros mean
    ("12 34", (12, 34)),
    ("", None),
    ("\n", None),
    ("123\n", None),
    ("a b c\n", None),
    ("1.5 2 3\n", None),
    ("-1 2 3\n", None),
    ("1 -2 3\n", None),
])
def test_parse_schedstat(text: str, expected: tuple[int, int] | None) -> None:
    assert parse_schedstat(text) == expected


def fake_proc(root: Path, pid: int, main: str | None, threads: dict[int, str]) -> str:
    d = root / str(pid)
    (d / "task").mkdir(parents=True)
    if main is not None:
        (d / "schedstat").write_text(main)
    for tid, text in threads.items():
        (d / "task" / str(tid)).mkdir()
        if text is not None:
            (d / "task" / str(tid) / "schedstat").write_text(text)
    return str(root)


def test_every_thread_is_summed(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 10, "100 5 3\n", {10: "100 5 3\n", 11: "2000 700 9\n", 12: "0 40 1\n"})
    assert read_schedstat(10, proc) == {10: 105, 11: 2700, 12: 40}


def test_missing_schedstat_is_none(tmp_path: Path) -> None:
    # a kernel without CONFIG_SCHED_INFO has no schedstat file at all
    proc = fake_proc(tmp_path, 10, None, {10: None})
    assert read_schedstat(10, proc) is None


def test_gone_process_is_none(tmp_path: Path) -> None:
    assert read_schedstat(4242, str(tmp_path)) is None


def test_sched_info_off_reads_zeros_and_is_none(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 10, "0 0 0\n", {10: "0 0 0\n"})
    assert read_schedstat(10, proc) is None


@pytest.mark.parametrize("bad", ["garbage\n", "1\n", "", "\xff\xfe"])
def test_malformed_thread_line_is_none(tmp_path: Path, bad: str) -> None:
    proc = fake_proc(tmp_path, 10, "100 5 3\n", {10: "100 5 3\n", 11: bad})
    assert read_schedstat(10, proc) is None


def test_malformed_main_line_is_none(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 10, "what\n", {10: "100 5 3\n"})
    assert read_schedstat(10, proc) is None


def test_a_thread_that_exited_since_the_listing_is_left_out(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 10, "100 5 3\n", {10: "100 5 3\n", 11: None})
    assert read_schedstat(10, proc) == {10: 105}


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/schedstat"), reason="kernel without schedstat")
def test_this_process() -> None:
    first = read_schedstat(os.getpid())
    if first is None:
        pytest.skip("schedstat reads zeros here (sched_info off)")
    assert os.getpid() in first or os.gettid() in first  # type: ignore[attr-defined]
    t = time.process_time()
    while time.process_time() - t < 0.05:
        pass
    second = read_schedstat(os.getpid())
    assert second is not None
    grown = sum(second.values()) - sum(first.get(tid, 0) for tid in second)
    assert grown >= 0.04e9          # the 50 ms of CPU just burnt, and possibly some waiting
