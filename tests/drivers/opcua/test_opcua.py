"""OPC UA: the driver against real asyncua servers on loopback, and through the whole agent.

The gateway's own OPC UA server is tested in tests/uplinks/opcua_server.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from pydantic import ValidationError

from agent.contract.events import DEVICE_STATUS, METER_READING, Reading
from agent.contract.schemas import EVENT_MODELS, CloudEvent
from agent.devices.runner import DeviceFailedError, DeviceRunner
from agent.errors import DriverStartupError, DriverWriteError
from drivers.opcua import PLUGIN
from drivers.opcua.config import OpcUaConfig, PointConfig
from drivers.opcua.driver import OpcUaDriver
from drivers.opcua.mapping import sample_of
from drivers.opcua.simulator import SimulatedPlc
from drivers.opcua.tools import browse_main
from drivers.opcua.uanames import ObjectIds, node_id
from tests.conftest import ROOT, free_port, wait_for, write_config
from tests.opcua_helpers import (
    PASSWORD,
    POINTS,
    CertificateLoginPlc,
    Recorder,
    ThreadedPlc,
    device,
    make_user_certificate,
    module_fixtures,
    run,
)

pki, plc = module_fixtures()  # the gateway's certificate, a password file; a simulated PLC


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
