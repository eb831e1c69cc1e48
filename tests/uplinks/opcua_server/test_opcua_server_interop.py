"""The gateway's OPC UA server against an implementation that is not the agent's own: node-opcua
(npm, pinned in tests/interop/opcua/package-lock.json) as its client.

node (Debian's ``nodejs``) and npm are needed; node-opcua is installed by ``npm ci`` on first use.
A missing node or npm fails these tests, it never skips them.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.contract.events import CROSSWALK_PRESENCE, DEVICE_STATUS, METER_READING
from agent.uplinks.opcua_server.config import OpcUaServerConfig
from agent.uplinks.opcua_server.nodes import NAMESPACE, UNECE_URI, unece_unit_id
from agent.uplinks.opcua_server.server import OpcUaServer
from drivers.modbus.config import ModbusConfig
from tests.conftest import free_port
from tests.modbus_helpers import tcp_unit
from tests.opcua_helpers import NodeScript, node_opcua, run, serving

HMI_PASSWORD = "hmi-pass"  # noqa: S105 - the test server's user
T0 = datetime(2026, 3, 1, 8, 0, 0, 123000, tzinfo=UTC)
READ_ONLY, READ_WRITE = 1, 3  # AccessLevel bits: CurrentRead, CurrentRead | CurrentWrite


def gw(device: str, name: str) -> str:
    """A gateway variable's NodeId, its namespace named by URI as a SCADA configuration does."""
    return f"nsu={NAMESPACE};s=Devices.{device}.{name}"


@pytest.fixture(scope="module")
def node() -> str:
    return node_opcua()


@pytest.fixture(scope="module")
def client_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """node-opcua's own PKI folder: its application certificate is made once for the module."""
    return tmp_path_factory.mktemp("node-opcua-client-pki")


def server_config(tmp_path: Path, policies: list[str], **keys: Any) -> OpcUaServerConfig:
    (tmp_path / "users").write_text(f"scada:{HMI_PASSWORD}\n")
    return OpcUaServerConfig.model_validate({
        "enabled": True, "listen": f"opc.tcp://127.0.0.1:{free_port()}", "security_policies": policies,
        "users_file": "users", "publish_interval": "50ms", **keys,
    }, context={"base_dir": tmp_path})  # fmt: skip


async def feed(server: OpcUaServer) -> None:
    """What a pump's driver reports, as the runtime hands it to the server; returns once it is served."""
    server.update("pump-1", DEVICE_STATUS, {"status": "online"}, T0)
    server.update("pump-1", METER_READING, {"measurements": [
        {"quantity": "voltage", "value": 231.5, "unit": "V", "quality": "good", "phase": "L1"},
        {"quantity": "flow", "value": 10.0, "unit": "m3/h", "quality": "good", "point": "setpoint"},
        {"quantity": "pressure", "value": 4.2, "unit": "bar", "quality": "stale", "point": "p"},
        {"quantity": "counter", "value": None, "unit": "", "quality": "bad", "reason": "BadSensorFailure",
         "point": "c"},
    ]}, T0)  # fmt: skip
    server.update("pump-1", CROSSWALK_PRESENCE, {"area": "north", "count": 4, "max_count": 6}, T0)
    flushes = server.stats["flushes"]
    for _ in range(100):
        if server.stats["flushes"] > flushes and not server._pending:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the server never published the values")


@asynccontextmanager
async def node_client(node: str, pki: Path, endpoint: str, *, policy: str = "None", mode: str = "None",
                      user: str | None = None, password: str = HMI_PASSWORD) -> AsyncIterator[NodeScript]:  # fmt: skip
    """A node-opcua client session (anonymous unless ``user``); its connect answer is ``lines`` id 0."""
    args = ["--endpoint", endpoint, "--pki", str(pki), "--policy", policy, "--mode", mode]
    if user is not None:
        args += ["--user", user, "--password", password]
    client = await NodeScript(node, "client.js", *args).start()
    try:
        await client.wait(lambda line: line.get("id") == 0, "connect answer", timeout=30)
        yield client
    finally:
        await client.close()


def connected(client: NodeScript) -> dict[str, Any]:
    answer = next(line for line in client.lines if line.get("id") == 0)
    assert answer["ok"], f"node-opcua could not connect: {answer}\n{client.log()[-2000:]}"
    return answer


def refused(client: NodeScript) -> str:
    answer = next(line for line in client.lines if line.get("id") == 0)
    assert not answer["ok"], f"node-opcua connected where it should have been refused: {answer}"
    return str(answer["code"])


def test_node_opcua_browses_reads_units_timestamps_and_status_and_subscribes(
    node: str, client_pki: Path, tmp_path: Path
) -> None:
    config = server_config(tmp_path, ["None"])

    async def body() -> None:
        server = OpcUaServer(config)
        await server.start()
        try:
            await feed(server)
            async with node_client(node, client_pki, config.listen, user="scada") as client:
                connected(client)
                tree = await client.request("browse", path=["Gateway", "Devices", "pump-1"])
                assert tree["ok"], tree
                types = {c["name"]: (c["nodeClass"], c.get("dataType")) for c in tree["children"]}
                assert types == {"status": ("Variable", "String"), "voltage_L1": ("Variable", "Double"),
                                 "setpoint": ("Variable", "Double"), "p": ("Variable", "Double"),
                                 "c": ("Variable", "Double"), "area_north": ("Variable", "Int64")}, types  # fmt: skip
                names = ("voltage_L1", "p", "c", "status", "area_north")
                read = await client.request("read", nodes=[gw("pump-1", n) for n in names], properties=True)
                assert read["ok"], read
                volt, p, c, status, area = read["results"]
                assert (area["value"], area["dataType"]) == (4, "Int64")
                assert (volt["value"], volt["dataType"], volt["status"]) == (231.5, "Double", "Good")
                assert volt["sourceTimestamp"] == "2026-03-01T08:00:00.123Z", "the reading's time is the source time"
                assert volt["serverTimestamp"] is not None
                eu = volt["properties"]["EngineeringUnits"]
                assert (eu["namespaceUri"], eu["unitId"], eu["displayName"]) == (UNECE_URI, unece_unit_id("VLT"), "V")
                assert eu["qualifiedNamespace"] == 0, "the standard property's browse name is in namespace 0"
                assert (p["value"], p["status"]) == (4.2, "UncertainLastUsableValue")
                assert (c["value"], c["status"]) == (None, "BadSensorFailure")
                assert (status["value"], status["dataType"]) == ("online", "String")
                sub = await client.request("subscribe", nodes=[gw("pump-1", "voltage_L1")], interval=50)
                assert sub["ok"], sub
                await client.wait(lambda line: line.get("event") == "change" and line["value"] == 231.5, "first value")
                server.update("pump-1", METER_READING, {"measurements": [
                    {"quantity": "voltage", "value": 229.0, "unit": "V", "quality": "good", "phase": "L1"}]},
                    T0 + timedelta(seconds=1))  # fmt: skip
                change = await client.wait(lambda line: line.get("event") == "change" and line["value"] == 229.0,
                                           "the new value")  # fmt: skip
                assert (change["status"], change["sourceTimestamp"]) == ("Good", "2026-03-01T08:00:01.123Z")
                server.update("pump-1", DEVICE_STATUS, {"status": "offline"}, T0 + timedelta(seconds=2))
                stale = await client.wait(lambda line: line.get("event") == "change" and line["status"] != "Good",
                                          "the value turning uncertain")  # fmt: skip
                assert (stale["value"], stale["status"]) == (229.0, "UncertainLastUsableValue")
        finally:
            await server.stop()

    run(body)


def test_none_endpoint_next_to_a_secure_one_takes_clients_and_the_secure_one_only_trusted_ones(
    node: str, client_pki: Path, tmp_path: Path
) -> None:
    """Both policies offered at once. node-opcua sends its application certificate in CreateSession
    even on the None endpoint: there it plays no part (Part 4, 5.7.2: the Server shall ignore it),
    so it is neither refused nor saved as a rejected client. On the secure endpoint it is the
    client's identity: refused until trusted, then accepted with a user login."""
    config = server_config(tmp_path, ["None", "Basic256Sha256_SignAndEncrypt"], allow_anonymous=True,
                           cert_dir="pki", writable=[{"device": "pump-1", "point": "setpoint"}])  # fmt: skip
    rejected = tmp_path / "pki" / "rejected-clients"

    async def body() -> None:
        async with serving(config) as (server, writes):
            await feed(server)
            for user in (None, "scada"):
                async with node_client(node, client_pki, config.listen, user=user) as client:
                    assert connected(client)["mode"] == "None"
                    read = await client.request("read", nodes=[gw("pump-1", "voltage_L1")])
                    assert read["ok"] and read["results"][0]["value"] == 231.5, read
                    if user is not None:
                        wrote = await client.request("write", items=[
                            {"node": gw("pump-1", "setpoint"), "type": "Double", "value": 12.5}])  # fmt: skip
                        assert wrote["results"] == ["Good"], wrote
            assert writes == [("pump-1", "setpoint", 12.5)]
            assert not rejected.exists() or not list(rejected.iterdir()), "nothing is rejected on the None endpoint"

            secure = {"policy": "Basic256Sha256", "mode": "SignAndEncrypt", "user": "scada"}
            async with node_client(node, client_pki, config.listen, **secure) as client:
                assert refused(client) == "BadCertificateUntrusted"
                cert = next(line for line in client.lines if line.get("event") == "certificate")
            saved = rejected / f"{cert['thumbprint']}.der"
            assert saved.is_file(), list(rejected.iterdir())
            assert hashlib.sha1(saved.read_bytes(), usedforsecurity=False).hexdigest().upper() == cert["thumbprint"]
            saved.rename(tmp_path / "pki" / "trusted-clients" / saved.name)  # what the operator does
            async with node_client(node, client_pki, config.listen, **secure) as client:
                assert connected(client)["mode"] == "SignAndEncrypt"
                read = await client.request("read", nodes=[gw("pump-1", "voltage_L1")])
                assert read["results"][0]["value"] == 231.5, read
                wrote = await client.request("write", items=[
                    {"node": gw("pump-1", "setpoint"), "type": "Double", "value": 13.0}])  # fmt: skip
                assert wrote["results"] == ["Good"], wrote
            assert writes[-1] == ("pump-1", "setpoint", 13.0)

    run(body)


def test_anonymous_sessions_see_read_only_points_and_get_a_status_per_node(
    node: str, client_pki: Path, tmp_path: Path
) -> None:
    """An anonymous session may read: UserAccessLevel says so, and a Write is answered per node."""
    config = server_config(
        tmp_path, ["None"], allow_anonymous=True, writable=[{"device": "pump-1", "point": "setpoint"}]
    )

    async def body() -> None:
        async with serving(config) as (server, writes):
            await feed(server)
            async with node_client(node, client_pki, config.listen) as anonymous:
                connected(anonymous)
                read = await anonymous.request("read", nodes=[gw("pump-1", "setpoint"), gw("pump-1", "voltage_L1")])
                setpoint, volt = read["results"]
                assert (setpoint["accessLevel"], setpoint["userAccessLevel"]) == (READ_WRITE, READ_ONLY), setpoint
                assert (volt["accessLevel"], volt["userAccessLevel"]) == (READ_ONLY, READ_ONLY), volt
                wrote = await anonymous.request("write", items=[
                    {"node": gw("pump-1", "setpoint"), "type": "Double", "value": 12.5},
                    {"node": gw("pump-1", "voltage_L1"), "type": "Double", "value": 1.0},
                ])  # fmt: skip
                assert wrote["ok"], f"the Write request failed as a whole: {wrote}"
                assert wrote["results"] == ["BadUserAccessDenied", "BadNotWritable"]
                again = await anonymous.request("read", nodes=[gw("pump-1", "setpoint")])
                assert again["results"][0]["value"] == 10.0
            async with node_client(node, client_pki, config.listen, user="scada") as user:
                read = await user.request("read", nodes=[gw("pump-1", "setpoint"), gw("pump-1", "voltage_L1")])
                assert [r["userAccessLevel"] for r in read["results"]] == [READ_WRITE, READ_ONLY]
            assert writes == []
            assert server.stats["refused_writes"] == 2

    run(body)


def test_points_not_declared_writable_answer_bad_not_writable(node: str, client_pki: Path, tmp_path: Path) -> None:
    """BadNotWritable (AccessLevel has no CurrentWrite) is what clients expect for a read-only value;
    BadUserAccessDenied would tell the operator to log in as someone else."""
    config = server_config(tmp_path, ["None"], writable=[{"device": "pump-1", "point": "setpoint"}])

    async def body() -> None:
        async with serving(config) as (server, writes):
            await feed(server)
            async with node_client(node, client_pki, config.listen, user="scada") as client:
                connected(client)
                wrote = await client.request("write", items=[
                    {"node": gw("pump-1", "voltage_L1"), "type": "Double", "value": 1.0},
                    {"node": gw("pump-1", "setpoint"), "type": "Double", "value": 12.5},
                    {"node": gw("pump-1", "status"), "type": "String", "value": "offline"},
                    {"node": gw("pump-1", "nothing"), "type": "Double", "value": 1.0},
                ])  # fmt: skip
                assert wrote["results"] == ["BadNotWritable", "Good", "BadNotWritable", "BadNodeIdUnknown"], wrote
            assert writes == [("pump-1", "setpoint", 12.5)]

    run(body)


def test_a_modbus_coil_is_a_boolean_that_node_opcua_writes_as_one(node: str, client_pki: Path, tmp_path: Path) -> None:
    """A real coil: the Modbus driver polls a simulated unit, the server serves its events, and the
    operator's Boolean write goes back through the driver as function 05."""
    coil = {"name": "run", "table": "coil", "address": 5, "type": "bool", "quantity": "digital_input", "writable": True}
    volts = {"name": "volts", "table": "holding", "address": 10, "type": "uint16", "scale": 0.1, "quantity": "voltage"}
    config = server_config(tmp_path, ["None"], writable=[{"device": "relay-1", "point": "run"}])

    def modbus(port: int) -> ModbusConfig:
        return ModbusConfig.model_validate({"id": "relay-1", "driver": "modbus", "host": "127.0.0.1", "port": port,
                                            "timeout": "300ms", "points": [coil, volts]})  # fmt: skip

    async def body() -> None:
        async with tcp_unit(modbus) as (driver, unit, _sim):
            unit.set(driver.config.points[0], 1)

            async def poll() -> None:
                for reading in await driver.poll(driver.requests) or []:
                    server.update("relay-1", reading.type, reading.data, reading.time)

            async def on_write(device: str, point: str, value: Any) -> None:
                assert device == "relay-1"
                await driver.write(point, value)
                await poll()

            server = OpcUaServer(config, on_write=on_write)
            await server.start()
            try:
                await poll()
                await asyncio.sleep(0.2)
                async with node_client(node, client_pki, config.listen, user="scada") as client:
                    connected(client)
                    tree = await client.request("browse", path=["Gateway", "Devices", "relay-1"])
                    types = {c["name"]: c["dataType"] for c in tree["children"]}
                    assert types == {"run": "Boolean", "volts": "Double"}, types
                    read = await client.request("read", nodes=[gw("relay-1", "run")])
                    assert (read["results"][0]["value"], read["results"][0]["dataType"]) == (True, "Boolean")
                    wrote = await client.request("write", items=[
                        {"node": gw("relay-1", "run"), "type": "Boolean", "value": False}])  # fmt: skip
                    assert wrote["results"] == ["Good"], wrote
                    assert unit.writes == [(5, 5, [False])], "function 05 switched the coil off"
                    await asyncio.sleep(0.2)
                    read = await client.request("read", nodes=[gw("relay-1", "run")])
                    assert read["results"][0]["value"] is False
                    wrong = await client.request("write", items=[
                        {"node": gw("relay-1", "run"), "type": "Double", "value": 1.0}])  # fmt: skip
                    assert wrong["results"] == ["BadTypeMismatch"], "a variable takes its own data type"
            finally:
                await server.stop()

    run(body)
