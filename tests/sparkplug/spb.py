"""The Sparkplug B payload module generated from Eclipse Tahu's sparkplug_b.proto, and decoding.

The module is the one the uplink generates from the proto pinned in the repository, so the
checks read payloads with the same schema the spec names; the decoding and field reading here
are the harness's own.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from google.protobuf.message import DecodeError


def _module() -> Any:
    dev = os.environ.get("SPB_PB2_DIR")  # development before the uplink had its module
    if dev:
        sys.path.insert(0, dev)
        return importlib.import_module("sparkplug_b_pb2")
    return importlib.import_module("agent.uplinks.sparkplug.sparkplug_b_pb2")


pb: Any = _module()
Payload: Any = pb.Payload

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
