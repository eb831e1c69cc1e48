"""The address space: one variable per device value, its data type, unit and status code.

Variables live under ``Objects/Gateway/Devices/<device_id>`` in the gateway's namespace
(:data:`NAMESPACE`); each is created the first time a value for it arrives, its data type chosen
from that value. asyncua types NodeId, DataValue and StatusCode fields with NewTypes that plain
``str``/``int``/``datetime`` do not satisfy under mypy: the constructors below hold those casts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asyncua import ua
    from asyncua.common.node import Node
    from asyncua.server.server import Server

NAMESPACE = "urn:edge-agent:gateway"
UNECE_URI = "http://www.opcfoundation.org/UA/units/un/cefact"
# Units of the event vocabulary (agent/contract/vocabulary.py) -> UN/CEFACT common codes (OPC UA Part 8, 5.6.3).
UNECE_CODES: dict[str, tuple[str, str]] = {
    "kWh": ("KWH", "kilowatt hour"), "kvarh": ("K3", "kilovolt ampere reactive hour"),
    "kW": ("KWT", "kilowatt"), "kvar": ("KVR", "kilovar"), "kVA": ("KVA", "kilovolt ampere"),
    "V": ("VLT", "volt"), "A": ("AMP", "ampere"), "Hz": ("HTZ", "hertz"), "m3": ("MTQ", "cubic metre"),
    "m3/h": ("MQH", "cubic metre per hour"), "degC": ("CEL", "degree Celsius"), "bar": ("BAR", "bar"),
    "%": ("P1", "percent"), "W": ("WTT", "watt"), "Wh": ("WHR", "watt hour"), "l": ("LTR", "litre"),
}  # fmt: skip
# Bad codes a driver may name (OPC UA drivers pass the server's) that describe a value, so they are
# kept; others (e.g. BadNodeIdUnknown) describe a request and would mislead a reader here.
VALUE_CODES = frozenset({
    "BadSensorFailure", "BadDeviceFailure", "BadOutOfService", "BadConfigurationError", "BadNotConnected",
    "BadCommunicationError", "BadWaitingForInitialData", "BadOutOfRange", "BadNoCommunication",
})  # fmt: skip


# Quantities whose values are 0/1 states (coils, discrete inputs, bits): Boolean variables, written as Booleans.
BOOLEAN_QUANTITIES = frozenset({"digital_input"})


@dataclass(slots=True)
class Pending:
    """The latest value of one variable, waiting for the next flush."""

    value: Any
    quality: str
    reason: str | None
    unit: str | None
    time: datetime
    quantity: str | None = None


class DeviceNodes:
    """The Gateway/Devices folder and the device variables in it, found by (device, name) or by NodeId."""

    def __init__(self, writable: set[tuple[str, str]]) -> None:
        """``writable``: the (device, name) variables whose AccessLevel allows CurrentWrite."""
        self.writable = writable
        self.ns = 0
        self.variables: dict[tuple[str, str], tuple[ua.NodeId, ua.VariantType]] = {}
        self.by_node: dict[ua.NodeId, tuple[str, str]] = {}  # every device variable
        self._folder: Node | None = None
        self._devices: dict[str, Node] = {}

    async def build(self, server: Server) -> None:
        """Register the namespace and create ``Objects/Gateway/Devices``."""
        from asyncua import ua

        ns = self.ns = await server.register_namespace(NAMESPACE)
        gateway = await server.nodes.objects.add_folder(node_id("Gateway", ns), ua.QualifiedName("Gateway", ns))
        self._folder = await gateway.add_folder(node_id("Devices", ns), ua.QualifiedName("Devices", ns))

    async def create(self, device: str, name: str, first: Pending) -> tuple[ua.NodeId, ua.VariantType]:
        """The variable for ``first``'s value (and its device's object, the first time), typed from that value."""
        from asyncua import ua

        ns = self.ns
        folder = self._devices.get(device)
        if folder is None:
            assert self._folder is not None
            folder = await self._folder.add_object(node_id(f"Devices.{device}", ns), ua.QualifiedName(device, ns))
            self._devices[device] = folder
        variant = (ua.VariantType.String if name == "status"
                   else ua.VariantType.Boolean if isinstance(first.value, bool) or first.quantity in BOOLEAN_QUANTITIES
                   else ua.VariantType.Int64 if isinstance(first.value, int) and first.unit is None
                   else ua.VariantType.Double)  # fmt: skip
        var_id = node_id(f"Devices.{device}.{name}", ns)
        default = {ua.VariantType.String: "", ua.VariantType.Boolean: False, ua.VariantType.Int64: 0}.get(variant, 0.0)
        var = await folder.add_variable(var_id, ua.QualifiedName(name, ns), ua.Variant(default, variant))
        if first.unit:
            await add_unit(var, first.unit, ns, var_id)
        if (device, name) in self.writable:
            await var.set_writable()
        self.by_node[var_id] = (device, name)
        self.variables[device, name] = (var_id, variant)
        return var_id, variant


def coerce(value: Any, variant: ua.VariantType) -> Any:
    """A value as the variable's data type holds it."""
    from asyncua import ua

    if variant == ua.VariantType.Double:
        return float(value)
    if variant == ua.VariantType.Int64:
        return int(value)
    if variant == ua.VariantType.Boolean:
        return bool(value)
    return str(value)


def status_codes() -> Any:
    """asyncua's StatusCodes, imported when first needed (the core does not import asyncua otherwise)."""
    from asyncua.ua.status_codes import StatusCodes

    return StatusCodes


def node_id(identifier: str | int, namespace: int = 0) -> ua.NodeId:
    """``NodeId(identifier, namespace)`` without the NewType casts."""
    from asyncua.ua.uatypes import NodeId

    return NodeId(identifier, namespace)  # type: ignore[arg-type]


def data_value(value: Any, code: int, source: datetime | None, server: datetime) -> ua.DataValue:
    """A DataValue with a status code and both timestamps."""
    from asyncua.ua.uatypes import DataValue, StatusCode

    code_of: Any = StatusCode(code)  # type: ignore[arg-type]
    return DataValue(value, code_of, source, server)  # type: ignore[arg-type]


def status(code: int) -> ua.StatusCode:
    """``StatusCode(code)`` without the NewType cast."""
    from asyncua.ua.uatypes import StatusCode

    return StatusCode(code)  # type: ignore[arg-type]


def quality_code(quality: str, reason: str | None) -> int:
    """The status code of a value of this quality (and, when bad, the driver's reason)."""
    codes = status_codes()
    if quality == "good":
        return int(codes.Good)
    if quality == "stale":
        return int(codes.UncertainLastUsableValue)
    if reason in VALUE_CODES:
        return int(getattr(codes, reason))
    if reason and (reason.startswith("BadNodeId") or reason in ("BadNoMatch", "BadBrowseNameInvalid")):
        # The device has no such variable: here the variable exists, so say what it means for it.
        return int(codes.BadConfigurationError)
    return int(codes.BadNoCommunication)


def unece_unit_id(code: str) -> int:
    """OPC UA's UnitId of a UN/CEFACT common code: its ASCII bytes, big-endian (Part 8, 5.6.3)."""
    unit_id = 0
    for char in code:
        unit_id = (unit_id << 8) | ord(char)
    return unit_id


async def add_unit(var: Node, unit: str, ns: int, var_id: ua.NodeId) -> None:
    """EngineeringUnits (EUInformation) when the unit has a UN/CEFACT code, else a plain ``Unit`` property."""
    from asyncua import ua
    from asyncua.ua.object_ids import ObjectIds

    known = UNECE_CODES.get(unit)
    if known is None:
        await var.add_property(node_id(f"{var_id.Identifier!s}.Unit", ns), ua.QualifiedName("Unit", ns),
                               ua.Variant(unit, ua.VariantType.String))  # fmt: skip
        return
    code, description = known
    eu = ua.EUInformation(NamespaceUri=UNECE_URI, UnitId=unece_unit_id(code), DisplayName=ua.LocalizedText(unit),
                          Description=ua.LocalizedText(description))  # fmt: skip
    await var.add_property(node_id(f"{var_id.Identifier!s}.EngineeringUnits", ns),
                           ua.QualifiedName("EngineeringUnits", 0), ua.Variant(eu, ua.VariantType.ExtensionObject),
                           datatype=node_id(ObjectIds.EUInformation))  # fmt: skip
