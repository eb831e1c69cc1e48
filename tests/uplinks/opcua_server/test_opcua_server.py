"""The gateway's OPC UA server (``uplink.opcua``) against real asyncua clients on loopback, the
``opcua`` driver as its client, and through the whole agent."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import socket
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

from agent.contract.events import METER_READING
from agent.errors import DriverStartupError, DriverWriteError
from agent.protocols.opcua_certs import ensure_certificate
from agent.uplinks.opcua_server.config import OpcUaServerConfig
from agent.uplinks.opcua_server.nodes import NAMESPACE, unece_unit_id
from agent.uplinks.opcua_server.server import OpcUaServer
from agent.uplinks.opcua_server.writes import write_failure_code
from drivers.opcua.config import OpcUaConfig
from drivers.opcua.driver import OpcUaDriver
from tests.conftest import free_port, wait_for
from tests.opcua_helpers import PASSWORD, Recorder, ThreadedPlc, device, module_fixtures, run

pki, plc = module_fixtures()  # the gateway's certificate, a password file; a simulated PLC


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


# ---- through the whole agent ----------------------------------------------------------------


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
