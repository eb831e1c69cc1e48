"""Parsing of the MQTT packets the Sparkplug checks read: CONNECT (with its Will), SUBSCRIBE, PUBLISH
and DISCONNECT, for MQTT 3.1.1 and 5.0.

Only what the assertions need is decoded; a packet of another type is recorded by name alone.
A packet that does not parse raises :class:`PacketError` naming the field, so a broken client
shows up as a failed check rather than a crashed proxy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 8: "SUBSCRIBE", 9: "SUBACK", 12: "PINGREQ",
         13: "PINGRESP", 14: "DISCONNECT"}  # fmt: skip

SESSION_EXPIRY = 0x11  # MQTT 5 property identifier


class PacketError(ValueError):
    """A packet too short or malformed in the named field."""


@dataclass(frozen=True)
class Will:
    topic: str
    qos: int
    retain: bool
    payload: bytes


@dataclass(frozen=True)
class Packet:
    """One MQTT packet seen by the proxy, or the close of a connection (kind ``CLOSE``).

    ``n`` orders every packet of every connection through every proxy of one recording; ``at``
    is wall-clock seconds (UTC) when it passed. ``up`` is client -> broker.
    """

    n: int
    at: float
    server: str
    conn: int
    up: bool
    kind: str
    version: int = 4  # protocol level of the connection: 4 = 3.1.1, 5 = 5.0
    topic: str = ""
    qos: int = 0
    retain: bool = False
    payload: bytes = b""
    clean: bool = False
    session_expiry: int = 0
    will: Will | None = None
    subscriptions: tuple[tuple[str, int], ...] = ()
    reason: int = 0
    client_id: str = ""
    extra: dict[str, object] = field(default_factory=dict, compare=False)


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.i = 0
        self.what = what

    def take(self, n: int, name: str) -> bytes:
        if self.i + n > len(self.data):
            raise PacketError(f"{self.what}: {name} runs past the end of the packet")
        out = self.data[self.i : self.i + n]
        self.i += n
        return out

    def u8(self, name: str) -> int:
        return self.take(1, name)[0]

    def u16(self, name: str) -> int:
        return int.from_bytes(self.take(2, name), "big")

    def varint(self, name: str) -> int:
        value, shift = 0, 0
        for _ in range(4):
            byte = self.u8(name)
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        raise PacketError(f"{self.what}: {name} is a variable integer longer than 4 bytes")

    def binary(self, name: str) -> bytes:
        return self.take(self.u16(name), name)

    def string(self, name: str) -> str:
        try:
            return self.binary(name).decode()
        except UnicodeDecodeError:
            raise PacketError(f"{self.what}: {name} is not UTF-8") from None

    def properties(self, name: str) -> dict[int, int]:
        """MQTT 5 properties; only the four-byte integer ones are kept (Session Expiry is one)."""
        end = self.varint(f"{name} length")
        end += self.i
        found: dict[int, int] = {}
        while self.i < end:
            ident = self.varint(f"{name} identifier")
            if ident in (0x02, 0x11, 0x18, 0x27):  # four-byte integers
                found[ident] = int.from_bytes(self.take(4, name), "big")
            elif ident in (0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A, 0x2C):  # bytes
                self.take(1, name)
            elif ident in (0x13, 0x21, 0x22, 0x23):  # two-byte integers
                self.take(2, name)
            elif ident == 0x0B:  # subscription identifier
                self.varint(name)
            elif ident in (0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F):  # strings or binary data
                self.binary(name)
            elif ident == 0x26:  # user property: a string pair
                self.binary(name)
                self.binary(name)
            else:
                raise PacketError(f"{self.what}: unknown property {ident:#x} in {name}")
        return found


def body_of(raw: bytes) -> tuple[int, int, bytes]:
    """(type, flags, variable header + payload) of one framed packet."""
    r = _Reader(raw, "packet")
    first = r.u8("fixed header")
    length = r.varint("remaining length")
    return first >> 4, first & 0x0F, r.take(length, "body")


def parse(raw: bytes, *, n: int, at: float, server: str, conn: int, up: bool, version: int) -> Packet:
    """One framed packet as a :class:`Packet`; ``version`` is the connection's (from its CONNECT)."""
    ptype, flags, body = body_of(raw)
    kind = KINDS.get(ptype, f"TYPE{ptype}")
    base = {"n": n, "at": at, "server": server, "conn": conn, "up": up, "kind": kind, "version": version}
    if ptype == 1:
        return Packet(**base | _connect(body))  # type: ignore[arg-type]
    if ptype == 3:
        return Packet(**base | _publish(body, flags, version))  # type: ignore[arg-type]
    if ptype == 8:
        return Packet(**base | _subscribe(body, version))  # type: ignore[arg-type]
    if ptype == 14:
        return Packet(**base | {"reason": body[0] if body else 0})  # type: ignore[arg-type]
    return Packet(**base)  # type: ignore[arg-type]


def _connect(body: bytes) -> dict[str, object]:
    r = _Reader(body, "CONNECT")
    if r.string("protocol name") not in ("MQTT", "MQIsdp"):
        raise PacketError("CONNECT: protocol name is not MQTT")
    version = r.u8("protocol level")
    flags = r.u8("connect flags")
    r.u16("keep alive")
    expiry = r.properties("properties").get(SESSION_EXPIRY, 0) if version == 5 else 0
    client_id = r.string("client identifier")
    will = None
    if flags & 0x04:
        if version == 5:
            r.properties("will properties")
        topic = r.string("will topic")
        will = Will(topic, (flags >> 3) & 0x03, bool(flags & 0x20), r.binary("will payload"))
    return {"version": version, "clean": bool(flags & 0x02), "session_expiry": expiry, "will": will,
            "client_id": client_id}  # fmt: skip


def _publish(body: bytes, flags: int, version: int) -> dict[str, object]:
    r = _Reader(body, "PUBLISH")
    qos = (flags >> 1) & 0x03
    topic = r.string("topic")
    if qos:
        r.u16("packet identifier")
    if version == 5:
        r.properties("properties")
    return {"topic": topic, "qos": qos, "retain": bool(flags & 0x01), "payload": body[r.i :]}


def _subscribe(body: bytes, version: int) -> dict[str, object]:
    r = _Reader(body, "SUBSCRIBE")
    r.u16("packet identifier")
    if version == 5:
        r.properties("properties")
    subs: list[tuple[str, int]] = []
    while r.i < len(body):
        topic = r.string("topic filter")
        subs.append((topic, r.u8("subscription options") & 0x03))
    return {"subscriptions": tuple(subs)}
