"""Signed fleet documents: what ``verify`` accepts, and every kind of bad envelope with its reason and field."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as default
from datetime import timedelta
from typing import Any

import pytest

from agent.fleet.envelope import (
    CODES,
    COMMAND_TYPE,
    CONFIG_TYPE,
    MAX_ENVELOPE_BYTES,
    Refused,
    TrustedKey,
    Verified,
    make_body,
    pae,
    sign,
    verify,
)
from agent.fleet.keys import public_text
from agent.fleet.nonces import NonceStore
from tests.fleet.envelopes import (
    DROP,
    GATEWAY,
    GROUPS,
    KEYS,
    NOW,
    OPERATOR,
    READER,
    STRANGER,
    body,
    edited,
    envelope,
    later,
    signed,
    signed_raw,
)


def check(data: bytes, nonces: NonceStore | None = None, **overrides: Any) -> Verified:
    """``verify`` as our gateway would call it for a ``write`` command, now."""
    args: dict[str, Any] = {
        "payload_type": COMMAND_TYPE,
        "scope": "write",
        "keys": KEYS,
        "gateway": GATEWAY,
        "groups": GROUPS,
        "nonces": nonces if nonces is not None else NonceStore(None),
        "now": NOW,
        "clock_synced": True,
    }
    return verify(data, **(args | overrides))


@dataclass(frozen=True)
class Bad:
    name: str
    data: Callable[[], bytes]
    code: str
    field: str | None
    overrides: dict[str, Any] = default(default_factory=dict)


def _set(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.__setitem__(name, value)


def _set_sig(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["signatures"][0].__setitem__(name, value)


def _flip_sig(doc: dict[str, Any]) -> None:
    sig = bytearray(base64.b64decode(doc["signatures"][0]["sig"]))
    sig[0] ^= 1
    doc["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()


def _other_body(doc: dict[str, Any]) -> None:
    doc["payload"] = base64.b64encode(json.dumps(body(command="restart")).encode()).decode()


def _nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def _raw_body(**changes: Any) -> bytes:
    """Body JSON text with ``changes`` spliced in as literal JSON: for what json.dumps will not write."""
    text = json.dumps(body())[:-1]
    return (text + "".join(f', "{k}": {v}' for k, v in changes.items()) + "}").encode()


def _in_body(name: str, code: str, field: str, **changes: Any) -> Bad:
    """A properly signed body with ``changes`` (see ``body``), refused for ``payload.<field>``."""
    return Bad(name, lambda: signed(body(**changes)), code, f"payload.{field}")


BAD = [
    Bad("oversized", lambda: b" " * (MAX_ENVELOPE_BYTES + 1), "too_large", None),
    Bad("not JSON", lambda: b"{not json", "malformed", None),
    Bad("not UTF-8", lambda: b'{"payloadType": "\xff"}', "malformed", None),
    Bad("a JSON array", lambda: b"[]", "malformed", None),
    Bad("nested 100,000 levels", lambda: _nested(100_000), "malformed", None),
    Bad("objects nested 40,000 levels", lambda: b'{"a":' * 40_000 + b"1" + b"}" * 40_000, "malformed", None),
    Bad("payload nested 60,000 levels", lambda: signed_raw(_nested(60_000)), "malformed", "payload"),
    Bad("an unknown envelope field", lambda: edited(signed(), _set("extra", 1)), "malformed", "extra"),
    Bad(
        "payloadType a lone surrogate",
        lambda: edited(signed(), _set("payloadType", "\ud800")),
        "malformed",
        "payloadType",
    ),
    Bad("payloadType missing", lambda: edited(signed(), lambda d: d.pop("payloadType")), "malformed", "payloadType"),
    Bad("payload not base64", lambda: edited(signed(), _set("payload", "*not base64*")), "malformed", "payload"),
    Bad("payload not JSON", lambda: signed_raw(b"ping gw-1"), "malformed", "payload"),
    Bad("payload a JSON list", lambda: signed_raw(b"[1, 2]"), "malformed", "payload"),
    Bad("payload nested 40 levels", lambda: signed(body(deep=json.loads(_nested(40)))), "malformed", "payload"),
    Bad("payload repeats a key", lambda: signed_raw(_raw_body(command='"restart"')), "malformed", "payload"),
    Bad("payload holds NaN", lambda: signed_raw(_raw_body(value="NaN")), "malformed", "payload"),
    Bad("payload holds a 5,000-digit number", lambda: signed_raw(_raw_body(value="9" * 5000)), "malformed", "payload"),
    Bad("no signatures", lambda: edited(signed(), _set("signatures", [])), "unsigned", "signatures"),
    Bad("signatures missing", lambda: edited(signed(), lambda d: d.pop("signatures")), "unsigned", "signatures"),
    Bad("signatures not a list", lambda: edited(signed(), _set("signatures", {})), "malformed", "signatures"),
    Bad(
        "nine signatures",
        lambda: edited(signed(), lambda d: d["signatures"].extend(d["signatures"] * 8)),
        "malformed",
        "signatures",
    ),
    Bad(
        "keyid missing",
        lambda: edited(signed(), lambda d: d["signatures"][0].pop("keyid")),
        "malformed",
        "signatures[0].keyid",
    ),
    Bad("sig not base64", lambda: edited(signed(), _set_sig("sig", "%%%")), "malformed", "signatures[0].sig"),
    Bad("sig not 64 bytes", lambda: edited(signed(), _set_sig("sig", "AAAA")), "malformed", "signatures[0].sig"),
    Bad("unknown key", lambda: signed(key=STRANGER, key_id="stranger"), "unknown_key", "signatures[0].keyid"),
    Bad("bad signature", lambda: edited(signed(), _flip_sig), "bad_signature", "signatures[0].sig"),
    Bad(
        "another key under a trusted key id",
        lambda: signed(key=STRANGER, key_id="op"),
        "bad_signature",
        "signatures[0].sig",
    ),
    Bad("body swapped after signing", lambda: edited(signed(), _other_body), "bad_signature", "signatures[0].sig"),
    Bad(
        "payloadType swapped after signing (it is signed)",
        lambda: edited(signed(kind=CONFIG_TYPE), _set("payloadType", COMMAND_TYPE)),
        "bad_signature",
        "signatures[0].sig",
    ),
    Bad("a config verified as a command", lambda: signed(kind=CONFIG_TYPE), "wrong_type", "payloadType"),
    Bad("key lacking the scope", lambda: signed(key=READER, key_id="reader"), "scope", "signatures[0].keyid"),
    _in_body("missing target", "malformed", "target", target=DROP),
    _in_body("target not text", "malformed", "target", target=["gw-1"]),
    _in_body("another gateway", "wrong_target", "target", target="gw-2"),
    _in_body("a group not ours", "wrong_target", "target", target="group:south"),
    _in_body("a group named without group:", "wrong_target", "target", target="north"),
    _in_body("missing issued_at", "malformed", "issued_at", issued_at=DROP),
    _in_body("issued_at without a zone", "malformed", "issued_at", issued_at="2025-06-01T12:00:00"),
    _in_body("missing expires_at", "malformed", "expires_at", expires_at=DROP),
    _in_body("expires_at not a date", "malformed", "expires_at", expires_at="tomorrow"),
    _in_body("expires_at a number", "malformed", "expires_at", expires_at=1748779200),
    _in_body("expires_at on 30 February", "malformed", "expires_at", expires_at="2025-02-30T00:00:00Z"),
    _in_body("nonce missing", "malformed", "nonce", nonce=DROP),
    _in_body("nonce too short", "malformed", "nonce", nonce="abc"),
    Bad("clock unsynced", lambda: signed(), "clock_unsynced", None, {"clock_synced": False}),
    _in_body("issued in the future", "not_yet_valid", "issued_at", now=later(600)),
    _in_body("expired", "expired", "expires_at", now=later(-7200)),
    _in_body("expired a second ago", "expired", "expires_at", now=later(-3601)),
    _in_body("a life over 30 days", "malformed", "expires_at", expires_at="2025-07-02T12:00:00Z"),
    _in_body(
        "expiring before its issue",
        "malformed",
        "expires_at",
        issued_at="2025-06-01T12:04:00Z",
        expires_at="2025-06-01T12:02:00Z",
    ),
]


@pytest.mark.parametrize("bad", BAD, ids=[b.name for b in BAD])
def test_a_bad_envelope_is_refused_with_its_code_and_field(bad: Bad) -> None:
    data = bad.data()
    started = time.monotonic()
    with pytest.raises(Refused) as refused:
        check(data, **bad.overrides)
    assert time.monotonic() - started < 1.0, "refusing must not take long"
    assert (refused.value.code, refused.value.field) == (bad.code, bad.field), refused.value
    assert str(refused.value) == f"{bad.code}: {refused.value.message}"
    if bad.field is not None:
        assert bad.field in refused.value.message  # the message names the field for the operator


def test_the_table_covers_every_reason_but_replay() -> None:
    # replay needs a second delivery: tested below, and in test_nonces.py across a restart
    assert len(BAD) >= 20
    assert {b.code for b in BAD} | {"replayed"} == {
        "too_large", "malformed", "unsigned", "unknown_key", "bad_signature", "wrong_type", "scope",
        "wrong_target", "expired", "not_yet_valid", "replayed", "clock_unsynced",
    } == set(CODES)  # fmt: skip


def test_a_signed_command_is_accepted_with_its_fields() -> None:
    nonces = NonceStore(None)
    doc = body(point="active_power")
    verified = check(signed(doc), nonces)
    assert verified.body == doc
    assert verified.payload_type == COMMAND_TYPE
    assert verified.key_id == "op"
    assert verified.nonce == doc["nonce"]
    assert verified.issued_at == NOW
    assert verified.expires_at == later(3600)
    assert len(nonces) == 1


def test_a_config_for_one_of_our_groups_is_accepted() -> None:
    data = signed(body(target="group:north"), kind=CONFIG_TYPE)
    verified = check(data, payload_type=CONFIG_TYPE, scope="config")
    assert verified.body["target"] == "group:north"


def test_a_second_delivery_is_refused_as_a_replay() -> None:
    nonces, data = NonceStore(None), signed()
    check(data, nonces)
    with pytest.raises(Refused) as refused:
        check(data, nonces, now=later(60))
    assert (refused.value.code, refused.value.field) == ("replayed", "payload.nonce")


def test_a_refused_document_leaves_its_nonce_unremembered() -> None:
    nonces, data = NonceStore(None), signed()
    for overrides in ({"gateway": "gw-2"}, {"clock_synced": False}, {"scope": "read"}):
        with pytest.raises(Refused):
            check(data, nonces, **overrides)
    assert len(nonces) == 0
    check(data, nonces)


def test_any_good_signature_with_the_scope_will_do() -> None:
    doc = body()
    raw = json.dumps(doc).encode()
    sigs = [
        ("stranger", STRANGER.sign(pae(COMMAND_TYPE, raw))),
        ("reader", READER.sign(pae(COMMAND_TYPE, raw))),  # verifies, but may not write
        ("op", OPERATOR.sign(pae(COMMAND_TYPE, raw))),
    ]
    assert check(envelope(COMMAND_TYPE, raw, sigs)).key_id == "op"
    assert check(envelope(COMMAND_TYPE, raw, sigs), scope="read").key_id == "reader"


def test_an_unknown_clock_state_judges_by_the_clock() -> None:
    assert check(signed(), clock_synced=None).key_id == "op"


def test_issued_a_little_ahead_of_our_clock_is_accepted() -> None:
    check(signed(body(now=later(299))))  # within the 5 minutes of skew allowed


def test_make_body_fills_the_reserved_fields() -> None:
    doc = make_body(target="group:north", ttl=90, fields={"command": "ping"}, now=NOW + timedelta(microseconds=5))
    assert doc["issued_at"] == "2025-06-01T12:00:00Z"
    assert doc["expires_at"] == "2025-06-01T12:01:30Z"
    assert len(doc["nonce"]) == 32 and int(doc["nonce"], 16) >= 0
    assert doc["nonce"] != make_body(target="x", ttl=90, fields={})["nonce"]
    assert doc["command"] == "ping"


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"ttl": 0.5}, "ttl"),
        ({"ttl": 31 * 86400}, "ttl"),
        ({"target": ""}, "target"),
        ({"fields": {"nonce": "x"}}, "nonce"),
    ],
)
def test_make_body_refuses_what_verify_would(kwargs: dict[str, Any], problem: str) -> None:
    args: dict[str, Any] = {"target": GATEWAY, "ttl": 60, "fields": {}} | kwargs
    with pytest.raises(ValueError, match=problem):
        make_body(**args)


def test_sign_refuses_what_no_gateway_would_accept() -> None:
    with pytest.raises(ValueError, match="over the"):
        sign(COMMAND_TYPE, body(blob="x" * MAX_ENVELOPE_BYTES), OPERATOR, "op")


@pytest.mark.parametrize(
    ("public_key", "scopes", "problem"),
    [
        ("rsa:AAAA", ["read"], "must start with 'ed25519:'"),
        ("ed25519:***", ["read"], "not base64"),
        ("ed25519:" + base64.b64encode(b"x" * 31).decode(), ["read"], "32 bytes, this one is 31"),
        (None, ["reboot"], "unknown scope.*'reboot'"),
        (None, "read", "a list of scopes"),
    ],
)
def test_a_trusted_key_is_refused_by_what_is_wrong(public_key: str | None, scopes: Any, problem: str) -> None:
    text = public_key or public_text(OPERATOR.public_key())
    with pytest.raises(ValueError, match=problem):
        TrustedKey.from_text("op", text, scopes)
