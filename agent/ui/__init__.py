"""The technician page (issue 18): a small HTTPS/HTTP server inside the agent, on when ``ui.enabled``.

Only :mod:`agent.ui.config` and :mod:`agent.ui.netif` are imported by the config model; the
rest (Starlette, uvicorn) is imported by the runtime only when the page is on.
"""
