"""Before anything starts: make sure the gateway has an identity, claiming one if it has none.

Called by ``run_agent`` when ``fleet.identity`` is set. Refuses to start while a key file is
readable by group or others. Claims when there is no ``identity.json``, or when the certificate
expired and the claim credential is still there (re-provisioning: the same gateway id, the
buffer untouched). No device and no uplink runs meanwhile, so no event exists under another id.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.fleet.identity.claim import Claimer, ClaimSettings
from agent.fleet.identity.files import IdentityFiles, identity_dir, too_open
from agent.fleet.identity.keystore import FileKeyStore, KeyStore
from agent.fleet.identity.site import claim_address

log = logging.getLogger(__name__)


def key_store(config: Any, folder: Path) -> KeyStore:
    """The configured key store over the identity folder.

    Raises:
        ConfigError: a key store this build does not have.
    """
    kind = config.fleet.identity.key_store
    if kind != "file":
        raise ConfigError([f"fleet.identity.key_store: {kind} is not available in this build"])
    return FileKeyStore(folder)


def permission_problems(config: Any, folder: Path) -> list[str]:
    """Every key file (identity keys, claim key) group or others may read."""
    identity = config.fleet.identity
    paths = [folder / "key.pem", folder / "key.next.pem"]
    if identity.claim is not None:
        paths.append(identity.claim.key_file)
    return [p for p in map(too_open, paths) if p]


async def provision_at_start(config: Any, config_path: Path | None) -> Any | None:
    """The config to run (the issued id and certificate in it), or None if stopped while claiming.

    Raises:
        ConfigError: a key file too open, a damaged identity folder, or nothing to claim with.
    """
    identity_cfg = config.fleet.identity
    folder = identity_dir(config.buffer.path)
    problems = permission_problems(config, folder)
    if problems:
        raise ConfigError(problems)
    files = IdentityFiles(folder)
    store = key_store(config, folder)
    recovered = files.recover()
    if recovered:
        log.warning("identity: %s", recovered)
    try:
        identity = files.identity()
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    expired = identity is not None and _expired(files)
    if identity is not None and not expired:
        return config if not recovered else _reloaded(config, config_path)
    if identity_cfg.claim is None:
        if identity is None:
            raise ConfigError([f"fleet.identity: no identity in {folder} and no fleet.identity.claim to claim one"])
        log.error("identity: the certificate of %s has expired and there is no claim credential", identity.gateway_id)
        return config
    claim = identity_cfg.claim
    try:
        serial = claim.read_serial()
    except (OSError, ValueError) as exc:
        raise ConfigError([str(exc)]) from None
    host, port, broker_ca, v5 = claim_address(config)
    settings = ClaimSettings(
        host=host, port=port, broker_ca=broker_ca, cert_file=claim.cert_file, key_file=claim.key_file, v5=v5,
        serial=serial, hardware_model=claim.read_model(), root=claim.root, ca_file=identity_cfg.ca_file,
        answer_timeout=claim.answer_timeout, retry_interval=claim.retry_interval,
        gateway_id=identity.gateway_id if identity is not None else None,
    )  # fmt: skip
    try:
        claimer = Claimer(settings, store, files)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    why = "the certificate expired: re-provisioning" if expired else "no identity yet"
    log.info("identity: %s; claiming with serial %s as %s at %s:%d", why, serial, claimer.claim_cn, host, port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, claimer.stop)
    try:
        done = await asyncio.to_thread(claimer.run)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    if done is None:
        log.info("identity: stopped while claiming")
        return None
    return _reloaded(config, config_path)


def _expired(files: IdentityFiles) -> bool:
    leaf = files.leaf()
    return leaf is None or leaf.not_valid_after_utc <= dt.datetime.now(dt.UTC)


def _reloaded(config: Any, config_path: Path | None) -> Any:
    """The config validated again: now it carries the issued id and certificate."""
    from agent.config.model import load_config

    if config_path is not None:
        return load_config(config_path)
    data = config.model_dump(exclude_unset=True)
    return type(config).model_validate(data)
