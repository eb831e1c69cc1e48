"""The key-by-key reference in docs/configuration.md, generated from the config models.

``python -m agent.config.reference`` rewrites the generated block; a test keeps it in sync.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from agent.config.model import AgentConfigBase, BufferConfig, GatewayConfig, ObservabilityConfig
from agent.contract.units import parse_duration, parse_size
from agent.devices.registry import load_plugins
from agent.docblock import replace_block
from agent.fleet.config import FleetConfig, FleetKey
from agent.fleet.identity.config import ClaimConfig, IdentityConfig
from agent.fleet.identity.pkcs11_config import Pkcs11Config
from agent.fleet.identity.renew_config import RenewConfig
from agent.ui.config import UiConfig
from agent.uplinks.registry import load_uplinks

BEGIN, END = "<!-- keys:begin -->", "<!-- keys:end -->"


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    if field.default_factory is not None:
        factory: object = field.default_factory
        return "`{}`" if factory is dict else "`[]`" if factory is list else "see below"
    value: Any = field.default
    validators = {getattr(m, "func", None) for m in field.metadata}
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif parse_duration in validators:
        text = _human_duration(float(value))
    elif parse_size in validators:
        text = _human_size(int(value))
    else:
        text = str(value)
    return f"`{text}`"


def _human_duration(seconds: float) -> str:
    for unit, factor in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{round(seconds * 1000)}ms"


def _human_size(size: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _table(prefix: str, model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[str]:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        text = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {_default(field)} | {text} |")
    return rows


def _uplink_sections() -> list[tuple[str, str, type[BaseModel], tuple[str, ...]]]:
    """A table per installed uplink (``uplink.<name>``), and one per settings group inside it."""
    sections: list[tuple[str, str, type[BaseModel], tuple[str, ...]]] = []
    for name, plugin in load_uplinks().items():
        nested = {
            key: field.annotation
            for key, field in plugin.config_model.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        }
        sections.append((f"uplink.{name}", f"uplink.{name}.", plugin.config_model, tuple(nested)))
        sections += [(f"uplink.{name}.{key}", f"uplink.{name}.{key}.", model, ()) for key, model in nested.items()]
    return sections


def render_markdown() -> str:
    """The generated block: one table per section and per installed driver."""
    out = [BEGIN, ""]
    sections: list[tuple[str, str, type[BaseModel], tuple[str, ...]]] = [
        ("Top level", "", AgentConfigBase, ("gateway", "uplink", "buffer", "observability", "fleet", "ui", "devices")),
        ("gateway", "gateway.", GatewayConfig, ()),
        *_uplink_sections(),
        ("buffer", "buffer.", BufferConfig, ()),
        ("observability", "observability.", ObservabilityConfig, ()),
        ("fleet", "fleet.", FleetConfig, ("identity",)),
        ("fleet.keys[]", "fleet.keys[].", FleetKey, ()),
        ("fleet.identity", "fleet.identity.", IdentityConfig, ("claim", "renew", "pkcs11")),
        ("fleet.identity.claim", "fleet.identity.claim.", ClaimConfig, ()),
        ("fleet.identity.renew", "fleet.identity.renew.", RenewConfig, ()),
        ("fleet.identity.pkcs11", "fleet.identity.pkcs11.", Pkcs11Config, ()),
        ("ui", "ui.", UiConfig, ()),
    ]
    for title, prefix, model, skip in sections:
        out += [f"### {title}", "", *_table(prefix, model, skip), ""]
    for name, plugin in sorted(load_plugins().items()):
        out += [f"### devices[] with `driver: {name}`", "", plugin.summary, "", *_table("", plugin.config_model), ""]
    out.append(END)
    return "\n".join(out)


def update_doc(path: Path) -> bool:
    """Rewrite the generated block in ``path``; returns whether it changed."""
    return replace_block(path, BEGIN, END, render_markdown())


if __name__ == "__main__":
    doc = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/configuration.md")
    print(f"{doc}: {'updated' if update_doc(doc) else 'up to date'}")
