"""Client writes: answered per node, and for a device variable only once the device applied the value.

A write to a writable point is answered only after ``on_write(device, point, value)`` (the
runtime hands it to the device's ``Driver.write``) returned: Good, and the variable shows the
value; or, if it raised or took longer than ``write_timeout``, a Bad code
(:func:`write_failure_code`: BadTimeout, BadNotWritable, BadOutOfRange, BadTypeMismatch,
BadCommunicationError...) and the variable keeps its value. Either way a log line names the
user, the point, the value and the outcome. While a write waits for its device, that client
connection's other requests wait too (asyncua serves a connection's requests in order).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agent.errors import DriverWriteError
from agent.uplinks.opcua_server.nodes import data_value, status, status_codes

if TYPE_CHECKING:
    from asyncua import ua

    from agent.uplinks.opcua_server.server import OpcUaServer

log = logging.getLogger(__name__)

WriteCallback = Callable[[str, str, Any], Awaitable[None] | None]


# A device's refusal that names the value's problem goes to the client as is; others say what it
# means from the client's side of the gateway.
PASSED_WRITE_CODES = frozenset({
    "BadOutOfRange", "BadTypeMismatch", "BadNotWritable", "BadWriteNotSupported", "BadNotSupported",
    "BadDeviceFailure", "BadOutOfService", "BadInvalidArgument",
})  # fmt: skip


# What a driver's DriverWriteError.kind means to an OPC UA client.
WRITE_KIND_CODES: dict[str, str] = {
    "not_writable": "BadNotWritable", "out_of_range": "BadOutOfRange", "bad_value": "BadTypeMismatch",
    "timeout": "BadTimeout", "unavailable": "BadCommunicationError", "device_error": "BadDeviceFailure",
}  # fmt: skip


def write_failure_code(exc: BaseException) -> str:
    """The status code a client gets for a write the device did not apply.

    BadTimeout when the device did not answer within ``write_timeout``; an OPC UA device's own
    code when the driver raised from asyncua's error (BadOutOfRange, BadTypeMismatch...; the PLC's
    BadUserAccessDenied concerns the gateway's account: BadNotWritable here); else what the
    driver's :class:`DriverWriteError` ``kind`` says (:data:`WRITE_KIND_CODES`); else
    BadCommunicationError.
    """
    from asyncua.ua.uaerrors import UaStatusCodeError

    if isinstance(exc, TimeoutError):
        return "BadTimeout"
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for link in chain:
        if isinstance(link, UaStatusCodeError):
            name = _code_name(link.code)
            if name in PASSED_WRITE_CODES:
                return name
            return "BadNotWritable" if name == "BadUserAccessDenied" else "BadCommunicationError"
    if isinstance(exc, DriverWriteError):
        return WRITE_KIND_CODES[exc.kind]
    return "BadCommunicationError"


def _code_name(code: int) -> str:
    from asyncua.ua.status_codes import get_name_and_doc

    return get_name_and_doc(code)[0]


class DeviceWrites:
    """asyncua's attribute service, with client writes answered per node as OPC UA clients expect.

    A device variable's value goes through :meth:`device_write` (BadNotWritable unless
    ``writable``, BadUserAccessDenied without a user login, else the device's answer). Any other
    write is checked first: BadNodeIdUnknown, BadNotWritable (an attribute other than the value,
    or a value whose AccessLevel has no CurrentWrite), BadUserAccessDenied (no user login, or a
    UserAccessLevel without CurrentWrite); what passes goes to the wrapped service. Reads are the
    wrapped service's. Results keep the request's order, one status code per node.
    """

    def __init__(self, inner: Any, owner: OpcUaServer) -> None:
        """``inner``: asyncua's attribute service; ``owner``: the server whose variables, callback, stats serve."""
        self.inner = inner
        self.owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read(self, params: Any) -> Any:
        return self.inner.read(params)

    async def write(self, params: ua.WriteParameters, user: Any = None) -> list[ua.StatusCode]:
        from asyncua import ua
        from asyncua.crypto.permission_rules import UserRole
        from asyncua.ua.attribute_ids import AttributeIds

        if user is None or getattr(user, "role", None) == UserRole.Admin:
            # asyncua's own session (no client is ever Admin here): the address space, not the device
            return await self._inner_write(params, user)
        results: list[ua.StatusCode] = []
        for item in params.NodesToWrite:
            target = self.owner.nodes.by_node.get(item.NodeId)
            if target is not None and item.AttributeId == AttributeIds.Value:
                results.append(await self.device_write(target, item, user))
                continue
            refusal = self._refusal(item, user)
            if refusal is None:
                one = ua.WriteParameters()
                one.NodesToWrite = [item]
                results += self._count(await self._inner_write(one, user))
            else:
                self.owner.stats["refused_writes"] += 1
                results.append(refusal)
        return results

    def _refusal(self, item: ua.WriteValue, user: Any) -> ua.StatusCode | None:
        """The status code refusing a write to a node that is not a device variable's value, or None."""
        from asyncua import ua
        from asyncua.crypto.permission_rules import UserRole
        from asyncua.ua.attribute_ids import AttributeIds

        read = ua.ReadParameters()
        read.NodesToRead = [
            ua.ReadValueId(NodeId=item.NodeId, AttributeId=a)
            for a in (AttributeIds.NodeId, AttributeIds.AccessLevel, AttributeIds.UserAccessLevel)
        ]
        exists, access, user_access = self.inner.read(read)
        codes = status_codes()
        if exists.StatusCode is None or not exists.StatusCode.is_good():
            return status(codes.BadNodeIdUnknown)
        if item.AttributeId != AttributeIds.Value:
            return status(codes.BadNotWritable)  # no node here has WriteMask bits
        if access.StatusCode is None or not access.StatusCode.is_good() or access.Value is None:
            return access.StatusCode or status(codes.BadAttributeIdInvalid)  # not a variable
        if not access.Value.Value & ua.AccessLevel.CurrentWrite.mask:
            return status(codes.BadNotWritable)
        if getattr(user, "role", None) != UserRole.User or user_access.Value is None \
                or not user_access.Value.Value & ua.AccessLevel.CurrentWrite.mask:  # fmt: skip
            return status(codes.BadUserAccessDenied)
        return None

    async def _inner_write(self, params: ua.WriteParameters, user: Any) -> list[ua.StatusCode]:
        result: list[ua.StatusCode] = await (self.inner.write(params) if user is None
                                             else self.inner.write(params, user=user))  # fmt: skip
        return result

    def _count(self, results: list[ua.StatusCode]) -> list[ua.StatusCode]:
        self.owner.stats["refused_writes"] += sum(1 for r in results if not r.is_good())
        return results

    async def device_write(self, target: tuple[str, str], item: ua.WriteValue, user: Any) -> ua.StatusCode:
        """One client write to a device variable's value: Good only once the device applied it.

        A point not in ``writable`` is BadNotWritable, and a session without a user login
        BadUserAccessDenied, before anything reaches the device. Otherwise the device's answer
        decides: the driver's write must succeed within ``write_timeout``, else the client gets a
        Bad code (:func:`write_failure_code`) and the variable keeps its value. An applied value
        shows in the variable until the device's next event says otherwise.
        """
        from asyncua import ua
        from asyncua.crypto.permission_rules import UserRole

        device, point = target
        owner = self.owner
        node, variant = owner.nodes.variables[target]
        name = getattr(user, "name", None)
        who = f"user {name!r}" if name else "an anonymous session"
        value = item.Value.Value.Value if item.Value is not None and item.Value.Value is not None else None
        code, reason, delivered = "Good", "", False
        if target not in owner.nodes.writable:
            code, reason = "BadNotWritable", "not in uplink.opcua.writable (read-only)"
        elif getattr(user, "role", None) != UserRole.User:
            code, reason = "BadUserAccessDenied", "only user logins write"
        elif item.IndexRange:
            code, reason = "BadWriteNotSupported", "an index range (the variable is written whole)"
        elif item.Value is None or item.Value.Value is None or item.Value.Value.VariantType != variant \
                or value is None:  # fmt: skip
            code, reason = "BadTypeMismatch", f"the variable is {variant.name}"
        elif owner.on_write is None:
            code, reason = "BadNotWritable", "no device path"
        else:
            delivered = True
            try:
                await asyncio.wait_for(self._deliver(device, point, value), owner.config.write_timeout)
            except Exception as exc:
                code = write_failure_code(exc)
                reason = str(exc) or f"no answer within {owner.config.write_timeout:g}s"
        number = int(getattr(status_codes(), code))
        if code != "Good":
            owner.stats["refused_writes"] += 1
            outcome = "not applied by the device" if delivered else "refused"
            (log.warning if delivered or code != "BadNotWritable" else log.info)(
                "OPC UA write by %s: %s/%s = %r %s, answered %s: %s", who, device, point, value, outcome, code, reason
            )
            return status(number)
        owner.stats["writes"] += 1
        log.info("OPC UA write by %s: %s/%s = %r applied by the device", who, device, point, value)
        if owner.server is not None:
            now = datetime.now(UTC)
            source = item.Value.SourceTimestamp if item.Value is not None else None
            await owner.server.write_attribute_value(node, data_value(ua.Variant(value, variant), number,
                                                                     source or now, now))  # fmt: skip
        return status(number)

    async def _deliver(self, device: str, point: str, value: Any) -> None:
        on_write = self.owner.on_write
        assert on_write is not None
        result = on_write(device, point, value)
        if inspect.isawaitable(result):
            await result
