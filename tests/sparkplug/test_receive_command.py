"""TCK-lite ReceiveCommand: a Rebirth NCMD: DATA stops, NBIRTH and every DBIRTH again, the same bdSeq.

One test per assertion id the TCK's ReceiveCommandTest references (assertions.yaml), each judged on our edge
node's recorded session (a real edge-agent with the Sparkplug uplink; conftest.py).
"""

from __future__ import annotations

import pytest

from tests.sparkplug.tck_lite import assert_ours, ids_for
from tests.sparkplug.verdicts import Verdict


@pytest.mark.parametrize("assertion", ids_for("ReceiveCommand"))
def test_receive_command(assertion: str, ours: dict[str, Verdict], ours_mqtt5: dict[str, Verdict]) -> None:
    assert_ours(assertion, ours, ours_mqtt5)
