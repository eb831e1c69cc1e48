"""The two views of a live session agree: what the proxy saw the edge node publish reached the
``spBv1.0/#`` recorder as published (topic, payload, QoS and retain), and every NDEATH the
recorder got, the edge's own or its Will from the broker, carries the bdSeq of that session."""

from __future__ import annotations

from collections import Counter

from tests.sparkplug.session import Session, bdseq_of, split_topic


def test_every_edge_publish_reached_the_recorder_as_published(
    our_sessions: list[Session], control_judged: tuple[Session, object]
) -> None:
    for session in [*our_sessions, control_judged[0]]:
        sent = Counter((m.server, m.topic, m.raw, m.qos, m.retain) for m in session.edge)
        got = Counter((m.server, m.topic, m.payload, m.qos, m.retain) for m in session.messages
                      if split_topic(m.topic)[0] not in ("", "NCMD", "DCMD"))  # the host's commands aside  # fmt: skip
        wills = Counter({k: n for k, n in got.items() if k[1].split("/")[2] == "NDEATH"})
        assert sent - got == Counter(), f"{session.node}: published, never delivered: {list(sent - got)[:3]}"
        assert got - sent - wills == Counter(), f"{session.node}: delivered, never published: {list(got - sent)[:3]}"
        assert all(m.decoded is not None for m in session.messages if split_topic(m.topic)[0])


def test_every_ndeath_delivered_names_a_session_of_the_edge(our_sessions: list[Session]) -> None:
    for session in our_sessions:
        wills = {session.will_bdseq(c.conn) for c in session.connects()}
        deaths = [bdseq_of(m.decoded) for m in session.messages if split_topic(m.topic)[0] == "NDEATH"]
        assert deaths, "the stop publishes an NDEATH"
        assert set(deaths) <= wills, f"NDEATH bdSeqs {deaths} vs the CONNECTs' Wills {wills}"
