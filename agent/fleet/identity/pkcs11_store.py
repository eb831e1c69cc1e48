"""A key store whose keys are made and used inside a PKCS#11 token; no private key byte leaves it.

Each key is an EC P-256 pair made by the token (``CKA_TOKEN``, ``CKA_PRIVATE``,
``CKA_SENSITIVE`` true, ``CKA_EXTRACTABLE`` false), labelled ``<key_label>.pending`` until
promoted, then ``<key_label>.current``. Its ``CKA_ID`` starts with an 8-byte generation number,
one above every key the store made before, so promotion is one attribute write: relabel the
pending private key. A crash right after it leaves two private keys labelled current; the
higher generation is the new one, and the next write clears the other (:meth:`_tidy`). The
public half (same ``CKA_ID``) is found by id; its label only helps people reading the token.

CSRs are signed in the token: the CertificationRequestInfo is built with asn1crypto, its
SHA-256 digest signed with ``CKM_ECDSA``, and the raw r||s turned into the DER signature X.509
wants. The handshake cannot use such a key (docs/fleet.md, "Keys in a PKCS#11 token"), so
:meth:`tls_key_file` is None.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pkcs11
from asn1crypto import csr as asn1_csr
from asn1crypto import keys as asn1_keys
from asn1crypto import pem as asn1_pem
from asn1crypto import x509 as asn1_x509
from asn1crypto.core import OctetString
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from agent.fleet.identity.keystore import CsrFields, KeyStoreError, Which
from agent.fleet.identity.pkcs11_config import Pkcs11Config, pin_file_problem

P256_PARAMS = encode_named_curve_parameters("secp256r1")
_GENERATION_BYTES = 8


class Pkcs11KeyStore:
    """Keys in the token ``config.token_label`` of ``config.module``, logged in with the PIN file's PIN."""

    kind = "pkcs11"

    def __init__(self, config: Pkcs11Config) -> None:
        """Nothing is loaded until a key is asked for."""
        self.config = config
        self._lock = threading.Lock()  # one session at a time: a token's login state is per process

    # -- the KeyStore protocol --------------------------------------------------------------------

    def generate(self) -> None:
        """A new P-256 pair made in the token as the pending key; an older pending pair is destroyed."""
        with self._session() as session:
            self._tidy(session)
            generation = 1 + max((_generation(k) for k in self._privates(session, None)), default=0)
            for old in self._privates(session, "pending"):
                self._destroy_pair(session, old)
            key_id = generation.to_bytes(_GENERATION_BYTES, "big") + os.urandom(8)
            label = self._label("pending")
            params = session.create_domain_parameters(KeyType.EC, {Attribute.EC_PARAMS: P256_PARAMS}, local=True)
            params.generate_keypair(
                id=key_id,
                label=label,
                store=True,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template={Attribute.TOKEN: True, Attribute.PRIVATE: False},
                private_template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.DERIVE: False,
                },
            )

    def has(self, which: Which) -> bool:
        """Whether the token holds that key."""
        with self._session() as session:
            return self._private(session, which, required=False) is not None

    def public_key(self, which: Which) -> ec.EllipticCurvePublicKey:
        """The public half of that key, read from the token."""
        with self._session() as session:
            return self._public(session, self._private(session, which))

    def csr(self, which: Which, fields: CsrFields) -> bytes:
        """A PEM CSR (CN, serialNumber) signed by that key inside the token."""
        with self._session() as session:
            private = self._private(session, which)
            public = self._public(session, private)
            spki = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            info = asn1_csr.CertificationRequestInfo(
                {
                    "version": "v1",
                    "subject": asn1_x509.Name.build(
                        {"common_name": fields.common_name, "serial_number": fields.serial}
                    ),
                    "subject_pk_info": asn1_keys.PublicKeyInfo.load(spki),
                    "attributes": [],
                }
            )
            raw = private.sign(hashlib.sha256(info.dump()).digest(), mechanism=Mechanism.ECDSA)
        signature = _der_signature(raw)
        request = asn1_csr.CertificationRequest(
            {
                "certification_request_info": info,
                "signature_algorithm": {"algorithm": "sha256_ecdsa"},
                "signature": signature,
            }
        )
        pem: bytes = asn1_pem.armor("CERTIFICATE REQUEST", request.dump())
        return pem

    def promote(self) -> None:
        """The pending key becomes the current one: one relabel, then the old current pair is destroyed.

        Raises:
            KeyStoreError: there is no pending key.
        """
        with self._session() as session:
            pending = self._private(session, "pending")
            pending[Attribute.LABEL] = self._label("current")  # the switch: a crash after it is tidied later
            self._tidy(session)  # the old current pair (lower generation) goes, the public half is relabelled

    def tls_key_file(self) -> Path | None:
        """None: the key cannot leave the token, and Python's ssl reads client keys only from files."""
        return None

    # -- token access -----------------------------------------------------------------------------

    def _label(self, which: Which) -> str:
        return f"{self.config.key_label}.{which}"

    @contextmanager
    def _session(self) -> Iterator[Any]:
        config = self.config
        where = f"PKCS#11 token {config.token_label!r} ({config.module})"
        problem = pin_file_problem(config.pin_file)
        if problem:
            raise KeyStoreError(f"fleet.identity.pkcs11.pin_file: {problem}")
        try:
            pin = config.pin_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyStoreError(f"fleet.identity.pkcs11.pin_file {config.pin_file}: unreadable ({exc})") from None
        if not pin:
            raise KeyStoreError(f"fleet.identity.pkcs11.pin_file {config.pin_file}: empty")
        with self._lock:
            try:
                token = pkcs11.lib(str(config.module)).get_token(token_label=config.token_label)
            except pkcs11.NoSuchToken:
                raise KeyStoreError(f"{where}: no token with that label") from None
            except pkcs11.MultipleTokensReturned:
                raise KeyStoreError(f"{where}: more than one token has that label") from None
            except (OSError, RuntimeError) as exc:
                raise KeyStoreError(f"{where}: cannot load the module ({type(exc).__name__})") from None
            try:
                session = token.open(rw=True, user_pin=pin)
            except pkcs11.PinIncorrect:
                raise KeyStoreError(
                    f"{where}: the token refused the PIN in {config.pin_file} (CKR_PIN_INCORRECT)"
                ) from None
            except pkcs11.PinLocked:
                raise KeyStoreError(f"{where}: the user PIN is locked (CKR_PIN_LOCKED)") from None
            except pkcs11.PKCS11Error as exc:
                raise KeyStoreError(f"{where}: cannot log in ({type(exc).__name__})") from None
            try:
                yield session
            except pkcs11.PKCS11Error as exc:
                raise KeyStoreError(f"{where}: {type(exc).__name__}") from None
            finally:
                session.close()

    def _privates(self, session: Any, which: Which | None) -> list[Any]:
        """Our private keys labelled ``which`` (None: current and pending)."""
        labels = [self._label(which)] if which else [self._label("current"), self._label("pending")]
        found: list[Any] = []
        for label in labels:
            found += _all(session, {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label})
        return found

    def _private(self, session: Any, which: Which, *, required: bool = True) -> Any:
        found = max(self._privates(session, which), key=_generation, default=None)
        if found is None and required:
            where = f"PKCS#11 token {self.config.token_label!r}"
            raise KeyStoreError(f"{where}: no {which} key (no private key labelled {self._label(which)!r})")
        return found

    def _public(self, session: Any, private: Any) -> ec.EllipticCurvePublicKey:
        publics = _all(session, {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: private.id})
        if len(publics) != 1:
            where = f"PKCS#11 token {self.config.token_label!r}"
            raise KeyStoreError(f"{where}: {len(publics)} public keys with the id of {private.label!r}, not one")
        public = publics[0]
        if public[Attribute.EC_PARAMS] != P256_PARAMS:
            raise KeyStoreError(f"PKCS#11 token {self.config.token_label!r}: {private.label!r} is not an EC P-256 key")
        # CKA_EC_POINT is the point wrapped in a DER OCTET STRING (PKCS#11 2.40 s2.3.3).
        point = OctetString.load(bytes(public[Attribute.EC_POINT])).native
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)

    def _tidy(self, session: Any) -> None:
        """Finish a promotion a crash interrupted: the older current pair goes, the public half is relabelled."""
        current = sorted(self._privates(session, "current"), key=_generation)
        for stale in current[:-1]:
            self._destroy_pair(session, stale)
        if current:
            for public in _all(session, {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: current[-1].id}):
                if public.label != self._label("current"):
                    public[Attribute.LABEL] = self._label("current")

    def _destroy_pair(self, session: Any, private: Any) -> None:
        key_id = private.id
        private.destroy()
        for public in _all(session, {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key_id}):
            public.destroy()


def _all(session: Any, template: dict[Attribute, Any]) -> list[Any]:
    """Every object matching ``template``, the search finished before anything else is done.

    A token allows one C_FindObjects per session: a search left open (a lazy iterator) makes the
    next call fail with CKR_OPERATION_ACTIVE.
    """
    return list(session.get_objects(template))


def _generation(private: Any) -> int:
    key_id = bytes(private.id or b"")
    return int.from_bytes(key_id[:_GENERATION_BYTES], "big")


def _der_signature(raw: bytes) -> bytes:
    """The token's r||s (32 bytes each for P-256) as the DER ECDSA-Sig-Value X.509 carries."""
    if len(raw) != 64:
        raise KeyStoreError(f"PKCS#11 signature: {len(raw)} bytes, expected 64 (r||s for P-256)")
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
