"""Checks of DATA contents, metric and property encoding (SendData, SendComplexData), Rebirth
commands (ReceiveCommand) and the ends of a session (SessionTermination)."""

from __future__ import annotations

from tests.sparkplug.checks_birth import _epochs
from tests.sparkplug.checks_session import REBIRTH, _where
from tests.sparkplug.packets import Packet
from tests.sparkplug.session import BIRTHS, DATA, IN_FLIGHT, NAMESPACE, EdgeMessage, Session, bdseq_of, metrics
from tests.sparkplug.spb import INT32, METRIC_TYPES, PROPERTY_TYPES, decode
from tests.sparkplug.verdicts import Check, Verdict, check, judge

QUALITY_CODES = {0, 192, 500}


def _data_payload(kind: str) -> Check:
    def run(s: Session) -> Verdict:
        found, bad = s.of(kind), []
        for m in found:
            if m.payload is None or not m.payload.metrics:
                bad.append(f"{_where(m)} carries no metrics")
                continue
            births = [b for b in s.births_before(m) if b.device == m.device and b.payload is not None]
            if not births:
                continue  # DATA without its birth: the order checks' finding
            names = s.alias_names(m)
            known = {x.name for b in births for x in b.payload.metrics}
            for x in m.payload.metrics:
                name = x.name or names.get(x.alias, "")
                if name not in known:
                    bad.append(
                        f"{_where(m)} metric {x.name or x.alias} is not in the births of {m.device or 'the node'}"
                    )
        return judge(bad, len(found), f"{kind}s")

    return run


check("topics-ndata-payload")(_data_payload("NDATA"))
check("topics-ddata-payload")(_data_payload("DDATA"))


@check("payloads-alias-data-cmd-requirement")
def data_alias_only(s: Session) -> Verdict:
    found = list(metrics(s.of(*DATA)))
    bad = [f"{_where(m)} metric {x.name!r} alias {x.alias if x.HasField('alias') else None}" for m, x in found
           if x.name or not x.HasField("alias")]  # fmt: skip
    return judge(bad, len(found) if s.aliases else 0, "DATA metrics (aliases in use)")


@check("payloads-name-requirement")
def names_unless_aliases(s: Session) -> Verdict:
    found = list(metrics(s.of(*BIRTHS, *DATA)))
    bad = [f"{_where(m)} metric has neither name nor alias" for m, x in found if not x.name and not x.HasField("alias")]
    bad += [f"{_where(m)} metric alias {x.alias} has no name" for m, x in found
            if m.kind in BIRTHS and not x.name]  # fmt: skip
    return judge(bad, len(found), "metrics")


@check("payloads-metric-datatype-not-req")
def no_datatype_in_data(s: Session) -> Verdict:
    found = list(metrics(s.of(*DATA)))
    bad = [f"{_where(m)} metric {x.name or x.alias} datatype {x.datatype}" for m, x in found if x.HasField("datatype")]
    return judge(bad, len(found), "DATA metrics")


@check("payloads-metric-datatype-value", "payloads-metric-datatype-value-type")
def datatype_values(s: Session) -> Verdict:
    found = [(m, x) for m, x in metrics(s.of(*BIRTHS, *DATA)) if x.HasField("datatype")]
    bad = [f"{_where(m)} metric {x.name} datatype {x.datatype}" for m, x in found if x.datatype not in METRIC_TYPES]
    return judge(bad, len(found), "metric datatypes")


def _property_values(s: Session) -> list[tuple[EdgeMessage, str, object]]:
    out: list[tuple[EdgeMessage, str, object]] = []
    for m, x in metrics(s.of(*BIRTHS, *DATA)):
        if x.HasField("properties"):
            out += [
                (m, f"{x.name or x.alias}.{k}", v) for k, v in zip(x.properties.keys, x.properties.values, strict=False)
            ]
    return out


def _property_sets(s: Session) -> list[tuple[EdgeMessage, object]]:
    return [(m, x.properties) for m, x in metrics(s.of(*BIRTHS, *DATA)) if x.HasField("properties")]


@check("payloads-propertyset-keys-array-size", "payloads-propertyset-values-array-size")
def property_sizes(s: Session) -> Verdict:
    found = _property_sets(s)
    bad = [f"{_where(m)} {len(p.keys)} keys, {len(p.values)} values" for m, p in found  # type: ignore[attr-defined]
           if len(p.keys) != len(p.values)]  # type: ignore[attr-defined]  # fmt: skip
    return judge(bad, len(found), "property sets")


@check("payloads-metric-propertyvalue-type-req")
def property_type_in_births(s: Session) -> Verdict:
    found = [(m, k, v) for m, k, v in _property_values(s) if m.kind in BIRTHS]
    bad = [f"{_where(m)} property {k} has no type" for m, k, v in found if not v.HasField("type")]  # type: ignore[attr-defined]
    return judge(bad, len(found), "birth property values")


@check("payloads-metric-propertyvalue-type-type", "payloads-metric-propertyvalue-type-value")
def property_types(s: Session) -> Verdict:
    found = [(m, k, v) for m, k, v in _property_values(s) if v.HasField("type")]  # type: ignore[attr-defined]
    bad = [f"{_where(m)} property {k} type {v.type}" for m, k, v in found if v.type not in PROPERTY_TYPES]  # type: ignore[attr-defined]
    return judge(bad, len(found), "property value types")


def _qualities(s: Session) -> list[tuple[EdgeMessage, str, object]]:
    return [(m, k, v) for m, k, v in _property_values(s) if k.endswith(".Quality")]


@check("payloads-propertyset-quality-value-type")
def quality_type(s: Session) -> Verdict:
    found = _qualities(s)
    return judge([f"{_where(m)} {k} type {v.type}" for m, k, v in found if v.type != INT32], len(found),  # type: ignore[attr-defined]
                 "Quality properties")  # fmt: skip


@check("payloads-propertyset-quality-value-value")
def quality_value(s: Session) -> Verdict:
    found = _qualities(s)
    bad = [f"{_where(m)} {k} = {v.WhichOneof('value')} {getattr(v, 'int_value', None)}" for m, k, v in found  # type: ignore[attr-defined]
           if v.WhichOneof("value") != "int_value" or v.int_value not in QUALITY_CODES]  # type: ignore[attr-defined]  # fmt: skip
    return judge(bad, len(found), "Quality properties")


def rebirth_commands(s: Session) -> list[Packet]:
    """NCMD Rebirth=true handed to the edge, by the proxy's record."""
    topic = f"{NAMESPACE}/{s.group}/NCMD/{s.node}"
    out = []
    for p in s.packets:
        if p.kind == "PUBLISH" and not p.up and p.topic == topic:
            payload = decode(p.payload)
            if payload is not None and any(x.name == REBIRTH and x.boolean_value for x in payload.metrics):
                out.append(p)
    return out


def _after(s: Session, cmd: Packet) -> list[EdgeMessage]:
    return [m for m in s.edge if m.conn == cmd.conn and m.n > cmd.n]


@check("operational-behavior-data-commands-rebirth-action-1")
def rebirth_stops_data(s: Session) -> Verdict:
    cmds, bad = rebirth_commands(s), []
    for cmd in cmds:
        later = _after(s, cmd)
        birth = next((m.n for m in later if m.kind == "NBIRTH"), None)
        bad += [f"{_where(m)} after the Rebirth #{cmd.n} before its NBIRTH" for m in later
                if m.kind in DATA and (birth is None or m.n < birth) and m.at > cmd.at + IN_FLIGHT]  # fmt: skip
    return judge(bad, len(cmds), "Rebirth commands")


@check("operational-behavior-data-commands-rebirth-action-2")
def rebirth_births_all(s: Session) -> Verdict:
    cmds, bad = rebirth_commands(s), []
    for cmd in cmds:
        before = [m for m in s.edge if m.conn == cmd.conn and m.n < cmd.n]
        alive: set[str] = set()
        for m in before:
            if m.kind == "NBIRTH":
                alive = set()
            elif m.kind == "DBIRTH":
                alive.add(m.device)
            elif m.kind == "DDEATH":
                alive.discard(m.device)
        later = _after(s, cmd)
        start = next((i for i, m in enumerate(later) if m.kind == "NBIRTH"), None)
        if start is None:
            bad.append(f"no NBIRTH after the Rebirth #{cmd.n}")
            continue
        burst = []
        for m in later[start + 1 :]:
            if m.kind != "DBIRTH":
                break
            burst.append(m.device)
        if missing := alive - set(burst):
            bad.append(f"after the Rebirth #{cmd.n} no DBIRTH for {sorted(missing)} before DATA")
    return judge(bad, len(cmds), "Rebirth commands")


@check("operational-behavior-data-commands-rebirth-action-3")
def rebirth_same_bdseq(s: Session) -> Verdict:
    cmds, bad = rebirth_commands(s), []
    for cmd in cmds:
        birth = next((m for m in _after(s, cmd) if m.kind == "NBIRTH"), None)
        will = s.will_bdseq(cmd.conn)
        if birth is None or bdseq_of(birth.payload) != will:
            bad.append(
                f"after the Rebirth #{cmd.n}: NBIRTH bdSeq {bdseq_of(birth.payload) if birth else None}, Will {will}"
            )
    return judge(bad, len(cmds), "Rebirth commands")


def _disconnects(s: Session, version: int | None = None) -> list[Packet]:
    return [p for p in s.packets if p.up and p.kind == "DISCONNECT" and version in (None, p.version)]


def _last_publish_before(s: Session, p: Packet) -> EdgeMessage | None:
    return next((m for m in reversed(s.edge) if m.conn == p.conn and m.n < p.n), None)


def _ndeath_first(version: int | None) -> Check:
    def run(s: Session) -> Verdict:
        found = _disconnects(s, version)
        bad = []
        for p in found:
            last = _last_publish_before(s, p)
            if last is None or last.kind != "NDEATH":
                bad.append(f"DISCONNECT #{p.n} on {p.server}#{p.conn} after {_where(last) if last else 'nothing'}")
        return judge(bad, len(found), "DISCONNECTs")

    return run


check("operational-behavior-edge-node-intentional-disconnect-ndeath", "payloads-ndeath-will-message-publisher")(
    _ndeath_first(None)
)
check("payloads-ndeath-will-message-publisher-disconnect-mqtt311")(_ndeath_first(4))


@check("payloads-ndeath-will-message-publisher-disconnect-mqtt50")
def disconnect_with_will(s: Session) -> Verdict:
    found = _disconnects(s, 5)
    return judge([f"DISCONNECT #{p.n} reason {p.reason:#x}" for p in found if p.reason != 0x04], len(found),
                 "MQTT 5.0 DISCONNECTs")  # fmt: skip


@check("operational-behavior-edge-node-intentional-disconnect-packet")
def disconnect_after_ndeath(s: Session) -> Verdict:
    found, bad = s.of("NDEATH"), []
    for m in found:
        # keepalive and acknowledgement packets are the MQTT client's, not a continuation of the session
        following = next((p for p in s.conns[m.conn] if p.n > m.n and p.up and p.kind not in ("PUBACK", "PINGREQ")),
                         None)  # fmt: skip
        if following is not None and following.kind not in ("DISCONNECT", "CLOSE"):
            bad.append(f"{_where(m)} followed by {following.kind} #{following.n}")
    return judge(bad, len(found), "published NDEATHs")


@check("operational-behavior-device-ddeath")
def device_death(s: Session) -> Verdict:
    """A device the scenario took offline gets a DDEATH, and no session after it ends with the
    device born (a DBIRTH left standing would tell the host a dead device is online)."""
    bad = []
    for device in s.offline_devices:
        since = s.marks.get(f"offline:{device}", 0.0)
        said = [m for m in s.edge if m.device == device and m.kind in ("DBIRTH", "DDEATH") and m.at >= since]
        if not any(m.kind == "DDEATH" for m in said):
            bad.append(f"{device} went offline and no DDEATH followed")
        for epoch in _epochs(s):
            last = [m for m in epoch if m.device == device and m.kind in ("DBIRTH", "DDEATH") and m.at >= since]
            if last and last[-1].kind == "DBIRTH" and any(m.kind == "DDEATH" for m in said if m.n < last[-1].n):
                bad.append(f"{device}, still offline, left born by {_where(last[-1])}")
    return judge(bad, len(s.offline_devices), "devices taken offline")
