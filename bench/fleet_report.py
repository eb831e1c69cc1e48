"""The fleet benchmark's printing: a few lines per phase as it ends, and the summary table with the targets."""

from __future__ import annotations

from typing import Any

ECHOES = ("in-callback", "after-puback", "after-puback-nodelay")  # fleet.ECHO_MODES, in its order


def mb(n: float) -> float:
    return n / 1e6


def fmt(v: float | None, spec: str = ",.0f") -> str:
    return "-" if v is None or v != v else format(v, spec)


def print_memory(label: str, m: dict[str, float]) -> None:
    print(
        f"   channel {label}: mean RSS {mb(m['rss']):.1f} MB (max {mb(m['rss_max']):.1f}), PSS"
        f" {mb(m['pss']):.1f} MB, USS {mb(m['uss']):.1f} MB over {m['n']:.0f} agents; all agents'"
        f" CPU {m['cpu']:.0f}% of a core ({m['cpu'] / max(1, m['n']):.2f}% each)",
        flush=True,
    )


def spread(x: dict[str, float], unit: str = " s") -> str:
    return f"{fmt(x['p50'], '.2f')} / {fmt(x['p95'], '.2f')} / {fmt(x['max'], '.2f')}{unit} ({x['n']:.0f})"


def print_push(r: dict[str, Any]) -> None:
    c = r["cli_summary"]
    cs = c.get("seconds_to_applied") or {}
    print(
        f"   CLI: exit {r['cli_exit']}, {r['cli_seconds']:.1f} s in all, {r['cli_start_to_publish']:.1f} s from its"
        f" start to its first document; its summary: {c.get('applied', '-')} applied, {c.get('rejected', '-')}"
        f" rejected, {c.get('rolled_back', '-')} rolled back, {c.get('no_answer', '-')} no answer; seconds to"
        f" applied p50/p95/max {fmt(cs.get('p50'), '.2f')} / {fmt(cs.get('p95'), '.2f')} / {fmt(cs.get('max'), '.2f')}",
        flush=True,
    )
    if r["cli_exit"] != 0 and r["cli_stderr"]:
        print(f"   CLI stderr: {r['cli_stderr']}", flush=True)
    print(
        f"   {r['published']}/{r['gateways']} documents seen published within {r['publish_span']:.2f} s;"
        f" from the first (p50 / p95 / max, gateways):",
        flush=True,
    )
    print(f"     committed (report `applying`): {spread(r['committed'])}", flush=True)
    print(f"     applied (report `applied`)   : {spread(r['applied'])}", flush=True)
    print(f"     applied - {r['health_window']} s health window : {spread(r['applied_after_window'])}", flush=True)
    print(f"   outcomes: {r['outcomes']}", flush=True)


def report(name: str, r: dict[str, Any], agents: int) -> None:
    """One phase's lines, as it ends."""
    if name == "round_trip":
        for label, x in (
            *((f"bare paho echo, {m:<20}", r[f"echo_{m}"]) for m in ECHOES),
            ("signed ping to the agents", r["ping"]),
        ):
            print(
                f"   {label:<36}: {x['answered']}/{x['sent']} answered, p50 {x['p50']:.1f} ms, p95 {x['p95']:.1f} ms,"
                f" p99 {x['p99']:.1f} ms, max {x['max']:.1f} ms; statuses {x['statuses']}",
                flush=True,
            )
        print(f"   pings took {r['ping']['seconds']:.1f} s, mosquitto CPU {r['ping']['mosq_cpu']:.0f}%", flush=True)
    elif name == "push_config":
        print_push(r)
    elif name == "restart":
        print(
            f"   broker down {r['outage']:.1f} s; back: {r['back']}/{agents}, all back"
            f" {fmt(r['all_back_s'], '.1f')} s after the broker started (median {fmt(r['median_back_s'], '.1f')} s);"
            f" busiest second {r['busiest_second']} CONNECTs ({r['busiest_second'] / agents:.0%} of the fleet), any 1 s"
            f" window {r['busiest_1s_window']}; {r['connects']} CONNECTs, {r['again']} clients more than once",
            flush=True,
        )
        print(f"   CONNECTs per second from broker start: {' '.join(map(str, r['histogram']))}", flush=True)
        if r["reasons"]:
            print(f"   broker log after restart: {r['reasons']}", flush=True)
    elif name == "loss":
        print(
            f"   received {r['received']:,} events ({r['unique']:,} unique): lost {r['lost']}, duplicates"
            f" {r['duplicates']}, still buffered {r['undrained']};"
            f" agent log lines with Traceback/ERROR/CRITICAL: {r['problems']}",
            flush=True,
        )
    elif name == "per_client":
        print(
            f"   per client over the run ({r['clients']} clients): most CONNECTs in any 1 s {r['max_1s']}"
            f" (over 1: {len(r['over_1_per_s'])}), in any 60 s {r['max_60s']} (over 15:"
            f" {len(r['over_15_per_min'])}), most in all {r['most_connects']}",
            flush=True,
        )


def summary(results: dict[str, Any], agents: int, info: list[str], elapsed: float) -> None:
    """The figures next to their targets, ready to paste into the issue."""
    rows: list[tuple[str, str, str]] = []
    if "push_config" in results:
        x = results["push_config"]
        o = x["outcomes"]
        rows.append(
            (
                f"push-config: applied - {x['health_window']} s window p50/p95/max",
                spread(x["applied_after_window"]),
                "all <= 10 s",
            )
        )
        rows.append(("  committed (`applying`) p50/p95/max", spread(x["committed"]), ""))
        rows.append(("  applied p50/p95/max (window included)", spread(x["applied"]), ""))
        rows.append(
            (
                "  applied / rejected / rolled back / none",
                f"{o['applied']} / {o['rejected']} / {o['rolled_back']} / {o['no_answer']} (CLI exit {x['cli_exit']})",
                f"{x['gateways']} applied",
            )
        )
    if "round_trip" in results:
        p = results["round_trip"]["ping"]
        rows.append(
            (
                "command round trip (ping) p50/p95/max",
                f"{p['p50']:.1f} / {p['p95']:.1f} / {p['max']:.1f} ms ({p['answered']}/{p['sent']} answered)",
                "p95 <= 50 ms",
            )
        )
        for mode in ECHOES:
            e = results["round_trip"][f"echo_{mode}"]
            rows.append(
                (f"  bare paho echo, {mode}", f"{e['p50']:.1f} / {e['p95']:.1f} / {e['max']:.1f} ms", "(yardstick)")
            )
    if "restart" in results:
        r = results["restart"]
        rows.append(
            (
                "broker restart: CONNECTs in busiest second",
                f"{r['busiest_second']} = {r['busiest_second'] / agents:.0%} (any 1 s window {r['busiest_1s_window']})",
                "<= 10 % of fleet",
            )
        )
        rows.append(
            (
                "  all back after broker start",
                f"{fmt(r['all_back_s'], '.1f')} s ({r['back']}/{agents})",
                "<= 120 s",
            )
        )
    if "loss" in results:
        x = results["loss"]
        rows.append(("  events lost / duplicates", f"{x['lost']} / {x['duplicates']} of {x['unique']:,}", "0 lost"))
    if "connects" in results:
        c = results["connects"]
        rows.append(
            (
                "  one client's CONNECTs in any 1 s",
                f"{c['max_1s']} (clients over 1: {len(c['over_1_per_s'])})",
                "<= 1 (AWS)",
            )
        )
        rows.append(
            (
                "  one client's CONNECTs in any 60 s",
                f"{c['max_60s']} (over 15: {len(c['over_15_per_min'])})",
                "<= 15 (EMQX)",
            )
        )
    if "mem_on" in results and "mem_off" in results:
        on, off = results["mem_on"], results["mem_off"]
        rows.append(
            (
                "RSS channel on - off (mean)",
                f"{mb(on['rss'] - off['rss']):+.1f} MB (on {mb(on['rss']):.1f}, off {mb(off['rss']):.1f});"
                f" PSS {mb(on['pss'] - off['pss']):+.1f}, USS {mb(on['uss'] - off['uss']):+.1f}",
                "<= 10 MB",
            )
        )
        rows.append(("  idle fleet CPU on / off", f"{on['cpu']:.0f}% / {off['cpu']:.0f}% of a core", ""))
    lines = ["", "=" * 100, "SUMMARY", "=" * 100, *info, f"elapsed   : {elapsed:.0f} s", ""]
    lines += [f"{a:<44} {b:<60} {c}" for a, b, c in rows]
    if results.get("error"):
        lines.append(f"stopped early: {results['error']}")
    print("\n".join(lines), flush=True)
