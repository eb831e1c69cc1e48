"""A network server's MQTT integration, simulated: what ChirpStack v4 or The Things Stack v3 would publish.

Per device: a join, uplinks with rising f_cnt heard by one to ``gateways`` gateways, a ChirpStack
status report; and the faults a real deployment has: redelivered duplicates, f_cnt gaps (uplinks
lost on air), undecodable payloads, a device that goes silent, a message that is not JSON and an
uplink of a DevEUI nobody configured. Everything is derived from ``seed`` and ``round``, so running
the same command again publishes the very same messages (a redelivery); the ledger says what was sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from drivers.lorawan.messages import Server

DEFAULT_APPLICATION = {"chirpstack": "2d7c1f0a-4b8e-4f3a-9c1d-5e6f7a8b9c0d", "tts": "parking@ttn"}
UNKNOWN_EUI = "ffffffffffff0001"
DETECTORS = ("nwave-nps405", "nwave-nps310", "bosch-tps110")
SENSORS = ("milesight-em300-th",)
_PROFILES = {"nwave-nps405": "Nwave NPS405", "nwave-nps310": "Nwave NPS310", "bosch-tps110": "Bosch TPS110",
             "milesight-em300-th": "Milesight EM300-TH"}  # fmt: skip


@dataclass
class Sent:
    """The ledger of one device: what the simulator published for it."""

    id: str
    dev_eui: str
    codec: str
    uplinks: int = 0  # distinct uplinks with a decodable payload
    bad: int = 0  # distinct uplinks with an undecodable payload
    duplicates: int = 0  # uplinks published a second time
    gaps: int = 0  # f_cnt values skipped (uplinks "lost on air")
    joins: int = 0
    status: int = 0
    silent: bool = False
    last_f_cnt: int = 0
    occupied: list[bool] = field(default_factory=list)


def parse_devices(text: str) -> list[tuple[str, int]]:
    """``nwave-nps405:20,bosch-tps110:5`` -> [(codec, count), ...]; ValueError naming the bad part."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        codec, _, count = part.partition(":")
        if codec not in DETECTORS + SENSORS:
            raise ValueError(f"--devices: {codec!r} cannot be simulated (one of {', '.join(DETECTORS + SENSORS)})")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--devices: {part!r}: give codec:count, count 1 or more")
        out.append((codec, int(count)))
    if not out:
        raise ValueError("--devices: give at least one codec:count")
    return out


def dev_eui(kind: int, n: int) -> str:
    """A made-up DevEUI (the 70b3d5 block of the IEEE, as many test devices use)."""
    return f"70b3d5{kind:02x}{n:08x}"


def payload(codec: str, occupied: bool, n: int, bad: bool) -> tuple[int, bytes]:
    """fPort and bytes of one uplink; ``bad``: one the codec must refuse (too short, or an unknown port)."""
    if bad:
        return (2, b"\x01") if n % 2 else (99, b"\x00")
    if codec in DETECTORS:
        # Status, fPort 1: the occupied flag in bit 0, and for Nwave the previous state's minutes above it.
        return 1, bytes([((n % 90) << 1 | occupied) if codec.startswith("nwave") else int(occupied)])
    temperature = int((20 + n % 10) * 10)  # EM300-TH: battery 01 75, temperature 03 67 (/10), humidity 04 68 (/2)
    return 85, bytes([0x01, 0x75, 90, 0x03, 0x67]) + temperature.to_bytes(2, "little") + bytes([0x04, 0x68, 100])


class Scenario:
    """The messages of one run, in the order they are published: (topic, payload, qos)."""

    def __init__(self, server: Server, application: str, devices: list[tuple[str, int]], *, uplinks: int,
                 gateways: int, seed: int, round_: int, join: bool, faults: bool) -> None:  # fmt: skip
        self.server, self.application = server, application
        self.uplinks, self.gateways, self.seed, self.round = uplinks, gateways, seed, round_
        self.join, self.faults = join, faults
        self.rng = random.Random(f"{seed}/{round_}")
        self.ledger: list[Sent] = []
        for kind, (codec, count) in enumerate(devices):
            for n in range(count):
                # The two servers' fleets get their own DevEUIs, so one agent can read both at once.
                eui = dev_eui(kind + (0x10 if server == "tts" else 0), n + 1)
                self.ledger.append(Sent(f"{server}-{codec}-{n + 1}", eui, codec))
        if faults and self.ledger:
            self.ledger[-1].silent = True
        self.bad_messages = 0
        self.unknown_uplinks = 0

    def messages(self) -> list[tuple[str, bytes, int]]:
        """Every message, devices interleaved round-robin (as a city's traffic is)."""
        out: list[tuple[str, bytes, int]] = []
        for sent in self.ledger:
            if self.join:
                sent.joins += 1
                out.append(self._join(sent))
        # Without a join a round carries on the last one's frame counters (each round sends alike).
        f_cnts = {s.dev_eui: 0 if self.join else self.round * self._per_round(i, s) for i, s in enumerate(self.ledger)}
        for i in range(self.uplinks):
            for index, sent in enumerate(self.ledger):
                if sent.silent and i > 0:
                    continue  # heard once, then never again
                f_cnts[sent.dev_eui] += 1
                if self.faults and index % 5 == 1 and i == 2:
                    f_cnts[sent.dev_eui] += 1  # one uplink lost on air
                    sent.gaps += 1
                bad = self.faults and index % 7 == 2 and i == 3
                occupied = (i + index) % 2 == 0
                message = self._uplink(sent, f_cnts[sent.dev_eui], occupied, i, bad)
                out.append(message)
                if bad:
                    sent.bad += 1
                else:
                    sent.uplinks += 1
                    sent.occupied.append(occupied)
                if self.faults and i % 4 == 1:
                    out.append(message)  # the same message again: a redelivery
                    sent.duplicates += 1
                sent.last_f_cnt = f_cnts[sent.dev_eui]
        if self.server == "chirpstack":
            for sent in self.ledger:
                if not sent.silent:
                    sent.status += 1
                    out.append(self._status(sent))
        if self.faults:
            out += self._strays()
        return out

    def _per_round(self, index: int, sent: Sent) -> int:
        """The f_cnt values one round uses up for a device."""
        if sent.silent:
            return 1
        return self.uplinks + (1 if self.faults and index % 5 == 1 and self.uplinks > 2 else 0)

    # ---- message bodies, as each server writes them -----------------------------------------------
    def _when(self) -> str:
        return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")

    def _topic(self, sent: Sent | None, eui: str, kind: str) -> str:
        if self.server == "chirpstack":
            return f"application/{self.application}/device/{eui}/event/{kind}"
        return f"v3/{self.application}/devices/{sent.id if sent else 'stray-' + eui}/{kind}"

    def _session(self, sent: Sent) -> str:
        return base64.b64encode(
            hashlib.sha256(f"{self.seed}/{sent.dev_eui}/{self.round}".encode()).digest()[:16]
        ).decode()

    def _join(self, sent: Sent) -> tuple[str, bytes, int]:
        if self.server == "chirpstack":
            doc: dict[str, Any] = {"deduplicationId": self._uuid(sent.dev_eui, "join"), "time": self._when(),
                                   "deviceInfo": self._device_info(sent), "devAddr": "01ab2345"}  # fmt: skip
        else:
            doc = {"end_device_ids": self._ids(sent), "correlation_ids": [f"as:up:{self._uuid(sent.dev_eui, 'j')}"],
                   "received_at": self._when(), "join_accept": {"session_key_id": self._session(sent),
                                                                "received_at": self._when()}}  # fmt: skip
        return self._topic(sent, sent.dev_eui, "join"), json.dumps(doc).encode(), self._qos

    def _uplink(self, sent: Sent, f_cnt: int, occupied: bool, i: int, bad: bool) -> tuple[str, bytes, int]:
        port, data = payload(sent.codec, occupied, i, bad)
        heard = self.rng.randint(1, max(1, self.gateways))
        radio = [(f"00800000a0000{g:03d}", self.rng.randint(-120, -60), round(self.rng.uniform(-15, 10), 1))
                 for g in range(heard)]  # fmt: skip
        text = base64.b64encode(data).decode()
        if self.server == "chirpstack":
            doc: dict[str, Any] = {
                "deduplicationId": self._uuid(sent.dev_eui, f"up/{f_cnt}"), "time": self._when(),
                "deviceInfo": self._device_info(sent), "devAddr": "01ab2345", "dr": 5, "fPort": port, "data": text,
                "rxInfo": [{"gatewayId": g, "uplinkId": self.rng.randint(1, 2**31), "rssi": r, "snr": s}
                           for g, r, s in radio],
                "txInfo": {"frequency": 868100000, "modulation": {"lora": {"bandwidth": 125000, "spreadingFactor": 7}}},
            }  # fmt: skip
            if f_cnt:  # protobuf's JSON leaves a zero out
                doc["fCnt"] = f_cnt
        else:
            up: dict[str, Any] = {"session_key_id": self._session(sent), "f_port": port, "frm_payload": text,
                                  "rx_metadata": [{"gateway_ids": {"gateway_id": f"gw-{g[-3:]}"}, "rssi": r,
                                                   "channel_rssi": r, "snr": s} for g, r, s in radio],
                                  "settings": {"data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": 7}},
                                               "frequency": "868100000"},
                                  "received_at": self._when(),
                                  "version_ids": {"brand_id": sent.codec.split("-")[0],
                                                  "model_id": sent.codec.split("-", 1)[1]}}  # fmt: skip
            if f_cnt:  # TTS leaves empty fields out: no f_cnt means 0
                up["f_cnt"] = f_cnt
            correlation = f"as:up:{self._uuid(sent.dev_eui, str(f_cnt))}"
            doc = {"end_device_ids": self._ids(sent), "correlation_ids": [correlation],
                   "received_at": self._when(), "uplink_message": up}  # fmt: skip
        return self._topic(sent, sent.dev_eui, "up"), json.dumps(doc).encode(), self._qos

    def _status(self, sent: Sent) -> tuple[str, bytes, int]:
        doc = {"deduplicationId": self._uuid(sent.dev_eui, "status"), "time": self._when(),
               "deviceInfo": self._device_info(sent), "margin": 7, "batteryLevel": 87.5}  # fmt: skip
        return self._topic(sent, sent.dev_eui, "status"), json.dumps(doc).encode(), self._qos

    def _strays(self) -> list[tuple[str, bytes, int]]:
        """A message that is not JSON, and an uplink of a DevEUI nobody configured."""
        self.bad_messages += 1
        self.unknown_uplinks += 1
        stray = Sent("stray", UNKNOWN_EUI, "nwave-nps405")
        topic = self._topic(None, UNKNOWN_EUI, "up")
        return [(topic, b"\x08\x01 protobuf, not JSON", self._qos), self._uplink(stray, 1, True, 0, False)]

    def _device_info(self, sent: Sent) -> dict[str, Any]:
        return {"tenantId": "52f14cd4-c6f1-4fbd-8f87-4025e1d49242", "tenantName": "City",
                "applicationId": self.application, "applicationName": "parking",
                "deviceProfileId": "b8b2bd5f-12d0-4d5e-8a0c-4a6b5d3c2e1f",
                "deviceProfileName": _PROFILES.get(sent.codec, sent.codec), "deviceName": sent.id,
                "devEui": sent.dev_eui}  # fmt: skip

    def _ids(self, sent: Sent) -> dict[str, Any]:
        app, _, _tenant = self.application.partition("@")
        return {"device_id": sent.id, "application_ids": {"application_id": app}, "dev_eui": sent.dev_eui.upper(),
                "join_eui": "0000000000000000"}  # fmt: skip

    def _uuid(self, eui: str, what: str) -> str:
        return str(uuid.UUID(bytes=hashlib.sha256(f"{self.seed}/{self.round}/{eui}/{what}".encode()).digest()[:16]))

    @property
    def _qos(self) -> int:
        return 1 if self.server == "chirpstack" else 0


def publish(scenario: Scenario, host: str, port: int, rate: float) -> None:
    """Publish every message (``rate`` per second; 0: as fast as the broker takes them) and wait for the acks."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"lorawan-sim-{uuid.uuid4().hex[:8]}"
    )
    client.max_inflight_messages_set(1000)
    client.connect(host, port, 30)
    client.loop_start()
    try:
        pending = []
        started = time.monotonic()
        for n, (topic, body, qos) in enumerate(scenario.messages()):
            pending.append(client.publish(topic, body, qos=qos))
            if rate > 0:
                time.sleep(max(0.0, started + (n + 1) / rate - time.monotonic()))
        for info in pending:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def ledger_json(scenario: Scenario) -> dict[str, Any]:
    """What was sent, per device and in all."""
    devices = {s.id: {k: v for k, v in vars(s).items() if k != "id"} for s in scenario.ledger}
    totals = {k: sum(getattr(s, k) for s in scenario.ledger) for k in ("uplinks", "bad", "duplicates", "gaps",
                                                                      "joins", "status")}  # fmt: skip
    return {"network_server": scenario.server, "application": scenario.application, "round": scenario.round,
            "devices": devices, "totals": totals, "bad_messages": scenario.bad_messages,
            "unknown_uplinks": scenario.unknown_uplinks}  # fmt: skip
