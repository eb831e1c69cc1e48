"""Off loopback the page is HTTPS only, with the gateway's own ECDSA P-256 certificate.

The certificate is made for an address this test can serve on (127.0.0.1) and served by the
page's own server class, as the agent serves it on a site LAN: a plain HTTP request gets no
page, the browser-visible fingerprint is the one ``edge-agent ui info`` prints.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.tools.cli import main
from agent.ui.app import build_app
from agent.ui.server import QuietServer
from agent.ui.state import UiState
from agent.ui.tls import ensure_certificate, fingerprint
from tests.conftest import free_port, wait_for


class Figures:
    async def snapshot(self) -> dict[str, Any]:
        return {}

    async def bundle(self) -> Path:
        raise RuntimeError("not here")

    def previews(self, device: str) -> list[dict[str, Any]] | None:
        return None


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    folder = tmp_path_factory.mktemp("ui-tls") / "ui"
    cert, key = ensure_certificate(folder, "127.0.0.1", "gw-test")
    port = free_port()
    host = f"127.0.0.1:{port}"
    app = build_app(Figures(), UiState(folder), hosts={host}, origin=f"https://{host}", tls=True)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http="h11", ws="none", lifespan="off", log_config=None,
        ssl_certfile=str(cert), ssl_keyfile=str(key),
    )  # fmt: skip
    server = QuietServer(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10, "the HTTPS page to start")
    try:
        yield port, cert
    finally:
        server.should_exit = True
        thread.join(5)


def test_the_certificate_is_ecdsa_p256_for_the_address_and_its_key_is_0600(tmp_path: Path) -> None:
    cert_path, key_path = ensure_certificate(tmp_path / "ui", "192.0.2.10", "gw-test")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["192.0.2.10"]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    # Kept across restarts; made again only for another address.
    assert ensure_certificate(tmp_path / "ui", "192.0.2.10", "gw-test")[0].read_bytes() == cert_path.read_bytes()
    before = fingerprint(cert_path)
    ensure_certificate(tmp_path / "ui", "192.0.2.11", "gw-test")
    assert fingerprint(cert_path) != before


def test_https_works_and_shows_the_printed_fingerprint(served: tuple[int, Path]) -> None:
    port, cert = served
    context = ssl.create_default_context(cafile=str(cert))
    r = httpx2.get(f"https://127.0.0.1:{port}/api/session", verify=context, timeout=5)
    assert r.status_code == 200 and r.json() == {"state": "setup"}
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port)))
    shown = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    assert shown == fingerprint(cert)


def test_plain_http_gets_no_page(served: tuple[int, Path]) -> None:
    port, _cert = served
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(f"GET /api/session HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        sock.settimeout(5)
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert b"setup" not in answer and not answer.startswith(b"HTTP/1.1 200")


def test_ui_info_prints_the_https_url_and_fingerprint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        'gateway: {id: gw-test}\nbuffer: {path: var/buffer.db}\nui: {enabled: true, listen: "192.0.2.10:8443"}\n'
    )
    assert main(["ui", "info", "-c", str(site)]) == 0
    assert "url: https://192.0.2.10:8443/" in capsys.readouterr().out
    cert, _key = ensure_certificate(tmp_path / "var" / "ui", "192.0.2.10", "gw-test")
    assert main(["ui", "info", "-c", str(site)]) == 0
    out = capsys.readouterr().out
    assert f"sha256 fingerprint: {fingerprint(cert)}" in out
