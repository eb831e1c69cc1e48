"""The harness checked: a session that keeps every rule passes every check it has evidence for,
and each broken copy of it fails exactly the assertions its fault breaks (no more, no fewer)."""

from __future__ import annotations

import pytest

from tests.sparkplug.synthetic import BROKEN, good
from tests.sparkplug.verdicts import FAIL, PASS, UNTESTED, evaluate

MQTT5_ONLY = {"principles-persistence-clean-session-50", "payloads-ndeath-will-message-publisher-disconnect-mqtt50"}


def test_the_good_stream_passes_every_check() -> None:
    verdicts = evaluate(good())
    assert {i: v for i, v in verdicts.items() if v.outcome != PASS} == {i: verdicts[i] for i in MQTT5_ONLY}, (
        "a 3.1.1 session has no evidence for the 5.0 rules and must fail nothing"
    )
    assert all(verdicts[i].outcome == UNTESTED for i in MQTT5_ONLY)


def test_the_good_stream_over_mqtt5_passes_the_5_0_rules_too() -> None:
    verdicts = evaluate(good(mqtt5=True))
    assert {i: v.detail for i, v in verdicts.items() if v.outcome != PASS} == {
        "principles-persistence-clean-session-311": "no MQTT 3.1.1 CONNECTs in the session",
        "payloads-ndeath-will-message-publisher-disconnect-mqtt311": "no DISCONNECTs in the session",
    }


@pytest.mark.parametrize("fault", [*sorted(BROKEN), "no_will_reason"])
def test_a_broken_stream_fails_exactly_its_assertions(fault: str) -> None:
    session = good(mqtt5=True, no_will_reason=True) if fault == "no_will_reason" else good(**{fault: True})
    want = {"payloads-ndeath-will-message-publisher-disconnect-mqtt50"} if fault == "no_will_reason" else BROKEN[fault]
    verdicts = evaluate(session)
    failed = {i for i, v in verdicts.items() if v.outcome == FAIL}
    assert failed == want, {i: verdicts[i].detail for i in failed ^ want}
