"""A serial sensor simulator: realistic frames on a pseudo-terminal or a real port, with noise.

``edge-agent simulate serial --pty`` creates a pseudo-terminal pair, prints the path the
agent should open and the matching device config, and streams frames until stopped. With
``--noise 0.1`` one frame slot in ten is damaged: garbage bytes before the frame, a
corrupted frame, or a cut-off frame followed by a good one. A ledger of what was sent is
printed at the end, with the bad-frame counts the agent should report for it.

Noise is built so that each damaged slot is one fault for the agent's parser: garbage never
contains the first sync byte (binary) nor the terminator (line), a corrupted checksum never
contains the first sync byte, and a frame is cut where its remnant fails the checksum. A
weak checksum (sum8, xor, crc8) can still pass a damaged frame by chance in rarer cases
(a sync byte sequence inside the damaged bytes), as on a real line; crc16-modbus makes that
negligible.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import re
import select
import signal
import struct
import sys
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import yaml

from drivers.serial.checksums import FUNCTIONS, SIZES, ChecksumName, checksum_bytes

Emits = Literal["meter", "parking", "crosswalk"]
FramingKind = Literal["line", "binary"]
Fault = Literal["garbage", "corrupt", "truncated"]
NUMBER = r"-?\d+(?:\.\d+)?"


@dataclass(frozen=True)
class Channel:
    """One value the sensor sends: its text tag and decimals, its binary code and scale."""

    quantity: str
    unit: str
    tag: str  # line framing: TAG=value
    decimals: int  # line framing
    code: str  # binary framing: struct code of the raw integer
    scale: float  # binary framing: value = raw * scale


PROFILES: dict[Emits, tuple[Channel, ...]] = {
    # An environment sensor on a lamp post: temperature, humidity, pressure.
    "meter": (
        Channel("temperature", "degC", "T", 2, "h", 0.01),
        Channel("humidity", "%", "H", 1, "H", 0.1),
        Channel("pressure", "bar", "P", 4, "H", 0.0001),
    ),
    # A magnetometer bay sensor.
    "parking": (
        Channel("occupied", "", "OCC", 0, "B", 1),
        Channel("confidence", "", "CONF", 2, "B", 0.01),
    ),
    # A people counter at a crossing.
    "crosswalk": (Channel("count", "", "PED", 0, "H", 1),),
}


def _wire(value: float, decimals: int) -> float:
    return float(f"{round(value, decimals):.12g}")


@dataclass
class Ledger:
    """What the simulator sent, and the bad-frame counts the agent should report for it."""

    kind: FramingKind
    slots: int = 0
    good: int = 0
    faults: dict[Fault, int] = field(default_factory=lambda: {"garbage": 0, "corrupt": 0, "truncated": 0})

    def expected(self) -> dict[str, int]:
        """Bad frames by the parser's reasons (see drivers/serial/framing.py)."""
        f = self.faults
        if self.kind == "binary":
            return {"no_sync": f["garbage"], "bad_checksum": f["corrupt"] + f["truncated"]}
        return {"no_sync": f["garbage"] + f["truncated"], "undecodable": f["corrupt"]}

    def summary(self) -> str:
        """One line for the technician."""
        faults = ", ".join(f"{n} {name}" for name, n in self.faults.items())
        expected = ", ".join(f"{reason} {n}" for reason, n in self.expected().items())
        return f"sent {self.slots} frame slots: {self.good} good frames, {faults}; agent should count: {expected}"


class Simulator:
    """Builds the byte stream of one sensor, slot by slot, and keeps the truth of what it sent."""

    def __init__(
        self,
        emits: Emits = "meter",
        framing: FramingKind = "line",
        *,
        checksum: ChecksumName = "crc16-modbus",
        checksum_over: Literal["payload", "sync+payload"] = "payload",
        sync: bytes = b"\xaa\x55",
        noise: float = 0.0,
        faults: tuple[Fault, ...] = ("garbage", "corrupt", "truncated"),
        seed: int | None = None,
    ) -> None:
        """Choose the sensor and its framing; ``noise`` is the share of damaged slots (0..1)."""
        if not 0.0 <= noise <= 1.0:
            raise ValueError("noise is a share of frames: 0 to 1")
        if not sync:
            raise ValueError("sync needs at least one byte")
        if framing == "binary" and checksum == "none":
            faults = tuple(f for f in faults if f == "garbage")  # no check can catch the others
        if noise and not faults:
            raise ValueError("no fault kind left to inject")
        self.emits = emits
        self.kind = framing
        self.channels = PROFILES[emits]
        self.checksum: ChecksumName = checksum
        self.checksum_over = checksum_over
        self.sync = sync
        self.noise = noise
        self.fault_kinds = faults
        self.rng = random.Random(seed)
        self.ledger = Ledger(framing)
        self.truth: list[dict[str, float]] = []  # values of each good frame sent, in order
        self.layout = "<" + "".join(c.code for c in self.channels)
        self.length = len(sync) + struct.calcsize(self.layout) + SIZES[checksum]
        self.pattern = ";".join(f"{c.tag}=(?P<{c.quantity}>{NUMBER})" for c in self.channels)
        self._regex = re.compile(self.pattern)
        self._state: dict[str, float] = {
            "temperature": self.rng.uniform(12.0, 24.0),
            "humidity": self.rng.uniform(40.0, 70.0),
            "pressure": self.rng.uniform(1.005, 1.020),
            "occupied": 0.0,
            "confidence": 0.9,
            "count": 0.0,
        }

    # ---- the config the agent needs -------------------------------------------------------
    def device_config(self, device_id: str, port: str, **extra: Any) -> dict[str, Any]:
        """The ``devices[]`` entry that reads this simulator (``extra`` keys added as given)."""
        framing: dict[str, Any]
        fields: list[dict[str, Any]]
        if self.kind == "line":
            framing = {"kind": "line", "pattern": self.pattern, "terminator": "\n"}
            fields = [{"name": c.quantity, "quantity": c.quantity, "unit": c.unit} for c in self.channels]
        else:
            framing = {
                "kind": "binary",
                "sync": self.sync.hex().upper(),
                "layout": self.layout,
                "length": self.length,
                "checksum": self.checksum,
                "checksum_over": self.checksum_over,
            }
            fields = [
                {"name": i, "quantity": c.quantity, "unit": c.unit, "scale": c.scale}
                for i, c in enumerate(self.channels)
            ]
        device: dict[str, Any] = {"id": device_id, "driver": "serial", "port": port, "framing": framing}
        device["fields"] = fields
        device["emits"] = self.emits
        if self.emits == "parking":
            device["bay"] = "A1"
        elif self.emits == "crosswalk":
            device["area"] = "north"
        device.update(extra)
        return device

    def device_yaml(self, device_id: str, port: str, **extra: Any) -> str:
        """:meth:`device_config` as a YAML list item, ready to paste under ``devices:``."""
        return yaml.safe_dump([self.device_config(device_id, port, **extra)], sort_keys=False, width=200)

    # ---- the stream ----------------------------------------------------------------------------
    def slot(self) -> bytes:
        """The bytes of the next frame slot: a good frame, or one fault (updates the ledger)."""
        self.ledger.slots += 1
        frame, values = self._good_frame()
        fault = self.rng.choice(self.fault_kinds) if self.noise and self.rng.random() < self.noise else None
        if fault == "corrupt":
            self.ledger.faults["corrupt"] += 1
            return self._corrupt(frame)
        if fault == "garbage":
            self.ledger.faults["garbage"] += 1
            frame = self._garbage() + frame
        elif fault == "truncated":
            self.ledger.faults["truncated"] += 1
            frame = self._cut(frame) + frame
        self.ledger.good += 1
        self.truth.append(values)
        return frame

    def _step(self) -> dict[str, float]:
        s, rng = self._state, self.rng
        # Slow random walks inside physical bounds: what a real sensor's readings look like.
        s["temperature"] = min(60.0, max(-40.0, s["temperature"] + rng.gauss(0.0, 0.05)))
        s["humidity"] = min(99.0, max(5.0, s["humidity"] + rng.gauss(0.0, 0.2)))
        s["pressure"] = min(1.050, max(0.950, s["pressure"] + rng.gauss(0.0, 0.00005)))
        if rng.random() < 0.1:
            s["occupied"] = 1.0 - s["occupied"]
        s["confidence"] = rng.uniform(0.85, 0.99)
        s["count"] = float(max(0, round(rng.gauss(2.0, 1.6))))
        return {c.quantity: s[c.quantity] for c in self.channels}

    def _good_frame(self) -> tuple[bytes, dict[str, float]]:
        for _ in range(100):
            values = self._step()
            if self.kind == "line":
                wire = {c.quantity: _wire(values[c.quantity], c.decimals) for c in self.channels}
                text = ";".join(f"{c.tag}={wire[c.quantity]:.{c.decimals}f}" for c in self.channels)
                return (text + "\r\n").encode("ascii"), wire
            raws = [round(values[c.quantity] / c.scale) for c in self.channels]
            payload = struct.pack(self.layout, *raws)
            covered = self.sync + payload if self.checksum_over == "sync+payload" else payload
            frame = self.sync + payload + checksum_bytes(self.checksum, covered)
            # A sync inside a frame is harmless while the frame is good, but it would give a
            # damaged copy a second (uncounted) chance to pass a weak checksum.
            if self.sync not in frame[1:]:
                wire = {c.quantity: float(f"{r * c.scale:.12g}") for c, r in zip(self.channels, raws, strict=True)}
                return frame, wire
        raise RuntimeError("could not build a frame without an inner sync")  # pragma: no cover

    def _checks(self, candidate: bytes) -> bool:
        """Whether a binary candidate frame passes the checksum."""
        size = SIZES[self.checksum]
        end = len(candidate) - size
        covered = candidate[:end] if self.checksum_over == "sync+payload" else candidate[len(self.sync) : end]
        return FUNCTIONS[self.checksum](covered).to_bytes(size, "little") == candidate[end:]

    def _garbage(self) -> bytes:
        n = self.rng.randint(1, 16)
        if self.kind == "binary":
            pool = [b for b in range(256) if b != self.sync[0]]
        else:  # bytes no ASCII text contains, and never the terminator
            pool = [*range(0x00, 0x09), *range(0x80, 0x100)]
        return bytes(self.rng.choice(pool) for _ in range(n))

    def _corrupt(self, frame: bytes) -> bytes:
        if self.kind == "binary":
            size = SIZES[self.checksum]
            while True:
                flip = self.rng.randint(1, 255)
                bad = frame[:-1] + bytes([frame[-1] ^ flip])
                if self.sync[0] not in bad[-size:]:
                    return bad
        body = frame[:-2]  # without CR LF
        while True:
            at = self.rng.randint(1, len(body) - 1)
            bad = body[:at] + bytes([self.rng.randint(0x80, 0xFF)]) + body[at:]
            if not any(self._regex.fullmatch(bad[i:].decode("latin-1")) for i in range(at + 1, len(bad))):
                return bad + b"\r\n"

    def _cut(self, frame: bytes) -> bytes:
        """A cut-off copy of ``frame``, to be followed by ``frame`` itself."""
        if self.kind == "binary":
            for _ in range(100):
                cut = self.rng.randint(len(self.sync) + 1, self.length - 1)
                if not self._checks((frame[:cut] + frame)[: self.length]):
                    return frame[:cut]
            raise RuntimeError("no cut fails the checksum")  # pragma: no cover
        body = frame[:-2]
        for _ in range(100):
            cut = self.rng.randint(1, len(body) - 1)
            glued = (body[:cut] + body).decode("ascii")
            if not any(self._regex.fullmatch(glued[i:]) for i in range(cut)):
                return body[:cut]
        raise RuntimeError("no cut leaves the frame alone")  # pragma: no cover


# ---- where the bytes go ---------------------------------------------------------------------
class PtySink:
    """The master end of a pseudo-terminal; the agent opens the slave's path."""

    def __init__(self, link: Path | None = None) -> None:
        """Create the pair (slave in raw mode, so the line discipline passes bytes untouched)."""
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self._slave)
        self.link = link
        if link is not None:
            if link.exists() and not link.is_symlink():
                self.close()
                raise FileExistsError(f"{link} exists and is not a symlink; not replacing it")
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(self.path)

    def write(self, data: bytes, timeout: float = 1.0) -> bool:
        """Write all of ``data``; False if nobody drained the pty within ``timeout``."""
        deadline = time.monotonic() + timeout
        while data:
            try:
                data = data[os.write(self.master, data) :]
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                select.select([], [self.master], [], left)
        return True

    def close(self) -> None:
        """Close both ends: the agent's reads fail as on an unplugged adapter."""
        if self.link is not None and self.link.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class PortSink:
    """A real serial port (e.g. a USB adapter wired to the gateway's port with a null modem)."""

    def __init__(self, path: str, baudrate: int) -> None:
        """Open the port for writing."""
        import serial

        self.path = path
        self._port = serial.Serial(path, baudrate, write_timeout=1.0)
        self._timeout = serial.SerialTimeoutException

    def write(self, data: bytes) -> bool:
        """Write ``data``; False if the port would not take it within a second."""
        try:
            self._port.write(data)
        except self._timeout:
            return False
        return True

    def close(self) -> None:
        """Close the port."""
        self._port.close()


# ---- the command line ----------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-agent simulate serial",
        description="Stream a simulated serial sensor's frames to a pseudo-terminal or a port.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--pty", action="store_true", help="create a pseudo-terminal and print its path")
    where.add_argument("--port", help="write to this serial port instead")
    p.add_argument("--link", type=Path, help="with --pty: also make this symlink to it (a stable path for configs)")
    p.add_argument("--baudrate", type=int, default=9600, help="with --port (default 9600)")
    p.add_argument("--emits", choices=list(PROFILES), default="meter", help="sensor kind (default meter)")
    p.add_argument("--framing", choices=["line", "binary"], default="line", help="default line")
    p.add_argument("--checksum", choices=list(SIZES), default="crc16-modbus", help="binary framing")
    p.add_argument("--checksum-over", choices=["payload", "sync+payload"], default="payload")
    p.add_argument("--sync", default="AA55", help="binary framing: sync bytes in hex (default AA55)")
    p.add_argument("--rate", type=float, default=2.0, help="frames per second (default 2)")
    p.add_argument("--noise", type=float, default=0.0, help="share of damaged frame slots, 0..1 (default 0)")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (default: until Ctrl-C)")
    p.add_argument("--seed", type=int, help="random seed, for a repeatable stream")
    p.add_argument("--device-id", default="serial-1", help="id in the printed device config")
    return p


def _stop(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    """Run the simulator; prints the port and device config to stdout, the ledger to stderr."""
    args = _parser().parse_args(argv)
    if args.rate <= 0 or not math.isfinite(args.rate):
        print("--rate must be a positive number of frames per second", file=sys.stderr)
        return 2
    try:
        sim = Simulator(
            args.emits,
            args.framing,
            checksum=args.checksum,
            checksum_over=args.checksum_over,
            sync=bytes.fromhex(args.sync.removeprefix("0x")),
            noise=args.noise,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"edge-agent simulate serial: {exc}", file=sys.stderr)
        return 2
    sink: PtySink | PortSink
    try:
        sink = PtySink(args.link) if args.pty else PortSink(args.port, args.baudrate)
    except OSError as exc:  # SerialException is an OSError
        print(f"edge-agent simulate serial: cannot open {args.port or 'a pty'}: {exc}", file=sys.stderr)
        return 1
    port = str(args.link) if args.link else sink.path
    print(f"# serial {args.framing} {args.emits} sensor on {port}; add this device to the site config:")
    print(sim.device_yaml(args.device_id, port), end="", flush=True)
    signal.signal(signal.SIGTERM, _stop)
    stalled = 0
    started = next_at = time.monotonic()
    try:
        while not args.seconds or time.monotonic() - started < args.seconds:
            if not sink.write(sim.slot()):
                stalled += 1
                if stalled == 1:
                    print(f"nobody reads {port}: frames are being dropped", file=sys.stderr)
            next_at += 1.0 / args.rate
            time.sleep(max(0.0, next_at - time.monotonic()))
    except KeyboardInterrupt:
        pass
    finally:
        sink.close()
        print(sim.ledger.summary() + (f" ({stalled} not taken by the port)" if stalled else ""), file=sys.stderr)
    return 0
