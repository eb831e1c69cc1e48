"""What ``fleet.identity`` does to the rest of the site file, at every validation.

Once the gateway is provisioned, its id is ``identity.json``'s and the MQTT uplink's client
certificate and key are the identity folder's ``cert.pem`` and ``key.pem``: every load of the
file (start, reload, remote config, doctor) sees the same gateway. Before that, with a claim
credential, the id is empty and the agent claims before it starts anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.fleet.identity.files import CERT, KEY, IdentityFiles, identity_dir

TLS_PORT = 8883


def identity_id(config: Any) -> str | None:
    """The provisioned gateway id, or None (not provisioned, or unreadable by this user)."""
    try:
        identity = IdentityFiles(identity_dir(config.buffer.path)).identity()
    except PermissionError:
        return None  # validate run as another user: the agent itself can read it
    except ValueError:
        return None  # the agent names the damaged file when it starts
    return identity.gateway_id if identity is not None else None


def apply_identity(config: Any) -> None:
    """Fill in the gateway id and the uplink's client files from the identity folder (in place, once).

    Raises:
        ValueError: naming the keys that conflict with ``fleet.identity``.
    """
    identity = config.fleet.identity
    mqtt = getattr(config.uplink, "mqtt", None)
    if mqtt is None:
        raise ValueError("fleet.identity: needs uplink.mqtt (the identity is its client certificate)")
    if mqtt.tls.cert_file is not None or mqtt.tls.key_file is not None:
        raise ValueError(
            "uplink.mqtt.tls.cert_file, uplink.mqtt.tls.key_file: the client certificate is fleet.identity's; "
            "remove both keys"
        )
    if mqtt.tls.enabled is False:
        raise ValueError("uplink.mqtt.tls.enabled: fleet.identity needs TLS (the certificate is the login)")
    known = identity_id(config)
    if not config.gateway.id:
        if known is None and identity.claim is None:
            raise ValueError("gateway.id: required unless fleet.identity.claim is set")
        if known is not None:
            object.__setattr__(config, "gateway", config.gateway.model_copy(update={"id": known}))
    elif known is not None and known != config.gateway.id:
        raise ValueError(
            f"gateway.id: {config.gateway.id!r}, but this gateway was provisioned as {known!r} (identity.json); "
            "remove gateway.id or correct it"
        )
    folder = identity_dir(config.buffer.path)
    tls = mqtt.tls.model_copy(update={"cert_file": folder / CERT, "key_file": folder / KEY, "enabled": True})
    update: dict[str, Any] = {"tls": tls}
    if "port" not in mqtt.model_fields_set:
        update["port"] = TLS_PORT
    object.__setattr__(config.uplink, "mqtt", mqtt.model_copy(update=update))


def claim_address(config: Any) -> tuple[str, int, Path | None, bool]:
    """Broker host, port, CA file and whether MQTT 5, as the uplink will connect."""
    mqtt = config.uplink.mqtt
    port = mqtt.port if "port" in mqtt.model_fields_set else TLS_PORT
    return mqtt.host, port, mqtt.tls.ca_file, mqtt.protocol == "5"


def identity_paths(config: Any) -> tuple[Path, Path]:
    """The uplink's certificate and key files under ``fleet.identity``."""
    folder = identity_dir(config.buffer.path)
    return folder / CERT, folder / KEY
