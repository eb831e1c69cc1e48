"""A recording MQTT proxy: the edge node connects through it, and every packet either way is kept
with its time and its place in one order across all proxies of a recording.

That order is what the session checks need and a subscriber cannot see: the CONNECT and its
Will, SUBSCRIBE before NBIRTH, the QoS and retain flags as the client sent them, the STATE and
commands the client was handed, and where a connection ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

from tests.mqtt_proxy import Framer
from tests.sparkplug.packets import Packet, PacketError, parse


class Tape:
    """Every packet of every proxy sharing it, in the order they passed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._packets: list[Packet] = []
        self._conns = 0
        self.errors: list[str] = []

    def next_conn(self) -> int:
        with self._lock:
            self._conns += 1
            return self._conns

    def add(self, raw: bytes, *, server: str, conn: int, up: bool, version: int) -> Packet | None:
        with self._lock:
            try:
                packet = parse(raw, n=len(self._packets), at=time.time(), server=server, conn=conn, up=up,
                               version=version)  # fmt: skip
            except PacketError as e:
                self.errors.append(f"{server}#{conn}: {e}")
                return None
            self._packets.append(packet)
            return packet

    def close(self, *, server: str, conn: int, version: int, by_client: bool) -> None:
        with self._lock:
            self._packets.append(Packet(n=len(self._packets), at=time.time(), server=server, conn=conn,
                                        up=by_client, kind="CLOSE", version=version))  # fmt: skip

    def packets(self) -> list[Packet]:
        with self._lock:
            return list(self._packets)


class RecordingProxy:
    """A TCP proxy on a free loopback port to ``upstream_port``, recording onto ``tape``."""

    def __init__(self, tape: Tape, server: str, upstream_port: int) -> None:
        self.tape = tape
        self.server = server
        self.upstream_port = upstream_port
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"spb-proxy-{server}", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> RecordingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        conn = self.tape.next_conn()
        try:
            ureader, uwriter = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cwriter.transport.abort()  # the broker is down: the client sees a refused session
            return
        self._writers |= {cwriter, uwriter}
        state: dict[str, Any] = {"version": 4, "closed_by": None}
        up = asyncio.ensure_future(self._pump(creader, uwriter, conn, True, state))
        down = asyncio.ensure_future(self._pump(ureader, cwriter, conn, False, state))
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for w in (cwriter, uwriter):
            w.transport.abort()
            self._writers.discard(w)
        for task in (up, down):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        self.tape.close(server=self.server, conn=conn, version=state["version"], by_client=bool(state["closed_by"]))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int, up: bool,
                    state: dict[str, Any]) -> None:  # fmt: skip
        framer = Framer()
        while True:
            try:
                data = await reader.read(65536)
            except OSError:
                data = b""
            if not data:
                if state["closed_by"] is None:
                    state["closed_by"] = up
                return
            for raw in framer.feed(data):
                packet = self.tape.add(raw, server=self.server, conn=conn, up=up, version=state["version"])
                if packet is not None and packet.kind == "CONNECT":
                    state["version"] = packet.version
            writer.write(data)
            with contextlib.suppress(OSError):
                await writer.drain()
