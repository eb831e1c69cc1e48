"""The control: Eclipse Tahu's sparkplug-client 3.2.4 as an edge node through the same TCK-lite.
Its verdict per assertion is recorded in control_verdicts.yaml; a change in the harness that
moves any of them shows here. Where Tahu's client departs from the spec the verdict says so
(e.g. its Will is QoS 0, its bdSeq UInt64), which is what a control is for: the checks catch
real deviations in an implementation that is not ours."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.sparkplug.verdicts import Verdict

EXPECTED = Path(__file__).with_name("control_verdicts.yaml")


def test_the_controls_verdicts_match_the_recorded_table(control: dict[str, Verdict]) -> None:
    expected: dict[str, str] = yaml.safe_load(EXPECTED.read_text())
    got = {i: v.outcome for i, v in control.items()}
    assert got == expected, {
        i: (expected.get(i), got.get(i), control[i].detail) for i in got if got[i] != expected.get(i)
    }
