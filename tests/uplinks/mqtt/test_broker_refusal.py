"""MQTT 5: a PUBACK with a failure reason is not a delivery (the broker did not take it)."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

from tests.conftest import KEEP_USER, Mosquitto, wait_for, write_config


def test_events_the_broker_refuses_stay_buffered(tmp_path: Path, subscriber_factory, agent_factory) -> None:
    broker = Mosquitto(tmp_path)
    acl = tmp_path / "acl"
    acl.write_text("topic read #\ntopic write ioc/v1/gw-test/gateway/#\ntopic write ioc/v1/gw-test/status\n"
                   "topic write ioc/v1/gw-test/meter-ok/#\n")  # fmt: skip
    broker.conf.write_text(
        f"listener {broker.port} 127.0.0.1\nallow_anonymous true\nacl_file {acl}\nlog_dest none\n{KEEP_USER}"
    )
    broker.start()
    try:
        sub = subscriber_factory(broker.port, client_id="refusal-subscriber")
        devices = (
            "  - {id: meter-ok, driver: virtual, kind: meter, interval: 50ms}\n"
            "  - {id: meter-denied, driver: virtual, kind: meter, interval: 50ms}\n"
        )
        config = write_config(tmp_path / "site.yaml", port=broker.port, devices=devices)
        config.write_text(config.read_text().replace("topic_prefix: ioc/v1,", "topic_prefix: ioc/v1, protocol: '5',"))
        agent = agent_factory(config)
        wait_for(lambda: len(sub.seqs("meter-ok")) >= 20, 20, "allowed events")
        time.sleep(1)
        agent.signal(signal.SIGTERM)
        assert agent.wait(10) == 0
        assert sub.seqs("meter-denied") == []
        db = sqlite3.connect(f"file:{tmp_path / 'buffer.db'}?mode=ro", uri=True)
        denied_left = db.execute("SELECT count(*) FROM outbox WHERE device = 'meter-denied'").fetchone()[0]
        last = dict(db.execute("SELECT device, seq FROM sequences"))
        db.close()
        assert denied_left == last["meter-denied"] > 0  # every refused event is still buffered
        assert "broker refused" in agent.output()
    finally:
        broker.stop()
