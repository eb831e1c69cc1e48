"""The site configuration: one YAML file, validated whole before anything starts.

Every problem is reported at once, each naming the file, the line, the field path and what
is wrong, so a technician fixes them all in one pass (``edge-agent validate``).
"""

from __future__ import annotations

import ipaddress
import logging
import stat
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from agent.config.suggest import did_you_mean, known_keys
from agent.config.yaml_load import ECHO_CHARS, YamlLoadError, clip, clip_text, load_yaml, read_text
from agent.contract.events import GATEWAY_STREAM
from agent.contract.units import parse_size
from agent.devices.api import DeviceConfig, Duration, PriorityName, Size, StrictModel, resolve_path
from agent.devices.registry import load_plugins
from agent.errors import ConfigError
from agent.fleet.config import FleetConfig
from agent.store.salvage import buffer_path_problem
from agent.ui.config import UiConfig
from agent.uplinks.api import UplinkSettings
from agent.uplinks.registry import load_uplinks

GATEWAY_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"


log = logging.getLogger(__name__)


class GatewayConfig(StrictModel):
    """Who this gateway is."""

    id: str = Field(
        default="",
        pattern=f"^$|{GATEWAY_ID_PATTERN}",
        description="Gateway id, unique in the fleet: [a-z0-9][a-z0-9-]*. Required unless fleet.identity.claim "
        "is set: then it comes from the identity the responder issued.",
    )
    site: str | None = Field(default=None, description="Free-form site name (substation, car park...).")
    health_interval: Duration = Field(
        default=60.0, ge=1, description="How often a city.gateway.health event is published."
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (localhost or a loopback address)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port).

    Raises:
        ValueError: not of that form, or the port is out of range.
    """
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:9108), got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets (e.g. [::1]:9108), got {value!r}")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host, int(port)


class UplinkConfigBase(StrictModel):
    """Where events go: one key per installed uplink plugin (see agent/uplinks/api.py)."""

    def present(self) -> dict[str, UplinkSettings]:
        """Every uplink the file configures (or that is on by default), by name, in name order."""
        found = {name: getattr(self, name) for name in type(self).model_fields}
        return {name: value for name, value in found.items() if isinstance(value, UplinkSettings)}

    def active(self) -> dict[str, UplinkSettings]:
        """The uplinks that run."""
        return {name: value for name, value in self.present().items() if value.active()}


class BufferConfig(StrictModel):
    """The durable store-and-forward buffer (SQLite, WAL)."""

    path: Path = Field(default=Path("var/buffer.db"), description="Buffer file; relative to the config file.")
    max_bytes: Size = Field(
        default=parse_size("256MiB"),
        ge=parse_size("64KiB"),
        description="Bound on buffered events; past it the oldest of the lowest class are dropped.",
    )
    media_max_bytes: Size | None = Field(
        default=None,
        ge=0,
        description="Share of max_bytes that camera snapshots (class media) may hold; past it the oldest "
        "snapshots are dropped (reason media_quota), so pictures never crowd out readings. "
        "null: a quarter of max_bytes, at most 16MiB.",
    )

    _paths = field_validator("path", mode="before")(resolve_path)

    @field_validator("path")
    @classmethod
    def _can_be_a_buffer(cls, value: Path) -> Path:
        # Refused before anything runs: the agent never moves or writes over someone else's file.
        problem = buffer_path_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _media_within_total(self) -> BufferConfig:
        if self.media_max_bytes is not None and self.media_max_bytes > self.max_bytes:
            raise ValueError(
                f"media_max_bytes ({self.media_max_bytes} bytes) must not exceed max_bytes ({self.max_bytes} bytes)"
            )
        return self

    @property
    def media_quota(self) -> int:
        """The effective ``media_max_bytes``."""
        if self.media_max_bytes is not None:
            return self.media_max_bytes
        return min(parse_size("16MiB"), self.max_bytes // 4)


class ObservabilityConfig(StrictModel):
    """Metrics, health endpoints and stall detection (see docs/observability.md)."""

    # Declared before ``listen`` so that listen's check can see it.
    allow_remote: bool = Field(
        default=False,
        description="Allow a non-loopback listen address. The endpoints have no authentication: "
        "prefer a loopback address with a reverse proxy or an SSH tunnel.",
    )
    listen: str | None = Field(
        default=None,
        description="host:port serving /metrics (Prometheus), /healthz and /readyz, e.g. 127.0.0.1:9108 "
        "or [::1]:9108. null: off.",
    )
    stall_after: Duration = Field(
        default=30.0,
        ge=1,
        description="A loop (event loop, buffer commits, uplink) that made no progress for this long is "
        "stuck: /healthz answers 503 and the systemd watchdog is no longer fed.",
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        host, _port = parse_listen(value)
        if not is_loopback(host) and not info.data.get("allow_remote", False):
            raise ValueError(
                f"{value} is not a loopback address and the endpoints have no authentication: "
                "listen on 127.0.0.1 (or [::1]), or set observability.allow_remote: true"
            )
        return value


class AgentConfigBase(StrictModel):
    """Keys of the site file other than ``devices`` (whose model depends on installed drivers)."""

    version: Literal[1] = Field(default=1, description="Config schema version.")
    gateway: GatewayConfig = Field(description="This gateway.")
    uplink: UplinkConfigBase = Field(default_factory=UplinkConfigBase, description="Upstream connections.")
    buffer: BufferConfig = Field(default_factory=BufferConfig, description="Store-and-forward buffer.")
    observability: ObservabilityConfig = Field(
        default_factory=ObservabilityConfig, description="Metrics, health endpoints, stall detection."
    )
    fleet: FleetConfig = Field(
        default_factory=FleetConfig, description="Signed commands from the operations centre (off by default)."
    )
    ui: UiConfig = Field(default_factory=UiConfig, description="The technician page (off by default).")
    priorities: dict[str, PriorityName] = Field(
        default_factory=dict,
        description="Delivery class per event type, overriding the defaults (see docs/delivery.md).",
    )
    devices: list[DeviceConfig] = Field(default_factory=list, description="Field devices.")

    @model_validator(mode="after")
    def _unique_ids(self) -> AgentConfigBase:
        problems = device_id_problems([d.id for d in self.devices])
        if problems:
            raise ValueError(problems[0])
        return self

    @model_validator(mode="after")
    def _identity(self) -> AgentConfigBase:
        if self.fleet.identity is not None:
            from agent.fleet.identity.site import apply_identity

            apply_identity(self)  # the issued id and client certificate (agent/fleet/identity/site.py)
        elif not self.gateway.id:
            raise ValueError("gateway.id: required key is missing")
        return self


def device_id_problems(ids: list[object]) -> list[str]:
    """Duplicate or reserved device ids, as ``devices[i].id: message``."""
    problems = []
    seen: dict[str, int] = {}
    for index, device_id in enumerate(ids):
        if not isinstance(device_id, str):
            continue  # missing, or not a string: the id's own check says so
        if device_id == GATEWAY_STREAM:
            problems.append(f"devices[{index}].id: '{GATEWAY_STREAM}' is reserved for gateway events")
        elif device_id in seen:
            problems.append(
                f"devices[{index}].id: duplicate device id {clip(device_id)} (also devices[{seen[device_id]}])"
            )
        else:
            seen[device_id] = index
    return problems


@cache
def config_model() -> type[AgentConfigBase]:
    """The full config model: ``uplink`` has a key per installed uplink, ``devices`` is a union
    of the installed drivers' models."""
    uplinks: dict[str, Any] = {}
    for name, up in load_uplinks().items():
        if up.default_on:
            uplinks[name] = (up.config_model, Field(default_factory=up.config_model, description=up.summary))
        else:
            uplinks[name] = (up.config_model | None, Field(default=None, description=up.summary))
    uplink_model: Any = create_model("UplinkConfig", __base__=UplinkConfigBase, **uplinks)
    fields: dict[str, Any] = {
        "uplink": (uplink_model, Field(default_factory=uplink_model, description="Upstream connections."))
    }
    models = tuple(p.config_model for p in load_plugins().values())
    if models:
        union: Any = models[0] if len(models) == 1 else Annotated[Union[models], Field(discriminator="driver")]  # noqa: UP007
        fields["devices"] = (list[union], Field(default_factory=list, description="Field devices."))
    model: type[AgentConfigBase] = create_model("AgentConfig", __base__=AgentConfigBase, **fields)
    return model


def json_schema() -> dict[str, Any]:
    """JSON Schema of the site file, for editors."""
    schema = config_model().model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "edge-agent site configuration"
    schema["patternProperties"] = {f"^{EXTENSION_PREFIX}": {"description": "Ignored: anchors for merge keys."}}
    return schema


MAX_PROBLEMS = 100  # listed at most; the rest are counted
MESSAGE_CHARS = 400  # one problem's message at most (values in it are clipped to 80 characters)
EXTENSION_PREFIX = "x-"  # top-level keys ignored by validation (anchors to merge from)
CHECK_FAILED = "the agent could not check this file"  # a bug: never a hostile file's fault


def load_config(path: Path) -> AgentConfigBase:
    """Read and validate a site file (at most 1 MiB; see agent/config/yaml_load.py for the parser's bounds).

    Raises:
        ConfigError: listing every problem as ``file:line: field.path: message``.
    """
    try:
        text = read_text(path)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except YamlLoadError as exc:
        raise ConfigError([f"{_where(path, exc.line)}: {exc.message}"]) from None
    return parse_config(text, path)


def parse_config(text: str, path: Path) -> AgentConfigBase:
    """Validate YAML text as a site file; ``path`` names it in errors and anchors relative paths.

    Whatever the text, the outcome is the config or a ConfigError: never another exception, and
    never a message that repeats more than a few dozen characters of what was written.
    """
    try:
        data, root = load_yaml(text)
    except YamlLoadError as exc:
        what = "" if exc.bound else "not valid YAML: "
        raise ConfigError([f"{_where(path, exc.line)}: {what}{exc.message}"]) from None
    try:
        return _validate(data, _Lines(root), path)
    except ConfigError:
        raise
    except Exception as exc:  # a validator's bug; refuse the file rather than crash a reload
        log.debug("validating %s failed", path, exc_info=True)
        detail = clip_text(f"{type(exc).__name__}: {exc}", 200)
        raise ConfigError([f"{path}: {CHECK_FAILED} ({detail}); please report it (-v logs where)"]) from exc


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line else str(path)


def _validate(data: Any, lines: _Lines, path: Path) -> AgentConfigBase:
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping with gateway, uplink, buffer, devices"])
    # Top-level x-... keys are the file's own: a place for anchors that devices merge (<<: *name).
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith(EXTENSION_PREFIX))}
    # Cross-device checks run on the raw data too, so they are reported alongside field errors.
    devices = data.get("devices")
    raw_devices: list[Any] = devices if isinstance(devices, list) else []
    raw_ids = [d.get("id") if isinstance(d, dict) else None for d in raw_devices]
    early = [_located(lines, path, *_split(p)) for p in device_id_problems(raw_ids)]
    try:
        config = config_model().model_validate(data, context={"base_dir": path.parent.absolute()})
    except ValidationError as exc:
        found = dict.fromkeys([*_each_problem(exc, data, lines, path), *early])  # dedupe, keep order
        raise ConfigError(_listed(found, exc.error_count() - _MOST_ERRORS, path)) from exc
    late = [_located(lines, path, *_split(p)) for p in cross_device_problems(config.devices)]
    if early or late:
        raise ConfigError(_listed([*early, *late], 0, path))
    return config


def _split(problem: str) -> tuple[list[int | str], str]:
    """``"devices[1].id: message"`` -> (["devices", 1, "id"], "message")."""
    where, _, message = problem.partition(": ")
    return _parse_path(where), message


def _listed(found: Iterable[tuple[int, str]], unread: int, path: Path) -> list[str]:
    """Problems by line, at most MAX_PROBLEMS of them, and how many more there are."""
    problems = [text for _, text in sorted(found, key=lambda p: p[0])]
    more = len(problems) - MAX_PROBLEMS + max(unread, 0)
    if more > 0:
        problems = [*problems[:MAX_PROBLEMS], f"{path}: ... and {more} more problem(s): fix the ones above first"]
    return problems


def config_warnings(config: AgentConfigBase) -> list[str]:
    """What a valid config allows but should not: ``field.path: finding; fix`` lines.

    ``edge-agent validate`` prints them (and exits 0), ``edge-agent doctor`` shows each as a
    warn row, and ``edge-agent run`` logs them at start.
    """
    warnings = []
    for name, settings in config.uplink.present().items():
        warnings += settings.warnings(f"uplink.{name}")
    for field, path in secret_files(config):
        problem = open_permissions(path)
        if problem is not None:
            warnings.append(f"{field}: {problem}")
    for index, device in enumerate(config.devices):
        warnings += device.warnings(f"devices[{index}]")
    return warnings


def secret_files(config: AgentConfigBase) -> list[tuple[str, Path]]:
    """(field path, file) of every password, users and private key file the config names."""
    files: list[tuple[str, object]] = []
    for name, settings in config.uplink.present().items():
        files += settings.secret_files(f"uplink.{name}")
    for index, device in enumerate(config.devices):
        files += [(f"devices[{index}].{key}", getattr(device, key, None)) for key in _DEVICE_SECRET_KEYS]
    return [(field, path) for field, path in files if isinstance(path, Path)]


_DEVICE_SECRET_KEYS = ("password_file", "user_private_key")  # of the drivers that log in (opcua)


def open_permissions(path: Path) -> str | None:
    """``"permissions 0644 for 'x' are too open; chmod 600 x"`` if group or others may use the file."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None  # gone since it was validated: the agent says so when it reads it
    if mode & 0o077 == 0:
        return None
    return f"permissions {mode:04o} for '{path}' are too open; chmod 600 {path}"


def cross_device_problems(devices: list[DeviceConfig]) -> list[str]:
    """Problems between devices of one driver (the driver's own ``check_devices``)."""
    problems: list[str] = []
    plugins = load_plugins()
    for name, plugin in plugins.items():
        if plugin.check_devices is not None:
            mine = [(i, d) for i, d in enumerate(devices) if d.driver == name]
            if mine:
                problems += plugin.check_devices(mine)
    return problems


_MOST_ERRORS = 1000  # pydantic errors located at most (a hostile file can have hundreds of thousands)


def _each_problem(exc: ValidationError, data: dict[Any, Any], lines: _Lines, path: Path) -> Iterator[tuple[int, str]]:
    plugins = load_plugins()
    drivers = ", ".join(sorted(plugins)) or "none installed"
    # A device whose driver is unknown gets one error, not one per key the union tried.
    devices = data.get("devices")
    unknown = (
        {i for i, d in enumerate(devices) if isinstance(d, dict) and not _known_driver(d.get("driver"), plugins)}
        if isinstance(devices, list)
        else set()
    )
    suggested = 0
    for error in exc.errors(include_url=False)[:_MOST_ERRORS]:
        keys, beyond = _data_path(error["loc"], data)
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            keys = [*keys, "driver"]  # the union names the device; the problem is its driver key
        if len(keys) >= 2 and keys[0] == "devices" and keys[1] in unknown and keys[2:] != ["driver"]:
            continue
        message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if message.startswith(("devices[", "gateway.", "uplink.", "fleet.")) and ": " in message:
            # Cross-field checks name their own path; use it so the line number is right.
            keys, message = _split(message)
        kind = error["type"]
        if kind == "extra_forbidden":
            message = "unknown key (check the spelling; see `edge-agent schema`)"
            suggested += 1
            if suggested <= MAX_PROBLEMS:  # a file of thousands of unknown keys: only the ones listed
                message += did_you_mean(keys[-1] if keys else None, known_keys())
        elif kind == "missing":
            message = "required key is missing"
        elif kind in ("union_tag_invalid", "literal_error") and keys and keys[-1] == "driver":
            given = error["input"].get("driver") if isinstance(error["input"], dict) else error["input"]
            message = f"unknown driver {clip(given)} (installed: {drivers})" + did_you_mean(given, plugins)
        elif kind == "union_tag_not_found":
            message = f"missing 'driver' key (installed: {drivers})"
        elif kind in ("literal_error", "enum") or kind.startswith(("greater_than", "less_than")):
            message = f"{message}, got {clip(error['input'])}"
        elif kind == "string_pattern_mismatch":
            message = _PATTERN_HELP.get(str(keys[-1]) if keys else "", message) + f", got {clip(error['input'])}"
        if beyond:
            message = f"{_format_path(beyond)} (with the profile's): {message}"
        yield _located(lines, path, keys, message)


def _known_driver(name: object, plugins: dict[str, Any]) -> bool:
    return isinstance(name, str) and name in plugins


_PATTERN_HELP = {
    "id": "use lower-case letters, digits and dashes, starting with a letter or digit",
    "topic_prefix": "a topic prefix has no wildcards (+ #), spaces, or leading/trailing '/'",
}


def _located(lines: _Lines, path: Path, keys: list[int | str], message: str) -> tuple[int, str]:
    """``(line, "file:line: field.path: message")`` for sorting and printing."""
    line = lines.line_of(keys)
    where = f"{path}:{line}" if line else str(path)
    return line or 0, f"{where}: {_format_path(keys) or '(top level)'}: {clip_text(message, MESSAGE_CHARS)}"


def _data_path(loc: tuple[int | str, ...], data: Any) -> tuple[list[int | str], list[int | str]]:
    """The parts of pydantic's location that exist in the data (union tags dropped), and the rest
    when it goes on past the data's end (an item a driver added, as a modbus profile's points)."""
    keys: list[int | str] = []
    node = data
    plugins = load_plugins()
    for at, part in enumerate(loc):
        if _has(node, part):
            node = node[part]
            keys.append(part)
        elif isinstance(node, list):
            return keys, [p for p in loc[at:] if not (isinstance(p, str) and p in plugins)]
        elif isinstance(node, dict):
            if isinstance(part, str) and part not in plugins:
                keys.append(part)  # a missing key: name it
                node = None
        else:
            break
    return keys, []


def _has(node: Any, part: int | str) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and part < len(node)


def _parse_path(text: str) -> list[int | str]:
    keys: list[int | str] = []
    for part in text.replace("]", "").replace("[", ".").split("."):
        if part:
            keys.append(int(part) if part.isdigit() else part)
    return keys


def _format_path(keys: list[int | str]) -> str:
    out = ""
    for key in keys:
        name = key if isinstance(key, int) or len(key) <= ECHO_CHARS else clip(key)
        out += f"[{name}]" if isinstance(name, int) else (f".{name}" if out else str(name))
    return out


class _Lines:
    """Line numbers of field paths in the parsed YAML, each mapping indexed once (a file with
    100,000 keys would otherwise cost a scan of them per problem)."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.root = root
        self._keys: dict[int, dict[str, tuple[int, yaml.Node]]] = {}

    def line_of(self, keys: list[int | str]) -> int | None:
        """1-based line of the deepest node along ``keys`` that exists in the YAML."""
        node = self.root
        if node is None:
            return None
        line: int = node.start_mark.line + 1
        for key in keys:
            if isinstance(node, yaml.MappingNode):
                found = self._index(node).get(str(key))
                if found is None:
                    return line
                line, node = found
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                return line
        return line

    def _index(self, node: yaml.MappingNode) -> dict[str, tuple[int, yaml.Node]]:
        index = self._keys.get(id(node))
        if index is None:
            # Merged keys come first and the mapping's own last, so the one that counts wins.
            index = {str(k.value): (k.start_mark.line + 1, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}
            self._keys[id(node)] = index
        return index
