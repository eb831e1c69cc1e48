"""The Sparkplug B Payload message of Eclipse Tahu's sparkplug_b.proto, and decoding.

The message class is the one the uplink builds from the proto pinned in the repository (Tahu's,
the one the spec names), so the checks read payloads with the schema the spec names; the decoding
and the field reading here are the harness's own.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import DecodeError

from agent.uplinks.sparkplug.proto import payload_class

Payload: Any = payload_class()

# DataType enum values (sparkplug_b.proto)
INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT, UUID = 9, 10, 11, 12, 13, 14, 15
DATASET, BYTES, FILE, TEMPLATE = 16, 17, 18, 19
PROPERTYSET, PROPERTYSETLIST = 20, 21
METRIC_TYPES = set(range(1, 20)) | set(range(22, 35))  # basic, dataset, template and the array types
PROPERTY_TYPES = set(range(1, 16)) | {PROPERTYSET, PROPERTYSETLIST}


def decode(raw: bytes) -> Any | None:
    """The Payload, or None if the bytes are not one."""
    payload = Payload()
    try:
        payload.ParseFromString(raw)
    except DecodeError:
        return None
    return payload


def metric_value(metric: Any) -> Any:
    """The value a metric carries (None when it carries none)."""
    which = metric.WhichOneof("value")
    return None if which is None else getattr(metric, which)
