"""Checks of the CONNECT, the subscriptions before a birth, the birth order and contents, and
intentional ends of a session (SessionEstablishment and SessionTermination)."""

from __future__ import annotations

from typing import Any

from paho.mqtt.client import topic_matches_sub

from tests.sparkplug.checks_session import REBIRTH, _where
from tests.sparkplug.session import BIRTHS, DATA, NAMESPACE, EdgeMessage, Session, metrics
from tests.sparkplug.spb import BOOLEAN
from tests.sparkplug.verdicts import Check, Verdict, check, judge


@check("message-flow-edge-node-birth-publish-will-message")
def has_will(s: Session) -> Verdict:
    c = s.connects()
    return judge([f"CONNECT #{p.n} has no Will" for p in c if p.will is None], len(c), "CONNECTs")


@check("message-flow-edge-node-birth-publish-will-message-qos", "payloads-ndeath-will-message-qos")
def will_qos(s: Session) -> Verdict:
    c = [p for p in s.connects() if p.will is not None]
    return judge([f"CONNECT #{p.n} Will QoS {p.will.qos}" for p in c if p.will and p.will.qos != 1], len(c), "Wills")


@check("message-flow-edge-node-birth-publish-will-message-will-retained", "payloads-ndeath-will-message-retain")
def will_retain(s: Session) -> Verdict:
    c = [p for p in s.connects() if p.will is not None]
    return judge([f"CONNECT #{p.n} Will retained" for p in c if p.will and p.will.retain], len(c), "Wills")


@check("principles-persistence-clean-session-311")
def clean_311(s: Session) -> Verdict:
    c = [p for p in s.connects() if p.version == 4]
    return judge([f"CONNECT #{p.n} Clean Session false" for p in c if not p.clean], len(c), "MQTT 3.1.1 CONNECTs")


@check("principles-persistence-clean-session-50")
def clean_50(s: Session) -> Verdict:
    c = [p for p in s.connects() if p.version == 5]
    bad = [f"CONNECT #{p.n} Clean Start {p.clean}, Session Expiry {p.session_expiry}" for p in c
           if not p.clean or p.session_expiry != 0]  # fmt: skip
    return judge(bad, len(c), "MQTT 5.0 CONNECTs")


def _subscribed_before(s: Session, m: EdgeMessage, topic: str) -> bool:
    return any(p.kind == "SUBSCRIBE" and p.n < m.n and any(topic_matches_sub(f, topic) for f, _ in p.subscriptions)
               for p in s.conns[m.conn])  # fmt: skip


@check("message-flow-edge-node-ncmd-subscribe")
def ncmd_subscribe(s: Session) -> Verdict:
    found = s.of("NBIRTH")
    topic = f"{NAMESPACE}/{s.group}/NCMD/{s.node}"
    return judge([f"{_where(m)} before a SUBSCRIBE to {topic}" for m in found if not _subscribed_before(s, m, topic)],
                 len(found), "NBIRTHs")  # fmt: skip


@check("message-flow-device-dcmd-subscribe")
def dcmd_subscribe(s: Session) -> Verdict:
    found = s.of("DBIRTH")
    bad = [f"{_where(m)} before a SUBSCRIBE covering DCMD to {m.device}" for m in found
           if not _subscribed_before(s, m, f"{NAMESPACE}/{s.group}/DCMD/{s.node}/{m.device}")]  # fmt: skip
    return judge(bad, len(found), "DBIRTHs")


@check("message-flow-edge-node-birth-publish-connect")
def birth_after_connect(s: Session) -> Verdict:
    found = s.of("NBIRTH")
    bad = [f"{_where(m)} without a CONNECT before it" for m in found
           if not any(p.kind == "CONNECT" and p.n < m.n for p in s.conns[m.conn])]  # fmt: skip
    return judge(bad, len(found), "NBIRTHs")


@check("principles-birth-certificates-order")
def birth_first(s: Session) -> Verdict:
    bad, seen = [], 0
    for conn in sorted({m.conn for m in s.edge}):
        first = next(m for m in s.edge if m.conn == conn)
        seen += 1
        if first.kind not in ("NBIRTH", "NDEATH"):  # an NDEATH may end a session that never began
            bad.append(f"first publish of connection {conn} is {_where(first)}")
    return judge(bad, seen, "connections that published")


@check("message-flow-device-birth-publish-nbirth-wait")
def dbirth_after_nbirth(s: Session) -> Verdict:
    found = s.of("DBIRTH")
    bad = [f"{_where(m)} with no NBIRTH before it on its connection" for m in found
           if not any(b.kind == "NBIRTH" for b in s.births_before(m))]  # fmt: skip
    return judge(bad, len(found), "DBIRTHs")


def _epochs(s: Session) -> list[list[EdgeMessage]]:
    """The edge's messages cut at each NBIRTH (a message before any NBIRTH of its connection alone)."""
    out: list[list[EdgeMessage]] = []
    current: dict[int, list[EdgeMessage]] = {}
    for m in s.edge:
        if m.kind == "NBIRTH" or m.conn not in current:
            current[m.conn] = []
            out.append(current[m.conn])
        current[m.conn].append(m)
    return out


def _late_dbirths(s: Session) -> list[tuple[EdgeMessage, EdgeMessage]]:
    """(DBIRTH, earlier DATA) where a device born in an earlier epoch and not dead since was birthed
    only after DATA: its DBIRTH belonged right after the NBIRTH."""
    out, born_before = [], set()
    for epoch in _epochs(s):
        dead, first_data = set(), None
        for m in epoch:
            if m.kind == "DDEATH":
                dead.add(m.device)
            elif m.kind in DATA and first_data is None:
                first_data = m
            elif m.kind == "DBIRTH" and first_data is not None and m.device in born_before and m.device not in dead:
                out.append((m, first_data))
        born_before |= {m.device for m in epoch if m.kind == "DBIRTH"}
    return out


@check("payloads-dbirth-order")
def dbirth_order(s: Session) -> Verdict:
    bad = [f"{_where(b)} after {_where(d)}" for b, d in _late_dbirths(s)]
    return judge(bad, len(s.of("DBIRTH")), "DBIRTHs")


@check("payloads-ndata-order")
def ndata_order(s: Session) -> Verdict:
    found = s.of("NDATA")
    bad = [f"{_where(m)} with no NBIRTH in force" for m in found if not s.births_before(m)]
    bad += [f"{_where(d)} before {_where(b)}" for b, d in _late_dbirths(s) if d.kind == "NDATA"]
    return judge(bad, len(found), "NDATAs")


@check("payloads-ddata-order")
def ddata_order(s: Session) -> Verdict:
    found, bad = s.of("DDATA"), []
    for epoch in _epochs(s):
        alive: set[str] = set()
        for m in epoch:
            if m.kind == "DBIRTH":
                alive.add(m.device)
            elif m.kind == "DDEATH":
                alive.discard(m.device)
            elif m.kind == "DDATA" and (m.device not in alive or epoch[0].kind != "NBIRTH"):
                bad.append(f"{_where(m)} for {m.device} before its DBIRTH")
    return judge(bad, len(found), "DDATAs")


def _rebirth_metrics(s: Session) -> list[tuple[EdgeMessage, Any]]:
    return [(m, x) for m, x in metrics(s.of("NBIRTH")) if x.name == REBIRTH]


def _rebirth(want: str) -> Check:
    def run(s: Session) -> Verdict:
        births, found = s.of("NBIRTH"), _rebirth_metrics(s)
        bad = [f"{_where(m)} has no {REBIRTH}" for m in births if m.n not in {b.n for b, _ in found}]
        for m, x in found:
            if "datatype" in want and x.datatype != BOOLEAN:
                bad.append(f"{_where(m)} {REBIRTH} datatype {x.datatype}")
            if "value" in want and (x.WhichOneof("value") != "boolean_value" or x.boolean_value):
                bad.append(f"{_where(m)} {REBIRTH} value {x.WhichOneof('value')}")
            if "alias" in want and x.HasField("alias"):
                bad.append(f"{_where(m)} {REBIRTH} has alias {x.alias}")
        return judge(bad, len(births), "NBIRTHs")

    return run


check("operational-behavior-data-commands-rebirth-name")(_rebirth("name"))
check("operational-behavior-data-commands-rebirth-datatype")(_rebirth("datatype"))
check("operational-behavior-data-commands-rebirth-value")(_rebirth("value"))
check("payloads-nbirth-rebirth-req", "topics-nbirth-rebirth-metric")(_rebirth("datatype value"))
check("operational-behavior-data-commands-rebirth-name-aliases")(_rebirth("alias"))


def _birth_metrics(kind: str, rule: str) -> Check:
    def run(s: Session) -> Verdict:
        found = list(metrics(s.of(kind)))
        bad = []
        for m, x in found:
            has_value = x.WhichOneof("value") is not None
            if "name" in rule and not x.name:
                bad.append(f"{_where(m)} metric alias {x.alias} has no name")
            if "datatype" in rule and not x.HasField("datatype"):
                bad.append(f"{_where(m)} metric {x.name} has no datatype")
            if "value" in rule and has_value == x.is_null:
                bad.append(f"{_where(m)} metric {x.name} value={has_value} is_null={x.is_null}")
            if "current" in rule and x.is_null and (known := _value_known_at_birth(s, m, x)):
                bad.append(known)
        return judge(bad, len(found), f"{kind} metrics")

    return run


check("topics-nbirth-metrics")(_birth_metrics("NBIRTH", "name datatype value"))
check("topics-dbirth-metrics")(_birth_metrics("DBIRTH", "name datatype value"))
check("operational-behavior-data-publish-nbirth-values")(_birth_metrics("NBIRTH", "value current"))
check("operational-behavior-data-publish-dbirth-values")(_birth_metrics("DBIRTH", "value current"))


def _value_known_at_birth(s: Session, birth: EdgeMessage, metric: Any) -> str | None:
    """A birth's null metric whose value the edge had: DATA after the birth, in its epoch (live or
    history), shows the newest reading taken before the birth was sent carried a value."""
    if not metric.HasField("alias") or birth.payload is None:
        return None
    newest: tuple[int, bool, EdgeMessage] | None = None
    for m in s.edge:
        if m.n <= birth.n or m.conn != birth.conn or m.device != birth.device:
            continue
        if m.kind in BIRTHS or m.kind == "DDEATH":
            break  # a new birth or a death: the epoch of this birth is over
        for x in m.payload.metrics if m.kind in DATA and m.payload is not None else ():
            read_before = x.HasField("timestamp") and x.timestamp <= birth.payload.timestamp
            if x.alias == metric.alias and read_before and (newest is None or x.timestamp >= newest[0]):
                newest = (x.timestamp, not x.is_null and x.WhichOneof("value") is not None, m)
    if newest is None or not newest[1]:
        return None
    return (
        f"{_where(birth)} metric {metric.name} is_null, but {_where(newest[2])} carries its value read at "
        f"{newest[0]}, before the birth ({birth.payload.timestamp})"
    )


@check("payloads-metric-datatype-req")
def birth_datatypes(s: Session) -> Verdict:
    found = list(metrics(s.of(*BIRTHS)))
    bad = [f"{_where(m)} metric {x.name} has no datatype" for m, x in found if not x.HasField("datatype")]
    return judge(bad, len(found), "birth metrics")


@check("payloads-alias-birth-requirement")
def alias_with_name(s: Session) -> Verdict:
    found = [(m, x) for m, x in metrics(s.of(*BIRTHS)) if x.HasField("alias")]
    bad = [f"{_where(m)} alias {x.alias} without a name" for m, x in found if not x.name]
    return judge(bad, len(found), "aliased birth metrics")


@check("payloads-alias-uniqueness")
def alias_unique(s: Session) -> Verdict:
    bad, seen = [], 0
    for epoch in _epochs(s):
        owner: dict[int, str] = {}
        for m in epoch:
            if m.kind not in BIRTHS or m.payload is None:
                continue
            for x in m.payload.metrics:
                if x.HasField("alias"):
                    seen += 1
                    who = f"{m.device}:{x.name}"
                    if owner.setdefault(x.alias, who) != who:
                        bad.append(f"{_where(m)} alias {x.alias} for {who}, already {owner[x.alias]}")
    return judge(bad, seen, "birth aliases")


@check("case-sensitivity-metric-names")
def case_collisions(s: Session) -> Verdict:
    bad, seen = [], 0
    for m in s.of(*BIRTHS):
        names = [x.name for x in m.payload.metrics] if m.payload is not None else []
        seen += 1
        lowered = [n.lower() for n in names]
        bad += [f"{_where(m)} names {n!r} twice ignoring case" for n in set(lowered) if lowered.count(n) > 1]
    return judge(bad, seen, "births")
