"""The dead-link watch: the last byte from the broker, our own PINGREQ, the round-trip estimate."""

from __future__ import annotations

from agent.uplinks.mqtt.errors import ConnectionLost

# An answer (PUBACK, PINGRESP) overdue this long, without a byte from the broker meanwhile,
# means the link is dead: at least ANSWER_FLOOR, more when the observed round trip is slow
# (RFC 6298's srtt + 4 rttvar), at most half the keepalive.
ANSWER_FLOOR = 4.0
TICK = 1.0  # seconds between paho's housekeeping (loop_misc) calls, and between link checks


class Link:
    """Tells a dead link from a quiet one, well within the keepalive."""

    def __init__(self) -> None:
        """A link that has heard nothing yet; the uplink stamps ``last_inbound`` on connect."""
        self.last_inbound = 0.0
        self.ping_at: float | None = None
        self.checked_at = 0.0
        self.srtt: float | None = None
        self._rttvar = 0.0

    def heard(self, now: float) -> None:
        """A byte came from the broker."""
        self.last_inbound = now
        self.ping_at = None  # any byte from the broker answers our question

    def sample_rtt(self, rtt: float) -> None:
        """RFC 6298's smoothed round trip and its variation, from publish to PUBACK."""
        if self.srtt is None:
            self.srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar += 0.25 * (abs(self.srtt - rtt) - self._rttvar)
            self.srtt += 0.125 * (rtt - self.srtt)

    def answer_timeout(self, keepalive: float) -> float:
        rto = self.srtt + 4 * self._rttvar if self.srtt is not None else 0.0
        return min(keepalive / 2, max(ANSWER_FLOOR, rto))

    def check(self, now: float, oldest: float | None, keepalive: float) -> bool:
        """Notice a dead link well within the keepalive, busy or idle; True: send a PINGREQ now.

        ``oldest`` is when the oldest message still awaiting its PUBACK was sent, if any.

        paho pings only after a keepalive of silence and then waits another keepalive, so a
        half-open link (no RST, no FIN) takes it twice the keepalive to notice. Here the
        broker must answer: when a PUBACK or our PINGREQ is due and not one byte has come
        from the broker for the answer timeout (a few seconds, at most half the keepalive),
        the link is dead. An idle link is pinged after half a keepalive of silence, so a dead
        link is noticed within one keepalive (plus a second for this check's tick) either way.
        """
        stalled = now - self.checked_at > 2 * TICK  # the loop itself was held up: reads may be pending
        self.checked_at = now
        awaited = self.ping_at
        if oldest is not None:
            awaited = oldest if awaited is None else min(awaited, oldest)
        if awaited is not None and not stalled:
            silent = now - max(self.last_inbound, awaited)
            if silent > self.answer_timeout(keepalive):
                raise ConnectionLost(f"no answer from the broker for {silent:.1f} s (link dead?)")
        if self.ping_at is None and now - self.last_inbound >= keepalive / 2:
            self.ping_at = now
            return True
        return False
