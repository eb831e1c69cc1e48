"""Build-time model tooling: `python -m models.build` (see README.md). Not imported by the agent."""
