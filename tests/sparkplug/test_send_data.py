"""TCK-lite SendData: NDATA and DDATA: topics, QoS 0 and not retained, seq, timestamps in UTC, contents.

One test per assertion id the TCK's SendDataTest references (assertions.yaml), each judged on our edge
node's recorded session (a real edge-agent with the Sparkplug uplink; conftest.py).
"""

from __future__ import annotations

import pytest

from tests.sparkplug.tck_lite import assert_ours, ids_for
from tests.sparkplug.verdicts import Verdict


@pytest.mark.parametrize("assertion", ids_for("SendData"))
def test_send_data(assertion: str, ours: dict[str, Verdict], ours_mqtt5: dict[str, Verdict]) -> None:
    assert_ours(assertion, ours, ours_mqtt5)
