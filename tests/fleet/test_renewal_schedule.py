"""Renewal's schedule on a fake clock (no sleeps, no broker): the real renewer, real key and
certificate files, a CA made with ``cryptography`` that issues from the CSR, and a fake of only
the network: an exchange that answers (or, while "down", times out) and a swap the broker accepts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent.fleet.identity.files import IdentityFiles as Folder
from agent.fleet.identity.keystore import CsrFields, FileKeyStore
from agent.fleet.identity.renew_config import RenewConfig
from agent.fleet.identity.renewal import NOT_YET_VALID_RECHECK, RECHECK, Renewer, Who
from agent.fleet.identity.renewal_files import Chains
from agent.fleet.identity.renewal_schedule import Validity, renew_at
from agent.uplinks.api import IdentityFiles
from tests.fleet.renewal_kit import DAY, KitCA, cert_pem

T0 = datetime(2027, 1, 1, tzinfo=UTC)


class End(BaseException):
    """Stops the renewer's loop at the end of the simulated period (it survives any Exception)."""


class World:
    """Fake time and a CA the renewer reaches through ``exchange``; every attempt is recorded."""

    def __init__(self, folder: Path, *, down: tuple[float, float] | None = None, end_day: float = 100) -> None:
        self.now = T0
        self.ca = KitCA(now=T0)
        self.down = down
        self.end = T0 + end_day * DAY
        self.folder = folder
        self.ca.client(folder, "gw-017", days=90, start=T0)
        self.current = IdentityFiles(folder / "cert.pem", folder / "key.pem")
        self.attempts: list[float] = []  # day of each request
        self.renewed: list[float] = []  # day of each promotion
        self.expiring: list[tuple[float, dict[str, Any]]] = []
        self.swap_outcome: str | None = None
        self.answer_override: dict[str, Any] | None = None
        # The invariant the issue asks for: whenever the clock is looked at, the current certificate is valid.
        self.invalid_at: list[float] = []
        self._leaves: dict[bytes, x509.Certificate] = {}

    def day(self) -> float:
        return (self.now - T0) / DAY

    def clock(self) -> datetime:
        data = self.current.cert_file.read_bytes()
        if data not in self._leaves:
            self._leaves[data] = x509.load_pem_x509_certificates(data)[0]
        leaf = self._leaves[data]
        if not leaf.not_valid_before_utc <= self.now <= leaf.not_valid_after_utc:
            self.invalid_at.append(self.day())
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        if self.now >= self.end:
            raise End

    async def exchange(self, body: bytes, nonce: str, timeout: float) -> dict[str, Any] | None:
        request = json.loads(body)
        assert request["nonce"] == nonce and request["serial"] == "SN-0042" and "PRIVATE" not in body.decode()
        self.attempts.append(self.day())
        if self.down is not None and self.down[0] <= self.day() < self.down[1]:
            await self.sleep(timeout)  # nobody answers
            return None
        if self.answer_override is not None:
            return {**self.answer_override, "nonce": nonce}
        leaf = self.ca.from_csr(request["csr"].encode(), "gw-017", self.now, days=90)
        chain = cert_pem(leaf).decode()
        return {"status": "issued", "nonce": nonce, "gateway_id": "gw-017", "certificate_chain": chain,
                "brokers": [], "config_version": None, "groups": [], "not_after": "x"}  # fmt: skip

    async def swap(self, files: IdentityFiles, timeout: float) -> str | None:
        assert files.cert_file.exists() and files.key_file.exists()
        return self.swap_outcome

    def promoted(self, _leaf: x509.Certificate) -> None:
        self.renewed.append(self.day())

    def renewer(self, config: RenewConfig | None = None) -> Renewer:
        return Renewer(
            Who("gw-017", "SN-0042", "rpi4"),
            lambda: config or RenewConfig(),
            keys=FileKeyStore(self.folder),
            chains=Chains(Folder(self.folder)),
            current=lambda: self.current,
            roots=lambda: [self.ca.cert],
            exchange=self.exchange,
            swap=self.swap,
            promoted=self.promoted,
            on_expiring=lambda data: self.expiring.append((self.day(), data)),
            clock=self.clock,
            sleep=self.sleep,
            rng=random.Random(7),
        )

    def run(self, renewer: Renewer) -> None:
        with pytest.raises(End):
            asyncio.run(renewer.run())


def _leaf(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def test_the_schedule_is_two_thirds_of_the_lifetime_or_30_days_before_expiry() -> None:
    ninety = Validity(T0, T0 + 90 * DAY)
    assert renew_at(ninety, RenewConfig()) == T0 + 60 * DAY  # 2/3 and 30 days before agree
    year = Validity(T0, T0 + 360 * DAY)
    assert renew_at(year, RenewConfig()) == T0 + 240 * DAY  # 2/3 comes first
    sixty = Validity(T0, T0 + 60 * DAY)
    assert renew_at(sixty, RenewConfig()) == T0 + 30 * DAY  # 30 days before comes first (2/3: day 40)
    week = Validity(T0, T0 + 6 * DAY)
    assert renew_at(week, RenewConfig()) == T0 + 4 * DAY  # shorter than the margin: 2/3, never at once (a loop)


def test_a_90_day_certificate_renews_on_day_60_with_a_new_key(tmp_path: Path) -> None:
    world = World(tmp_path, end_day=100)
    old_key = (tmp_path / "key.pem").read_bytes()
    world.run(world.renewer())
    assert world.attempts[0] == 60.0 and world.renewed[0] == 60.0
    assert world.renewed == [60.0]  # the next one is due on day 120
    assert (tmp_path / "key.pem").read_bytes() != old_key
    leaf = _leaf(tmp_path / "cert.pem")
    assert leaf.not_valid_before_utc == T0 + 60 * DAY and leaf.public_key() == FileKeyStore(tmp_path).public_key(
        "current"
    )
    assert not (tmp_path / "key.next.pem").exists() and not (tmp_path / "cert.next.pem").exists()
    assert world.invalid_at == [] and world.expiring == []
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600


def test_with_the_ca_down_from_day_60_to_80_it_still_holds_a_valid_certificate_before_day_90(tmp_path: Path) -> None:
    world = World(tmp_path, down=(60, 80), end_day=95)
    renewer = world.renewer()
    world.run(renewer)
    assert world.attempts[0] == 60.0
    gaps = [b - a for a, b in zip(world.attempts, world.attempts[1:], strict=False)]
    answer_wait = 60 / 86400  # each failed attempt waited answer_timeout for nobody
    assert all(0.8 - 1e-9 <= gap - answer_wait <= 1.2 + 1e-9 for gap in gaps), gaps  # 24 h ± 20 %
    assert len({round(gap, 3) for gap in gaps}) > 3  # jittered, not a fixed period
    assert 80 <= world.renewed[0] < 90 and len(world.renewed) == 1
    assert world.invalid_at == []  # never without a valid certificate
    assert _leaf(tmp_path / "cert.pem").not_valid_after_utc > world.now
    assert renewer.state.last_error is None and renewer.state.failures == {"no answer": len(world.attempts) - 1}


def test_expiring_is_reported_from_7_days_before_once_a_day(tmp_path: Path) -> None:
    world = World(tmp_path, down=(0, 1000), end_day=92)
    world.run(world.renewer())
    days = [day for day, _ in world.expiring]
    assert days and days[0] >= 83 and all(b - a >= 1 for a, b in itertools.pairwise(days))
    assert len([d for d in days if d <= 90]) in (7, 8)  # day 83 to day 90, one a day (and on after expiry)
    first = world.expiring[0][1]
    assert first["days_left"] <= 7 and first["last_error"].startswith("no answer")
    assert first["subject"] == "CN=gw-017" and first["not_after"].endswith("Z")


def test_a_clock_behind_the_certificate_is_waited_out_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = World(tmp_path, end_day=61)
    world.now = datetime(1970, 1, 1, tzinfo=UTC)  # a board without RTC, before NTP
    renewer = world.renewer()
    caplog.set_level(logging.WARNING)
    waits = [renewer.step() for _ in range(5)]
    assert waits == [NOT_YET_VALID_RECHECK] * 5 and world.attempts == []
    assert sum("before the client certificate's start" in r.message for r in caplog.records) == 1
    world.now = T0 + 59 * DAY  # NTP set the clock
    assert renewer.step() == RECHECK  # a day to go: it looks again within the hour


def test_a_forged_answer_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    world = World(tmp_path, end_day=61)
    before = (tmp_path / "cert.pem").read_bytes(), (tmp_path / "key.pem").read_bytes()
    other = KitCA("not our root", now=T0)
    renewer = world.renewer()
    world.now = T0 + 60 * DAY
    csr_key = FileKeyStore(tmp_path)
    csr_key.generate()
    forged = other.from_csr(
        csr_key.csr("pending", CsrFields("SN-0042", "rpi4", "0", "00", "gw-017")), "gw-017", world.now
    )
    world.answer_override = {"status": "issued", "gateway_id": "gw-017", "certificate_chain": cert_pem(forged).decode()}
    assert not asyncio.run(renewer.attempt())
    assert renewer.state.last_error is not None and "certificate_chain" in renewer.state.last_error
    world.answer_override = {"status": "retry", "reason": "rate limit", "retry_after": 3 * 86400}
    assert not asyncio.run(renewer.attempt())
    assert renewer.state.next_attempt == world.now + 3 * DAY  # the responder's wait beats our 24 h
    assert ((tmp_path / "cert.pem").read_bytes(), (tmp_path / "key.pem").read_bytes()) == before


def test_a_certificate_the_broker_refuses_is_dropped_and_the_old_one_stays(tmp_path: Path) -> None:
    world = World(tmp_path, end_day=61)
    before = (tmp_path / "cert.pem").read_bytes(), (tmp_path / "key.pem").read_bytes()
    world.swap_outcome = "the broker refused the new client certificate: certificate unknown"
    renewer = world.renewer()
    world.now = T0 + 60 * DAY
    assert not asyncio.run(renewer.attempt())
    assert renewer.state.last_error is not None and renewer.state.last_error.startswith("new certificate refused")
    assert ((tmp_path / "cert.pem").read_bytes(), (tmp_path / "key.pem").read_bytes()) == before
    assert not (tmp_path / "cert.next.pem").exists() and not (tmp_path / "key.next.pem").exists()
    assert world.renewed == []
