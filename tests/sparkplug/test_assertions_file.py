"""assertions.yaml names every assertion id the TCK's seven edge tests reference, each either
checked by a TCK-lite module or not applicable with a reason, and the checks agree with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.sparkplug.synthetic import good
from tests.sparkplug.verdicts import all_checks, evaluate

HERE = Path(__file__).parent
TCK_TESTS = ("SessionEstablishment", "SessionTermination", "SendData", "SendComplexData", "ReceiveCommand",
             "PrimaryHost", "MultipleBroker")  # fmt: skip


def assertions() -> dict[str, dict[str, Any]]:
    loaded: dict[str, dict[str, Any]] = yaml.safe_load((HERE / "assertions.yaml").read_text())
    return loaded


def tck_references() -> dict[str, list[str]]:
    """id -> the TCK edge tests referencing it, from tck_edge_ids.txt (copied from the TCK's sources)."""
    refs: dict[str, list[str]] = {}
    for line in (HERE / "tck_edge_ids.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        test, ident = line.split()
        refs.setdefault(ident, []).append(test)
    return refs


def test_the_file_covers_exactly_the_referenced_ids() -> None:
    refs, entries = tck_references(), assertions()
    assert len(refs) == 164 and sum(map(len, refs.values())) == 170
    assert set(entries) == set(refs)
    assert {i: e["tck"] for i, e in entries.items()} == refs


def test_each_id_is_tested_or_not_applicable_with_a_reason() -> None:
    for ident, entry in assertions().items():
        has_test, has_reason = "test" in entry, bool(str(entry.get("not_applicable", "")).strip())
        assert has_test != has_reason, f"{ident}: exactly one of test / not_applicable"
        if has_test:
            assert entry["test"] in entry["tck"], f"{ident}: tested by {entry['test']}, not a TCK test naming it"
            assert ident in all_checks(), f"{ident}: no check registered"
        assert entry["text"], f"{ident}: the spec's text is missing"


def test_the_checks_are_exactly_the_tested_ids() -> None:
    tested = {i for i, e in assertions().items() if "test" in e}
    assert set(evaluate(good())) == tested == set(all_checks())


def test_no_datasets_or_templates_and_the_alias_group_is_tested_whole() -> None:
    entries = assertions()
    na = {i for i, e in entries.items() if "not_applicable" in e}
    assert {i for i in na if "dataset" in i or "template" in i} | {
        "operational-behavior-primary-application-state-with-multiple-servers-state-subs"
    } == na
    assert all("test" in e for i, e in entries.items() if "alias" in i)
