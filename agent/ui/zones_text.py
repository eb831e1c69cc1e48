"""Replace one camera's zones in the site file's text, leaving every other line as written.

The zone editor changes ``parking_bays`` and ``waiting_areas`` of one device and nothing else:
comments, key order, quoting and other devices stay byte for byte. PyYAML's node tree gives
each node's position in the text, so only the two values are cut out and written anew (as flow
lists of flow mappings, one zone a line). Comments inside the replaced lists go with them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

ZONE_KEYS = ("parking_bays", "waiting_areas")
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")


class Raw(str):
    """A value's own text from the file, written back as it was (``debounce: 1s`` stays ``1s``)."""

    __slots__ = ()


class ZoneTextError(ValueError):
    """The site text has no such device, or is not a file this edit can make sense of."""


def scalar(value: Any) -> str:
    """One YAML flow scalar: a plain word when it reads back as the same text, else JSON (valid YAML)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if _PLAIN.match(text) and yaml.safe_load(text) == text:  # not a number, bool or null in disguise
        return text
    return json.dumps(text)


def render_zone(zone: dict[str, Any]) -> str:
    """``{id: P-07, units: relative, polygon: [[0.1, 0.2], ...], ...}``: id, units and polygon first."""
    first = ["id", "units", "polygon"]
    parts = []
    for key in first + sorted(k for k in zone if k not in first):
        if key not in zone:
            continue
        value = zone[key]
        if key == "polygon":
            shown = "[" + ", ".join(f"[{scalar(x)}, {scalar(y)}]" for x, y in value) + "]"
        else:
            shown = scalar(value)
        parts.append(f"{key}: {shown}")
    return "{" + ", ".join(parts) + "}"


def _find(mapping: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    for k, v in mapping.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            return k, v
    return None


def _device(root: yaml.Node | None, device: str) -> yaml.MappingNode:
    found = _find(root, "devices") if isinstance(root, yaml.MappingNode) else None
    if found is None or not isinstance(found[1], yaml.SequenceNode):
        raise ZoneTextError("the site file has no devices: list")
    for item in found[1].value:
        if isinstance(item, yaml.MappingNode):
            ident = _find(item, "id")
            if ident is not None and isinstance(ident[1], yaml.ScalarNode) and ident[1].value == device:
                return item
    raise ZoneTextError(f"devices: no device with id {device!r} in the site file")


def _end(node: yaml.Node) -> int:
    """Where a node's own text ends (a block collection's end mark lies after trailing comments)."""
    if isinstance(node, yaml.MappingNode | yaml.SequenceNode) and not node.flow_style and node.value:
        last = node.value[-1]
        return _end(last[1] if isinstance(last, tuple) else last)
    return int(node.end_mark.index)


def _kept(text: str, value: yaml.Node, names: Sequence[str]) -> dict[str, dict[str, Raw]]:
    """Zone id -> {key: its value's text} of the ``names`` an old zone set (plain scalars only)."""
    out: dict[str, dict[str, Raw]] = {}
    for zone in value.value if isinstance(value, yaml.SequenceNode) else []:
        ident = _find(zone, "id") if isinstance(zone, yaml.MappingNode) else None
        if ident is None or not isinstance(ident[1], yaml.ScalarNode):
            continue
        out[ident[1].value] = {
            k.value: Raw(text[v.start_mark.index : v.end_mark.index])
            for k, v in zone.value
            if isinstance(k, yaml.ScalarNode) and k.value in names and isinstance(v, yaml.ScalarNode)
        }
    return out


def replace_zones(
    text: str,
    device: str,
    zones: Mapping[str, Sequence[dict[str, Any]]],
    keep: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """``text`` with ``device``'s ``parking_bays`` and ``waiting_areas`` (keys of ``zones``) replaced.

    ``keep``: per list, keys a zone redrawn under its old id keeps as written (a bay's
    ``debounce``). A list left empty is written ``[]``; a key the device lacks is added after its
    last key. Raises ZoneTextError when the text does not parse or has no such device.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ZoneTextError(f"the site file does not parse: {exc}") from None
    node = _device(root, device)
    edits: list[tuple[int, int, str]] = []  # (start, end, new text)
    key_col = node.value[0][0].start_mark.column
    for key, items in zones.items():
        found = _find(node, key)
        old = _kept(text, found[1], (keep or {}).get(key, ())) if found is not None else {}
        rendered = [render_zone({**old.get(z["id"], {}), **z}) for z in items]
        flow = "[" + ", ".join(rendered) + "]"
        if found is not None:
            k, v = found
            if not rendered:
                edits.append((k.end_mark.index, _end(v), ": []"))
            elif node.flow_style or not isinstance(v, yaml.SequenceNode) or v.flow_style or not v.value:
                edits.append((v.start_mark.index, _end(v), flow))
            else:
                col = v.start_mark.column
                edits.append((v.start_mark.index, _end(v), ("\n" + " " * col).join(f"- {r}" for r in rendered)))
        elif node.flow_style:
            close = text.rindex("}", 0, node.end_mark.index)
            edits.append((close, close, f", {key}: {flow}"))
        elif rendered:
            at = _end(node)
            lines = "".join(f"\n{' ' * (key_col + 2)}- {r}" for r in rendered)
            edits.append((at, at, f"\n{' ' * key_col}{key}:{lines}"))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text
