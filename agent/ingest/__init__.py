"""``edge-agent ingest``: the IOC's reference consumer of the event contract, into PostgreSQL.

It runs at the operations centre, never on a gateway: the agent's runtime does not import it
(tests/test_import_graph.py), and it needs the ``ingest`` extra (psycopg 3). See docs/ingest.md.
"""
