"""TCK-lite SessionTermination: NDEATH before an intentional disconnect, the DISCONNECT after it, NDEATH and
DDEATH topics and flags, and a DDEATH for a device that went offline.

One test per assertion id the TCK's SessionTerminationTest references (assertions.yaml), each judged on our edge
node's recorded session (a real edge-agent with the Sparkplug uplink; conftest.py).
"""

from __future__ import annotations

import pytest

from tests.sparkplug.tck_lite import assert_ours, ids_for
from tests.sparkplug.verdicts import Verdict


@pytest.mark.parametrize("assertion", ids_for("SessionTermination"))
def test_session_termination(assertion: str, ours: dict[str, Verdict], ours_mqtt5: dict[str, Verdict]) -> None:
    assert_ours(assertion, ours, ours_mqtt5)
