"""A live change leaves within 2 s while a backlog longer than the edge node's read-ahead drains:
the edge node on the agent's own store file (its feed's live lane) against a real Mosquitto.

The read-ahead is made small here (QUEUE_CAP) so the backlog cannot be held in memory whole:
behind a single cursor the live reading would wait for the drain to reach it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.contract.data import measurement, meter_reading
from agent.contract.events import GATEWAY_HEALTH, GATEWAY_STREAM, Priority, Reading
from agent.errors import DriverWriteError
from agent.store import event_store
from agent.store.event_store import EventStore
from agent.store.outbox import Outbox
from agent.uplinks import api
from agent.uplinks.sparkplug import forward
from agent.uplinks.sparkplug.config import SparkplugConfig
from agent.uplinks.sparkplug.uplink import SparkplugUplink
from tests.conftest import Mosquitto
from tests.uplinks.sparkplug.helpers import GROUP, Recorder

BACKLOG = 4500  # readings of 4 metrics: 18,000 metrics, 36 payloads, 3.6 s of paced drain
READ_AHEAD = 2000  # metrics (the first read, 500 rows, is 2,000): behind one cursor the live one would wait ~3 s
LIVE_VALUE = 4242.5


class NoWrites:
    """The core's inbound side, for a test that sends no command."""

    async def write(self, device: str, point: str, value: Any, *, origin: str) -> None:
        raise DriverWriteError("no device takes writes in this test", "unavailable")

    async def command(self, command: api.Command) -> api.Reply:
        return api.Reply("unsupported")

    async def request(self, name: str, request_id: str, data: bytes, *, origin: str) -> api.Reply:
        return api.Reply("unsupported")

    def refused(self, code: str, *, origin: str) -> None:
        pass

    async def document(self, kind: str, data: bytes, *, origin: str) -> None:
        pass


def _reading(value: float, at: datetime) -> Reading:
    return Reading("city.meter.reading", meter_reading([
        measurement("voltage", value, "V", point=f"voltage_l{phase}") for phase in (1, 2, 3)
    ] + [measurement("frequency", 50.0, "Hz", point="frequency")]), at)  # fmt: skip


def stamps(messages: list[Any]) -> set[int]:
    return {metric.timestamp for m in messages for metric in m.payload.metrics}


def _millis(at: datetime) -> int:
    return int(at.timestamp() * 1000)


async def _until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return found


def _config(port: int) -> SparkplugConfig:
    return SparkplugConfig.model_validate({"enabled": True, "group_id": GROUP, "keepalive": "1s",
                                           "servers": [{"host": "127.0.0.1", "port": port}]})  # fmt: skip


@asynccontextmanager
async def _edge_node(config: SparkplugConfig, store: EventStore, state: Path) -> AsyncIterator[SparkplugUplink]:
    """The edge node running on the store's feed; stopped (with its goodbye) afterwards."""
    uplink = SparkplugUplink(config, api.UplinkContext("sparkplug", "Sparkplug", "gw-test", NoWrites(), state))
    task = asyncio.create_task(uplink.run(store.feeds["sparkplug"]))
    try:
        yield uplink
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await uplink.goodbye()


def test_a_live_change_leaves_within_2s_while_the_backlog_drains(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(forward, "QUEUE_CAP", READ_AHEAD)
    broker = Mosquitto(tmp_path)
    broker.start()
    rec = Recorder(broker.port)
    config = _config(broker.port)
    start = datetime.now(UTC) - timedelta(hours=1)
    history = {_millis(start + timedelta(seconds=i)) for i in range(BACKLOG)}

    def historical_ddata() -> list[Any]:
        return [m for m in rec.of("DDATA", "meter-1") if m.payload.metrics[0].is_historical]

    async def run() -> tuple[float, int, set[int]]:
        store = EventStore({"sparkplug": lambda: Outbox(tmp_path / "spb.db", 1 << 30)}, gateway="gw-test")
        await store.open()
        for i in range(BACKLOG):  # an outage's worth, accepted before the session
            store.submit("meter-1", _reading(float(i), start + timedelta(seconds=i)), Priority.TELEMETRY)
        await store.flush()
        try:
            async with _edge_node(config, store, tmp_path):
                await _until(historical_ddata, 10, "the backlog's first historical DDATA")
                live_at = datetime.now(UTC)
                sent = time.monotonic()
                store.submit("meter-1", _reading(LIVE_VALUE, live_at), Priority.TELEMETRY)
                await store.flush()

                def live() -> list[Any]:
                    return [m for m in rec.of("DDATA", "meter-1") if not m.payload.metrics[0].is_historical
                            and m.payload.metrics[0].timestamp == _millis(live_at)]  # fmt: skip

                arrived = (await _until(live, 5, "the live DDATA"))[0]
                latency = arrived.at - sent
                # Nothing lost: every historical reading arrives, and once confirmed leaves the buffer.
                await _until(lambda: history <= stamps(historical_ddata()), 10, "every historical reading")
                after = len([m for m in historical_ddata() if m.at > arrived.at])
                feed = store.feeds["sparkplug"]
                deadline = time.monotonic() + 5
                while (await feed.stats()).rows and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                final = await feed.stats()
                assert (final.rows, final.accepted, final.delivered, final.dropped) == (0, BACKLOG + 1, BACKLOG + 1, 0)
                return latency, after, stamps(historical_ddata())
        finally:
            await store.close()

    try:
        latency, after, seen = asyncio.run(run())
    finally:
        rec.close()
        broker.stop()
    assert latency <= 2.0, f"the live change took {latency:.2f} s"
    assert after >= 1, "the live change overtook the backlog (historical DDATA still followed it)"
    assert history <= seen


def test_readings_still_queued_for_a_commit_are_in_the_births(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reading taken just before the BIRTHs but not yet committed (the store groups commits) is
    the BIRTH's current value, not a DATA after a BIRTH that said null or an older value."""
    monkeypatch.setattr(event_store, "COMMIT_INTERVAL", 0.5)  # commits paced as under load, but slower
    broker = Mosquitto(tmp_path)
    broker.start()
    rec = Recorder(broker.port)
    config = _config(broker.port)
    now = datetime.now(UTC)

    async def run() -> None:
        store = EventStore({"sparkplug": lambda: Outbox(tmp_path / "spb.db", 1 << 30)}, gateway="gw-test")
        await store.open()
        writer = asyncio.create_task(store.run_writer())
        try:
            store.submit("meter-1", _reading(1.0, now - timedelta(seconds=1)), Priority.TELEMETRY)
            assert await store.settled(), "the first reading is committed at once"
            store.submit("meter-1", _reading(2.0, now), Priority.TELEMETRY)  # waits ~0.5 s for its commit
            store.submit(GATEWAY_STREAM, Reading(GATEWAY_HEALTH, {"uptime_s": 12.5}, now), Priority.TELEMETRY)
            async with _edge_node(config, store, tmp_path):
                await _until(lambda: rec.of("DBIRTH", "meter-1"), 10, "the DBIRTH")
                await asyncio.sleep(0.6)  # a DATA would have followed by now
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await store.close()

    try:
        asyncio.run(run())
    finally:
        rec.close()
        broker.stop()
    nbirth, dbirth = rec.of("NBIRTH")[0].metrics(), rec.of("DBIRTH", "meter-1")[0].metrics()
    assert dbirth["voltage_l1"].double_value == 2.0 and not dbirth["voltage_l1"].is_null
    assert not nbirth["Gateway/uptime_s"].is_null and nbirth["Gateway/uptime_s"].double_value == 12.5
    live = [m for m in rec.of("DDATA", "meter-1") + rec.of("NDATA") if not m.payload.metrics[0].is_historical]
    assert live == [], "the queued readings left as live DATA after the BIRTHs"
