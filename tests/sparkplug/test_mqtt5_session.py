"""Our edge node's MQTT 5.0 session end to end (the one the TCK-lite records for the -50 ids): a real
agent with ``protocol: "5"`` connects with Clean Start and no session expiry, is born, and on
SIGTERM publishes NDEATH itself, then sends DISCONNECT with reason 0x04 ("Disconnect with Will
Message") so the broker publishes the will as well."""

from __future__ import annotations

from tests.sparkplug.session import Session, bdseq_of

DISCONNECT_WITH_WILL = 0x04


def test_mqtt5_session_births_then_ndeath_and_disconnect_with_will(our_sessions: list[Session]) -> None:
    s = our_sessions[1]
    connects = s.connects()
    assert len(connects) == 1 and connects[0].version == 5, [(p.n, p.version) for p in connects]
    assert connects[0].clean and connects[0].session_expiry == 0
    conn = connects[0].conn
    said = [m for m in s.edge if m.conn == conn]
    kinds = [m.kind for m in said]
    assert kinds[0] == "NBIRTH" and "DBIRTH" in kinds and "DDATA" in kinds, kinds
    assert kinds[-1] == "NDEATH", f"the session's last publish is {kinds[-1]}, not NDEATH"
    nbirth, ndeath = said[0], said[-1]
    assert bdseq_of(ndeath.payload) == bdseq_of(nbirth.payload) == s.will_bdseq(conn)
    after = [p for p in s.conns[conn] if p.up and p.n > ndeath.n and p.kind not in ("PUBACK", "PINGREQ")]
    assert after and after[0].kind == "DISCONNECT", [p.kind for p in after]
    assert after[0].reason == DISCONNECT_WITH_WILL, f"DISCONNECT reason {after[0].reason:#x}"
