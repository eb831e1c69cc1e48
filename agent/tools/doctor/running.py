"""The running agent's own verdict on itself: its status model as ``/healthz`` and ``/readyz``
serve it, when the config turns those endpoints on (``observability.listen``)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from agent.config.model import AgentConfigBase, parse_listen
from agent.tools.doctor.report import Row

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - what a wildcard bind reaches here


def _get(url: str, timeout: float) -> dict[str, Any]:
    """The endpoint's JSON, whatever its status (503 carries the verdict too)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 - http to our own endpoint
            body = answer.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError(f"{url} did not answer a JSON object")
    return data


def check_running_agent(config: AgentConfigBase, timeout: float) -> list[Row]:
    """ok while the agent runs and is ready; warn if not ready (why); FAIL if a loop is stuck."""
    listen = config.observability.listen
    if listen is None:
        return []
    host, port = parse_listen(listen)
    host = _WILDCARDS.get(host, host)
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    try:
        live = _get(f"{base}/healthz", timeout)
        ready = _get(f"{base}/readyz", timeout)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return [
            Row("agent", base, "skip", f"no agent answering ({reason}): not running yet?", "systemctl start edge-agent")
        ]
    if not live.get("ok"):
        stalls = "; ".join(f"{part}: {why}" for part, why in dict(live.get("stalls") or {}).items())
        return [Row("agent", base, "FAIL", f"running but stuck: {stalls}",
                    "journalctl -u edge-agent for the cause; systemctl restart edge-agent")]  # fmt: skip
    checks = dict(ready.get("checks") or {})
    failing = [name for name, ok in checks.items() if not ok]
    if failing:
        details = [str(ready[key]) for key in ("uplink_error", "buffer_error") if ready.get(key)]
        finding = f"running, not ready: {', '.join(failing)}" + (f" ({'; '.join(details)})" if details else "")
        return [Row("agent", base, "warn", finding, "see the broker and buffer rows above")]
    return [Row("agent", base, "ok", f"running and ready ({', '.join(checks)}); up {live.get('uptime_s')} s")]
