"""Measurements of the agent and its host: plain counters, histograms, /proc readings.

Nothing here sits on the event hot path. The runtime keeps plain counters (ints in dicts,
bumped on the event loop) and hands a :class:`Snapshot` of them to the Prometheus exporter
(agent/observability/http.py) when it scrapes, on the HTTP server's thread. Histograms are
fixed-bucket counters too (:class:`Histogram`), so observing a poll is a bisect and two
additions. prometheus_client is only imported when the endpoint is on.

The metric names are listed in docs/observability.md; a test scrapes a running agent and
checks every documented name is served.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import glob
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

# Seconds. A poll is a register read over TCP or RS-485 (milliseconds to a timeout of seconds).
POLL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Seconds. One model run on one frame (camera driver), from a few ms (accelerator) to seconds (CPU).
INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MAX_REASONS = 16  # distinct failure reasons kept per device (or for the uplink); the rest are "other"


# ---- histograms and per-device telemetry ---------------------------------------------------
class Histogram:
    """Fixed-bucket histogram: observed on the event loop, read by the scrape thread."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        """Buckets are upper bounds, ascending; +Inf is implied."""
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one value."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative ``(le, count)`` buckets ending with ``+Inf``, and the sum."""
        counts = list(self.counts)  # one C-level copy: consistent under the GIL
        total = self.total
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*map(_le, self.bounds), "+Inf"), counts, strict=True):
            running += n
            out.append((bound, running))
        return out, total

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)


def _le(bound: float) -> str:
    return repr(float(bound))


@dataclass(slots=True)
class DeviceTelemetry:
    """One device's poll timings, failures by reason and inference timings.

    Owned by the runtime per device id, so the figures survive restarts of the device.
    """

    device: str
    driver: str
    polls: Histogram = field(default_factory=lambda: Histogram(POLL_BUCKETS))
    failures: dict[str, int] = field(default_factory=dict)
    inference: dict[str, Histogram] = field(default_factory=dict)

    def poll_failed(self, reason: str) -> None:
        """Count a failed poll under its normalised reason."""
        key = normalise_reason(reason)
        if key not in self.failures and len(self.failures) >= MAX_REASONS:
            key = "other"
        self.failures[key] = self.failures.get(key, 0) + 1

    def observe_poll(self, seconds: float) -> None:
        """Time of one poll (one ``read()``)."""
        self.polls.observe(seconds)

    def observe_inference(self, model: str, seconds: float) -> None:
        """Time of one inference run of ``model``."""
        hist = self.inference.get(model)
        if hist is None:
            if len(self.inference) >= MAX_REASONS:
                model = "other"
                hist = self.inference.get(model)
            if hist is None:
                hist = self.inference[model] = Histogram(INFERENCE_BUCKETS)
        hist.observe(seconds)


# ---- reasons ---------------------------------------------------------------------------------
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), label)
    for pattern, label in (
        (r"not authori[sz]ed|bad user ?name or password|authenticat", "not_authorized"),
        (r"certificate|\bssl\b|\btls\b|hostname mismatch", "tls"),
        (r"no connack", "no_connack"),
        (r"no puback", "no_puback"),
        (r"nothing from the broker|link dead", "link_dead"),
        (r"broker refused", "refused"),
        (r"publish failed", "publish_failed"),
        (r"timed? ?out|timeout", "timeout"),
        (r"connection refused|econnrefused|cannot connect", "connection_refused"),
        (r"name or service not known|gaierror|name resolution|nodename", "dns"),
        (r"no route|unreachable", "unreachable"),
        (r"port \S+ gone|unplugged|no such (file|device)|not found", "port_lost"),
        (r"permission denied", "permission_denied"),
        (r"crc|checksum", "bad_checksum"),
        (r"no valid frame", "bad_frames"),
        (r"no complete frame", "incomplete_frame"),
        (r"no data on", "no_data"),
        (r"short answer", "short_answer"),
        (r"exception \d+|illegal", "device_exception"),
        (r"connection reset|broken pipe|closed|connection lost|\beof\b", "connection_lost"),
    )
)
_EXC_NAME = re.compile(r"^([A-Z][A-Za-z0-9]*(?:Error|Exception|Timeout|Fault))\b")


@lru_cache(maxsize=512)
def normalise_reason(text: str) -> str:
    """A short, low-cardinality label for an error message (``timeout``, ``connection_lost``...).

    Known causes map to fixed labels; otherwise the exception name, or the message's first
    words without numbers, in snake_case (at most 40 characters).
    """
    for pattern, label in _RULES:
        if pattern.search(text):
            return label
    m = _EXC_NAME.match(text)
    if m:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", m.group(1)).lower()
    words = re.findall(r"[a-z]+", text.lower())[:4]
    return "_".join(words)[:40] or "unknown"


# ---- the host --------------------------------------------------------------------------------
PREFERRED_THERMAL = ("cpu-thermal", "cpu_thermal", "soc_thermal", "soc-thermal", "x86_pkg_temp", "cpu")


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def temperature_c(root: str = "/sys/class/thermal") -> float | None:
    """The SoC/CPU temperature in °C (``cpu-thermal`` on a Raspberry Pi); None when none is exposed."""
    zones: list[tuple[str, float]] = []
    for zone in sorted(glob.glob(os.path.join(root, "thermal_zone*"))):
        raw = _read(os.path.join(zone, "temp"))
        if raw is None:
            continue
        try:
            milli = int(raw.strip())
        except ValueError:
            continue
        zones.append(((_read(os.path.join(zone, "type")) or "").strip(), milli / 1000.0))
    if not zones:
        return None
    for wanted in PREFERRED_THERMAL:
        for kind, value in zones:
            if kind == wanted:
                return value
    return zones[0][1]


class _SysInfo(ctypes.Structure):
    """``struct sysinfo`` (linux/sysinfo.h), with room to spare at the end."""

    _fields_ = [
        ("uptime", ctypes.c_long),
        ("loads", ctypes.c_ulong * 3),
        ("totalram", ctypes.c_ulong),
        ("freeram", ctypes.c_ulong),
        ("sharedram", ctypes.c_ulong),
        ("bufferram", ctypes.c_ulong),
        ("totalswap", ctypes.c_ulong),
        ("freeswap", ctypes.c_ulong),
        ("procs", ctypes.c_ushort),
        ("pad", ctypes.c_ushort),
        ("totalhigh", ctypes.c_ulong),
        ("freehigh", ctypes.c_ulong),
        ("mem_unit", ctypes.c_uint),
        ("_spare", ctypes.c_char * 64),
    ]


@lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _sysinfo() -> _SysInfo | None:
    """sysinfo(2): memory and load without /proc (systemd's ProcSubset=pid hides /proc/meminfo)."""
    libc = _libc()
    if libc is None:
        return None
    info = _SysInfo()
    try:
        if libc.sysinfo(ctypes.byref(info)) != 0:
            return None
    except (AttributeError, OSError):
        return None
    return info


def memory(proc: str = "/proc") -> tuple[int | None, int | None]:
    """``(MemTotal, MemAvailable)`` of the host in bytes (None when unknown).

    From /proc/meminfo; where that is hidden, from sysinfo(2), whose "available" is free
    plus buffer memory (it cannot see reclaimable page cache, so it reads low).
    """
    found: dict[str, int] = {}
    for line in (_read(os.path.join(proc, "meminfo")) or "").splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if name in ("MemTotal", "MemAvailable") and parts and parts[0].isdigit():
            found[name] = int(parts[0]) * 1024
    if "MemTotal" not in found or "MemAvailable" not in found:
        info = _sysinfo()
        if info is not None:
            unit = info.mem_unit or 1
            found.setdefault("MemTotal", info.totalram * unit)
            found.setdefault("MemAvailable", (info.freeram + info.bufferram) * unit)
    return found.get("MemTotal"), found.get("MemAvailable")


def rss_bytes(proc: str = "/proc") -> int | None:
    """Resident memory of this process in bytes."""
    raw = _read(os.path.join(proc, "self", "statm"))
    try:
        return int(raw.split()[1]) * os.sysconf("SC_PAGE_SIZE") if raw else None
    except (IndexError, ValueError, OSError):
        return None


def disk_space(path: Path) -> tuple[int | None, int | None]:
    """``(free, total)`` bytes of the file system holding ``path`` (free for unprivileged users)."""
    for candidate in (path, *path.parents):
        try:
            st = os.statvfs(candidate)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    return None, None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (/proc/loadavg, else sysinfo(2))."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info = _sysinfo()
        if info is None:
            return None
        return [round(x / 65536.0, 2) for x in info.loads]  # SI_LOAD_SHIFT


def process_cpu_seconds() -> float:
    """CPU time (user + system, all threads) this process has used."""
    t = os.times()
    return t.user + t.system


class CpuMeter:
    """Process CPU use in % of one core between successive calls (thread-safe)."""

    def __init__(self) -> None:
        """Start measuring now."""
        self._lock = threading.Lock()
        self._mark = (time.monotonic(), process_cpu_seconds())

    def percent(self) -> float | None:
        """CPU % since the previous call (or since creation); 100 = one core fully busy."""
        now, cpu = time.monotonic(), process_cpu_seconds()
        with self._lock:
            (then, before), self._mark = self._mark, (now, cpu)
        if now - then <= 0:
            return None
        return round(100.0 * (cpu - before) / (now - then), 1)


def host_health(buffer_path: Path, cpu: CpuMeter) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``process`` and ``host`` parts of a health event (see docs/events.md)."""
    total, available = memory()
    free, size = disk_space(buffer_path.parent)
    process = {"cpu_percent": cpu.percent(), "rss_bytes": rss_bytes(), "threads": threading.active_count()}
    host = {
        "load_avg": load_average(),
        "cpus": os.cpu_count(),
        "mem_total_bytes": total,
        "mem_available_bytes": available,
        "disk_free_bytes": free,
        "disk_total_bytes": size,
        "temperature_c": temperature_c(),
    }
    return process, host


# ---- export ----------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """Everything the collector exports, read by the runtime at scrape time (thread-safe)."""

    gateway: str
    site: str | None
    version: str
    produced: Mapping[tuple[str, str], int]
    dropped: Mapping[tuple[str, str, str], int]
    not_accepted: int
    published: int
    delivered: int | None
    buffer_events: Mapping[str, int] | None  # by class name; None if the buffer did not answer
    buffer_bytes: int | None
    buffer_max_bytes: int
    buffer_oldest_age: float | None
    disk_free: int | None
    uplink_connected: bool
    uplink_reconnects: int
    uplink_disconnects: int
    uplink_errors: Mapping[str, int]
    devices: list[tuple[str, str, str]]  # (device, driver, status)
    telemetry: list[DeviceTelemetry]
    loop_heartbeat_age: float
    loop_lag: float
    live: bool
    ready: bool
    temperature: float | None
    mem_available: int | None
    load1: float | None
    # (kind, outcome) -> requests and documents from the operations centre (empty: fleet off)
    fleet: Mapping[tuple[str, str], int] = field(default_factory=dict)
    cert_expiry: float | None = None  # seconds until the client certificate expires (fleet.identity)
    cert_renewal_failures: Mapping[str, int] = field(default_factory=dict)  # failed renewals by reason
    # name -> (driver, {"connected": bool, counter: int}): upstream connections drivers share (a LoRaWAN
    # network server's broker)
    links: Mapping[str, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)
    # (uplink, kind, outcome, reason) -> commands from the far end of a durable uplink (UplinkStatus.command)
    uplink_commands: Mapping[tuple[str, str, str, str], int] = field(default_factory=dict)
