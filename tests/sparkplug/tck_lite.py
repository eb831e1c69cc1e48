"""What the TCK-lite modules share: which ids each judges (from assertions.yaml), which recorded
session judges an id, and how our edge node's verdicts are asserted."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.sparkplug.verdicts import PASS, Verdict

ASSERTIONS = Path(__file__).with_name("assertions.yaml")

# Judged on the short MQTT 5.0 session of our edge node; every other id on the main (3.1.1) one.
MQTT5_IDS = frozenset({"principles-persistence-clean-session-50",
                       "payloads-ndeath-will-message-publisher-disconnect-mqtt50"})  # fmt: skip


def ids_for(test: str) -> list[str]:
    """The ids assertions.yaml gives to the TCK-lite module of ``test`` (e.g. SendData)."""
    entries: dict[str, dict[str, object]] = yaml.safe_load(ASSERTIONS.read_text())
    return sorted(i for i, e in entries.items() if e.get("test") == test)


def assert_ours(ident: str, ours: dict[str, Verdict], ours_mqtt5: dict[str, Verdict]) -> None:
    """Our edge node passes ``ident``."""
    verdict = (ours_mqtt5 if ident in MQTT5_IDS else ours)[ident]
    assert verdict.outcome == PASS, f"{ident}: {verdict.outcome}: {verdict.detail}"
