"""The demo: simulated devices -> agent -> embedded broker -> a live view of the events.

Everything runs in one process on loopback with a pure-Python broker (amqtt), so the demo
needs no system packages. Halfway through, the uplink is cut for a few seconds to show
store-and-forward: the agent buffers, reconnects, drains, and the view checks every
device's ``seq`` for gaps. The outage is a cut in the agent's own link (a relay between it
and the broker), so the viewer, connected directly, misses nothing the broker receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.config.model import parse_config
from agent.runtime.agent import Agent

DEMO_CONFIG = """\
gateway: {{id: gw-demo-01, site: demo, health_interval: 10s}}
uplink:
  mqtt: {{host: 127.0.0.1, port: {link_port}, topic_prefix: ioc/v1, reconnect_min: 500ms, reconnect_max: 2s}}
buffer: {{path: {buffer}, max_bytes: 16MiB}}
devices:
  - {{id: meter-1, driver: virtual, kind: meter, interval: 1s}}
  - {{id: bay-a1, driver: virtual, kind: parking, bay: A1, interval: 2s}}
  - {{id: crossing-n, driver: virtual, kind: crosswalk, area: north, interval: 1s}}
{extra_devices}"""
# With the modbus driver installed, a simulated Eastron SDM630 answers Modbus TCP on loopback
# (``edge-agent simulate modbus``, its own process) and the agent reads it through its profile.
MODBUS_DEVICE = (
    "  - {{id: sdm630-1, driver: modbus, host: 127.0.0.1, port: {port}, unit: 1, profile: eastron-sdm630,"
    " interval: 2s, deadband: 0.5}}\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _broker_config(port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def describe(event: dict[str, Any]) -> str:
    """One readable line for an event."""
    data = event.get("data", {})
    kind = event["type"]
    if kind == "city.meter.reading":
        parts = [
            f"{m['quantity']}{'.' + m['phase'] if m.get('phase') else ''}="
            f"{round(m['value'], 2) if isinstance(m['value'], float) else m['value']} {m['unit']}"
            for m in data.get("measurements", [])[:3]
        ]
        text = ", ".join(parts)
    elif kind == "city.parking.occupancy":
        text = f"bay {data['bay']}: {'OCCUPIED' if data['occupied'] else 'free'} (conf {data['confidence']})"
    elif kind == "city.crosswalk.presence":
        text = f"area {data['area']}: {data['count']} waiting (max {data['max_count']})"
    elif kind == "city.device.status":
        text = f"device is {data['status']}" + (f": {data['reason']}" if data.get("reason") else "")
    elif kind == "city.gateway.health":
        buf, acc = data["buffer"], data["accounting"]
        text = (
            f"health: uplink {'up' if data['uplink']['connected'] else 'DOWN'}, "
            f"buffered {buf['events']}, accepted {acc['accepted']}, delivered {acc['delivered']}"
        )
    else:
        text = json.dumps(data)[:80]
    return f"{event['time'][11:23]}  {event['device']:<11} {kind.rsplit('.', 1)[-1]:<10} seq={event['seq']:<5} {text}"


class Link:
    """The agent's uplink as a TCP relay to the broker, which the demo can cut and restore."""

    def __init__(self, broker_port: int) -> None:
        """Relay a free loopback port to ``broker_port`` once :meth:`restore` is called."""
        self.port = _free_port()
        self.broker_port = broker_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        """Accept and relay connections."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Drop every connection and refuse new ones, as a failed uplink would."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.broker_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


class Viewer:
    """Subscribes to everything the gateway publishes and prints it; checks seq per device."""

    def __init__(self, port: int) -> None:
        """Connect in paho's own thread."""
        self.seqs: dict[str, set[int]] = {}
        self.duplicates = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="demo-viewer")
        self.client.on_connect = lambda c, *_: c.subscribe("ioc/v1/#", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == "ioc/v1/gw-demo-01/status":
            print(f"{'':12} gateway status: {msg.payload.decode()}", flush=True)
            return
        event = json.loads(msg.payload)
        seen = self.seqs.setdefault(event["device"], set())
        if event["seq"] in seen:
            self.duplicates += 1
        seen.add(event["seq"])
        lag = time.time() - datetime.fromisoformat(event["time"]).timestamp()
        print(describe(event) + (f"   [from the buffer, {lag:.1f} s late]" if lag > 1.5 else ""), flush=True)

    def summary(self) -> str:
        """Per device: events received and any gap in seq."""
        lines = []
        for device, seen in sorted(self.seqs.items()):
            missing = sorted(set(range(min(seen), max(seen) + 1)) - seen)
            verdict = "no gaps" if not missing else f"MISSING {missing[:10]}"
            lines.append(f"  {device:<11} seq {min(seen)}..{max(seen)}: {len(seen)} events, {verdict}")
        lines.append(f"  duplicates received (at-least-once): {self.duplicates}")
        return "\n".join(lines)

    def stop(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


async def run_demo(*, duration: float = 30.0, outage: bool = True) -> int:
    """Run the demo for ``duration`` seconds (0: until Ctrl-C); returns an exit code."""
    from amqtt.broker import Broker

    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    logging.getLogger("transitions").setLevel(logging.CRITICAL)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="edge-agent-demo-") as tmp:
        broker = Broker(_broker_config(port))
        await broker.start()
        link = Link(port)
        await link.restore()
        simulator, extra = await _start_modbus_simulator()
        text = DEMO_CONFIG.format(link_port=link.port, buffer=Path(tmp) / "buffer.db", extra_devices=extra)
        config = parse_config(text, Path(tmp) / "demo.yaml")
        print(
            f"demo: embedded broker on 127.0.0.1:{port}; agent {config.gateway.id} with "
            f"{len(config.devices)} simulated devices; running {duration or 'until Ctrl-C'} s\n",
            flush=True,
        )
        agent = Agent(config)
        viewer = Viewer(port)
        agent_task = asyncio.create_task(agent.run(), name="agent")
        try:
            await _script(link, duration, outage)
        except (KeyboardInterrupt, asyncio.CancelledError):
            pass
        finally:
            agent.request_stop()
            await asyncio.gather(agent_task, return_exceptions=True)
            await asyncio.sleep(0.5)  # let the last messages reach the viewer
            viewer.stop()
            with contextlib.suppress(Exception):
                await broker.shutdown()
            if simulator is not None:
                simulator.terminate()
                await simulator.wait()
    print("\ndemo summary (what the operations centre received):")
    print(viewer.summary(), flush=True)
    gaps = any(set(range(min(s), max(s) + 1)) - s for s in viewer.seqs.values())
    return 1 if gaps or not viewer.seqs else 0


async def _start_modbus_simulator() -> tuple[asyncio.subprocess.Process | None, str]:
    """A simulated Modbus meter in its own process, if the modbus driver is installed."""
    from agent.devices.registry import load_plugins

    if "modbus" not in load_plugins():
        return None, ""
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "simulate", "modbus", "--profile", "eastron-sdm630",
        "--tcp", f"127.0.0.1:{port}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
    except TimeoutError:
        line = b""
    if b"serving" not in line:
        proc.kill()
        print("demo: the Modbus simulator did not start; running without the Modbus meter", flush=True)
        return None, ""
    return proc, MODBUS_DEVICE.format(port=port)


async def _script(link: Link, duration: float, outage: bool) -> None:
    started = time.monotonic()
    if outage and duration >= 15:
        down_at, up_at = duration * 0.4, duration * 0.4 + 5
        await asyncio.sleep(down_at)
        print(
            f"\n--- demo: cutting the uplink for {up_at - down_at:.0f} s; the agent keeps buffering ---\n", flush=True
        )
        await link.cut()
        await asyncio.sleep(up_at - down_at)
        await link.restore()
        print("\n--- demo: uplink back; the agent reconnects and drains its backlog in order ---\n", flush=True)
    if duration:
        await asyncio.sleep(max(0.0, duration - (time.monotonic() - started)))
    else:
        await asyncio.Event().wait()


if __name__ == "__main__":
    sys.exit(asyncio.run(run_demo()))
