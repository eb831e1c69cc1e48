"""Checks of the session rules: CONNECT and Will, subscriptions, topics, MQTT flags, seq, bdSeq,
timestamps, birth order and contents, and the ways a session ends (SessionEstablishment and
SessionTermination, plus the flag, topic, seq and timestamp rules the data tests share)."""

from __future__ import annotations

from typing import Any

from tests.sparkplug.session import BIRTHS, DATA, NAMESPACE, EdgeMessage, Session, bdseq_of, metrics
from tests.sparkplug.spb import INT64, decode
from tests.sparkplug.verdicts import Verdict, check, judge

TIME_TOLERANCE = 5.0  # seconds between a payload's timestamp and the moment the proxy saw it
REBIRTH = "Node Control/Rebirth"


def _where(m: EdgeMessage) -> str:
    return f"{m.kind} #{m.n} on {m.server}#{m.conn}"


def _flags(kinds: tuple[str, ...], qos: bool, retain: bool) -> Any:
    def run(s: Session) -> Verdict:
        found = s.of(*kinds)
        bad = [f"{_where(m)} qos={m.qos} retain={m.retain}" for m in found
               if (qos and m.qos != 0) or (retain and m.retain)]  # fmt: skip
        return judge(bad, len(found), "/".join(kinds))

    return run


for _kind in ("NBIRTH", "DBIRTH", "NDATA", "DDATA", "DDEATH"):
    _lower = _kind.lower()
    check(f"topics-{_lower}-mqtt")(_flags((_kind,), True, True))
check("message-flow-edge-node-birth-publish-nbirth-qos", "payloads-nbirth-qos")(_flags(("NBIRTH",), True, False))
check("message-flow-edge-node-birth-publish-nbirth-retained", "payloads-nbirth-retain")(
    _flags(("NBIRTH",), False, True)
)
check("message-flow-device-birth-publish-dbirth-qos", "payloads-dbirth-qos")(_flags(("DBIRTH",), True, False))
check("message-flow-device-birth-publish-dbirth-retained", "payloads-dbirth-retain")(_flags(("DBIRTH",), False, True))
check("payloads-ndata-qos")(_flags(("NDATA",), True, False))
check("payloads-ndata-retain")(_flags(("NDATA",), False, True))
check("payloads-ddata-qos")(_flags(("DDATA",), True, False))
check("payloads-ddata-retain")(_flags(("DDATA",), False, True))


def _topics(kind: str) -> Any:
    def run(s: Session) -> Verdict:
        found = s.of(kind)
        node_level = kind.startswith("N")
        bad = [f"{_where(m)} on {m.topic!r}" for m in found
               if m.group != s.group or m.node != s.node or (m.device == "") != node_level]  # fmt: skip
        if kind == "NDEATH":
            wills = [c for c in s.connects() if c.will is not None]
            want = f"{NAMESPACE}/{s.group}/NDEATH/{s.node}"
            bad += [f"Will of CONNECT #{c.n} on {c.will.topic!r}" for c in wills if c.will and c.will.topic != want]
            return judge(bad, len(found) + len(wills), "NDEATH topics (published and Will)")
        return judge(bad, len(found), f"{kind} topics")

    return run


check("message-flow-edge-node-birth-publish-nbirth-topic", "topics-nbirth-topic")(_topics("NBIRTH"))
check("message-flow-device-birth-publish-dbirth-topic", "topics-dbirth-topic")(_topics("DBIRTH"))
for _kind in ("NDATA", "DDATA", "DDEATH", "NDEATH"):
    check(f"topics-{_kind.lower()}-topic")(_topics(_kind))


@check("message-flow-edge-node-birth-publish-will-message-topic", "payloads-ndeath-will-message")
def will_topic(s: Session) -> Verdict:
    want = f"{NAMESPACE}/{s.group}/NDEATH/{s.node}"
    connects = s.connects()
    bad = [f"CONNECT #{c.n}: Will on {c.will.topic if c.will else None!r}" for c in connects
           if c.will is None or c.will.topic != want]  # fmt: skip
    return judge(bad, len(connects), "CONNECT Wills")


@check("message-flow-device-birth-publish-dbirth-match-edge-node-topic")
def dbirth_matches_nbirth(s: Session) -> Verdict:
    bad, seen = [], 0
    for m in s.of("DBIRTH"):
        seen += 1
        births = s.births_before(m)
        if not births or births[0].kind != "NBIRTH" or (births[0].group, births[0].node) != (m.group, m.node):
            bad.append(f"{_where(m)} has no NBIRTH of {m.group}/{m.node} before it")
    return judge(bad, seen, "DBIRTHs")


def _decodes(kind: str) -> Any:
    def run(s: Session) -> Verdict:
        found = s.of(kind)
        return judge([f"{_where(m)} is not a Sparkplug payload" for m in found if m.payload is None], len(found),
                     f"{kind} payloads")  # fmt: skip

    return run


check("message-flow-edge-node-birth-publish-nbirth-payload")(_decodes("NBIRTH"))
check("message-flow-device-birth-publish-dbirth-payload")(_decodes("DBIRTH"))


@check("message-flow-edge-node-birth-publish-will-message-payload")
def will_payload(s: Session) -> Verdict:
    wills = [c for c in s.connects() if c.will is not None]
    bad = [
        f"Will of CONNECT #{c.n} is not a Sparkplug payload" for c in wills if c.will and decode(c.will.payload) is None
    ]
    return judge(bad, len(wills), "Will payloads")


def _seq_present(kinds: tuple[str, ...]) -> Any:
    def run(s: Session) -> Verdict:
        found = s.of(*kinds)
        return judge([f"{_where(m)} has no seq" for m in found if m.seq is None], len(found), "/".join(kinds))

    return run


check("payloads-dbirth-seq")(_seq_present(("DBIRTH",)))
check("payloads-ddeath-seq", "payloads-ddeath-seq-number")(_seq_present(("DDEATH",)))
check("payloads-ndata-seq")(_seq_present(("NDATA",)))
check("payloads-ddata-seq")(_seq_present(("DDATA",)))
check("payloads-sequence-num-always-included")(_seq_present(("NBIRTH", "DBIRTH", "DDEATH", "NDATA", "DDATA")))


def _seq_chain(kind: str) -> Any:
    def run(s: Session) -> Verdict:
        found = s.of(kind)
        want = s.expected_seq
        bad = [f"{_where(m)} seq={m.seq}, want {want[m.n]}" for m in found if m.seq != want[m.n]]
        return judge(bad, len(found), f"{kind} seqs")

    return run


check("topics-dbirth-seq", "payloads-dbirth-seq-inc")(_seq_chain("DBIRTH"))
check("topics-ddeath-seq-num", "payloads-ddeath-seq-inc")(_seq_chain("DDEATH"))
check("topics-ndata-seq-num")(_seq_chain("NDATA"))
check("topics-ddata-seq-num")(_seq_chain("DDATA"))


@check("message-flow-edge-node-birth-publish-nbirth-payload-seq", "payloads-nbirth-seq",
       "payloads-sequence-num-req-nbirth")  # fmt: skip
def nbirth_seq_range(s: Session) -> Verdict:
    found = s.of("NBIRTH")
    bad = [f"{_where(m)} seq={m.seq}" for m in found if m.seq is None or not 0 <= m.seq <= 255]
    return judge(bad, len(found), "NBIRTH seqs")


@check("topics-nbirth-seq-num")
def nbirth_seq_zero(s: Session) -> Verdict:
    found = s.of("NBIRTH")
    return judge([f"{_where(m)} seq={m.seq}" for m in found if m.seq != 0], len(found), "NBIRTH seqs")


def _ndeath_payloads(s: Session) -> list[tuple[str, Any]]:
    out = [(f"Will of CONNECT #{c.n}", decode(c.will.payload)) for c in s.connects() if c.will is not None]
    return out + [(_where(m), m.payload) for m in s.of("NDEATH")]


@check("payloads-ndeath-seq", "topics-ndeath-seq")
def ndeath_no_seq(s: Session) -> Verdict:
    found = _ndeath_payloads(s)
    bad = [f"{where} carries seq={p.seq}" for where, p in found if p is not None and p.HasField("seq")]
    return judge(bad, len(found), "NDEATH payloads")


@check("topics-ndeath-payload")
def ndeath_only_bdseq(s: Session) -> Verdict:
    found = _ndeath_payloads(s)
    bad = [f"{where} metrics {[x.name for x in p.metrics] if p is not None else 'undecodable'}" for where, p in found
           if p is None or [x.name for x in p.metrics] != ["bdSeq"]]  # fmt: skip
    return judge(bad, len(found), "NDEATH payloads")


def _timestamps(kind: str) -> Any:
    def run(s: Session) -> Verdict:
        found = s.of(kind)
        bad = []
        for m in found:
            if m.payload is None or not m.payload.HasField("timestamp"):
                bad.append(f"{_where(m)} has no timestamp")
            elif abs(m.payload.timestamp / 1000 - m.at) > TIME_TOLERANCE:
                bad.append(
                    f"{_where(m)} timestamp {m.payload.timestamp} is {m.payload.timestamp / 1000 - m.at:+.1f} s off"
                )
        return judge(bad, len(found), f"{kind} timestamps")

    return run


check("payloads-nbirth-timestamp", "topics-nbirth-timestamp")(_timestamps("NBIRTH"))
check("payloads-dbirth-timestamp", "topics-dbirth-timestamp")(_timestamps("DBIRTH"))
check("payloads-ndata-timestamp", "topics-ndata-timestamp")(_timestamps("NDATA"))
check("payloads-ddata-timestamp", "topics-ddata-timestamp")(_timestamps("DDATA"))
check("payloads-ddeath-timestamp")(_timestamps("DDEATH"))


@check("payloads-metric-timestamp-in-UTC")
def utc_timestamps(s: Session) -> Verdict:
    bad, seen = [], 0
    for m, metric in metrics(s.of(*BIRTHS, *DATA)):
        if metric.HasField("timestamp"):
            seen += 1
            # history may be days old, but a local-time clock shows as hours in the future
            if not m.at - 30 * 86400 <= metric.timestamp / 1000 <= m.at + TIME_TOLERANCE:
                bad.append(f"{_where(m)} metric {metric.name or metric.alias} timestamp {metric.timestamp}")
    return judge(bad, seen, "metric timestamps")


@check("payloads-name-birth-data-requirement")
def metric_timestamps(s: Session) -> Verdict:
    found = list(metrics(s.of(*BIRTHS, *DATA)))
    bad = [f"{_where(m)} metric {x.name or x.alias} has no timestamp" for m, x in found if not x.HasField("timestamp")]
    return judge(bad, len(found), "metrics")


@check("payloads-nbirth-bdseq", "topics-nbirth-bdseq-included")
def nbirth_has_bdseq(s: Session) -> Verdict:
    found = s.of("NBIRTH")
    return judge([f"{_where(m)} has no bdSeq" for m in found if bdseq_of(m.payload) is None], len(found), "NBIRTHs")


def _bdseq_matches_will(s: Session, m: EdgeMessage) -> str | None:
    will, own = s.will_bdseq(m.conn), bdseq_of(m.payload)
    return None if will is not None and will == own else f"{_where(m)} bdSeq={own}, Will of its CONNECT {will}"


@check("message-flow-edge-node-birth-publish-nbirth-payload-bdSeq")
def nbirth_bdseq_int64(s: Session) -> Verdict:
    found = s.of("NBIRTH")
    bad = [x for m in found if (x := _bdseq_matches_will(s, m))]
    bad += [
        f"{_where(m)} bdSeq datatype {x.datatype}"
        for m, x in metrics(found)
        if x.name == "bdSeq" and x.datatype != INT64
    ]
    return judge(bad, len(found), "NBIRTHs")


@check("payloads-nbirth-bdseq-repeat", "topics-nbirth-bdseq-matching")
def nbirth_bdseq_will(s: Session) -> Verdict:
    found = s.of("NBIRTH")
    return judge([x for m in found if (x := _bdseq_matches_will(s, m))], len(found), "NBIRTHs")


@check("payloads-ndeath-bdseq")
def ndeath_bdseq(s: Session) -> Verdict:
    bad, seen = [], 0
    for conn in {m.conn for m in s.of("NBIRTH")}:
        births = {bdseq_of(m.payload) for m in s.of("NBIRTH") if m.conn == conn}
        deaths = [(f"Will of connection {conn}", s.will_bdseq(conn))]
        deaths += [(_where(m), bdseq_of(m.payload)) for m in s.of("NDEATH") if m.conn == conn]
        for where, value in deaths:
            seen += 1
            if {value} != births:
                bad.append(f"{where} bdSeq={value}, NBIRTH {sorted(births, key=str)}")
    return judge(bad, seen, "NDEATH bdSeqs")
