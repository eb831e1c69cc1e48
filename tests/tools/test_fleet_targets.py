"""``--to`` lists: ranges keep their padding, bad parts are named, huge ranges refused."""

from __future__ import annotations

import pytest

from agent.tools.fleet.targets import expand


def test_ranges_lists_and_padding() -> None:
    assert expand("gw-001..gw-003,gw-9") == ["gw-001", "gw-002", "gw-003", "gw-9"]
    assert expand("site-a.7..site-a.10") == ["site-a.7", "site-a.8", "site-a.9", "site-a.10"]
    assert expand("gw-2, gw-1,gw-2") == ["gw-2", "gw-1"]
    assert len(expand("gw-001..gw-100")) == 100


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("gw-5..gw-1", "backwards"),
        ("gw-1..gw-9999999", "more than"),
        ("gw/1", "not a gateway id"),
        ("", "not a gateway id"),
        ("gw-1..other-3", "not a gateway id"),
    ],
)
def test_bad_lists_are_named(text: str, said: str) -> None:
    with pytest.raises(ValueError, match=said):
        expand(text)
