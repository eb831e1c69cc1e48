"""The local HTTP endpoint: ``/metrics`` (Prometheus), ``/healthz`` (live), ``/readyz`` (ready).

The Prometheus export lives here too (:class:`AgentCollector`), so that prometheus_client is
imported only when the endpoint is on.

Served by the standard library's ThreadingHTTPServer on a thread of its own, never on the
event loop: a stuck loop must not take the endpoint down with it, it must make ``/healthz``
say so. The answers are computed from values the loop publishes (heartbeats, counters) and
read here without waiting for the loop.

Off by default (``observability.listen: null``). There is no authentication, so the agent
refuses a non-loopback address unless ``observability.allow_remote: true``.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from agent.config.model import parse_listen
from agent.observability.metrics import Snapshot

log = logging.getLogger(__name__)

Probe = Callable[[], tuple[bool, dict[str, Any]]]
PREFIX = "edge_agent"


# ---- Prometheus export --------------------------------------------------------------------
def _name(short: str) -> str:
    return f"{PREFIX}_{short}"


class AgentCollector(Collector):
    """Turns :class:`Snapshot` into Prometheus metric families at each scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        """``snapshot`` must be thread-safe: it runs on the scrape thread."""
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """Called by prometheus_client on the scrape thread."""
        s = self._snapshot()
        info = InfoMetricFamily(_name("build"), "Agent version and gateway identity.")
        info.add_metric([], {"version": s.version, "gateway": s.gateway, "site": s.site or ""})
        yield info

        produced = CounterMetricFamily(
            _name("events_produced"), "Events produced by devices and the gateway.", labels=["device", "type"]
        )
        for (device, typ), n in sorted(s.produced.items()):
            produced.add_metric([device, typ], n)
        yield produced
        yield CounterMetricFamily(
            _name("events_published"),
            "Events handed to the MQTT connection, re-sends after a reconnect included.",
            value=s.published,
        )
        if s.delivered is not None:
            yield CounterMetricFamily(
                _name("events_delivered"),
                "Events acknowledged by the broker (PUBACK) and removed from the buffer, since the agent started.",
                value=s.delivered,
            )
        dropped = CounterMetricFamily(
            _name("events_dropped"),
            "Buffered events evicted, by reason: capacity (buffer.max_bytes), disk_full or media_quota "
            "(buffer.media_max_bytes).",
            labels=["device", "type", "reason"],
        )
        for (device, typ, reason), n in sorted(s.dropped.items()):
            dropped.add_metric([device, typ, reason], n)
        yield dropped
        yield CounterMetricFamily(
            _name("events_not_accepted"),
            "Readings refused before reaching the buffer (commits stalled, disk failing, data not JSON).",
            value=s.not_accepted,
        )

        if s.buffer_events is not None:
            depth = GaugeMetricFamily(
                _name("buffer_events"), "Events in the buffer, by delivery class.", labels=["class"]
            )
            for cls, n in sorted(s.buffer_events.items()):
                depth.add_metric([cls], n)
            yield depth
        if s.buffer_bytes is not None:
            yield GaugeMetricFamily(_name("buffer_bytes"), "Logical size of the buffered events.", value=s.buffer_bytes)
        yield GaugeMetricFamily(_name("buffer_max_bytes"), "buffer.max_bytes.", value=s.buffer_max_bytes)
        if s.buffer_oldest_age is not None:
            yield GaugeMetricFamily(
                _name("buffer_oldest_age_seconds"),
                "Age of the oldest buffered event (0 when the buffer is empty).",
                value=s.buffer_oldest_age,
            )
        if s.disk_free is not None:
            yield GaugeMetricFamily(
                _name("buffer_disk_free_bytes"), "Free space on the buffer's file system.", value=s.disk_free
            )

        yield GaugeMetricFamily(
            _name("uplink_connected"), "1 while connected to the MQTT broker.", value=int(s.uplink_connected)
        )
        yield CounterMetricFamily(
            _name("uplink_reconnects"), "Connections made after the first one.", value=s.uplink_reconnects
        )
        yield CounterMetricFamily(
            _name("uplink_disconnects"), "Established connections that were lost.", value=s.uplink_disconnects
        )
        errors = CounterMetricFamily(
            _name("uplink_errors"),
            "Failed connection attempts and lost connections, by normalised reason.",
            labels=["reason"],
        )
        for reason, n in sorted(s.uplink_errors.items()):
            errors.add_metric([reason], n)
        yield errors
        commands = CounterMetricFamily(
            _name("uplink_commands"),
            "Commands from the far end of an uplink, by kind (Sparkplug: dcmd, ncmd), outcome (accepted, refused) "
            "and reason.",
            labels=["uplink", "kind", "outcome", "reason"],
        )
        for (uplink, kind, outcome, reason), n in sorted(s.uplink_commands.items()):
            commands.add_metric([uplink, kind, outcome, reason], n)
        yield commands

        if s.fleet:
            fleet = CounterMetricFamily(
                _name("fleet_requests"),
                "Signed requests (kind command) and desired documents (kind config) from the operations "
                "centre, by outcome: accepted, applied, rolled, or the refusal's reason code.",
                labels=["kind", "outcome"],
            )
            for (kind, outcome), n in sorted(s.fleet.items()):
                fleet.add_metric([kind, outcome], n)
            yield fleet

        if s.cert_expiry is not None:
            yield GaugeMetricFamily(
                _name("client_cert_expiry_seconds"),
                "Seconds until the MQTT client certificate expires (fleet.identity); negative once expired.",
                value=s.cert_expiry,
            )
            failures = CounterMetricFamily(
                _name("cert_renewal_failures"), "Failed certificate renewals, by reason.", labels=["reason"]
            )
            for reason, n in sorted(s.cert_renewal_failures.items()):
                failures.add_metric([reason], n)
            yield failures

        links = GaugeMetricFamily(
            _name("driver_link_up"),
            "1 while a connection drivers share upstream (a LoRaWAN network server's broker) is up.",
            labels=["driver", "link"],
        )
        link_messages = CounterMetricFamily(
            _name("driver_link_messages"),
            "Messages on a shared upstream connection, by kind (LoRaWAN: messages, bad_messages, unknown_uplinks, "
            "qos0_uplinks).",
            labels=["driver", "link", "kind"],
        )
        for link, (driver, state) in sorted(s.links.items()):
            links.add_metric([driver, link], int(bool(state.get("connected"))))
            for kind, n in sorted(state.items()):
                if kind != "connected" and isinstance(n, int):
                    link_messages.add_metric([driver, link, kind], n)
        yield links
        yield link_messages
        up = GaugeMetricFamily(
            _name("device_up"), "1 while the device answers (status online).", labels=["device", "driver"]
        )
        for device, driver, status in s.devices:
            up.add_metric([device, driver], int(status == "online"))
        yield up
        polls = HistogramMetricFamily(
            _name("device_poll_duration_seconds"),
            "Time of each poll of a device (the driver's read()).",
            labels=["device"],
        )
        failures = CounterMetricFamily(
            _name("device_poll_failures"), "Failed polls, by normalised reason.", labels=["device", "reason"]
        )
        inference = HistogramMetricFamily(
            _name("inference_duration_seconds"),
            "Time of one model inference; reported by drivers that run models (the camera driver).",
            labels=["device", "model"],
        )
        for t in sorted(s.telemetry, key=lambda t: t.device):
            buckets, total = t.polls.snapshot()
            polls.add_metric([t.device], buckets, total)
            for reason, n in sorted(dict(t.failures).items()):
                failures.add_metric([t.device, reason], n)
            for model, hist in sorted(dict(t.inference).items()):
                ib, it = hist.snapshot()
                inference.add_metric([t.device, model], ib, it)
        yield polls
        yield failures
        yield inference

        yield GaugeMetricFamily(
            _name("loop_heartbeat_age_seconds"),
            "Time since the event loop last ran its heartbeat (a stuck loop grows it).",
            value=s.loop_heartbeat_age,
        )
        yield GaugeMetricFamily(
            _name("loop_lag_seconds"), "How late the event loop ran its last heartbeat.", value=s.loop_lag
        )
        yield GaugeMetricFamily(_name("live"), "1 while every loop progresses (/healthz).", value=int(s.live))
        yield GaugeMetricFamily(_name("ready"), "1 while /readyz answers 200.", value=int(s.ready))
        if s.temperature is not None:
            yield GaugeMetricFamily(
                _name("host_temperature_celsius"), "SoC/CPU temperature (thermal zone).", value=s.temperature
            )
        if s.mem_available is not None:
            yield GaugeMetricFamily(
                _name("host_memory_available_bytes"), "MemAvailable of the host.", value=s.mem_available
            )
        if s.load1 is not None:
            yield GaugeMetricFamily(_name("host_load1"), "1-minute load average of the host.", value=s.load1)


def build_registry(snapshot: Callable[[], Snapshot]) -> CollectorRegistry:
    """A registry with the agent's collector and prometheus_client's process/platform/gc ones."""
    registry = CollectorRegistry()
    registry.register(AgentCollector(snapshot))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


# ---- HTTP -------------------------------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16

    def __init__(self, host: str, port: int, app: HealthServer) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if host == "localhost":
            host = "127.0.0.1"
        self.address_family = family
        self.app = app
        super().__init__((host, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds per request: a slow client cannot hold a thread forever

    def do_GET(self) -> None:
        app = self.server.app
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, encoder(app.registry), content_type)
            elif path in ("/healthz", "/readyz"):
                ok, body = (app.live if path == "/healthz" else app.ready)()
                data = json.dumps({"ok": ok, **body}, indent=1, default=str).encode() + b"\n"
                self._send(200 if ok else 503, data, "application/json")
            elif path == "/":
                self._send(200, b"edge-agent: /metrics /healthz /readyz\n", "text/plain; charset=utf-8")
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")
        except Exception as exc:  # an endpoint bug must answer, not kill the thread silently
            log.exception("observability endpoint %s failed", path)
            self._send(500, f"{type(exc).__name__}\n".encode(), "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not news: log them at debug."""
        log.debug("%s %s", self.address_string(), format % args)


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port``, served from a thread."""

    def __init__(self, listen: str, registry: CollectorRegistry, *, live: Probe, ready: Probe) -> None:
        """Prepare; :meth:`start` binds the port."""
        self.listen = listen
        self.registry = registry
        self.live = live
        self.ready = ready
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when 0 was asked for."""
        if self._server is None:
            raise RuntimeError("not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and serve.

        Raises:
            OSError: the address cannot be bound (in use, not local).
        """
        host, port = parse_listen(self.listen)
        self._server = _Server(host, port, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="edge-agent-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None
