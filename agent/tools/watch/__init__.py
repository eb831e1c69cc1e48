"""``edge-agent watch``: the conformance watcher (docs/events.md, "Conformance watcher").

Subscribes to one gateway or all with a persistent session, checks every message against the
event contract and the delivery promises, prints a live line and a final report, and exits 1 on
a violation. One module per job: options, subscription, schema (the tie to the shipped schemas),
checks and state, report, run
(``run.watch`` is the entry point; this package imports nothing, so the CLI can read its options cheaply).
"""
