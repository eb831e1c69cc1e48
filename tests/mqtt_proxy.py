"""A fault-injecting, MQTT-aware TCP proxy for the end-to-end tests.

It sits between the agent and the broker (agent -> proxy -> broker), runs its own asyncio
event loop in a background thread, and is controlled from synchronous test code through
thread-safe methods:

* :meth:`MqttProxy.drop_pubacks` silently drops a fraction of broker->client PUBACKs;
* :meth:`MqttProxy.cut_after_publish` closes the connection right after forwarding every
  Nth client->broker PUBLISH, so that PUBLISH reaches the broker but its PUBACK never returns;
* :meth:`MqttProxy.blackhole` stops forwarding in both directions without closing anything
  (a half-open link: no FIN, no RST); new connections are accepted and held;
* :meth:`MqttProxy.reset_all` aborts every connection with an RST.

Packets are framed by the MQTT fixed header (type nibble + remaining-length varint) so a
packet split across reads, or several packets in one read, are handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

PUBLISH = 3
PUBACK = 4
PINGREQ = 12


class MalformedPacketError(ValueError):
    """The byte stream is not MQTT (remaining length longer than four bytes)."""


class Framer:
    """Splits a byte stream into whole MQTT packets; keeps the incomplete tail for later."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete packet held back."""
        return len(self._buf)

    def _next_length(self) -> int | None:
        """Total length of the first packet in the buffer, or None if not complete yet."""
        buf = self._buf
        length, multiplier, i = 0, 1, 1
        while True:
            if i >= len(buf):
                return None
            byte = buf[i]
            length += (byte & 0x7F) * multiplier
            i += 1
            if not byte & 0x80:
                break
            if i > 4:
                raise MalformedPacketError("remaining length longer than 4 bytes")
            multiplier *= 128
        total = i + length
        return total if len(buf) >= total else None

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return every packet now complete, in order."""
        self._buf += data
        packets: list[bytes] = []
        while self._buf:
            total = self._next_length()
            if total is None:
                break
            packets.append(bytes(self._buf[:total]))
            del self._buf[:total]
        return packets


def packet_type(packet: bytes) -> int:
    """MQTT control packet type (upper nibble of the first byte)."""
    return packet[0] >> 4


@dataclass
class ProxyStats:
    """What the proxy did (a snapshot)."""

    connections: int = 0
    publishes_forwarded: int = 0
    pubacks_seen: int = 0
    pubacks_dropped: int = 0
    cuts: int = 0
    resets: int = 0  # connections aborted by reset_all()
    reset_calls: int = 0
    last_down_at: float = 0.0  # time.monotonic() of the last packet forwarded broker->client
    pingreqs_at: list[float] = field(default_factory=list)  # time.monotonic() a client PINGREQ arrived
    connects_at: list[float] = field(default_factory=list)  # time.monotonic() a client connection was accepted


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    closed: bool = False
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def close(self, *, client_rst: bool, upstream_rst: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for writer, rst in ((self.client, client_rst), (self.upstream, upstream_rst)):
            if writer is None:
                continue
            if rst:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        # linger on, timeout 0: close() sends RST and discards unsent data
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()  # flushes what is buffered, then FIN


class MqttProxy:
    """TCP proxy on a free loopback port forwarding to ``upstream_host:upstream_port``."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing: asyncio.Event | None = None
        self._stats = ProxyStats()
        self._drop_fraction = 0.0
        self._rng = random.Random(0)
        self._cut_every = 0
        self._since_cut = 0

    # ---- lifecycle (sync, from the test thread) ----------------------------------------
    def start(self) -> MqttProxy:
        """Start the loop thread and the listener; returns once it accepts connections."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._thread_main, name="mqtt-proxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start_server(), loop).result(10)
        return self

    def stop(self) -> None:
        """Close every connection and the listener, stop the loop and join its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> MqttProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # ---- controls (thread-safe) ---------------------------------------------------------
    def drop_pubacks(self, fraction: float, seed: int | None = 0) -> None:
        """Silently drop this fraction (0..1) of broker->client PUBACK packets."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("fraction must be within 0..1")

        def apply() -> None:
            self._drop_fraction = fraction
            self._rng = random.Random(seed)

        self._call(apply)

    def cut_after_publish(self, every_n: int) -> None:
        """Close the connection right after forwarding every Nth client->broker PUBLISH (0: off)."""
        if every_n < 0:
            raise ValueError("every_n must be >= 0")

        def apply() -> None:
            self._cut_every = every_n
            self._since_cut = 0

        self._call(apply)

    def blackhole(self, on: bool) -> None:
        """Stop (True) or resume (False) forwarding in both directions; nothing is closed."""

        def apply() -> None:
            assert self._flowing is not None
            if on:
                self._flowing.clear()
            else:
                self._flowing.set()

        self._call(apply)

    def heal(self) -> None:
        """No more faults: no PUBACK drops, no cuts, no blackhole."""
        self.drop_pubacks(0.0)
        self.cut_after_publish(0)
        self.blackhole(False)

    def reset_all(self) -> int:
        """Abort every connection with an RST (both sides); returns how many were open."""

        def apply() -> int:
            links = list(self._links)
            for link in links:
                link.close(client_rst=True, upstream_rst=True)
            self._stats.resets += len(links)
            self._stats.reset_calls += 1
            return len(links)

        return self._call(apply)

    def stats(self) -> ProxyStats:
        """A consistent snapshot of the counters."""

        def snap() -> ProxyStats:
            d = dict(vars(self._stats))
            d["pingreqs_at"] = list(self._stats.pingreqs_at)
            d["connects_at"] = list(self._stats.connects_at)
            return ProxyStats(**d)

        return self._call(snap)

    def open_connections(self) -> int:
        """Client connections currently open through the proxy."""
        return self._call(lambda: sum(1 for link in self._links if not link.closed))

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the proxy's loop thread and return its result."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("proxy is not running")

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(10)

    # ---- the loop thread ----------------------------------------------------------------
    def _thread_main(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _start_server(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close(client_rst=False, upstream_rst=False)
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        link = _Link(client=writer)
        self._links.add(link)
        self._stats.connections += 1
        self._stats.connects_at.append(time.monotonic())
        try:
            await self._flowing.wait()  # blackholed: accept, then hold
            if link.closed:
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            except OSError:
                link.close(client_rst=True, upstream_rst=True)
                return
            link.upstream = up_writer
            if link.closed:  # reset while connecting upstream
                link.closed = False
                link.close(client_rst=True, upstream_rst=True)
                return
            up = asyncio.create_task(self._pump(link, reader, up_writer, upstream=True))
            down = asyncio.create_task(self._pump(link, up_reader, writer, upstream=False))
            link.tasks = {up, down}
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # stop() cancels every handler; ending normally keeps asyncio from logging each one
            # as "Exception in callback" at teardown.
            pass
        finally:
            link.close(client_rst=False, upstream_rst=False)
            for t in link.tasks:
                t.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)
            self._links.discard(link)

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        """Forward one direction packet by packet, applying the faults.

        A reader side keeps reading and framing even while blackholed (so what the peer sends
        is seen, e.g. a PINGREQ, and held); the forwarding side waits until the link flows.
        An EOF is held as well: nothing, not even a FIN, crosses a blackholed link.
        """
        assert self._flowing is not None
        held: deque[bytes] = deque()
        more = asyncio.Event()
        eof = False

        async def read_side() -> None:
            nonlocal eof
            framer = Framer()
            try:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        return
                    packets = framer.feed(data)
                    if upstream:
                        now = time.monotonic()
                        self._stats.pingreqs_at += [now for p in packets if packet_type(p) == PINGREQ]
                    held.extend(packets)
                    more.set()
            except (ConnectionError, OSError, MalformedPacketError):
                return
            finally:
                eof = True
                more.set()

        reading = asyncio.create_task(read_side())
        try:
            while not link.closed:
                await more.wait()
                await self._flowing.wait()
                if link.closed:
                    return
                more.clear()
                batch = list(held)
                held.clear()
                out = bytearray()
                cut = False
                for packet in batch:
                    kind = packet_type(packet)
                    if not upstream and kind == PUBACK:
                        self._stats.pubacks_seen += 1
                        if self._drop_fraction and self._rng.random() < self._drop_fraction:
                            self._stats.pubacks_dropped += 1
                            continue
                    out += packet
                    if upstream and kind == PUBLISH:
                        self._stats.publishes_forwarded += 1
                        if self._cut_every:
                            self._since_cut += 1
                            if self._since_cut >= self._cut_every:
                                self._since_cut = 0
                                cut = True
                                break
                if out:
                    writer.write(out)
                    if not upstream:
                        self._stats.last_down_at = time.monotonic()
                    await writer.drain()
                if cut:
                    self._stats.cuts += 1
                    # The PUBLISH is flushed to the broker (graceful close); the client gets an RST.
                    link.close(client_rst=True, upstream_rst=False)
                    return
                if eof and not held:
                    return
        except (ConnectionError, OSError):
            return
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
