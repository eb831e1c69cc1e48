"""The devices themselves: each enabled driver started, one batch of readings taken, stopped."""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from agent.config.model import AgentConfigBase
from agent.contract.events import CROSSWALK_PRESENCE, METER_READING, PARKING_OCCUPANCY, Reading
from agent.devices.api import DeviceConfig, Driver, DriverContext
from agent.devices.ports import missing, port_holders
from agent.devices.registry import load_plugins
from agent.tools.doctor.report import Row, broken, exception_text

STOP_TIMEOUT = 2.0


class Probe(DriverContext):
    """The runtime's side of a driver under test: records what the driver reports about its polls.

    ``offline`` is set after ``offline_after`` failed polls in a row: the runtime's own rule for
    a device that does not answer (one failed poll may be a transient).
    """

    def __init__(self, device_id: str, offline_after: int = 1) -> None:
        """Nothing reported yet."""
        self.device_id = device_id
        self.offline_after = offline_after
        self.in_a_row = 0
        self.failures: list[str] = []
        self.offline = asyncio.Event()

    def poll_ok(self) -> None:
        """The device answered."""
        self.in_a_row = 0

    def poll_failed(self, reason: str) -> None:
        """A poll failed; the last reason is what the doctor reports."""
        self.failures.append(reason)
        self.in_a_row += 1
        if self.in_a_row >= self.offline_after:
            self.offline.set()


async def check_devices(config: AgentConfigBase, timeout: float) -> list[Row]:
    """Every enabled device, concurrently: start, one batch of readings, stop (or its driver's own check)."""
    plugins = load_plugins()
    own = {d.driver for d in config.devices if d.enabled and d.driver in plugins and plugins[d.driver].doctor}
    results = await asyncio.gather(
        *(check_device(d, timeout) for d in config.devices if d.enabled and d.driver not in own),
        *(_driver_check(driver, [d for d in config.devices if d.enabled and d.driver == driver], timeout)
          for driver in sorted(own)),
        return_exceptions=True,
    )  # fmt: skip
    rows: list[Row] = []
    for r in results:
        if isinstance(r, BaseException):
            rows.append(broken("device", r))
        elif isinstance(r, list):
            rows += r
        elif isinstance(r, Row):
            rows.append(r)
    disabled = [
        Row("device", f"{d.id} ({d.driver})", "skip", "disabled (enabled: false)")
        for d in config.devices
        if not d.enabled
    ]
    return [*rows, *disabled] or [Row("device", "-", "ok", "no devices configured")]


async def _driver_check(driver: str, devices: list[DeviceConfig], timeout: float) -> list[Row]:
    check = load_plugins()[driver].doctor
    assert check is not None
    found = await check(devices, timeout)
    return [Row("device", target, verdict, finding, fix) for target, verdict, finding, fix in found]  # type: ignore[arg-type]


_DEVICE_FIX = "check power, wiring or network, and the device's address and line settings in the config"


async def check_device(device: DeviceConfig, timeout: float) -> Row:
    """Start the device's driver, wait for one batch of readings (or the first failure), stop it.

    A port another process holds is still tried: the drivers lock their ports (pyserial's
    ``exclusive``), so the running agent's port fails to open rather than being disturbed;
    the holder is then named.
    """
    target = f"{device.id} ({device.driver})"
    holders: list[str] = []
    for path in device.device_paths():
        if not Path(path).exists():
            return Row("device", target, "FAIL", f"not read: {missing(path)}", "see the device-file row")
        holders += [f"{path} is open in {h}" for h in await asyncio.to_thread(port_holders, path)]
    batch = await read_device(device, timeout)
    if isinstance(batch, str):
        if holders:
            return Row(
                "device",
                target,
                "FAIL",
                batch if " is busy: open in " in batch else f"{batch}; {'; '.join(holders)}",  # named once
                "stop that process (the agent: systemctl stop edge-agent), then run the doctor again",
            )
        return Row("device", target, "FAIL", batch, _DEVICE_FIX)
    summary, bad = summarize(batch)
    if bad:
        return Row(
            "device",
            target,
            "warn",
            f"{summary}; bad: {'; '.join(bad[:3])}",
            "check the points' addresses and types against the device's manual",
        )
    return Row("device", target, "ok", summary)


async def read_device(device: DeviceConfig, timeout: float) -> list[Reading] | str:
    """One batch of the device's readings, or why there is none; ``timeout`` covers start and read."""
    probe = Probe(device.id, device.offline_after)
    try:
        driver = load_plugins()[device.driver].factory()(device, probe)
    except Exception as exc:
        return f"driver could not be created: {exception_text(exc)}"
    deadline = time.monotonic() + timeout
    try:
        try:
            async with asyncio.timeout(timeout):
                await driver.start()
        except TimeoutError:
            return f"start did not finish within {timeout:g}s"
        except Exception as exc:
            return f"cannot start: {exception_text(exc)}"
        left = max(0.0, deadline - time.monotonic())
        if type(driver).stream is not Driver.stream:  # push-style (or its own schedule): the first batch
            return await _first_batch(driver, probe, left)
        async with asyncio.timeout(left):
            return await driver.read()
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except Exception as exc:
        return exception_text(exc)
    finally:
        await _stop(driver)


async def _first_batch(driver: Driver, probe: Probe, timeout: float) -> list[Reading] | str:
    """The first batch a streaming driver yields, or why none came (offline, or the time ran out)."""
    stream = driver.stream()
    nxt: asyncio.Task[list[Reading]] = asyncio.ensure_future(anext(stream))
    failed = asyncio.ensure_future(probe.offline.wait())
    try:
        await asyncio.wait({nxt, failed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if nxt.done():
            return nxt.result()
        if probe.failures:
            count = len(probe.failures)
            return probe.failures[-1] + (f" ({count} failed polls)" if count > 1 else "")
        return f"no readings within {timeout:.1f} s"
    finally:
        for task in (nxt, failed):
            task.cancel()
        await asyncio.gather(nxt, failed, return_exceptions=True)
        close = getattr(stream, "aclose", None)  # an async generator: run its finally blocks
        if close is not None:
            with suppress(Exception):
                await close()


async def _stop(driver: Driver) -> None:
    with suppress(Exception):
        await asyncio.wait_for(driver.stop(), STOP_TIMEOUT)


def _value(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def summarize(readings: list[Reading]) -> tuple[str, list[str]]:
    """One line about a batch (events, first values), and the reasons of bad-quality values."""
    parts: list[str] = []
    bad: list[str] = []
    for reading in readings:
        data = reading.data
        if reading.type == METER_READING:
            measurements = data.get("measurements") or []
            for m in measurements:
                if m.get("quality", "good") != "good":
                    bad.append(f"{m.get('point') or m.get('quantity')} {m.get('reason') or m.get('quality')}")
            shown = [
                f"{m.get('quantity')}{' ' + m['phase'] if m.get('phase') else ''}={_value(m.get('value'))}"
                f"{' ' + m['unit'] if m.get('unit') else ''}"
                for m in measurements[:3]
            ]
            more = ", ..." if len(measurements) > 3 else ""
            parts.append(f"{len(measurements)} values ({', '.join(shown)}{more})")
        elif reading.type == PARKING_OCCUPANCY:
            parts.append(f"bay {data.get('bay')} {'occupied' if data.get('occupied') else 'free'}")
        elif reading.type == CROSSWALK_PRESENCE:
            parts.append(f"area {data.get('area')}: {data.get('count')} people")
        else:
            parts.append(reading.type)
    head = f"{len(readings)} event{'s' if len(readings) != 1 else ''}"
    shown_parts = "; ".join(parts[:2]) + ("; ..." if len(parts) > 2 else "")
    return (f"{head}: {shown_parts}" if parts else f"answered, {head}"), bad
