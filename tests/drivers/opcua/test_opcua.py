"""OPC UA: the driver and the gateway's server against real asyncua servers and clients on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import socket
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pydantic import ValidationError

from agent.contract.events import DEVICE_STATUS, METER_READING, Reading
from agent.contract.schemas import EVENT_MODELS, CloudEvent
from agent.devices.runner import DeviceFailedError, DeviceRunner
from agent.errors import DriverStartupError, DriverWriteError
from agent.protocols.opcua_certs import ensure_certificate
from agent.uplinks.opcua_server.config import OpcUaServerConfig
from agent.uplinks.opcua_server.nodes import NAMESPACE, unece_unit_id
from agent.uplinks.opcua_server.server import OpcUaServer
from agent.uplinks.opcua_server.writes import write_failure_code
from drivers.opcua import PLUGIN
from drivers.opcua.config import OpcUaConfig, PointConfig
from drivers.opcua.driver import OpcUaDriver
from drivers.opcua.mapping import sample_of
from drivers.opcua.simulator import SimulatedPlc
from drivers.opcua.tools import browse_main
from drivers.opcua.uanames import ObjectIds, node_id
from tests.conftest import ROOT, free_port, wait_for, write_config
from tests.opcua_helpers import CertificateLoginPlc, Recorder, ThreadedPlc, make_user_certificate

PASSWORD = "s3cret-pump"  # noqa: S105 - the simulated PLC's test user


def run(coro: Callable[[], Awaitable[None]], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(coro(), timeout))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Certificates shared by the module: generating RSA keys is the slow part of security."""
    base = tmp_path_factory.mktemp("pki")
    ensure_certificate(base / "gateway")
    (base / "password").write_text(PASSWORD + "\n")
    (base / "wrong").write_text("not-the-password\n")
    return {"server": base / "server", "gateway": base / "gateway", "password": base / "password",
            "wrong": base / "wrong"}  # fmt: skip


@pytest.fixture(scope="module")
def plc(pki: dict[str, Path]) -> Iterator[ThreadedPlc]:
    """One simulated PLC for the module: 8 variables (Pump1, Pump2), values changed by the tests."""
    sim = SimulatedPlc(free_port(), variables=8, rate=0, cert_dir=pki["server"], users={"op": PASSWORD},
                       allow_anonymous=True, seed=7)  # fmt: skip
    threaded = ThreadedPlc(sim)
    yield threaded
    threaded.close()


POINTS = [
    {"name": "flow", "node": "ns=2;s=Pump1.Flow", "quantity": "flow", "scale": 2.0},
    {"name": "energy", "node": "0:Objects/2:PLC/2:Pump1/2:Energy", "quantity": "active_energy"},
    {"name": "pressure", "node": "ns=2;s=Pump1.Pressure", "quantity": "pressure"},
    {"name": "running", "node": "ns=2;s=Pump1.Running", "bay": "P-01"},
    {"name": "people", "node": "ns=2;s=Pump2.Pressure", "area": "north"},
]


def device(plc: ThreadedPlc, **keys: Any) -> OpcUaConfig:
    raw = {"id": "plc", "driver": "opcua", "endpoint": plc.plc.endpoint, "interval": "100ms", "timeout": "2s",
           "points": POINTS, **keys}  # fmt: skip
    return OpcUaConfig.model_validate(raw)


def by_point(readings: list[Reading]) -> dict[str, dict[str, Any]]:
    return {m["point"]: m for r in readings if r.type == METER_READING for m in r.data["measurements"]}


class Collector:
    """Runs driver.stream() in a task and keeps every reading it yields."""

    def __init__(self, driver: OpcUaDriver) -> None:
        self.readings: list[Reading] = []
        self.task = asyncio.create_task(self._run(driver))

    async def _run(self, driver: OpcUaDriver) -> None:
        async for batch in driver.stream():
            self.readings += batch

    async def wait(self, predicate: Callable[[list[Reading]], Any], what: str, timeout: float = 10) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            assert not self.task.done(), self.task
            found = predicate(self.readings)
            if found:
                return found
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; got {self.readings[-5:]}")

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def measurement(point: str, predicate: Callable[[dict[str, Any]], bool] = lambda m: True) -> Callable[..., Any]:
    def find(readings: list[Reading]) -> tuple[Reading, dict[str, Any]] | None:
        for r in reversed(readings):
            if r.type == METER_READING:
                for m in r.data["measurements"]:
                    if m["point"] == point and predicate(m):
                        return r, m
        return None

    return find


# ---- the client driver ---------------------------------------------------------------------


def test_subscription_maps_values_source_timestamps_and_quality(plc: ThreadedPlc) -> None:
    async def body() -> None:
        ctx = Recorder()
        driver = OpcUaDriver(device(plc), ctx)
        await driver.start()
        got = Collector(driver)
        try:
            await got.wait(lambda rs: {"flow", "energy", "pressure"} <= set(by_point(rs)), "initial values")
            assert any(r.type == "city.parking.occupancy" for r in got.readings)
            stamp = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
            await plc.acall(plc.plc.set("Pump1.Flow", 12.25, source_time=stamp))
            reading, m = await got.wait(measurement("flow", lambda m: m["value"] == 24.5), "the new flow")
            assert reading.time == stamp.replace(microsecond=123000), "the event time is the source timestamp"
            assert m == {"quantity": "flow", "value": 24.5, "unit": "m3/h", "quality": "good", "point": "flow"}
            await plc.acall(plc.plc.set("Pump1.Pressure", 3.5, status=ua.StatusCodes.UncertainLastUsableValue))
            _, m = await got.wait(measurement("pressure", lambda m: m["quality"] != "good"), "uncertain pressure")
            assert (m["quality"], m["value"], m["reason"]) == ("stale", 3.5, "UncertainLastUsableValue")
            await plc.acall(plc.plc.set("Pump1.Energy", None, status=ua.StatusCodes.BadSensorFailure))
            _, m = await got.wait(measurement("energy", lambda m: m["quality"] != "good"), "bad energy")
            assert (m["quality"], m["value"], m["reason"]) == ("bad", None, "BadSensorFailure")
            await plc.acall(plc.plc.set("Pump1.Running", False))
            bay = await got.wait(lambda rs: [r for r in rs if r.type == "city.parking.occupancy"
                                             and r.data["occupied"] is False], "the bay freed")  # fmt: skip
            assert bay[-1].data["bay"] == "P-01" and bay[-1].data["confidence"] == 1.0
            area = next(r for r in got.readings if r.type == "city.crosswalk.presence")
            assert area.data["area"] == "north" and area.data["count"] == 4
            for r in got.readings:
                EVENT_MODELS[r.type].model_validate(r.data)
                assert r.time is not None and r.time.tzinfo is not None
            assert ctx.outcomes and set(ctx.outcomes) == {"ok"}
        finally:
            await got.stop()
            await driver.stop()
            await plc.acall(plc.plc.set("Pump1.Energy", 1000.0))
            await plc.acall(plc.plc.set("Pump1.Running", True))

    run(body)


def test_poll_mode_reads_with_status_and_client_side_deadband(plc: ThreadedPlc) -> None:
    async def body() -> None:
        ctx = Recorder()
        driver = OpcUaDriver(device(plc, mode="poll", deadband={"value": 1.0}), ctx)
        await driver.start()
        got = Collector(driver)
        try:
            await plc.acall(plc.plc.set("Pump1.Flow", 10.0))
            await got.wait(measurement("flow", lambda m: m["value"] == 20.0), "flow 20")
            await plc.acall(plc.plc.set("Pump1.Flow", 10.2))  # 20.4: inside the 1.0 deadband
            await asyncio.sleep(0.5)
            assert not measurement("flow", lambda m: m["value"] == 20.4)(got.readings)
            await plc.acall(plc.plc.set("Pump1.Flow", 11.0))
            await got.wait(measurement("flow", lambda m: m["value"] == 22.0), "flow 22")
            assert ctx.outcomes.count("ok") >= 5 and set(ctx.outcomes) == {"ok"}, "one ok per poll"
        finally:
            await got.stop()
            await driver.stop()

    run(body)


def test_driver_writes_engineering_values_back_to_the_plc_in_its_data_type(plc: ThreadedPlc) -> None:
    """What the gateway's OPC UA server hands on for an allowed write: scaled back, typed, refused clearly."""

    async def make_writable(name: str) -> None:
        assert plc.plc.server is not None
        await plc.plc.server.get_node(plc.plc.node_id(name)).set_writable()

    async def read_raw(name: str) -> Any:
        assert plc.plc.server is not None
        return await plc.plc.server.get_node(plc.plc.node_id(name)).read_value()

    async def body() -> None:
        driver = OpcUaDriver(device(plc, mode="poll"), Recorder())
        await driver.start()
        try:
            await plc.acall(make_writable("Pump1.Flow"))
            await driver.write("flow", 21.0)  # flow has scale 2.0: the PLC holds 10.5
            assert await plc.acall(read_raw("Pump1.Flow")) == 10.5
            with pytest.raises(DriverWriteError, match=r"the server refused pressure = 3\.0: .*Bad"):
                await driver.write("pressure", 3.0)  # not writable on the PLC
            with pytest.raises(DriverWriteError, match="has no point 'nope'"):
                await driver.write("nope", 1)
        finally:
            await driver.stop()
        with pytest.raises(DriverWriteError, match="cannot be written now: not connected"):
            await driver.write("flow", 1.0)

    run(body)


def test_gateway_certificate_created_on_first_run_and_thumbprint_logged(
    plc: ThreadedPlc, pki: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Basic256Sha256 / SignAndEncrypt with user login; a fresh cert_dir gets a certificate once."""
    cert_dir = tmp_path / "opcua-pki"
    config = device(plc, security_policy="Basic256Sha256", security_mode="SignAndEncrypt", cert_dir=str(cert_dir),
                    username="op", password_file=str(pki["password"]))  # fmt: skip

    async def body() -> None:
        for _ in range(2):
            driver = OpcUaDriver(config, Recorder())
            await driver.start()
            try:
                assert driver.session is not None
                assert driver.session.client.security_policy.Mode == ua.MessageSecurityMode.SignAndEncrypt
                initial = await driver.session.subscribe()
                assert initial == []
            finally:
                await driver.stop()

    with caplog.at_level(logging.INFO, logger="drivers.opcua"):
        run(body)
    der = (cert_dir / "client-cert.der").read_bytes()
    thumb = hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()
    lines = [r.getMessage() for r in caplog.records if "application certificate" in r.getMessage()]
    assert len(lines) == 2 and "created" in lines[0] and "using" in lines[1], lines
    assert all(thumb in line for line in lines)
    assert (cert_dir / "client-key.pem").stat().st_mode & 0o077 == 0, "the private key is private"
    assert PASSWORD not in caplog.text


@pytest.mark.parametrize(
    ("policy", "mode", "login"),
    [("None", "None", "anonymous"), ("Aes128Sha256RsaOaep", "Sign", "user"),
     ("Basic256Sha256", "SignAndEncrypt", "anonymous")],
)  # fmt: skip
def test_security_modes_read_values(plc: ThreadedPlc, pki: dict[str, Path], policy: str, mode: str, login: str) -> None:
    keys: dict[str, Any] = {"security_policy": policy, "security_mode": mode}
    if policy != "None":
        keys["cert_dir"] = str(pki["gateway"])
    if login == "user":
        keys |= {"username": "op", "password_file": str(pki["password"])}

    async def body() -> None:
        driver = OpcUaDriver(device(plc, mode="poll", **keys), Recorder())
        await driver.start()
        try:
            assert driver.session is not None
            expected = {"None": ua.MessageSecurityMode.None_, "Sign": ua.MessageSecurityMode.Sign,
                        "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}[mode]  # fmt: skip
            assert driver.session.client.security_policy.Mode == expected
            samples = await driver.session.poll()
            assert {s.point.name: s.quality for s in samples}["flow"] == "good"
        finally:
            await driver.stop()

    run(body)


def test_wrong_password_is_a_clear_startup_error(plc: ThreadedPlc, pki: dict[str, Path],
                                                 caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    async def body() -> None:
        driver = OpcUaDriver(device(plc, username="op", password_file=str(pki["wrong"])), Recorder())
        with pytest.raises(DriverStartupError) as caught:
            await driver.start()
        assert str(caught.value) == "the server refused user 'op': BadUserAccessDenied; check username/password_file"
        anonymous_refused = SimulatedPlc(free_port(), variables=4, rate=0, users={"op": PASSWORD},
                                         allow_anonymous=False)  # fmt: skip
        await anonymous_refused.start()
        try:
            config = device(plc, endpoint=anonymous_refused.endpoint)
            with pytest.raises(DriverStartupError, match="refused anonymous login: BadIdentityTokenRejected"):
                await OpcUaDriver(config, Recorder()).start()
        finally:
            await anonymous_refused.stop()

    with caplog.at_level(logging.DEBUG):
        run(body)
    assert "not-the-password" not in caplog.text


def test_bad_node_ids_name_the_point_and_the_others_keep_working(
    plc: ThreadedPlc, caplog: pytest.LogCaptureFixture
) -> None:
    points = [POINTS[0], {"name": "ghost", "node": "ns=2;s=Pump9.Flow", "quantity": "flow"},
              {"name": "lost", "node": "0:Objects/2:PLC/2:Pump1/2:Nothing", "quantity": "pressure"}]  # fmt: skip

    async def body() -> None:
        driver = OpcUaDriver(device(plc, points=points), Recorder())
        await driver.start()
        got = Collector(driver)
        try:
            await got.wait(lambda rs: {"ghost", "lost"} <= set(by_point(rs)), "the bad points reported")
            bad = by_point(got.readings)
            assert (bad["ghost"]["quality"], bad["ghost"]["value"], bad["ghost"]["reason"]) == \
                ("bad", None, "BadNodeIdUnknown")  # fmt: skip
            assert bad["lost"]["reason"] == "BadNoMatch"
            await plc.acall(plc.plc.set("Pump1.Flow", 33.0))
            await got.wait(measurement("flow", lambda m: m["value"] == 66.0 and m["quality"] == "good"), "flow")
        finally:
            await got.stop()
            await driver.stop()
        all_bad = device(plc, points=points[1:])
        with pytest.raises(DriverStartupError, match=r"no point can be read: ghost \(ns=2;s=Pump9.Flow\)"):
            await OpcUaDriver(all_bad, Recorder()).start()

    with caplog.at_level(logging.WARNING, logger="drivers.opcua"):
        run(body)
    assert "point 'ghost' (ns=2;s=Pump9.Flow) cannot be read: BadNodeIdUnknown" in caplog.text


def _cert_login_device(plc: CertificateLoginPlc, cert_dir: Path, cert: Path, key: Path, **keys: Any) -> OpcUaConfig:
    assert plc.flow is not None
    return OpcUaConfig.model_validate({
        "id": "cert-plc", "driver": "opcua", "endpoint": plc.endpoint, "interval": "100ms", "timeout": "2s",
        "security_policy": "Basic256Sha256", "security_mode": "SignAndEncrypt", "cert_dir": str(cert_dir),
        "user_certificate": str(cert), "user_private_key": str(key),
        "points": [{"name": "flow", "node": plc.flow.to_string(), "quantity": "flow"}], **keys,
    })  # fmt: skip


def test_certificate_login_with_the_trusted_user_certificate_streams_values(
    tmp_path: Path, pki: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """The server accepts only an X509 identity token with one user certificate (PEM .crt/.key files)."""
    operator = make_user_certificate(tmp_path / "users", "operator")
    plc = CertificateLoginPlc(free_port(), tmp_path / "plc-pki", operator.der)

    async def body() -> None:
        await plc.start()
        driver = OpcUaDriver(_cert_login_device(plc, pki["gateway"], operator.cert, operator.key), Recorder())
        try:
            await driver.start()
            got = Collector(driver)
            try:
                await got.wait(measurement("flow", lambda m: m["value"] == 1.0), "the initial flow")
                await plc.set_flow(17.5)
                _, m = await got.wait(measurement("flow", lambda m: m["value"] == 17.5), "the new flow")
                assert m["quality"] == "good"
            finally:
                await got.stop()
        finally:
            await driver.stop()
            await plc.stop()

    with caplog.at_level(logging.INFO, logger="drivers.opcua"):
        run(body)
    der = operator.der.read_bytes()
    thumb = hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()
    assert f"OPC UA certificate login with {operator.cert}, SHA-1 thumbprint {thumb}" in caplog.text


def test_unknown_user_certificate_is_refused_naming_the_device_and_the_certificate(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    operator = make_user_certificate(tmp_path / "users", "operator")
    intruder = make_user_certificate(tmp_path / "users", "intruder")
    thumb = hashlib.sha1(intruder.der.read_bytes(), usedforsecurity=False).hexdigest().upper()
    plc = CertificateLoginPlc(free_port(), tmp_path / "plc-pki", operator.der)

    async def body() -> None:
        await plc.start()
        try:
            config = _cert_login_device(plc, pki["gateway"], intruder.cert, intruder.key,
                                        startup_error_behavior="error")  # fmt: skip
            runner = DeviceRunner(config, PLUGIN, lambda _device, _reading: None)
            with pytest.raises(DeviceFailedError) as caught:
                await runner.run()
            assert str(caught.value) == (
                f"device cert-plc could not start: the server refused the user certificate {intruder.cert} "
                f"(SHA-1 thumbprint {thumb}): BadUserAccessDenied; trust it on the server as a user certificate, "
                "or check user_certificate/user_private_key"
            )
            # a key that is not the certificate's is a startup error before any connection
            mismatched = _cert_login_device(plc, pki["gateway"], intruder.cert, operator.key)
            with pytest.raises(DriverStartupError, match=f"{operator.key} is not the key of user_certificate"):
                await OpcUaDriver(mismatched, Recorder()).start()
        finally:
            await plc.stop()

    run(body)


async def _add_eu_range(plc: ThreadedPlc, name: str, low: float, high: float) -> None:
    """An EURange property (Part 8, 5.3.2) on a simulated variable, as AnalogItemType variables have."""
    assert plc.plc.server is not None
    var = plc.plc.server.get_node(plc.plc.node_id(name))
    for prop in await var.get_properties():
        if (await prop.read_browse_name()).Name == "EURange":
            return
    await var.add_property(node_id(f"{name}.EURange", plc.plc.namespace), ua.QualifiedName("EURange", 0),
                           ua.Variant(ua.Range(Low=low, High=high), ua.VariantType.ExtensionObject),
                           datatype=node_id(ObjectIds.Range))  # fmt: skip


def test_percent_deadband_is_relative_to_the_eurange_and_the_gateway_applies_it(
    plc: ThreadedPlc, caplog: pytest.LogCaptureFixture
) -> None:
    """2 % of EURange 0..200 is 4.0: changes of 4 or less from the last reported value are not reported.

    asyncua's server accepts a percent deadband and ignores it (``DeadbandType Percent is not
    implemented``): a plain client with the same filter gets every change, so the gateway filters.
    """
    percent = {"type": "percent", "value": 2}
    points = [
        {"name": "flow2", "node": "ns=2;s=Pump2.Flow", "quantity": "flow", "deadband": percent},
        {"name": "energy2", "node": "ns=2;s=Pump2.Energy", "quantity": "active_energy", "deadband": percent},
    ]

    async def body() -> None:
        await plc.acall(_add_eu_range(plc, "Pump2.Flow", 0.0, 200.0))
        await plc.acall(plc.plc.set("Pump2.Flow", 50.0))
        driver = OpcUaDriver(device(plc, points=points, queue_size=10), Recorder())
        await driver.start()
        got = Collector(driver)
        plain = Client(plc.plc.endpoint)
        await plain.connect()
        try:
            sub = await plain.create_subscription(100, None)
            await sub.deadband_monitor(plain.get_node("ns=2;s=Pump2.Flow"), 2.0, deadbandtype=2, queuesize=10)
            await got.wait(measurement("flow2", lambda m: m["value"] == 50.0), "flow 50")
            for value in (52.0, 53.5, 55.0, 57.0, 40.0):  # 52, 53.5 and 57 are within 4.0 of 50, 50, 55
                await plc.acall(plc.plc.set("Pump2.Flow", value))
                await asyncio.sleep(0.25)
            await got.wait(measurement("flow2", lambda m: m["value"] == 40.0), "flow 40")
            flows = [m["value"] for r in got.readings if r.type == METER_READING for m in r.data["measurements"]
                     if m["point"] == "flow2"]  # fmt: skip
            assert flows[flows.index(50.0) :] == [50.0, 55.0, 40.0]
            assert driver.stats["deadband_dropped"] == 3, "the small changes reached the gateway and stopped there"
            seen: list[float] = []
            while (event := await sub.next_event(1.0)) is not None:
                seen.append(event.value)  # type: ignore[union-attr]
            assert seen[seen.index(50.0) :] == [50.0, 52.0, 53.5, 55.0, 57.0, 40.0], "the server filters nothing"
            # No EURange: the deadband cannot apply, every change is reported, and the log says so.
            for value in (3000.0, 3000.5, 3001.0):
                await plc.acall(plc.plc.set("Pump2.Energy", value))
                await asyncio.sleep(0.15)
            await got.wait(measurement("energy2", lambda m: m["value"] == 3001.0), "energy 3001")
            energies = [m["value"] for r in got.readings if r.type == METER_READING for m in r.data["measurements"]
                        if m["point"] == "energy2"]  # fmt: skip
            assert energies[-3:] == [3000.0, 3000.5, 3001.0]
        finally:
            await plain.disconnect()
            await got.stop()
            await driver.stop()

    with caplog.at_level(logging.INFO, logger="drivers.opcua"):
        run(body)
    assert "point 'flow2': 2% deadband of EURange 0..200 = 4 m3/h, applied by the gateway" in caplog.text
    assert ("point 'energy2' (ns=2;s=Pump2.Energy): percent deadband ignored, every change is reported: the node "
            "has no EURange property") in caplog.text  # fmt: skip


def test_server_restart_recreates_the_subscription_and_reports_offline_then_online() -> None:
    """Through the real DeviceRunner: status events come from poll_failed/poll_ok."""
    port = free_port()
    config = OpcUaConfig.model_validate({
        "id": "plc", "driver": "opcua", "endpoint": f"opc.tcp://127.0.0.1:{port}", "interval": "50ms",
        "queue_size": 100, "watchdog": "500ms", "timeout": "1s", "reconnect_min": "200ms", "reconnect_max": "1s",
        "offline_after": 2, "points": [{"name": "counter", "node": "ns=2;s=Pump1.Energy", "quantity": "counter"}],
    })  # fmt: skip
    emitted: list[Reading] = []

    def status() -> list[str]:
        return [r.data["status"] for r in emitted if r.type == DEVICE_STATUS]

    def counters() -> list[float]:
        return [m["value"] for r in emitted if r.type == METER_READING for m in r.data["measurements"]
                if m["quality"] == "good"]  # fmt: skip

    async def until(predicate: Callable[[], Any], what: str, timeout: float = 15) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}: {status()}"
            await asyncio.sleep(0.02)

    async def body() -> None:
        first = SimulatedPlc(port, variables=4, rate=0)
        await first.start()
        runner = DeviceRunner(config, PLUGIN, lambda _device, reading: emitted.append(reading))
        task = asyncio.create_task(runner.run())
        second: SimulatedPlc | None = None
        try:
            await until(lambda: status() == ["online"] and counters(), "online")
            await first.stop()
            await until(lambda: status()[-1:] == ["offline"], "offline")
            offline = next(r for r in reversed(emitted) if r.type == DEVICE_STATUS)
            assert "connect" in offline.data["reason"] or "subscription ended" in offline.data["reason"]
            second = SimulatedPlc(port, variables=4, rate=0)
            await second.start()
            await until(lambda: status()[-1:] == ["online"] and counters()[-1:] == [1000.0], "online again")
            before = len(counters())
            for n in range(1, 41):  # every change after the recovery arrives, in order
                await second.set("Pump1.Energy", float(n))
                await asyncio.sleep(0.01)
            await until(lambda: counters()[-1:] == [40.0], "the last change")
            assert counters()[before:] == [float(n) for n in range(1, 41)]
            assert status() == ["online", "offline", "online"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if second is not None:
                await second.stop()

    run(body, timeout=60)


def test_config_errors_are_specific(tmp_path: Path) -> None:
    base = {"id": "p", "driver": "opcua", "endpoint": "opc.tcp://10.0.0.5:4840",
            "points": [{"name": "f", "node": "ns=2;s=F", "quantity": "flow"}]}  # fmt: skip
    cases = [
        ({"security_policy": "Basic256Sha256"}, "policy None goes with mode None"),
        ({"security_policy": "Basic256Sha256", "security_mode": "Sign"}, "cert_dir is required"),
        ({"username": "op"}, "username and password_file go together"),
        ({"password": "x"}, "Extra inputs are not permitted"),
        ({"points": [{"name": "f", "node": "Pump1.Flow", "quantity": "flow"}]}, "neither a NodeId"),
        ({"mode": "poll", "deadband": {"type": "percent", "value": 5}}, "percent deadband needs mode: subscribe"),
        ({"password_file": "missing.txt", "username": "op"}, f"file not found: {tmp_path / 'missing.txt'}"),
    ]
    for keys, message in cases:
        with pytest.raises(ValidationError, match=message):
            OpcUaConfig.model_validate({**base, **keys}, context={"base_dir": tmp_path})


def test_shipped_example_devices_validate() -> None:
    import yaml

    path = ROOT / "config/examples/opcua-plc.yaml"
    site = yaml.safe_load(path.read_text())
    devices = [OpcUaConfig.model_validate(d, context={"base_dir": path.parent}) for d in site["devices"]]
    assert [d.mode for d in devices] == ["subscribe", "poll"]
    assert devices[0].cert_dir == path.parent / "var/opcua-pki"


def test_browse_tool_prints_node_ids_paths_types_and_values(
    plc: ThreadedPlc, capsys: pytest.CaptureFixture[str]
) -> None:
    assert browse_main([plc.plc.endpoint, "--depth", "3"]) == 0
    out = capsys.readouterr().out
    assert "2:PLC  ns=2;s=PLC" in out and "  2:Pump1  ns=2;s=Pump1" in out
    flow = next(line for line in out.splitlines() if "ns=2;s=Pump1.Flow" in line)
    assert "Double = " in flow and flow.endswith("path 0:Objects/2:PLC/2:Pump1/2:Flow"), flow
    assert "0:Server" not in out, "diagnostics are left out unless --all"
    assert browse_main([plc.plc.endpoint, "--endpoints"]) == 0
    endpoints = capsys.readouterr().out
    assert "Basic256Sha256         SignAndEncrypt  Anonymous, UserName" in endpoints, endpoints
    assert browse_main([f"opc.tcp://127.0.0.1:{free_port()}"]) == 1
    assert "connection refused" in capsys.readouterr().err


# ---- the gateway's server ------------------------------------------------------------------


def test_server_exposes_latest_values_and_only_allowed_writes(tmp_path: Path) -> None:
    (tmp_path / "users").write_text("# name:password\nscada:hmi-pass\n")
    config = OpcUaServerConfig.model_validate({
        "enabled": True, "listen": f"opc.tcp://127.0.0.1:{free_port()}", "security_policies": ["None"],
        "users_file": "users", "writable": [{"device": "pump-1", "point": "setpoint"}], "publish_interval": "50ms",
    }, context={"base_dir": tmp_path})  # fmt: skip
    writes: list[tuple[str, str, Any]] = []

    async def on_write(device: str, point: str, value: Any) -> None:
        writes.append((device, point, value))

    async def body() -> None:
        server = OpcUaServer(config, on_write=on_write)
        await server.start()
        t0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
        reading = {"measurements": [
            {"quantity": "voltage", "value": 231.5, "unit": "V", "quality": "good", "phase": "L1"},
            {"quantity": "flow", "value": 10.0, "unit": "m3/h", "quality": "good", "point": "setpoint"},
            {"quantity": "pressure", "value": 4.2, "unit": "bar", "quality": "stale", "point": "p"},
            {"quantity": "counter", "value": None, "unit": "furlong", "quality": "bad", "reason": "BadSensorFailure",
             "point": "c"},
        ]}  # fmt: skip
        server.update("pump-1", "city.device.status", {"status": "online"}, t0)
        server.update("pump-1", METER_READING, reading, t0)
        server.update("pump-1", "city.parking.occupancy", {"bay": "P-7", "occupied": True}, t0)
        client = Client(config.listen)
        client.set_user("scada")
        client.set_password("hmi-pass")
        await asyncio.sleep(0.3)
        await client.connect()
        try:
            ns = await client.get_namespace_index("urn:edge-agent:gateway")

            def node(name: str) -> Any:
                return client.get_node(f"ns={ns};s=Devices.pump-1.{name}")

            volt = await node("voltage_L1").read_data_value()
            assert (volt.Value.Value, volt.StatusCode.name, volt.SourceTimestamp) == (231.5, "Good", t0)
            eu = await client.get_node(f"ns={ns};s=Devices.pump-1.voltage_L1.EngineeringUnits").read_value()
            assert eu.UnitId == unece_unit_id("VLT") == 5655636 and eu.DisplayName.Text == "V"
            assert await client.get_node(f"ns={ns};s=Devices.pump-1.c.Unit").read_value() == "furlong"
            stale = await node("p").read_data_value(raise_on_bad_status=False)
            assert (stale.Value.Value, stale.StatusCode.name) == (4.2, "UncertainLastUsableValue")
            bad = await node("c").read_data_value(raise_on_bad_status=False)
            assert bad.StatusCode.name == "BadSensorFailure" and bad.Value.Value is None
            assert await node("bay_P-7").read_value() is True
            assert await node("status").read_value() == "online"
            # subscribed by a real client, updated through update()
            sub = await client.create_subscription(50, None)
            await sub.subscribe_data_change(node("voltage_L1"))
            first = await sub.next_event(5)
            assert first is not None and first.value == 231.5
            server.update("pump-1", METER_READING, {"measurements": [
                {"quantity": "voltage", "value": 229.0, "unit": "V", "quality": "good", "phase": "L1"}]},
                t0 + timedelta(seconds=1))  # fmt: skip
            changed = await sub.next_event(5)
            assert changed is not None and changed.value == 229.0
            # writes: refused on a read-only variable (BadNotWritable: no user may), delivered for the declared one
            with pytest.raises(ua.UaStatusCodeError, match="BadNotWritable"):
                await node("voltage_L1").write_value(ua.DataValue(ua.Variant(1.0, ua.VariantType.Double)))
            await node("setpoint").write_value(ua.DataValue(ua.Variant(12.5, ua.VariantType.Double)))
            await asyncio.sleep(0.1)
            assert writes == [("pump-1", "setpoint", 12.5)]
            # offline: the status says so and the values turn uncertain
            server.update("pump-1", "city.device.status", {"status": "offline"}, t0 + timedelta(seconds=2))
            await asyncio.sleep(0.3)
            assert await node("status").read_value() == "offline"
            after = await node("voltage_L1").read_data_value(raise_on_bad_status=False)
            assert (after.Value.Value, after.StatusCode.name) == (229.0, "UncertainLastUsableValue")
            anonymous = Client(config.listen)
            with pytest.raises(ua.UaStatusCodeError, match="BadIdentityTokenRejected"):
                await anonymous.connect()
        finally:
            await client.disconnect()
            await server.stop()
        assert server.stats["writes"] == 1 and server.stats["variables"] >= 6

    run(body)


def _other_local_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return str(a.address)
    return None


def _listening_on(port: int) -> set[str]:
    """The addresses this process listens on at ``port``."""
    return {c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}  # fmt: skip


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def test_server_listens_on_loopback_unless_an_address_is_configured(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 12: enabled with the default ``listen``, only this host can connect; a configured address is used."""
    keys = {"enabled": True, "security_policies": ["None"], "allow_anonymous": True}
    default = OpcUaServerConfig.model_validate(keys)
    other = _other_local_address()

    async def serving(config: OpcUaServerConfig, port: int) -> tuple[set[str], bool, bool | None]:
        """Where the server listens, and whether loopback and the other address reach it."""
        server = OpcUaServer(config)
        await server.start()
        try:
            local = await asyncio.to_thread(_connects, "127.0.0.1", port)
            remote = None if other is None else await asyncio.to_thread(_connects, other, port)
            if local:  # and it is an OPC UA server there
                async with Client(f"opc.tcp://127.0.0.1:{port}") as client:
                    assert NAMESPACE in await client.get_namespace_array()
            return _listening_on(port), local, remote
        finally:
            await server.stop()

    async def body() -> None:
        caplog.set_level(logging.INFO, "agent.uplinks.opcua_server")
        where, local, remote = await serving(default, 4840)
        assert where == {"127.0.0.1"} and local and remote in (None, False)
        assert default.listen == "opc.tcp://127.0.0.1:4840"
        assert "listening on 127.0.0.1:4840 (None; anonymous allowed); loopback only" in caplog.text
        port, every = free_port(), "0.0.0.0"  # noqa: S104 - an operator's explicit choice, tested as such
        where, local, remote = await serving(OpcUaServerConfig.model_validate({
            **keys, "listen": f"opc.tcp://{every}:{port}"}), port)  # fmt: skip
        assert where == {every} and local and remote in (None, True)
        if other is not None:  # one interface's address: that one only
            port = free_port()
            where, local, remote = await serving(OpcUaServerConfig.model_validate({
                **keys, "listen": f"opc.tcp://{other}:{port}"}), port)  # fmt: skip
            assert where == {other} and not local and remote

    run(body)


def test_server_config_refuses_unsafe_or_useless_settings(tmp_path: Path) -> None:
    assert OpcUaServerConfig().enabled is False and OpcUaServerConfig().allow_anonymous is False
    with pytest.raises(ValidationError, match="nobody could log in"):
        OpcUaServerConfig.model_validate({"enabled": True, "security_policies": ["None"]})
    with pytest.raises(ValidationError, match="cert_dir is required"):
        OpcUaServerConfig.model_validate({"enabled": True, "allow_anonymous": True})
    with pytest.raises(ValidationError, match="writable points need users"):
        OpcUaServerConfig.model_validate({"security_policies": ["None"], "allow_anonymous": True,
                                          "writable": [{"device": "d", "point": "p"}]})  # fmt: skip
    with pytest.raises(ValidationError, match="trusted_clients_dir needs a security policy other than None"):
        OpcUaServerConfig.model_validate({"security_policies": ["None"], "allow_anonymous": True,
                                          "trusted_clients_dir": str(tmp_path)})  # fmt: skip
    with pytest.raises(ValidationError, match=f"folder not found: {tmp_path / 'nope'}"):
        OpcUaServerConfig.model_validate({"allow_anonymous": True, "cert_dir": "pki", "trusted_clients_dir": "nope"},
                                         context={"base_dir": tmp_path})  # fmt: skip


def _secure_server_config(tmp_path: Path, **keys: Any) -> OpcUaServerConfig:
    (tmp_path / "users").write_text(f"op:{PASSWORD}\n")
    return OpcUaServerConfig.model_validate({
        "enabled": True, "listen": f"opc.tcp://127.0.0.1:{free_port()}", "users_file": "users",
        "security_policies": ["Basic256Sha256_SignAndEncrypt"], "cert_dir": "server-pki", "publish_interval": "50ms",
        **keys,
    }, context={"base_dir": tmp_path})  # fmt: skip


def test_server_accepts_only_trusted_client_certificates(
    tmp_path: Path, pki: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Default trust list: <cert_dir>/trusted-clients, empty; a refused certificate waits in rejected-clients."""
    config = _secure_server_config(tmp_path)
    gateway_der = (pki["gateway"] / "client-cert.der").read_bytes()
    thumb = hashlib.sha1(gateway_der, usedforsecurity=False).hexdigest().upper()
    intruder = ensure_certificate(tmp_path / "intruder")
    reader = OpcUaConfig.model_validate({
        "id": "scada", "driver": "opcua", "endpoint": config.listen, "mode": "poll", "interval": "100ms",
        "timeout": "2s", "security_policy": "Basic256Sha256", "security_mode": "SignAndEncrypt",
        "cert_dir": str(pki["gateway"]), "username": "op", "password_file": str(pki["password"]),
        "points": [{"name": "v", "node": "ns=2;s=Devices.pump-1.voltage_L1", "quantity": "voltage"}],
    })  # fmt: skip

    async def lying_client(presents: bytes | None, channel: Any = intruder) -> None:
        """A client whose secure channel uses ``channel``'s certificate, naming another in CreateSession."""
        client = Client(config.listen, timeout=2)
        await client.set_security(SecurityPolicyBasic256Sha256, str(channel.cert_path), str(channel.key_path),
                                  mode=ua.MessageSecurityMode.SignAndEncrypt)  # fmt: skip
        client.application_uri = channel.application_uri
        client.set_user("op")
        client.set_password(PASSWORD)
        create_session = client.uaclient.create_session

        async def lying_create_session(params: ua.CreateSessionParameters) -> Any:
            params.ClientCertificate = presents
            return await create_session(params)

        client.uaclient.create_session = lying_create_session  # type: ignore[method-assign]
        try:
            await client.connect()
        finally:
            await client.disconnect()

    async def body() -> None:
        server = OpcUaServer(config)
        await server.start()
        t0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
        server.update("pump-1", METER_READING, {"measurements": [
            {"quantity": "voltage", "value": 231.5, "unit": "V", "quality": "good", "phase": "L1"}]}, t0)  # fmt: skip
        try:
            with pytest.raises(DriverStartupError) as caught:
                await OpcUaDriver(reader, Recorder()).start()
            assert str(caught.value) == (
                f"the server rejected the secure channel: BadCertificateUntrusted; trust the gateway's certificate "
                f"(SHA-1 thumbprint {thumb}) on the server, or check server_certificate"
            )
            rejected = tmp_path / "server-pki" / "rejected-clients" / f"{thumb}.der"
            assert rejected.read_bytes() == gateway_der
            # The operator trusts it: no restart, the next connection is accepted.
            rejected.rename(tmp_path / "server-pki" / "trusted-clients" / f"{thumb}.der")
            driver = OpcUaDriver(reader, Recorder())
            await driver.start()
            try:
                assert driver.session is not None
                samples = await driver.session.poll()
                assert [(s.value, s.quality) for s in samples] == [(231.5, "good")]
            finally:
                await driver.stop()
            # An untrusted channel certificate is refused whatever CreateSession names: its own, another
            # client's (trusted) certificate, or none at all (asyncua skips its validator then).
            for presents in (intruder.cert_path.read_bytes(), gateway_der, None):
                with pytest.raises(ua.UaStatusCodeError, match="BadCertificateUntrusted"):
                    await lying_client(presents)
            # A trusted channel naming another certificate in CreateSession (Part 4, 5.7.2: it must be the same)
            gateway = ensure_certificate(pki["gateway"])
            with pytest.raises(ua.UaStatusCodeError, match="BadCertificateInvalid"):
                await lying_client(intruder.cert_path.read_bytes(), channel=gateway)
        finally:
            await server.stop()

    with caplog.at_level(logging.INFO, logger="agent.uplinks.opcua_server"):
        run(body)
    assert "0 trusted client certificate(s) in" in caplog.text
    assert "client certificate refused, not trusted: CN=edge-agent@" in caplog.text
    assert f"thumbprint {thumb}; saved as {tmp_path / 'server-pki' / 'rejected-clients' / thumb}.der" in caplog.text
    assert "1 trusted client certificate(s) in" in caplog.text
    assert "session refused: the secure channel's client certificate is not trusted" in caplog.text
    assert "CreateSession names another certificate than the one the secure channel was opened with" in caplog.text


def test_none_endpoint_offered_with_a_secure_one_takes_sessions_without_a_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 13: with [None, Basic256Sha256_SignAndEncrypt], the None endpoint took nobody (an
    asyncua client sends no certificate there; the empty one was refused and saved)."""
    config = _secure_server_config(tmp_path, security_policies=["None", "Basic256Sha256_SignAndEncrypt"],
                                   allow_anonymous=True)  # fmt: skip

    async def body() -> None:
        server = OpcUaServer(config)
        await server.start()
        server.update("pump-1", METER_READING, {"measurements": [
            {"quantity": "voltage", "value": 231.5, "unit": "V", "quality": "good", "phase": "L1"}]},
            datetime.now(UTC))  # fmt: skip
        await asyncio.sleep(0.3)
        try:
            for user in (None, "op"):
                client = Client(config.listen, timeout=5)
                if user is not None:
                    client.set_user(user)
                    client.set_password(PASSWORD)
                async with client:
                    assert client.security_policy.Mode == ua.MessageSecurityMode.None_
                    ns = await client.get_namespace_index(NAMESPACE)
                    assert await client.get_node(f"ns={ns};s=Devices.pump-1.voltage_L1").read_value() == 231.5
        finally:
            await server.stop()

    with caplog.at_level(logging.INFO, logger="agent.uplinks.opcua_server"):
        run(body)
    rejected = tmp_path / "server-pki" / "rejected-clients"
    assert not rejected.exists() or not list(rejected.iterdir()), list(rejected.iterdir())
    assert "client certificate refused" not in caplog.text and "session refused" not in caplog.text


def test_server_write_answers_only_after_the_device_applied_it(
    plc: ThreadedPlc, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Good once Driver.write succeeded (the PLC holds the value); the device's refusal as the client's Bad code."""
    (tmp_path / "users").write_text("scada:hmi-pass\n")
    devices = ["plc", "gone", "slow", "limits"]
    writable = [{"device": "plc", "point": p} for p in ("flow", "pressure")] + \
        [{"device": d, "point": "setpoint"} for d in devices[1:]]  # fmt: skip
    config = OpcUaServerConfig.model_validate({
        "enabled": True, "listen": f"opc.tcp://127.0.0.1:{free_port()}", "security_policies": ["None"],
        "users_file": "users", "writable": writable, "write_timeout": "500ms", "publish_interval": "50ms",
    }, context={"base_dir": tmp_path})  # fmt: skip
    driver = OpcUaDriver(device(plc, mode="poll"), Recorder())

    async def on_write(device_id: str, point: str, value: Any) -> None:
        if device_id == "plc":
            await driver.write(point, value)
        elif device_id == "gone":
            raise DriverWriteError("device gone is not running", "unavailable")  # what the runtime says
        elif device_id == "slow":
            await asyncio.sleep(5)
        else:
            raise DriverWriteError(f"the server refused setpoint = {value!r}") from ua.uaerrors.BadOutOfRange()

    async def make_writable(name: str) -> None:
        assert plc.plc.server is not None
        await plc.plc.server.get_node(plc.plc.node_id(name)).set_writable()

    async def read_raw(name: str) -> Any:
        assert plc.plc.server is not None
        dv = await plc.plc.server.get_node(plc.plc.node_id(name)).read_data_value(raise_on_bad_status=False)
        return dv.Value.Value if dv.Value is not None else None  # other tests leave Pump1.Pressure Uncertain

    async def body() -> None:
        await plc.acall(make_writable("Pump1.Flow"))
        await driver.start()
        server = OpcUaServer(config, on_write=on_write)
        await server.start()
        t0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
        server.update(
            "plc",
            METER_READING,
            {
                "measurements": [
                    {"quantity": "flow", "value": 20.0, "unit": "m3/h", "quality": "good", "point": "flow"},
                    {"quantity": "pressure", "value": 4.0, "unit": "bar", "quality": "good", "point": "pressure"},
                ]
            },
            t0,
        )
        for d in devices[1:]:
            server.update(
                d,
                METER_READING,
                {
                    "measurements": [
                        {"quantity": "flow", "value": 1.0, "unit": "m3/h", "quality": "good", "point": "setpoint"}
                    ]
                },
                t0,
            )
        await asyncio.sleep(0.3)
        client = Client(config.listen)
        client.set_user("scada")
        client.set_password("hmi-pass")
        await client.connect()
        try:
            ns = await client.get_namespace_index("urn:edge-agent:gateway")

            def node(device_id: str, name: str) -> Any:
                return client.get_node(f"ns={ns};s=Devices.{device_id}.{name}")

            def double(value: float) -> ua.DataValue:
                return ua.DataValue(ua.Variant(value, ua.VariantType.Double))

            await node("plc", "flow").write_value(double(21.0))  # flow has scale 2.0: the PLC holds 10.5
            assert await plc.acall(read_raw("Pump1.Flow")) == 10.5, "Good means the device has it"
            assert await node("plc", "flow").read_value() == 21.0
            refusals = [("plc", "pressure", "BadNotWritable"), ("gone", "setpoint", "BadCommunicationError"),
                        ("slow", "setpoint", "BadTimeout"), ("limits", "setpoint", "BadOutOfRange")]  # fmt: skip
            for device_id, name, code in refusals:
                before = await node(device_id, name).read_value()
                started = asyncio.get_running_loop().time()
                with pytest.raises(ua.UaStatusCodeError, match=code):
                    await node(device_id, name).write_value(double(900.0))
                took = asyncio.get_running_loop().time() - started
                assert (0.5 <= took < 3) if code == "BadTimeout" else took < 0.5, (code, took)
                assert await node(device_id, name).read_value() == before, "a refused write leaves the value"
            with pytest.raises(ua.UaStatusCodeError, match="BadTypeMismatch"):
                await node("plc", "flow").write_value(ua.DataValue(ua.Variant(3, ua.VariantType.Int64)))
            assert await plc.acall(read_raw("Pump1.Pressure")) != 900.0, "the PLC refused it"
        finally:
            await client.disconnect()
            await server.stop()
            await driver.stop()
        assert (server.stats["writes"], server.stats["refused_writes"]) == (1, 5)

    with caplog.at_level(logging.INFO, logger="agent.uplinks.opcua_server"):
        run(body)
    assert "OPC UA write by user 'scada': plc/flow = 21.0 applied by the device" in caplog.text
    assert ("OPC UA write by user 'scada': plc/pressure = 900.0 not applied by the device, answered BadNotWritable: "
            "the server refused pressure = 900.0") in caplog.text  # fmt: skip
    assert "slow/setpoint = 900.0 not applied by the device, answered BadTimeout: no answer within 0.5s" in caplog.text


def test_write_failure_codes_say_what_the_device_answered() -> None:
    """How a driver's refusal becomes the client's status code (the end-to-end cases are above)."""

    class Plc(Exception):
        pass

    def refused(cause: BaseException) -> DriverWriteError:
        try:
            raise DriverWriteError("refused") from cause
        except DriverWriteError as exc:
            return exc

    assert write_failure_code(TimeoutError()) == "BadTimeout"
    # an OPC UA device's own code, raised through asyncua
    assert write_failure_code(refused(ua.uaerrors.BadOutOfRange())) == "BadOutOfRange"
    assert write_failure_code(refused(ua.uaerrors.BadUserAccessDenied())) == "BadNotWritable"
    assert write_failure_code(refused(ua.uaerrors.BadSessionClosed())) == "BadCommunicationError"
    # the kind every driver gives its refusal, whatever the wording
    kinds = {
        "not_writable": "BadNotWritable",
        "out_of_range": "BadOutOfRange",
        "bad_value": "BadTypeMismatch",
        "timeout": "BadTimeout",
        "unavailable": "BadCommunicationError",
        "device_error": "BadDeviceFailure",
    }
    for kind, code in kinds.items():
        assert write_failure_code(DriverWriteError("no", kind)) == code  # type: ignore[arg-type]
    assert write_failure_code(refused(Plc("link down"))) == "BadDeviceFailure"  # the default kind
    assert write_failure_code(Plc("anything else")) == "BadCommunicationError"


# ---- through the whole agent (needs the `opcua` entry point in pyproject.toml) ----------------


def test_agent_publishes_opcua_readings_end_to_end(tmp_path: Path, broker, subscriber_factory, agent_factory) -> None:
    listed = subprocess.run([sys.executable, "-m", "agent", "drivers"], cwd=ROOT, capture_output=True, text=True,
                            check=False)  # fmt: skip
    assert "opcua" in listed.stdout.split(), (
        'the opcua entry point is not installed: add opcua = "drivers.opcua:PLUGIN" to pyproject.toml, pip install -e .'
    )
    port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-c", "import sys; from drivers.opcua.tools import simulate_main; "
         f"sys.exit(simulate_main(['--port', '{port}', '--variables', '8', '--rate', '5']))"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert sim.stdout is not None
        line = sim.stdout.readline()
        assert f"opc.tcp://127.0.0.1:{port}" in line, line
        sub = subscriber_factory(broker.port)
        devices = (
            f"  - {{id: plc-1, driver: opcua, endpoint: 'opc.tcp://127.0.0.1:{port}', interval: 200ms, points: ["
            "{name: flow, node: 'ns=2;s=Pump1.Flow', quantity: flow}, "
            "{name: energy, node: '0:Objects/2:PLC/2:Pump2/2:Energy', quantity: active_energy}]}\n"
        )
        agent = agent_factory(write_config(tmp_path / "site.yaml", port=broker.port, devices=devices))
        try:
            wait_for(lambda: len(sub.seqs("plc-1", METER_READING)) >= 5, 30, "OPC UA readings")
        except AssertionError:
            raise AssertionError(f"no OPC UA readings; agent log:\n{agent.output()[-2000:]}") from None
        events = [e for e in sub.snapshot() if e["device"] == "plc-1"]
        for e in events:
            CloudEvent.model_validate(e)
            EVENT_MODELS[e["type"]].model_validate(e["data"])
        energy = [m["value"] for e in events if e["type"] == METER_READING for m in e["data"]["measurements"]
                  if m["point"] == "energy"]  # fmt: skip
        assert len(energy) >= 3 and energy == sorted(energy), "a counter only increases"
        assert [e["data"]["status"] for e in events if e["type"] == DEVICE_STATUS][:1] == ["online"]
    finally:
        sim.terminate()
        sim.wait(10)


def test_agent_serves_its_devices_over_opcua(tmp_path: Path, broker, subscriber_factory, agent_factory) -> None:
    """uplink.opcua on: a SCADA client reads the same values the agent publishes over MQTT."""
    port = free_port()
    (tmp_path / "users").write_text("scada:hmi-pass\n")
    site = tmp_path / "site.yaml"
    site.write_text(
        "gateway: {id: gw-test}\n"
        "uplink:\n"
        f"  mqtt: {{host: 127.0.0.1, port: {broker.port}, topic_prefix: ioc/v1}}\n"
        f"  opcua: {{enabled: true, listen: 'opc.tcp://127.0.0.1:{port}', security_policies: [None],"
        " users_file: users, publish_interval: 50ms, writable: [{device: meter-1, point: voltage}]}\n"
        f"buffer: {{path: {tmp_path / 'buffer.db'}}}\n"
        "devices:\n"
        "  - {id: meter-1, driver: virtual, kind: meter, interval: 200ms, seed: 7}\n"
    )
    sub = subscriber_factory(broker.port)
    agent = agent_factory(site)
    wait_for(lambda: len(sub.seqs("meter-1")) >= 3, 30, "meter readings over MQTT")

    async def body() -> None:
        client = Client(f"opc.tcp://127.0.0.1:{port}")
        client.set_user("scada")
        client.set_password("hmi-pass")
        await client.connect()
        try:
            ns = await client.get_namespace_index("urn:edge-agent:gateway")
            energy = client.get_node(f"ns={ns};s=Devices.meter-1.active_energy")
            first = await energy.read_value()
            assert await client.get_node(f"ns={ns};s=Devices.meter-1.status").read_value() == "online"
            await asyncio.sleep(1.0)
            later = await energy.read_value()
            assert later > first  # values follow the events as they flow
            published = [
                next(m["value"] for m in e["data"]["measurements"] if m["quantity"] == "active_energy")
                for e in sub.snapshot()
                if e.get("device") == "meter-1" and e["type"] == METER_READING
            ]
            assert first in published  # the very values the operations centre receives
            with pytest.raises(ua.UaStatusCodeError, match="BadNotWritable"):
                await energy.write_value(ua.DataValue(ua.Variant(1.0, ua.VariantType.Double)))
            # A declared writable point goes to the device's driver; the virtual meter cannot write,
            # and the client is told so rather than acknowledged.
            voltage = client.get_node(f"ns={ns};s=Devices.meter-1.voltage")
            with pytest.raises(ua.UaStatusCodeError, match="BadNotWritable"):
                await voltage.write_value(ua.DataValue(ua.Variant(1.0, ua.VariantType.Double)))
            assert await voltage.read_value() != 1.0, "a refused write never shows as the value"
        finally:
            await client.disconnect()

    run(body)
    assert "OPC UA server on opc.tcp://127.0.0.1" in agent.output()
    wait_for(lambda: "OPC UA write meter-1.voltage = 1.0 refused: driver virtual cannot write points"
             in agent.output(), 10, "the refused write in the log")  # fmt: skip


def test_server_with_security_serves_our_own_driver_over_basic256sha256(tmp_path: Path, pki: dict[str, Path]) -> None:
    """The gateway's server with SignAndEncrypt only and a login, read by the opcua driver itself."""
    (tmp_path / "users").write_text(f"op:{PASSWORD}\n")
    (tmp_path / "trusted").mkdir()
    gateway = x509.load_der_x509_certificate((pki["gateway"] / "client-cert.der").read_bytes())
    (tmp_path / "trusted" / "gateway.pem").write_bytes(gateway.public_bytes(Encoding.PEM))  # PEM is trusted too
    port = free_port()
    config = OpcUaServerConfig.model_validate({
        "enabled": True, "listen": f"opc.tcp://127.0.0.1:{port}",
        "security_policies": ["Basic256Sha256_SignAndEncrypt"], "trusted_clients_dir": "trusted",
        "users_file": "users", "cert_dir": "server-pki", "publish_interval": "50ms",
    }, context={"base_dir": tmp_path})  # fmt: skip

    async def body() -> None:
        server = OpcUaServer(config)
        await server.start()
        assert server.thumbprint  # its certificate was created on first start
        t0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
        server.update("pump-1", METER_READING, {"measurements": [
            {"quantity": "voltage", "value": 231.5, "unit": "V", "quality": "good", "phase": "L1"}]}, t0)  # fmt: skip
        await asyncio.sleep(0.3)
        reader = OpcUaConfig.model_validate({
            "id": "scada", "driver": "opcua", "endpoint": config.listen, "mode": "poll", "interval": "100ms",
            "security_policy": "Basic256Sha256", "security_mode": "SignAndEncrypt", "cert_dir": str(pki["gateway"]),
            "username": "op", "password_file": str(pki["password"]),
            "points": [{"name": "v", "node": "ns=2;s=Devices.pump-1.voltage_L1", "quantity": "voltage"}],
        })  # fmt: skip
        driver = OpcUaDriver(reader, Recorder())
        try:
            await driver.start()
            assert driver.session is not None
            assert driver.session.client.security_policy.Mode == ua.MessageSecurityMode.SignAndEncrypt
            samples = await driver.session.poll()
            assert [(s.point.name, s.value, s.quality) for s in samples] == [("v", 231.5, "good")]
            await driver.stop()
            # the same endpoint without security is not offered
            insecure = {**reader.model_dump(), "security_policy": "None", "security_mode": "None", "cert_dir": None}
            plain = OpcUaDriver(OpcUaConfig.model_validate(insecure), Recorder())
            with pytest.raises(DriverStartupError):
                await plain.start()
        finally:
            await driver.stop()
            await server.stop()

    run(body)


def test_a_float_variable_is_published_as_the_digits_it_holds() -> None:
    """Issue 13: a PLC's Float (float32) holding 230.1 widens to 230.10000610351562; a Double keeps its digits."""
    point = PointConfig(name="voltage_l1", node="ns=2;s=V1", quantity="voltage")
    now = datetime.now(UTC)
    widened = struct.unpack("<f", struct.pack("<f", 230.1))[0]
    as_float = sample_of(point, ua.DataValue(ua.Variant(widened, ua.VariantType.Float)), now)
    assert repr(as_float.value) == "230.1"
    as_double = sample_of(point, ua.DataValue(ua.Variant(widened, ua.VariantType.Double)), now)
    assert as_double.value == widened  # a Double is the device's own 64-bit value
    scaled = PointConfig(name="power", node="ns=2;s=P", quantity="active_power", scale=0.001)
    assert sample_of(scaled, ua.DataValue(ua.Variant(widened, ua.VariantType.Float)), now).value == 0.2301
