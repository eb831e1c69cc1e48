"""The page's access rules through Starlette's TestClient: tokens, passwords, sessions, CSRF, Host, rate limit."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from agent.ui.app import COOKIE, build_app
from agent.ui.state import PASSWORD_FILE, TOKEN_FILE, TOKEN_SECONDS, UiState

HOST = "127.0.0.1:9180"
ORIGIN = f"http://{HOST}"
OK = {"X-Edge-Agent": "1"}
PASSWORD = "correct horse battery"  # noqa: S105 - the test's own


class Figures:
    """A stand-in for the agent's status: these tests are about access, not figures."""

    async def snapshot(self) -> dict[str, Any]:
        return {"gateway": "gw-test", "devices": []}

    async def bundle(self) -> Path:
        raise RuntimeError("not here")

    def previews(self, device: str) -> list[dict[str, Any]] | None:
        return None


@pytest.fixture
def state(tmp_path: Path) -> UiState:
    return UiState(tmp_path / "ui")


def client(state: UiState, *, tls: bool = False, base: str = ORIGIN, host: str = HOST) -> TestClient:
    origin = f"{'https' if tls else 'http'}://{host}"
    app = build_app(Figures(), state, hosts={host}, origin=origin, tls=tls)
    return TestClient(app, base_url=base)  # type: ignore[arg-type]


def logged_in(state: UiState) -> TestClient:
    c = client(state)
    token = state.issue_token()
    assert c.post("/api/setup", json={"token": token}, headers=OK).status_code == 200
    assert c.post("/api/password", json={"password": PASSWORD}, headers=OK).status_code == 200
    return c


def test_no_session_is_401_and_no_token_is_401(state: UiState) -> None:
    c = client(state)
    assert c.get("/api/status").status_code == 401
    assert c.get("/api/events").status_code == 401
    assert c.get("/api/bundle").status_code == 401
    assert c.get("/api/preview/meter-1").status_code == 401
    r = c.post("/api/setup", json={}, headers=OK)
    assert r.status_code == 401 and "edge-agent ui token" in r.json()["error"]
    assert c.get("/api/session").json() == {"state": "setup"}


def test_token_is_single_use_hashed_0600_and_forces_a_password(state: UiState) -> None:
    token = state.issue_token()
    assert len(token) >= 32  # 192 bits, url-safe base64
    record = (state.folder / TOKEN_FILE).read_text()
    assert token not in record
    assert stat.S_IMODE((state.folder / TOKEN_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(state.folder.stat().st_mode) == 0o700
    c = client(state)
    r = c.post("/api/setup", json={"token": token}, headers=OK)
    assert r.status_code == 200 and r.json() == {"state": "set_password"}
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
    # The setup session sees nothing until a password is set.
    assert c.get("/api/status").status_code == 403
    assert c.post("/api/password", json={"password": "short"}, headers=OK).status_code == 400
    # Reused: refused, from another browser too.
    assert client(state).post("/api/setup", json={"token": token}, headers=OK).status_code == 403
    assert c.post("/api/password", json={"password": PASSWORD}, headers=OK).status_code == 200
    assert c.get("/api/status").json()["gateway"] == "gw-test"
    record = (state.folder / PASSWORD_FILE).read_text()
    assert PASSWORD not in record and '"scrypt"' in record
    assert stat.S_IMODE((state.folder / PASSWORD_FILE).stat().st_mode) == 0o600


def test_a_huge_or_malformed_body_is_not_a_token(state: UiState) -> None:
    c = client(state)
    state.issue_token()
    assert c.post("/api/setup", content=b"x" * 100_000, headers=OK).status_code == 401
    assert c.post("/api/setup", content=b"[1, 2]", headers=OK).status_code == 401
    assert c.post("/api/login", content=b"{not json", headers=OK).status_code == 401


def test_expired_and_wrong_tokens_are_403(state: UiState) -> None:
    old = state.issue_token(now=time.time() - TOKEN_SECONDS - 1)
    assert client(state).post("/api/setup", json={"token": old}, headers=OK).status_code == 403
    state.issue_token()
    assert client(state).post("/api/setup", json={"token": "x" * 32}, headers=OK).status_code == 403


def test_a_new_token_replaces_the_previous_one(state: UiState) -> None:
    first = state.issue_token()
    second = state.issue_token()
    assert client(state).post("/api/setup", json={"token": first}, headers=OK).status_code == 403
    assert client(state).post("/api/setup", json={"token": second}, headers=OK).status_code == 200


def test_unsafe_requests_need_the_header_and_the_same_origin(state: UiState) -> None:
    c = logged_in(state)
    assert c.post("/api/logout").status_code == 403  # no X-Edge-Agent header
    assert c.post("/api/logout", headers={**OK, "Origin": "http://evil.example"}).status_code == 403
    assert c.post("/api/logout", headers={**OK, "Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert c.get("/api/status").status_code == 200  # none of those logged out
    r = c.post("/api/logout", headers={**OK, "Origin": ORIGIN, "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 200
    assert c.get("/api/status").status_code == 401


def test_a_foreign_host_is_421(state: UiState) -> None:
    c = logged_in(state)
    r = c.get("/api/status", headers={"Host": "attacker.example:9180"})
    assert r.status_code == 421
    assert c.get("/", headers={"Host": "127.0.0.1:9999"}).status_code == 421


def test_the_sixth_failed_login_in_a_minute_is_429(state: UiState) -> None:
    c = logged_in(state)
    other = client(state)
    codes = [other.post("/api/login", json={"password": f"wrong {i}"}, headers=OK).status_code for i in range(6)]
    assert codes == [401] * 5 + [429]
    # Even the right password waits: the limit is on attempts, not on wrong answers.
    assert other.post("/api/login", json={"password": PASSWORD}, headers=OK).status_code == 429
    assert c.get("/api/status").status_code == 200  # a session already open carries on


def test_login_with_the_password_and_reset_ends_sessions(state: UiState) -> None:
    logged_in(state)
    c = client(state)
    assert c.get("/api/session").json() == {"state": "login"}
    assert c.post("/api/login", json={"password": PASSWORD}, headers=OK).status_code == 200
    assert c.get("/api/status").status_code == 200
    new = state.reset_password()  # what `edge-agent ui reset` does
    assert c.get("/api/status").status_code == 401
    assert c.post("/api/login", json={"password": PASSWORD}, headers=OK).status_code == 401
    assert c.post("/api/login", json={"password": new}, headers=OK).status_code == 200


def test_plain_http_off_loopback_is_refused(state: UiState) -> None:
    host = "192.0.2.10:9180"
    plain = client(state, tls=True, base=f"http://{host}", host=host)
    r = plain.get("/api/session")
    assert r.status_code == 403 and "HTTPS only" in r.json()["error"]
    secure = client(state, tls=True, base=f"https://{host}", host=host)
    assert secure.get("/api/session").status_code == 200
    token = state.issue_token()
    r = secure.post("/api/setup", json={"token": token}, headers=OK)
    assert r.status_code == 200 and "secure" in r.headers["set-cookie"].lower()


def test_every_answer_has_a_strict_csp_and_the_page_has_no_inline_script(state: UiState) -> None:
    c = client(state)
    r = c.get("/")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-eval" not in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    page = r.text
    assert "<script>" not in page and '<script src="/app.js"' in page
    assert "http://" not in page and "https://" not in page  # nothing from another host
    for name in ("/app.js", "/app.css"):
        body = c.get(name).text
        assert "http://" not in body and "https://" not in body and "eval(" not in body
    assert c.post("/api/setup", json={}, headers=OK).headers["content-security-policy"] == csp


def test_page_files_come_gzipped_when_asked_as_one_script_and_api_answers_never_do(state: UiState) -> None:
    import gzip

    from agent.ui.app import SCRIPTS

    c = client(state)
    packed = c.get("/app.js", headers={"accept-encoding": "gzip"})  # httpx decodes it; the header says it came packed
    assert packed.headers["content-encoding"] == "gzip" and packed.headers["vary"] == "accept-encoding"
    plain = c.get("/app.js", headers={"accept-encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.text == packed.text
    for part in SCRIPTS:  # every part's script is in the one file, in order
        assert (files := Path(__file__).parents[2] / "agent/ui/static" / part).exists()
        assert files.read_text().strip()[:60] in plain.text
    assert len(gzip.compress(plain.content)) < len(plain.content) / 2
    answer = c.get("/api/session", headers={"accept-encoding": "gzip"})
    assert "content-encoding" not in answer.headers


def test_the_session_cookie_is_not_readable_across_states(state: UiState) -> None:
    c = logged_in(state)
    sid = c.cookies.get(COOKIE)
    assert sid and len(sid) >= 40
    stranger = client(state)
    stranger.cookies.set(COOKIE, "forged-" + "a" * 40)
    assert stranger.get("/api/status").status_code == 401
    assert os.path.exists(state.folder / PASSWORD_FILE)
