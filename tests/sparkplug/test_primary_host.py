"""TCK-lite PrimaryHost: the primary host's STATE: no BIRTH until a valid online, NDEATH and the next server
on a valid offline, stale ones ignored.

One test per assertion id the TCK's PrimaryHostTest references (assertions.yaml), each judged on our edge
node's recorded session (a real edge-agent with the Sparkplug uplink; conftest.py).
"""

from __future__ import annotations

import pytest

from tests.sparkplug.tck_lite import assert_ours, ids_for
from tests.sparkplug.verdicts import Verdict


@pytest.mark.parametrize("assertion", ids_for("PrimaryHost"))
def test_primary_host(assertion: str, ours: dict[str, Verdict], ours_mqtt5: dict[str, Verdict]) -> None:
    assert_ours(assertion, ours, ours_mqtt5)
