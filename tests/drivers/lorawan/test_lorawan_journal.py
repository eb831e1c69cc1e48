"""The state journal's fold runs in a thread; an agent killed (SIGKILL) in the middle of one loses nothing."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from drivers.lorawan.journal import OLD_LOG, SNAPSHOT, Journal
from drivers.lorawan.state import digest
from tests.conftest import ROOT
from tests.drivers.lorawan.journal_child import DEVICES, KEYS, eui, key


def _killed_during_fold(folder: Path, point: str) -> None:
    child = subprocess.Popen([sys.executable, "-m", "tests.drivers.lorawan.journal_child", str(folder), point],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout is not None
        seen = set()
        deadline = time.monotonic() + 20
        while not {"FOLDING", "R2"} <= seen:
            line = child.stdout.readline()
            assert line, f"the child ended: {child.wait(5)}: {child.stderr.read() if child.stderr else ''}"
            seen.add(line.strip())
            assert time.monotonic() < deadline
        child.send_signal(signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()


@pytest.mark.parametrize("point", ["_install", "_drop_old_log"])
def test_a_kill_during_a_fold_loses_nothing_and_dedupe_holds_after_restart(tmp_path: Path, point: str) -> None:
    _killed_during_fold(tmp_path, point)
    assert (tmp_path / OLD_LOG).exists()  # the kill came mid-fold
    journal = Journal(tmp_path)
    journal.load()  # the restart
    assert len(journal.states) == DEVICES
    for device in range(DEVICES):
        state = journal.state(eui(device))
        assert state.f_cnt == 2000 + KEYS[2] - 1
        # Exactly the last 64 keys, in order (a redelivery of any makes nothing): round 1's last 54, round 2's 10.
        # A log applied twice over the snapshot would have brought older keys back in place of newer ones.
        assert state.keys == [digest(key(1, device, i)) for i in range(16, 70)] + [
            digest(key(2, device, i)) for i in range(10)], device  # fmt: skip
        assert not any(state.seen(key(1, device, i)) for i in range(16))
    journal.close()
    assert not (tmp_path / OLD_LOG).exists()
    assert (tmp_path / SNAPSHOT).stat().st_mode & 0o777 == 0o600


def test_a_fold_runs_in_a_thread_and_records_made_meanwhile_survive(tmp_path: Path) -> None:
    loop_thread = threading.get_ident()
    written_in: list[int] = []

    async def run() -> Journal:
        journal = Journal(tmp_path)
        journal.load()
        original = journal._install
        journal._install = lambda temp: (written_in.append(threading.get_ident()), original(temp))  # type: ignore[method-assign]
        state = journal.state(eui(1))
        journal.record(eui(1), state, state.remember("before"))
        journal.fold()
        journal.record(eui(1), state, state.remember("during"))  # while the thread may still write
        assert journal._folding is not None
        await asyncio.to_thread(journal._folding.join, 10)
        return journal

    journal = asyncio.run(run())
    assert written_in and written_in[0] != loop_thread
    journal.close()
    again = Journal(tmp_path)
    again.load()
    assert again.state(eui(1)).seen("before") and again.state(eui(1)).seen("during")
