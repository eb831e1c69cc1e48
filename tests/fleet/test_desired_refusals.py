"""Bad desired documents, handled in this process by a real agent's handler (built from a real site
file, never started: a refusal must never reach the reload): each is refused with its reason code
and the field that is wrong, reported, counted, remembered in the state directory, and nothing runs
differently. Real files, real signatures."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.config.model import load_config
from agent.fleet.desired import apply as apply_module
from agent.fleet.desired.apply import DesiredConfig
from agent.fleet.desired.document import sections_hash
from agent.fleet.desired.startup import at_start
from agent.fleet.desired.state import Applied, DesiredState
from agent.fleet.envelope import COMMAND_TYPE, make_body, sign
from agent.observability.logs import RepeatFilter
from agent.runtime.agent import Agent
from tests.fleet.desired_docs import Keys, desired, devices, site

OK = {"devices": devices({"id": "meter-1", "interval": "100ms"})}
LATER = datetime.now(UTC) + timedelta(hours=1)


def _agent(tmp_path: Path, keys: Keys, **kw: Any) -> Agent:
    path = site(tmp_path, 1, keys, **kw)
    return Agent(load_config(path), config_path=path)


def _handle(agent: Agent, data: bytes) -> dict[str, Any]:
    assert agent.desired is not None

    async def run() -> None:
        assert agent.desired is not None
        await agent.desired.handle(data)

    asyncio.run(run())
    body = agent.desired.reporter.body()
    assert body is not None
    return dict(body)


def _unsigned(keys: Keys) -> bytes:
    doc = json.loads(desired(keys, 2, OK))
    doc["signatures"] = []
    return json.dumps(doc).encode()


def _reused_nonce(keys: Keys) -> Callable[[Agent], bytes]:
    """A new document (another version) carrying the nonce of one accepted before."""

    def make(agent: Agent) -> bytes:
        first = make_body(target="gw-test", ttl=3600, fields={"version": 2, "sections": {"gateway": {}}})
        _handle(agent, sign("application/vnd.edge-agent.config+json", first, keys.op, "op"))  # verified, then refused
        again = make_body(target="gw-test", ttl=3600, fields={"version": 3, "sections": OK})
        again["nonce"] = first["nonce"]
        return sign("application/vnd.edge-agent.config+json", again, keys.op, "op")

    return make


def _cases(keys: Keys) -> dict[str, tuple[Any, str, str | None]]:
    """name: (envelope bytes, or a function of the agent making them; code; field)."""
    return {
        "not JSON": (b"this is not json", "malformed", None),
        "empty object": (b"{}", "malformed", "payloadType"),
        "unsigned": (_unsigned(keys), "unsigned", "signatures"),
        "unknown key": (desired(keys, 2, OK, by="stranger"), "unknown_key", "signatures[0].keyid"),
        "bad signature": (desired(keys, 2, OK, by="stranger", key_id="op"), "bad_signature", "signatures[0].sig"),
        "a command on desired": (desired(keys, 2, OK, kind=COMMAND_TYPE), "wrong_type", "payloadType"),
        "key without config": (desired(keys, 2, OK, by="reader"), "scope", "signatures[0].keyid"),
        "another gateway": (desired(keys, 2, OK, target="gw-other"), "wrong_target", "payload.target"),
        "another group": (desired(keys, 2, OK, target="group:south"), "wrong_target", "payload.target"),
        "expired": (
            desired(keys, 2, OK, ttl=60, now=datetime.now(UTC) - timedelta(hours=1)),
            "expired",
            "payload.expires_at",
        ),
        "not yet valid": (desired(keys, 2, OK, now=LATER), "not_yet_valid", "payload.issued_at"),
        "too large": (b"{" + b" " * (256 * 1024), "too_large", None),
        "replayed nonce": (_reused_nonce(keys), "replayed", "payload.nonce"),
        "version text": (desired(keys, "5", OK), "malformed", "payload.version"),
        "version 0": (desired(keys, 0, OK), "malformed", "payload.version"),
        "version true": (desired(keys, True, OK), "malformed", "payload.version"),
        "no sections": (desired(keys, 2, None), "malformed", "payload.sections"),
        "empty sections": (desired(keys, 2, {}), "malformed", "payload.sections"),
        "gateway section": (desired(keys, 2, {"gateway": {"id": "gw-x"}}), "malformed", "payload.sections.gateway"),
        "buffer section": (desired(keys, 2, {"buffer": {"path": "/tmp/x.db"}}), "malformed", "payload.sections.buffer"),
        "unknown section": (desired(keys, 2, {"extras": {}}), "malformed", "payload.sections.extras"),
        "unknown body field": (desired(keys, 2, OK, colour="blue"), "malformed", "payload.colour"),
        "window too short": (desired(keys, 2, OK, health_window=5), "malformed", "payload.health_window"),
        "window too long": (desired(keys, 2, OK, health_window=3601), "malformed", "payload.health_window"),
        "require not bool": (
            desired(keys, 2, OK, require_new_devices="yes"),
            "malformed",
            "payload.require_new_devices",
        ),
        "invalid interval": (
            desired(keys, 2, {"devices": devices({"id": "m1", "interval": "fast"})}),
            "invalid",
            "sections.devices[0].interval",
        ),
        "unknown driver": (
            desired(keys, 2, {"devices": [{"id": "m1", "driver": "warp"}]}),
            "invalid",
            "sections.devices[0].driver",
        ),
        "duplicate ids": (
            desired(keys, 2, {"devices": devices({"id": "m1"}, {"id": "m1"})}),
            "invalid",
            "sections.devices[1].id",
        ),
        "observability typo": (
            desired(keys, 2, {"observability": {"lisen": "127.0.0.1:9"}}),
            "invalid",
            "sections.observability.lisen",
        ),
        "priority unknown": (
            desired(keys, 2, {"priorities": {"city.x": "urgent"}}),
            "invalid",
            "sections.priorities.city.x",
        ),
        "fleet without keys scope": (desired(keys, 2, {"fleet": keys.fleet()}), "scope", "signatures"),
        "fleet turned off": (
            desired(keys, 2, {"fleet": keys.fleet(enabled=False)}, by="keeper"),
            "invalid",
            "sections.fleet.enabled",
        ),
        "fleet root moved": (
            desired(keys, 2, {"fleet": keys.fleet(root="fleet/v2")}, by="keeper"),
            "invalid",
            "sections.fleet.root",
        ),
        "keys lockout": (
            desired(keys, 2, {"fleet": keys.fleet(keys=keys.entries()[2:])}, by="keeper"),
            "keys_lockout",
            "sections.fleet.keys",
        ),
        "uplink port": (
            desired(keys, 2, {"uplink": {"mqtt": {"port": 70000}}}),
            "invalid",
            "sections.uplink.mqtt.port",
        ),
    }


def test_each_bad_document_is_refused_with_its_code_and_field(tmp_path: Path) -> None:
    keys = Keys()
    agent = _agent(tmp_path, keys)
    assert agent.desired is not None
    config = agent.config
    cases = _cases(keys)
    assert len(cases) >= 20
    seen: dict[str, tuple[str, str | None]] = {}
    for name, (data, code, field) in cases.items():
        payload = data(agent) if callable(data) else data
        report = _handle(agent, payload)
        assert report["status"] == "rejected", (name, report)
        first = report["errors"][0]
        seen[name] = (first["code"], first["field"])
        assert (first["code"], first["field"]) == (code, field), (name, report)
        assert first["message"] and report["reason"], (name, report)
        assert report["running"] == {"version": 0}
    assert agent.config is config  # nothing was applied
    assert agent.desired.outcomes["malformed"] >= 10
    assert sum(agent.desired.outcomes.values()) == len(cases) + 1  # + the replayed case's first document
    history = DesiredState(tmp_path / "fleet" / "config").history()
    assert [e["status"] for e in history] == ["rejected"] * len(history) and len(history) == 32  # bounded


def test_a_document_seen_before_is_not_checked_again(tmp_path: Path) -> None:
    """The retained document arrives on every reconnect: the same bytes are not a replay."""
    keys = Keys()
    agent = _agent(tmp_path, keys)
    assert agent.desired is not None
    bad = desired(keys, 2, {"devices": devices({"id": "m1", "interval": "fast"})})
    first = _handle(agent, bad)
    again = _handle(agent, bad)
    assert first["errors"] == again["errors"] and again["errors"][0]["code"] == "invalid"
    assert agent.desired.outcomes == {"invalid": 1}
    # A restart remembers it too: no "replayed" for our own retained document.
    restarted = Agent(load_config(agent.config_path), config_path=agent.config_path)  # type: ignore[arg-type]
    assert _handle(restarted, bad)["errors"][0]["code"] == "invalid"
    assert restarted.desired is not None and not restarted.desired.outcomes


def test_versions_at_or_below_the_applied_one(tmp_path: Path) -> None:
    """Stale below; same version, other content: stale; same version and hash: already applied;
    a rolled-back version: never again."""
    keys = Keys()
    path = site(tmp_path, 1, keys)
    state = DesiredState(tmp_path / "fleet" / "config")
    running = {"devices": devices({"id": "meter-1", "interval": "200ms"})}
    envelope = desired(keys, 5, running)
    state.save_applied(Applied(5, sections_hash(running), running, "0" * 64, envelope))
    state.remember({"digest": "1" * 64, "version": 9, "hash": None, "status": "rolled_back", "reason": "x"})
    agent = Agent(load_config(path), config_path=path)
    assert agent.config.devices[0].interval == 0.2  # the remote section runs from the start
    assert _handle(agent, desired(keys, 4, OK))["errors"][0]["code"] == "stale"
    assert _handle(agent, desired(keys, 5, OK))["errors"][0]["code"] == "stale"
    assert _handle(agent, desired(keys, 9, OK))["errors"][0]["code"] == "rolled_back_before"
    resigned = desired(keys, 5, running)
    report = _handle(agent, resigned)
    assert (report["status"], report["version"], report["hash"]) == ("applied", 5, sections_hash(running))
    applied = state.applied()
    assert applied is not None and applied.envelope == resigned  # the new envelope is the applied one now
    assert _handle(agent, resigned)["status"] == "applied"  # and arriving again is no replay


def test_state_files_are_private_and_a_pending_apply_rolls_back_at_start(tmp_path: Path) -> None:
    keys = Keys()
    path = site(tmp_path, 1, keys)
    state = DesiredState(tmp_path / "fleet" / "config")
    state.save_pending({"version": 8, "hash": "sha256:ab", "digest": "2" * 64})
    config, start = at_start(load_config(path), path)
    assert config.devices[0].interval == 0.1  # the local file: nothing was ever applied
    assert start.report.status == "rolled_back" and start.report.version == 8
    assert start.report.reason == "the agent stopped during the health window"
    assert not state.pending_path.exists()
    assert [e["version"] for e in state.history()] == [8]
    assert (tmp_path / "fleet" / "config").stat().st_mode & 0o777 == 0o700
    assert state.history_path.stat().st_mode & 0o777 == 0o600
    # Killed after the window passed, between writing applied.json and removing pending.json: kept.
    sections = {"devices": devices({"id": "meter-1", "interval": "300ms"})}
    state.save_applied(Applied(9, sections_hash(sections), sections, "3" * 64, b"{}"))
    state.save_pending({"version": 9, "hash": sections_hash(sections), "digest": "3" * 64})
    config, start = at_start(load_config(path), path)
    assert config.devices[0].interval == 0.3 and start.report.status == "applied" and start.running.version == 9
    assert state.applied_path.stat().st_mode & 0o777 == 0o600


def test_a_document_refused_for_the_clock_is_retried_once_it_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = Keys()
    agent = _agent(tmp_path, keys, clock="kernel")
    monkeypatch.setattr(apply_module, "CLOCK_RETRY", 0.05)
    synced = [False]
    _, start = at_start(agent.config, agent.config_path)  # type: ignore[arg-type]
    assert agent.inbound.channel is not None
    handler = DesiredConfig(agent, start, agent.inbound.channel.nonces, clock=lambda: synced[0])
    bad = desired(keys, 2, {"devices": devices({"id": "m1", "interval": "fast"})})

    async def run() -> list[str]:
        await handler.take(bad, "mqtt")
        await handler.idle()
        codes = [handler.reporter.body()["errors"][0]["code"]]  # type: ignore[index]
        synced[0] = True
        for _ in range(100):
            await asyncio.sleep(0.02)
            await handler.idle()
            if handler.outcomes["invalid"]:
                break
        codes.append(handler.reporter.body()["errors"][0]["code"])  # type: ignore[index]
        return codes

    assert asyncio.run(run()) == ["clock_unsynced", "invalid"]  # checked again: this time on its content


def test_a_site_file_fleet_key_can_be_replaced_by_a_keys_signer(tmp_path: Path) -> None:
    """A fleet section signed by a key with scope keys passes every check up to the apply."""
    keys = Keys()
    agent = _agent(tmp_path, keys)
    entries = keys.entries()
    entries[0]["scopes"] = ["config"]
    data = desired(keys, 2, {"fleet": keys.fleet(keys=entries)}, by="keeper")
    assert agent.desired is not None

    async def check() -> Any:
        assert agent.desired is not None
        found = agent.desired._verify(data, "x")
        return await agent.desired._check(found)

    new = asyncio.run(check())
    assert new.fleet.keys[0].scopes == ["config"]


def test_the_envelope_payload_is_what_is_checked(tmp_path: Path) -> None:
    """A valid signature over one body with another body's bytes swapped in never verifies."""
    keys = Keys()
    agent = _agent(tmp_path, keys)
    doc = json.loads(desired(keys, 2, OK))
    body = json.loads(base64.b64decode(doc["payload"]))
    body["sections"] = {"devices": []}
    doc["payload"] = base64.b64encode(json.dumps(body).encode()).decode()
    report = _handle(agent, json.dumps(doc).encode())
    assert report["errors"][0]["code"] == "bad_signature"


def test_every_refused_document_has_its_own_audit_line(tmp_path: Path) -> None:
    """The agent writes a log template once a minute at most (RepeatFilter, burst 1 by default);
    the audit trail must still say something about every document."""
    keys = Keys()
    agent = _agent(tmp_path, keys)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    handler.addFilter(RepeatFilter(window=60, burst=1))
    audit = logging.getLogger("agent.fleet.audit")
    audit.addHandler(handler)
    try:
        for version in (5, 6, 7):
            _handle(agent, desired(keys, version, {"priorities": {}}, by="reader"))  # no config scope
    finally:
        audit.removeHandler(handler)
    assert [line.split(":")[0] for line in lines] == [f"fleet config version {v} refused" for v in (5, 6, 7)], lines
