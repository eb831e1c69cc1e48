"""Settling the event loop's futures from paho's callbacks, which may fire more than once."""

from __future__ import annotations

import asyncio
from typing import Any


def settle(fut: asyncio.Future[Any], value: Any = None, error: BaseException | None = None) -> None:
    """Give ``fut`` its result (or ``error``) unless it has one: a late or repeated callback is a no-op."""
    if not fut.done():
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)
