"""asyncua names for this driver, typed for ``mypy --strict``.

asyncua re-exports most names implicitly (``asyncua.Client``, ``ua.StatusCodes``), which strict
mypy refuses, and types NodeId and DataValue fields with NewTypes (``String``, ``Int16``,
``DateTime``) that plain ``str``/``int``/``datetime`` do not satisfy. The imports below come from
the defining modules, and the two constructors hold the only type-ignores the driver needs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from asyncua.client.client import Client
from asyncua.server.server import Server
from asyncua.ua import uaerrors
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIdNames, ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaprotocol_auto import DataChangeFilter
from asyncua.ua.uatypes import DataValue, NodeId, StatusCode, Variant

UaError = uaerrors.UaError
UaStatusCodeError = uaerrors.UaStatusCodeError
UaStringParsingError = uaerrors.UaStringParsingError

__all__ = [
    "AttributeIds", "Client", "DataChangeFilter", "ObjectIdNames", "ObjectIds", "Server", "StatusCodes",
    "UaError", "UaStatusCodeError", "UaStringParsingError", "data_value", "node_id",
]  # fmt: skip


def node_id(identifier: str | int, namespace: int = 0) -> NodeId:
    """``NodeId("Pump1.Flow", 2)`` without the NewType casts."""
    return NodeId(identifier, namespace)  # type: ignore[arg-type]


def data_value(value: Variant, code: int, source: datetime | None, server: datetime | None) -> DataValue:
    """A DataValue with a status code and both timestamps."""
    status: Any = StatusCode(code)  # type: ignore[arg-type]
    return DataValue(value, status, source, server)  # type: ignore[arg-type]
