"""``fleet.identity.pkcs11``: the token a PKCS#11 key store keeps the gateway's key in.

In this build ``fleet.identity.key_store: pkcs11`` is refused by :func:`check_key_store`: the
identity is the MQTT uplink's TLS client certificate, and Python's ``ssl`` (hence paho) loads a
client key only from a file (docs/fleet.md, "Keys in a PKCS#11 token").
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from agent.devices.api import StrictModel, readable_file, resolve_path

DEFAULT_KEY_LABEL = "edge-agent"

TLS_REFUSAL = (
    "fleet.identity.key_store: pkcs11 cannot be used here: fleet.identity's key is the MQTT uplink's TLS client "
    "key, and Python's ssl (hence paho) loads client keys only from files; on Debian 12 neither the pkcs11 "
    'engine nor an OpenSSL provider reaches a token key through it (docs/fleet.md, "Keys in a PKCS#11 token"). '
    "Use key_store: file"
)


class Pkcs11Config(StrictModel):
    """The PKCS#11 module, the token by label, and the file holding the user PIN."""

    module: Path = Field(description="The token's PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so.")
    token_label: str = Field(
        min_length=1,
        max_length=32,
        description="The token's label, as softhsm2-util --show-slots or pkcs11-tool -L print it.",
    )
    pin_file: Path = Field(description="File holding the user PIN (mode 0600; the PIN is never logged).")
    key_label: str = Field(
        default=DEFAULT_KEY_LABEL,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$",
        description="Prefix of the key objects' labels: <key_label>.current and <key_label>.pending.",
    )

    _paths = field_validator("module", "pin_file", mode="before")(resolve_path)

    @field_validator("module")
    @classmethod
    def _module(cls, value: Path) -> Path:
        found = readable_file(value)
        assert found is not None
        return found

    @field_validator("pin_file")
    @classmethod
    def _pin_file(cls, value: Path) -> Path:
        found = readable_file(value)
        assert found is not None
        problem = pin_file_problem(found)
        if problem:
            raise ValueError(problem)
        return found


def pin_file_problem(path: Path) -> str | None:
    """Why the PIN file may not be used (group or others may read it), or None."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        return f"{path}: cannot be read ({type(exc).__name__})"
    if mode & 0o077:
        return f"{path}: permissions {mode:04o} are too open for a PIN; chmod 600 {path}"
    return None


def check_key_store(identity: Any) -> Any:
    """An "after" validator of ``fleet.identity``: ``key_store`` and ``pkcs11`` agree, and pkcs11 is refused.

    Every ``fleet.identity`` makes its key the MQTT uplink's TLS client key (site.apply_identity
    refuses one without ``uplink.mqtt`` or with TLS off), so a token key would always be needed
    for a handshake this build cannot do.
    """
    if identity.key_store == "pkcs11":
        if identity.pkcs11 is None:
            raise ValueError("fleet.identity.pkcs11: required with key_store: pkcs11 (module, token_label, pin_file)")
        raise ValueError(TLS_REFUSAL)
    if identity.pkcs11 is not None:
        raise ValueError("fleet.identity.pkcs11: only used with key_store: pkcs11; remove it or set key_store")
    return identity
