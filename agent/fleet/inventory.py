"""The gateway's inventory: what it runs, as a retained ``city.gateway.inventory`` CloudEvent.

The operations centre asks "which gateways still run model X, whose certificate expires this
month, whose clock drifts" without asking each gateway: the fleet channel keeps this document
retained on ``{prefix}/{gateway}/inventory`` (published again on every connection). It is
rebuilt every :data:`CHECK_EVERY` seconds and put when it changed, and on a heartbeat with fresh
uptime and buffer figures, which change all the time and so never count as a change.

Files are hashed once per change of their size or modification time, in a thread: never on the
event loop, never on the event path. docs/events.md has the schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config.model import AgentConfigBase
from agent.config.yaml_load import YamlLoadError, load_yaml, read_text
from agent.contract.events import (
    GATEWAY_INVENTORY,
    GATEWAY_STREAM,
    dataschema_for,
    format_time,
    new_event_id,
    source_for,
)
from agent.observability.clock import kernel_clock_sync
from agent.runtime.status import StatusModel
from agent.store.outbox import BufferStats
from agent.uplinks.api import Reports

log = logging.getLogger(__name__)

REPORT = "inventory"  # the Reports name the fleet channel publishes on {prefix}/{gateway}/inventory
CHECK_EVERY = 10.0  # seconds between rebuilds; a change goes out at the next one
HEARTBEAT = 300.0  # seconds: put again even unchanged, with fresh uptime and buffer figures
BUFFER_TIMEOUT = 2.0  # seconds to wait for the buffer's figures (the commit thread answers)
CONFIG_SECTIONS = ("devices", "priorities", "observability", "uplink", "fleet")  # what remote config may set

ConfigState = Callable[[], dict[str, Any]]


def sections_hash(sections: dict[str, Any]) -> str:
    """``sha256:<hex>`` of the canonical JSON of config sections (docs/fleet.md, remote configuration)."""
    canonical = json.dumps(sections, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def local_config_state(config: Callable[[], AgentConfigBase]) -> ConfigState:
    """The running config as the inventory reports it while no remote version runs: version 0.

    The hash covers what remote configuration may replace, dumped as the running config has it
    (defaults filled in); it is computed once per loaded config, not on every check.
    """
    seen: list[Any] = [None, ""]

    def state() -> dict[str, Any]:
        current = config()
        if seen[0] is not current:
            dump = current.model_dump(mode="json")
            seen[:] = [current, sections_hash({name: dump[name] for name in CONFIG_SECTIONS})]
        return {"version": 0, "hash": seen[1], "origin": "local"}

    return state


class FileFacts:
    """What the inventory reads from files, kept per path until its size or mtime changes."""

    def __init__(self) -> None:
        """Empty; filled as files are first read."""
        self._known: dict[tuple[str, Path], tuple[tuple[int, int], Any]] = {}
        self.reads = 0  # files actually read (hashed, parsed) rather than taken from the cache

    def _cached(self, kind: str, path: Path, read: Callable[[Path], Any]) -> Any:
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        hit = self._known.get((kind, path))
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = read(path)
        self.reads += 1
        self._known[(kind, path)] = (stamp, value)
        return value

    def sha256(self, path: Path) -> str:
        """The file's sha256 (blocking: hashed only when the file changed)."""

        def digest(p: Path) -> str:
            with p.open("rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()

        result: str = self._cached("sha256", path, digest)
        return result

    def yaml(self, path: Path) -> Any:
        """A small YAML or JSON file, parsed with the site file's bounds.

        Raises:
            OSError, YamlLoadError: it cannot be read or parsed.
        """
        return self._cached("yaml", path, lambda p: load_yaml(read_text(p))[0])

    def certificate(self, path: Path) -> tuple[str, datetime]:
        """(subject, not_after) of the first certificate in a PEM (or DER) file.

        Raises:
            OSError, ValueError: it cannot be read or holds no certificate.
        """
        return self._cached("x509", path, _read_certificate)  # type: ignore[no-any-return]


def _read_certificate(path: Path) -> tuple[str, datetime]:
    from cryptography import x509  # loaded only with the fleet channel on (it costs 7 MB)

    data = path.read_bytes()
    cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    return cert.subject.rfc4514_string(), cert.not_valid_after_utc


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _text(value: Any) -> str | None:
    return None if value is None or isinstance(value, dict | list) else str(value)


def _absolute(path: str | Path, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


class InventoryFiles:
    """Models, profiles and the client certificate the running config uses (blocking: run in a thread)."""

    def __init__(self, base_dir: Path) -> None:
        """``base_dir``: the site file's folder, which relative paths in it start from."""
        self.base_dir = base_dir
        self.files = FileFacts()
        self._profiles: tuple[Any, dict[str, tuple[Path | None, list[str]]]] = (None, {})
        self.identity_cert: Callable[[], Path] | None = None  # with fleet.identity: its current cert.pem

    def models(self, config: AgentConfigBase) -> list[dict[str, Any]]:
        """Each model manifest devices load, with the model file's sha256."""
        users: dict[Path, list[str]] = {}
        for device in config.devices:
            for manifest in device.model_manifests():
                users.setdefault(_absolute(manifest, self.base_dir), []).append(device.id)
        return [self._model(manifest, devices) for manifest, devices in sorted(users.items())]

    def _model(self, manifest: Path, devices: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"manifest": str(manifest), "name": None, "path": None, "sha256": None,
                               "version": None, "verified": False, "devices": devices}  # fmt: skip
        try:
            data = self.files.yaml(manifest)
        except (OSError, YamlLoadError) as exc:
            out["error"] = f"manifest: {_reason(exc)}"
            return out
        if not isinstance(data, dict) or not isinstance(data.get("file"), str):
            out["error"] = "manifest: no `file`"
            return out
        source = data.get("source")
        out["name"] = _text(data.get("name"))
        out["version"] = _text(data.get("version") or (source.get("version") if isinstance(source, dict) else None))
        model = _absolute(data["file"], manifest.parent)
        out["path"] = str(model)
        try:
            out["sha256"] = self.files.sha256(model)
        except OSError as exc:
            out["error"] = f"model file: {_reason(exc)}"
            return out
        out["verified"] = out["sha256"] == str(data.get("sha256", "")).strip().lower()
        return out

    def profiles(self, config: AgentConfigBase) -> list[dict[str, Any]]:
        """Each device profile devices were built from, with its file's sha256."""
        if self._profiles[0] is not config:  # searched once per loaded config: the reload merges them anew
            used: dict[str, tuple[Path | None, list[str]]] = {}
            for device in config.devices:
                for name, path in device.profile_files(self.base_dir).items():
                    used.setdefault(name, (path, []))[1].append(device.id)
            self._profiles = (config, used)
        out = []
        for name, (path, devices) in sorted(self._profiles[1].items()):
            entry: dict[str, Any] = {"name": name, "path": str(path) if path else None, "sha256": None,
                                     "version": None, "devices": devices}  # fmt: skip
            if path is not None:
                with contextlib.suppress(OSError):
                    entry["sha256"] = self.files.sha256(path)
                with contextlib.suppress(OSError, YamlLoadError):
                    data = self.files.yaml(path)
                    entry["version"] = _text(data.get("version")) if isinstance(data, dict) else None
            out.append(entry)
        return out

    def certificate(self, config: AgentConfigBase, now: datetime) -> dict[str, Any] | None:
        """The MQTT uplink's client certificate: subject and expiry (None: it has none)."""
        tls = getattr(config.uplink.present().get("mqtt"), "tls", None)
        path = self.identity_cert() if self.identity_cert is not None else getattr(tls, "cert_file", None)
        if path is None:
            return None
        return certificate_facts(Path(path), now, self.files)


def certificate_facts(path: Path, now: datetime, files: FileFacts | None = None) -> dict[str, Any]:
    """``{path, subject, not_after, days_left}`` of a certificate file (``error`` if unreadable)."""
    try:
        subject, not_after = (files or FileFacts()).certificate(path)
    except (OSError, ValueError) as exc:
        return {"path": str(path), "subject": None, "not_after": None, "days_left": None, "error": _reason(exc)}
    days = math.floor((not_after - now).total_seconds() / 86400)
    return {"path": str(path), "subject": subject, "not_after": format_time(not_after), "days_left": days}


def clock_state(trusted: bool) -> dict[str, Any]:
    """How the gateway judges its clock: as fleet.clock tells the channel to."""
    if trusted:
        return {"synced": True, "source": "trusted"}
    kernel = kernel_clock_sync()
    if kernel is None:
        return {"synced": None, "source": "unavailable"}
    return {"synced": kernel[0], "source": "kernel"}


class Inventory:
    """Builds the inventory and keeps the current one in :class:`Reports`."""

    def __init__(
        self,
        status: StatusModel,
        reports: Reports,
        base_dir: Path,
        *,
        check_every: float = CHECK_EVERY,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        """``status`` gives the running config, the start time and the buffer's figures."""
        self._status = status
        self._reports = reports
        self.files = InventoryFiles(base_dir)
        self._check_every = check_every
        self._heartbeat = heartbeat
        self._wake = asyncio.Event()
        self._failing = False
        # Remote configuration replaces this with its own (version, hash, origin) of what runs.
        self.config_state: ConfigState = local_config_state(lambda: self._status.config)
        self.renewal: Callable[[], dict[str, Any]] | None = None  # with fleet.identity: renewal's state
        self.puts = 0

    def check_now(self) -> None:
        """Rebuild at once (e.g. a new configuration was applied) instead of at the next check."""
        self._wake.set()

    async def stable(self) -> dict[str, Any]:
        """Everything but uptime and buffer figures: what a change is judged on."""
        config = self._status.config
        now = datetime.now(UTC)
        models, profiles, certificate = await asyncio.to_thread(self._read_files, config, now)
        if certificate is not None and self.renewal is not None:
            certificate["renewal"] = self.renewal()
        return {
            "agent_version": __version__,
            "python": platform.python_version(),
            "started_at": format_time(datetime.fromtimestamp(self._status.started, UTC)),
            "config": self.config_state(),
            "models": models,
            "profiles": profiles,
            "certificate": certificate,
            "clock": clock_state(config.fleet.clock == "trusted"),
        }

    def _read_files(self, config: AgentConfigBase, now: datetime) -> tuple[Any, Any, Any]:
        files = self.files
        return files.models(config), files.profiles(config), files.certificate(config, now)

    async def _buffer(self) -> dict[str, Any] | None:
        stats: BufferStats | None
        try:
            stats = (await asyncio.wait_for(self._status.refresh(), BUFFER_TIMEOUT))[self._status.store.main.name]
        except Exception:  # a stuck or failing buffer: the inventory still goes out, without figures
            stats = self._status.cached()
        if stats is None:
            return None
        age = round(time.time() - stats.oldest_created, 1) if stats.oldest_created else None
        return {"rows": stats.rows, "oldest_age_s": age}

    async def event(self, stable: dict[str, Any]) -> bytes:
        """The CloudEvent around ``stable`` with uptime and buffer figures as they are now."""
        data = dict(stable)
        data["uptime_s"] = round(max(0.0, time.time() - self._status.started), 1)
        data["buffer"] = await self._buffer()
        order = ("agent_version", "python", "started_at", "uptime_s", "config", "models", "profiles",
                 "certificate", "clock", "buffer")  # fmt: skip
        return inventory_event(self._status.config.gateway.id, {key: data[key] for key in order})

    async def run(self) -> None:
        """Put the inventory now, then on each change and heartbeat; forever (cancelled to stop)."""
        last: dict[str, Any] | None = None
        due = 0.0
        while True:
            try:
                stable = await self.stable()
                if stable != last or time.monotonic() >= due:
                    self._reports.put(REPORT, await self.event(stable))
                    self.puts += 1
                    last, due = stable, time.monotonic() + self._heartbeat
                self._failing = False
            except Exception:  # a bug here must not stop the agent; said once until it recovers
                if not self._failing:
                    log.exception("the inventory could not be built; trying again in %g s", self._check_every)
                self._failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._check_every)
            self._wake.clear()


def inventory_event(gateway: str, data: dict[str, Any], now: datetime | None = None) -> bytes:
    """``city.gateway.inventory`` as compact JSON: the gateway events' envelope without ``seq``
    (a retained state document, not a buffered event: the newest replaces the others)."""
    event = {
        "specversion": "1.0",
        "id": new_event_id(),
        "source": source_for(gateway, GATEWAY_STREAM),
        "type": GATEWAY_INVENTORY,
        "time": format_time(now or datetime.now(UTC)),
        "datacontenttype": "application/json",
        "dataschema": dataschema_for(GATEWAY_INVENTORY),
        "gateway": gateway,
        "device": GATEWAY_STREAM,
        "data": data,
    }
    return json.dumps(event, separators=(",", ":"), allow_nan=False).encode()
