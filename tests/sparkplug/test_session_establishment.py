"""TCK-lite SessionEstablishment: CONNECT and its Will, the subscriptions, waiting for the primary host,
NBIRTH and DBIRTH (topics, flags, seq, bdSeq, Rebirth metric, metrics, aliases) and their order.

One test per assertion id the TCK's SessionEstablishmentTest references (assertions.yaml), each judged on our edge
node's recorded session (a real edge-agent with the Sparkplug uplink; conftest.py).
"""

from __future__ import annotations

import pytest

from tests.sparkplug.tck_lite import assert_ours, ids_for
from tests.sparkplug.verdicts import Verdict


@pytest.mark.parametrize("assertion", ids_for("SessionEstablishment"))
def test_session_establishment(assertion: str, ours: dict[str, Verdict], ours_mqtt5: dict[str, Verdict]) -> None:
    assert_ours(assertion, ours, ours_mqtt5)
