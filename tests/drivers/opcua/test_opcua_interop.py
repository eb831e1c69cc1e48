"""The ``opcua`` driver against an implementation that is not the agent's own: node-opcua (npm,
pinned in tests/interop/opcua/package-lock.json) as a PLC. node-opcua as a client of the gateway's
server is in tests/uplinks/opcua_server.

node (Debian's ``nodejs``) and npm are needed; node-opcua is installed by ``npm ci`` on first use.
A missing node or npm fails these tests, it never skips them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua

from agent.contract.events import DEVICE_STATUS, METER_READING, Reading
from agent.devices.runner import DeviceRunner
from agent.protocols.opcua_certs import ensure_certificate
from drivers.opcua import PLUGIN
from drivers.opcua.config import OpcUaConfig
from drivers.opcua.driver import OpcUaDriver
from tests.conftest import free_port
from tests.opcua_helpers import NodeScript, Recorder, node_opcua, run


@pytest.fixture(scope="module")
def node() -> str:
    return node_opcua()


# ---- node-opcua as a PLC for the opcua driver ---------------------------------------------------

PLC_PASSWORD = "plc-secret"  # noqa: S105 - the node-opcua PLC's test user


@asynccontextmanager
async def node_plc(node: str, pki: Path, port: int, *, user: str | None = None) -> AsyncIterator[NodeScript]:
    """server.js on ``port``: Objects/PLC/{Flow, Pressure, Energy, Running} in its namespace (ns=1)."""
    args = ["--port", str(port), "--pki", str(pki)]
    if user is not None:
        args += ["--user", user, "--password", PLC_PASSWORD]
    plc = await NodeScript(node, "server.js", *args).start()
    try:
        await plc.wait(lambda line: line.get("event") == "listening", "listening line", timeout=30)
        yield plc
    finally:
        await plc.close()


async def plc_set(plc: NodeScript, name: str, value: Any, status: str = "Good", when: datetime | None = None) -> None:
    answer = await plc.request("set", node=name, value=value, status=status,
                               sourceTimestamp=when.isoformat() if when else None)  # fmt: skip
    assert answer["ok"], answer


def meter(readings: list[Reading], point: str) -> list[tuple[Reading, dict[str, Any]]]:
    return [(r, m) for r in readings if r.type == METER_READING for m in r.data["measurements"] if m["point"] == point]


async def until(predicate: Callable[[], Any], what: str, timeout: float = 10) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (found := predicate()):
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return found


def test_driver_subscribes_to_a_node_opcua_plc_over_signandencrypt_with_a_login(
    node: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Values, source timestamps, quality from status codes, the EURange of a real AnalogItem, a
    browse path; Basic256Sha256 SignAndEncrypt with a user login."""
    ensure_certificate(tmp_path / "gateway")
    (tmp_path / "password").write_text(PLC_PASSWORD + "\n")
    port = free_port()
    config = OpcUaConfig.model_validate({
        "id": "plc", "driver": "opcua", "endpoint": f"opc.tcp://127.0.0.1:{port}", "interval": "100ms",
        "timeout": "3s", "security_policy": "Basic256Sha256", "security_mode": "SignAndEncrypt",
        "cert_dir": str(tmp_path / "gateway"), "username": "op", "password_file": str(tmp_path / "password"),
        "points": [
            {"name": "flow", "node": "ns=1;s=PLC.Flow", "quantity": "flow",
             "deadband": {"type": "percent", "value": 2}},
            {"name": "pressure", "node": "ns=1;s=PLC.Pressure", "quantity": "pressure"},
            {"name": "energy", "node": "0:Objects/1:PLC/1:Energy", "quantity": "active_energy"},
            {"name": "running", "node": "ns=1;s=PLC.Running", "bay": "P-01"},
        ],
    })  # fmt: skip
    readings: list[Reading] = []

    async def collect(driver: OpcUaDriver) -> None:
        async for batch in driver.stream():
            readings.extend(batch)

    async def body() -> None:
        async with node_plc(node, tmp_path / "plc-pki", port, user="op") as plc:
            driver = OpcUaDriver(config, Recorder())
            await driver.start()
            task = asyncio.create_task(collect(driver))
            try:
                assert driver.session is not None
                assert driver.session.client.security_policy.Mode == ua.MessageSecurityMode.SignAndEncrypt
                await until(
                    lambda: (
                        {"flow", "pressure", "energy"} <= {m["point"] for _, m in meter(readings, "")}
                        or all(meter(readings, p) for p in ("flow", "pressure", "energy"))
                    ),
                    "initial values",
                )
                assert [m["value"] for _, m in meter(readings, "flow")][:1] == [40.0]
                assert [m["value"] for _, m in meter(readings, "energy")][:1] == [1000.0]
                stamp = datetime(2026, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)
                await plc_set(plc, "Flow", 50.0, when=stamp)
                reading, m = (await until(lambda: [x for x in meter(readings, "flow") if x[1]["value"] == 50.0],
                                          "flow 50"))[-1]  # fmt: skip
                assert reading.time == stamp, "the event's time is the PLC's source timestamp"
                assert m == {"quantity": "flow", "value": 50.0, "unit": "m3/h", "quality": "good", "point": "flow"}
                for value in (52.0, 53.5, 60.0):  # 2% of EURange 0..200 is 4: only 60 is reported
                    await plc_set(plc, "Flow", value)
                    await asyncio.sleep(0.25)
                await until(lambda: [x for x in meter(readings, "flow") if x[1]["value"] == 60.0], "flow 60")
                flows = [m["value"] for _, m in meter(readings, "flow")]
                assert flows[flows.index(50.0) :] == [50.0, 60.0]
                await plc_set(plc, "Pressure", 3.5, status="UncertainLastUsableValue")
                _, m = (await until(lambda: [x for x in meter(readings, "pressure") if x[1]["quality"] == "stale"],
                                    "uncertain pressure"))[-1]  # fmt: skip
                assert (m["value"], m["reason"]) == (3.5, "UncertainLastUsableValue")
                await plc_set(plc, "Pressure", None, status="BadSensorFailure")
                _, m = (await until(lambda: [x for x in meter(readings, "pressure") if x[1]["quality"] == "bad"],
                                    "bad pressure"))[-1]  # fmt: skip
                assert (m["value"], m["reason"]) == (None, "BadSensorFailure")
                await plc_set(plc, "Running", False)
                bays = await until(lambda: [r for r in readings if r.type == "city.parking.occupancy"
                                            and r.data["occupied"] is False], "the bay freed")  # fmt: skip
                assert bays[-1].data["bay"] == "P-01"
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await driver.stop()

    with caplog.at_level(logging.INFO, logger="drivers.opcua"):
        run(body)
    assert "point 'flow': 2% deadband of EURange 0..200 = 4 m3/h, applied by the gateway" in caplog.text


@pytest.mark.timeout(240)  # above run()'s own 180 s cap, which is above the sum of the waits' bounds
def test_driver_reports_a_node_opcua_plc_restart_offline_then_online(node: str, tmp_path: Path) -> None:
    """The PLC process is killed and started again on the same port: the device goes offline, then
    online with the subscription re-created, and later changes arrive in order."""
    port = free_port()
    config = OpcUaConfig.model_validate({
        "id": "plc", "driver": "opcua", "endpoint": f"opc.tcp://127.0.0.1:{port}", "interval": "50ms",
        "queue_size": 100, "watchdog": "500ms", "timeout": "1s", "reconnect_min": "200ms", "reconnect_max": "1s",
        "offline_after": 2, "points": [{"name": "energy", "node": "ns=1;s=PLC.Energy", "quantity": "counter"}],
    })  # fmt: skip
    emitted: list[Reading] = []

    def status() -> list[str]:
        return [r.data["status"] for r in emitted if r.type == DEVICE_STATUS]

    def counters() -> list[float]:
        return [m["value"] for _, m in meter(emitted, "energy") if m["quality"] == "good"]

    async def body() -> None:
        runner = DeviceRunner(config, PLUGIN, lambda _device, reading: emitted.append(reading))
        async with node_plc(node, tmp_path / "plc-pki", port) as first:
            task = asyncio.create_task(runner.run())
            try:
                await until(lambda: status() == ["online"] and counters() == [1000.0], "online", 20)
                first.kill()  # a PLC that loses power
                await until(lambda: status()[-1:] == ["offline"], "offline", 20)
                seen = len(counters())
                async with node_plc(node, tmp_path / "plc-pki", port) as second:
                    # online, and the new subscription's first value: the new PLC's 1000.0
                    await until(
                        lambda: status()[-1:] == ["online"] and counters()[seen:] == [1000.0], "online again", 20
                    )
                    before = len(counters())
                    for n in range(1, 11):  # node-opcua samples every 50 ms (the sampling interval asked for)
                        await plc_set(second, "Energy", float(n))
                        await asyncio.sleep(0.15)
                    await until(lambda: counters()[-1:] == [10.0], "the last change")
                    assert counters()[before:] == [float(n) for n in range(1, 11)]
                    assert status() == ["online", "offline", "online"]
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    # Above the sum of the waits' own bounds (two node-opcua starts of up to 30 s each, 20 s per
    # state): each wait names what did not come; the overall cap only stops a hang.
    run(body, timeout=180)
