"""What arrives for the edge node: the primary host's STATE, NCMD (Rebirth) and DCMD (writes).

Bad input never ends the session: an undecodable NCMD/DCMD or a STATE that is not the spec's
JSON is logged and ignored (never taken as online). A DCMD write goes to ``Driver.write`` only
for a point listed in ``writable`` (the driver then checks the point's own ``writable: true``);
every refusal is logged with group, node, device, metric, value and reason, counted, and
answered by republishing the metric's current value.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from agent.errors import DriverWriteError
from agent.uplinks.api import Inbound, UplinkStatus
from agent.uplinks.sparkplug.config import SparkplugConfig
from agent.uplinks.sparkplug.metrics import TYPE_NAMES
from agent.uplinks.sparkplug.model import Model
from agent.uplinks.sparkplug.node import Session, Topics
from agent.uplinks.sparkplug.payloads import REBIRTH, Written, decode_command, get_value

log = logging.getLogger(__name__)

# The protobuf value field each datatype arrives in (a DCMD with another one has the wrong datatype).
FIELDS = {1: "int_value", 2: "int_value", 3: "int_value", 4: "long_value", 8: "long_value",
          9: "float_value", 10: "double_value", 11: "boolean_value", 12: "string_value"}  # fmt: skip


class HostOffline(Exception):
    """The primary host said it is offline: end the session, try the next server."""


class Refused(Exception):
    """A DCMD the edge node refuses itself; ``code`` labels it on /metrics."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def refusal_code(exc: BaseException) -> str:
    """The /metrics reason of a refused write: ours, the driver's kind, or a timeout."""
    if isinstance(exc, Refused):
        return exc.code
    if isinstance(exc, DriverWriteError):
        return exc.kind
    if isinstance(exc, ValueError):
        return "bad_value"
    return "timeout" if isinstance(exc, TimeoutError) else "device_error"


class Commands:
    """Handles the session's inbound messages; lives across sessions (it keeps the last STATE time)."""

    def __init__(self, cfg: SparkplugConfig, topics: Topics, model: Model, inbound: Inbound, origin: str,
                 status: UplinkStatus) -> None:  # fmt: skip
        """``origin``: how writes are logged (the uplink's title); ``status``: where NCMD/DCMD are counted
        for /metrics."""
        self.cfg, self.topics, self.model, self.inbound, self.origin = cfg, topics, model, inbound, origin
        self.status = status
        self.writable = {(w.device, w.point) for w in cfg.writable}
        self.state_topic = Topics.state(cfg.primary_host_id) if cfg.primary_host_id else None
        self.last_state = -1  # the newest STATE timestamp seen
        self.last_online = -1  # the newest online STATE's
        self.host_online = asyncio.Event()
        self.offline: asyncio.Future[str] | None = None
        self.session: Session | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def subscriptions(self) -> list[tuple[str, int]]:
        """NCMD, DCMD (QoS 1) and, with a primary host, its STATE."""
        topics = [(self.topics.ncmd, 1), (self.topics.dcmd_filter, 1)]
        if self.state_topic is not None:
            topics.append((self.state_topic, 1))
        return topics

    def start_session(self, session: Session) -> None:
        """A new connection: the host is offline until its STATE says otherwise."""
        self.session = session
        self.host_online.clear()
        self.offline = asyncio.get_running_loop().create_future()
        if self.state_topic is None:
            self.host_online.set()

    def end_session(self) -> None:
        """The connection ended: pending writes are left to finish, their answers to no one."""
        self.session = None

    def handle(self, topic: str, payload: bytes) -> None:
        """One message from the broker."""
        if topic == self.state_topic:
            self._state(payload)
        elif topic == self.topics.ncmd:
            self._ncmd(payload)
        elif topic.startswith(self.topics.dcmd_filter[:-1]):
            device = topic[len(self.topics.dcmd_filter) - 1 :]
            self._dcmd(device, payload)

    # ---- STATE ---------------------------------------------------------------------------
    def _state(self, payload: bytes) -> None:
        try:
            body = orjson.loads(payload)
            online, stamp = body["online"], body["timestamp"]
            if not isinstance(online, bool) or not isinstance(stamp, int) or isinstance(stamp, bool):
                raise TypeError("online must be a boolean and timestamp an integer")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("Sparkplug: ignored a STATE of %s that is not the spec's JSON (%s): %r",
                        self.cfg.primary_host_id, exc, payload[:200])  # fmt: skip
            return
        born = self.session is not None and self.session.born
        walk = born or len(self.cfg.servers) > 1
        # An online STATE counts if not older than any STATE seen; an offline one in session if not
        # older than the last online one (message-flow-edge-node-birth-publish-phid-wait-timestamp,
        # -phid-offline). Before the BIRTHs any offline STATE says the host is not on this server:
        # with more servers the node walks on to the next (reconnecting to a single one would only
        # meet the same retained STATE again, so there it waits).
        floor = self.last_state if online else self.last_online
        if stamp < floor and (online or born):
            log.info("Sparkplug: ignored an older STATE of %s (timestamp %d < %d)", self.cfg.primary_host_id, stamp,
                     floor)  # fmt: skip
            return
        self.last_state = max(self.last_state, stamp)
        if online:
            self.last_online = stamp
            if not self.host_online.is_set():
                log.info("Sparkplug: primary host %s is online", self.cfg.primary_host_id)
            self.host_online.set()
            return
        self.host_online.clear()
        if walk and self.offline is not None and not self.offline.done():
            self.offline.set_result(f"primary host {self.cfg.primary_host_id} is offline")

    # ---- NCMD ----------------------------------------------------------------------------
    def _ncmd(self, payload: bytes) -> None:
        try:
            metrics = decode_command(payload)
        except ValueError as exc:
            self._undecodable("NCMD", self.topics.ncmd, exc)
            return
        for m in metrics:
            if m.name == REBIRTH:
                try:
                    wanted = get_value(m.metric, 11)
                except ValueError:
                    wanted = None
                if wanted is True and self.session is not None and self.session.born:
                    self.status.command("ncmd", "accepted", "rebirth")
                    log.info("Sparkplug: rebirth requested by NCMD")
                    self.session.birth_all()
                continue
            self.status.command("ncmd", "refused", "unknown_metric")
            log.warning("Sparkplug NCMD for %s/%s: metric %r ignored (only %s is taken)", self.topics.group,
                        self.topics.node, m.name if m.name is not None else m.alias, REBIRTH)  # fmt: skip

    def _undecodable(self, kind: str, topic: str, exc: Exception) -> None:
        self.status.command(kind.lower(), "refused", "undecodable")
        log.warning("Sparkplug: ignored an undecodable %s on %s: %s", kind, topic, exc)

    # ---- DCMD ----------------------------------------------------------------------------
    def _dcmd(self, device_id: str, payload: bytes) -> None:
        try:
            metrics = decode_command(payload)
        except ValueError as exc:
            self._undecodable("DCMD", self.topics.device("DCMD", device_id), exc)
            return
        for m in metrics:
            task = asyncio.get_running_loop().create_task(self._write(device_id, m))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write(self, device_id: str, m: Written) -> None:
        device = self.model.devices.get(device_id)
        label: Any = m.name if m.name is not None else f"alias {m.alias}"
        name = self.model.resolve(device, m.name, m.alias) if device is not None else None
        value: Any = None
        try:
            if device is None or name is None:
                what = "device" if device is None else "metric"
                raise Refused(f"unknown {what}", f"unknown_{what}")
            label = name
            current = device.current[name]
            if current.point is None or (device_id, current.point) not in self.writable:
                raise Refused("not in uplink.sparkplug.writable (read-only)", "not_writable")
            expected = TYPE_NAMES.get(current.datatype, str(current.datatype))
            if (m.datatype is not None and m.datatype != current.datatype) or \
                    m.metric.WhichOneof("value") != FIELDS.get(current.datatype):  # fmt: skip
                raise Refused(f"wrong datatype (the metric is {expected})", "wrong_datatype")
            value = get_value(m.metric, current.datatype)
            await asyncio.wait_for(self.inbound.write(device_id, current.point, value, origin=self.origin),
                                   self.cfg.write_timeout)  # fmt: skip
        except Exception as exc:
            reason = str(exc) or f"no answer within {self.cfg.write_timeout:g}s"
            self.status.command("dcmd", "refused", refusal_code(exc))
            log.warning("Sparkplug DCMD refused: group %s, node %s, device %s, metric %s, value %r: %s",
                        self.topics.group, self.topics.node, device_id, label, value, reason)  # fmt: skip
            self._republish(device_id, name)
            return
        self.status.command("dcmd", "accepted")
        log.info("Sparkplug DCMD applied: group %s, node %s, device %s, metric %s, value %r",
                 self.topics.group, self.topics.node, device_id, name, value)  # fmt: skip

    def _republish(self, device_id: str, name: str | None) -> None:
        """The refused metric's current value again, so the host's tag shows what the device holds."""
        device = self.model.devices.get(device_id)
        session = self.session
        if device is None or name is None or session is None or not session.born or not device.born:
            return
        session.ddata(device, [device.current[name]])

    async def close(self) -> None:
        """Cancel writes still waiting for their device."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
