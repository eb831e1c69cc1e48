"""The watcher's parts without a broker: its seq ranges, its usage errors, and a broker that is not there."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from agent.tools.watch.seqs import SeqSet, ranges_text
from tests.conftest import ROOT, free_port


@given(st.lists(st.integers(min_value=1, max_value=60), max_size=80))
def test_seq_ranges_behave_as_a_set(seqs: list[int]) -> None:
    ranges, seen = SeqSet(), set()
    for seq in seqs:
        assert ranges.add(seq) == (seq not in seen)
        seen.add(seq)
    assert all((s in ranges) == (s in seen) for s in range(0, 62))
    if seen:
        assert (ranges.first, ranges.last) == (min(seen), max(seen))
        holes = {s for a, b in ranges.holes() for s in range(a, b + 1)}
        assert holes == set(range(min(seen), max(seen) + 1)) - seen
        assert ranges.missing() == len(holes)


def test_ranges_text_is_bounded() -> None:
    assert ranges_text([(4, 5), (8, 8)]) == "4-5, 8"
    assert ranges_text([(i, i) for i in range(1, 40, 2)], limit=3) == "1, 3, 5, ... (+17 more)"


def _watch(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "agent", "watch", *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_bad_options_are_named_with_exit_2() -> None:
    for args, named in [
        (["--gateway", "gw/+"], "--gateway 'gw/+'"),
        (["--prefix", "ioc/#"], "--prefix 'ioc/#'"),
        (["--max-late", "-1"], "--max-late -1"),
        (["--class", "city.meter.reading=urgent"], "--class 'city.meter.reading=urgent'"),
        (["--cert-file", "a.pem"], "--cert-file and --key-file go together"),
    ]:
        done = _watch("--port", str(free_port()), *args)
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        assert named in done.stderr


def test_a_broker_that_is_not_there_is_named_with_exit_1() -> None:
    port = free_port()
    done = _watch("--port", str(port), "--duration", "1")
    assert done.returncode == 1
    assert f"cannot reach the broker 127.0.0.1:{port}" in done.stderr
