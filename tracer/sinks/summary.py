"""The exit summary on stderr: what was written, what the kernel counted, and per netns how the two
compare (the `summary` record, as a person reads it)."""
from __future__ import annotations

from .plain import stderr

# How long the session goes on writing what is still in the ring buffer at exit (tracer/session.py).
DRAIN_S = 20.0


def print_summary(summary: dict, out=stderr) -> None:
    if not summary:
        return
    total = sum(sum(r.values()) for r in summary["events"].values())
    held = f", suppressed {summary['suppressed']} (--max-rate)" if summary.get("suppressed") else ""
    if summary.get("aggregated"):
        held += f", aggregated {summary['aggregated']} during storms (counted per shape, not written one by one)"
    out(f"rsttrace: {total} events in {summary['duration_s']:.1f}s, lost {summary['lost']}{held}")
    if summary.get("unwritten"):
        out(f"rsttrace: {summary['unwritten']} records were still in the ring buffer when writing gave up "
            f"after {DRAIN_S:.0f} s (counted below)")
    otlp = summary.get("otlp")
    if otlp:
        out(f"rsttrace: --otlp {otlp['endpoint']}: {otlp_line(otlp)}")
    skipped = summary.get("skipped_runs") or {}
    if skipped:
        out(f"rsttrace: the kernel skipped {sum(skipped.values())} runs of rsttrace's programs ("
            + ", ".join(f"{hook} {n}" for hook, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
            + "): another BPF program was running on that CPU when the event fired (an interrupt nested "
              "in it); those events are in no record and no count")
    shown = summary["events"]
    if summary.get("suppressed") or summary["lost"] or summary.get("unwritten") or summary.get("aggregated"):
        shown = summary["exact_counts"]
        out("  counted in the kernel (every event past the kernel's filters, written or not):")
    for kind, by_reason in shown.items():
        for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1]):
            out(f"  {n:>8}  {kind:<13} {reason}")
    delta = summary["kernel_counters"]["delta"]
    moved = {k: v for k, v in delta.items() if v}
    if moved:
        out("  kernel counters (rsttrace's netns): " + ", ".join(f"{k} +{v}" for k, v in moved.items()))
    for ns in summary.get("reconciliation") or []:
        k, ours = ns["kernel"], ns.get("counted") or ns["rsttrace"]
        listen = ours.get("syn_dropped", 0) + ours.get("ack_dropped", 0)
        if not (k.get("TcpOutRsts") or k.get("TcpExtListenDrops") or ours):
            continue
        name = ns["name"] or ns["inode"]
        gone = " (gone: its last readings)" if ns.get("gone") else ""
        since = {"created_after_start": " (made after start: counted from 0)",
                 "late": f" (first read late: {ns.get('events_before_baseline', 0)} events before)"}.get(ns.get("baseline"), "")
        other = ns.get("unexplained", {}).get("TcpExtListenDrops")
        other = f", {other} the kernel counted where no hook saw a drop" if other else ""
        dev = ns.get("device_rsts")
        at_device = ""
        if dev and (dev["by_tcp"] or dev["not_by_tcp"] or dev["tcp_dropped"] or dev.get("unexplained")):
            at_device = f"; leaving the devices {dev['by_tcp']} by TCP, {dev['not_by_tcp']} not"
            if dev["tcp_dropped"]:
                at_device += f", {dev['tcp_dropped']} of TCP's dropped on the way out"
            if dev.get("unexplained"):
                at_device += f", {dev['unexplained']} TcpOutRsts unexplained"
        rejects = f"; {ours['firewall_reject']} by firewall REJECTs" if ours.get("firewall_reject") else ""
        out(f"  netns {name}{since}{gone}: RSTs sent {ours.get('rst_sent', 0)} seen / {_known(k.get('TcpOutRsts'))} "
            f"counted (TcpOutRsts){rejects}{at_device}; listen drops {listen} seen / "
            f"{_known(k.get('TcpExtListenDrops'))} counted (ListenDrops){other}")
    told = summary.get("connections")
    for c in (told or {}).get("per_listener") or []:
        out("  " + listener_connections(c))
    if told and told.get("not_followed"):
        out(f"  {told['not_followed']} drops or SYN retransmits of connections rsttrace could not follow "
            f"(its map of connections was full)")
    app = summary.get("app_errors")
    if app and app.get("paths_unread"):
        out(f"  {app['paths_unread']} failed path calls whose path could not be read from the process's memory")
    if summary.get("origins") is False and summary["exact_counts"].get("rst_received", {}).get("peer_reset"):
        out("  hint: --origins tells whether a received RST came from the peer, a firewall REJECT on this host "
            "or a box on the path (the TTL), and names the REJECT rule")
    if app is None and _app_side_would_tell(summary["exact_counts"]):
        out("  hint: --app-errors names the failed syscalls behind an application's aborts, and why a full "
            "accept queue is not drained (not accepting, accept() failing, accepting too slowly)")


# The reasons whose cause is in the application: what --app-errors explains further.
APP_SIDE_REASONS = {"rst_sent": {"closed_with_unread_data", "linger_zero", "aborted"},
                    "syn_dropped": {"accept_queue_full"}, "ack_dropped": {"accept_queue_full"}}


def _app_side_would_tell(counts: dict) -> bool:
    return any(counts.get(kind, {}).get(reason) for kind, reasons in APP_SIDE_REASONS.items() for reason in reasons)


def listener_connections(c: dict) -> str:
    """One listener's connections (enrich/stories.py), in a line."""
    delay = c.get("added_delay_s")
    late = f" (added delay p50 {delay['p50']:.2f} s, p99 {delay['p99']:.2f} s)" if delay else ""
    done = f"{c['established']} handshakes completed; " if c.get("established") is not None else ""
    return (f"port {c['port']} (netns {c.get('netns_name') or c['netns']}): {done}connections hurt: {c['never_established']} never "
            f"established, {c['established_late']} established late{late}, {c['client_only']} established on "
            f"the client only, {c['reset']} reset, {c['open']} without an end")


def otlp_line(otlp: dict) -> str:
    """What became of the log records handed to the OTLP sink (sinks/otlp.py), in a line."""
    text = f"{otlp['sent']} log records sent"
    for key, what in (("failed", "failed (refused, or given up after retries)"),
                      ("dropped_queue_full", "dropped (queue full)"), ("unsent_at_exit", "unsent at exit"),
                      ("pending", "still queued")):
        if otlp.get(key):
            text += f", {otlp[key]} {what}"
    return text


def _known(value: int | None) -> str:
    return "?" if value is None else str(value)
