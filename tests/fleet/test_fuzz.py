"""Hypothesis against ``verify``: whatever arrives, only ``Refused`` escapes (or the document passes), quickly.

Three sources of input: arbitrary bytes; arbitrary JSON in the envelope's place; and valid
envelopes mutated (bytes flipped, cut or inserted; envelope fields replaced; body fields replaced
and the body signed again, so the checks after the signature are reached too).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.fleet.envelope import CODES, COMMAND_TYPE, CONFIG_TYPE, Refused
from tests.fleet.envelopes import OPERATOR, READER, STRANGER, body, signed, signed_raw
from tests.fleet.test_envelope import check

BOUND = 1.0  # seconds per input; a legitimate verify takes well under a millisecond
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
KEYS = st.sampled_from([(OPERATOR, "op"), (READER, "reader"), (STRANGER, "stranger"), (STRANGER, "op")])
TYPES = st.sampled_from([COMMAND_TYPE, CONFIG_TYPE, "", "application/json"])
FIELDS = st.sampled_from(["target", "issued_at", "expires_at", "nonce", "command"])
TIMES = st.datetimes(timezones=st.timezones()).map(lambda t: t.isoformat())


def _only_refused(data: bytes) -> None:
    refused: Refused | None = None
    started = time.monotonic()
    try:
        check(data)
    except Refused as exc:
        refused = exc
    assert time.monotonic() - started < BOUND
    if refused is not None:
        assert refused.code in CODES
        assert str(refused).startswith(refused.code + ": ")


@FUZZ
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes(data: bytes) -> None:
    _only_refused(data)


@FUZZ
@given(value=JSON)
def test_arbitrary_json(value: Any) -> None:
    _only_refused(json.dumps(value).encode())


@st.composite
def _byte_mutants(draw: st.DrawFn) -> bytes:
    data = bytearray(signed())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 40))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=40))
        if not data:
            break
    return bytes(data)


@FUZZ
@given(data=_byte_mutants())
def test_valid_envelopes_with_bytes_changed(data: bytes) -> None:
    _only_refused(data)


@FUZZ
@given(
    name=st.sampled_from(["payloadType", "payload", "signatures", "keyid", "sig"]),
    value=JSON | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),  # lone surrogates: unsignable
)
def test_valid_envelopes_with_a_field_replaced(name: str, value: Any) -> None:
    doc = json.loads(signed())
    if name in ("keyid", "sig"):
        doc["signatures"][0][name] = value
    else:
        doc[name] = value
    _only_refused(json.dumps(doc).encode())


@FUZZ
@given(
    field=FIELDS,
    value=JSON | TIMES | st.text(alphabet="0123456789abcdefgroup:-TZ+.", max_size=40),
    kind=TYPES,
    key=KEYS,
)
def test_re_signed_bodies_with_a_field_replaced(field: str, value: Any, kind: str, key: Any) -> None:
    doc = body()
    doc[field] = value
    private, key_id = key
    _only_refused(signed(doc, kind=kind, key=private, key_id=key_id))


@FUZZ
@given(payload=st.binary(max_size=2048), kind=TYPES)
def test_re_signed_arbitrary_payloads(payload: bytes, kind: str) -> None:
    _only_refused(signed_raw(payload, kind=kind))


def test_the_fuzz_reaches_acceptance() -> None:
    # The harness is not vacuous: an untouched envelope passes through the same helper.
    assert check(signed()).key_id == "op"
    assert base64.b64decode(json.loads(signed())["payload"])
