"""The signed directive that lets a gateway take an older bundle: ``{"version": 40}`` for a target, used once.

An envelope (agent/fleet/envelope.py) of type ``DOWNGRADE_TYPE`` signed by a key with scope
``bundle``, with the envelope's own fields (``target``, ``issued_at``, ``expires_at``, ``nonce``)
and ``version``: the one older version it allows. Without it an older version is refused (the
persisted highest, and the config version line); with it, that version is staged, applied and
watched like any bundle, and once committed becomes the highest. The running agent takes its nonce
when it applies it (the fleet channel's nonce store), so a directive works once.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.fleet.bundles.manifest import BundleError
from agent.fleet.envelope import RESERVED, Refused, TrustedKey, make_body, sign, verify
from agent.fleet.nonces import NonceStore

DOWNGRADE_TYPE = "application/vnd.edge-agent.bundle-downgrade+json"
WHERE = "downgrade directive"


def make(version: int, *, target: str, ttl: float, key: Ed25519PrivateKey, key_id: str) -> bytes:
    """A signed directive allowing ``version`` on ``target`` (a gateway id or ``group:<name>``).

    Raises:
        ValueError: a bad version, target or ttl, named.
    """
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError("--version: an integer >= 1")
    return sign(DOWNGRADE_TYPE, make_body(target=target, ttl=ttl, fields={"version": version}), key, key_id)


def allowed_version(
    data: bytes, *, keys: Mapping[str, TrustedKey], gateway: str, groups: frozenset[str], nonces: NonceStore
) -> int:
    """The older version ``data`` allows on this gateway (its nonce taken if ``nonces`` keeps any).

    Raises:
        BundleError: the envelope's code (``unsigned``, ``scope``, ``expired``, ``wrong_target``,
            ``replayed``...) or ``malformed``, naming the directive's field.
    """
    try:
        verified = verify(data, payload_type=DOWNGRADE_TYPE, scope="bundle", keys=keys, gateway=gateway,
                          groups=groups, nonces=nonces, clock_synced=None)  # fmt: skip
    except Refused as exc:
        raise BundleError(exc.code, [f"{WHERE}: {exc.message}"]) from None
    extra = sorted(set(verified.body) - {*RESERVED, "version"})
    version = verified.body.get("version")
    if extra or not isinstance(version, int) or isinstance(version, bool) or version < 1:
        what = f"unknown field {extra[0]}" if extra else "version must be an integer >= 1"
        raise BundleError("malformed", [f"{WHERE}: payload: {what}"])
    return version
