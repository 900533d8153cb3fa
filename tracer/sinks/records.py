"""Records: the versioned shape every output shares (schema/rsttrace-v1.schema.json).

The JSON is the schema; plain lines and the terminal UI are views of these same dicts. Sinks get
dicts from here and know nothing about BPF.
"""
from __future__ import annotations

import time
from typing import Any

from ..events.decode import Event

SCHEMA = "rsttrace/1"


_second = [-1, ""]      # the last whole second formatted: events come in bursts within one second


def rfc3339(ns: int) -> str:
    """UTC, microsecond precision: 2026-11-22T09:43:46.123456Z."""
    secs, rem = divmod(ns, 1_000_000_000)
    if secs != _second[0]:
        _second[:] = secs, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    return f"{_second[1]}.{rem // 1000:06d}Z"


def base(record_type: str, ns: int | None = None) -> dict[str, Any]:
    return {"schema": SCHEMA, "type": record_type, "time": rfc3339(ns if ns is not None else time.time_ns())}


# What enrichment found out about an event beyond the kernel's record, each a field of its own when
# there is something to say (docs/json.md), in this order:
#   app_errors  RSTs: the process's failed syscalls in the window before it (enrich/app.py)
#   accept      accept-queue drops: the listener's accept() calls and SYNs, and why its queue is full
#   firewall    firewall_reject(_icmp): the REJECT rules of that netns that could have sent it (enrich/origins.py)
#   nat         rst_sent no_socket from an address a DNAT rule of its netns rewrites: the segment skipped
#               NAT, conntrack marked it INVALID (enrich/origins.py)
#   origin      rst_received: its TTL and timestamp option against the peer's handshake, and the REJECT
#               on this host that made it, if one did (enrich/origins.py)
#   reset_by    rst_received: the rst_sent of this host that caused it, or null where none matched
#               (enrich/stories.py)
EVENT_EXTRAS = ("app_errors", "accept", "firewall", "nat", "origin", "reset_by")


def event_record(ev: Event) -> dict[str, Any]:
    rec = {
        "schema": SCHEMA,
        "type": "event",
        "time": rfc3339(ev.time_ns),
        "ktime_ns": ev.ktime_ns,
        "event": ev.kind,
        "reason": ev.reason,
        "kernel_reason": ev.kernel_reason,
        "inferred": ev.inferred,
        "family": ev.family,
        "local": {"addr": ev.local_addr, "port": ev.local_port},
        "remote": {"addr": ev.remote_addr, "port": ev.remote_port},
        "state": ev.state,
        "netns": {"inode": ev.netns, "name": ev.netns_name},
        "context": "softirq" if ev.softirq else "process",
        "process": ev.process,
        "socket": {
            "inode": ev.sock_ino or None,
            "cookie": ev.sock_cookie or None,
            "unread_bytes": ev.unread_bytes,
            "linger": ev.linger,
            "orphan": ev.orphan,
        },
        "queues": ev.queues,
        "explanation": ev.explanation,
        "evidence": {
            "callers": ev.caller_names,
            "tcp_flags": ev.tcp_flag_names,
            "task_on_cpu": {"pid": ev.task_pid, "comm": ev.task_comm},
        },
    }
    for name in EVENT_EXTRAS:
        if name in ev.extra:
            rec[name] = ev.extra[name]
    return rec


def connection_record(*, wall_ns: int, ktime_ns: int, **fields: Any) -> dict[str, Any]:
    """A connection's story (tracer/enrich/stories.py): outcome, errno, both ends, what hurt it."""
    rec = {"schema": SCHEMA, "type": "connection", "time": rfc3339(wall_ns), "ktime_ns": ktime_ns}
    rec.update(fields)
    return rec


def coverage_record(coverage: dict, kernel: str, filters: dict, startup_ms: float) -> dict[str, Any]:
    rec = base("coverage")
    rec.update({"kernel": kernel, "filters": filters, "startup_ms": round(startup_ms, 1), **coverage})
    return rec


def lost_record(lost: int, total_lost: int) -> dict[str, Any]:
    rec = base("lost")
    rec.update({"lost": lost, "total_lost": total_lost,
                "note": "the BPF ring buffer was full: these events were counted in the kernel but not delivered"})
    return rec


def suppressed_record(window_s: float, held_back: dict[str, dict[str, int]], total: int, max_rate: int,
                      exact: dict[str, dict[str, int]], uncounted: int) -> dict[str, Any]:
    """--max-rate held back event records: how many, by reason, and the kernel's exact counts so far."""
    rec = base("suppressed")
    rec.update({"window_s": round(window_s, 3), "max_rate": max_rate,
                "suppressed": sum(sum(r.values()) for r in held_back.values()), "by_reason": held_back,
                "total_suppressed": total, "exact_counts": exact, "uncounted": uncounted})
    return rec


def summary_record(counts: dict[str, dict[str, int]], lost: int, submitted: int, duration_s: float,
                   kernel_counters: dict[str, Any], exact: dict[str, dict[str, int]],
                   reconciliation: list[dict] | None = None, suppressed: int = 0,
                   uncounted: int = 0, unwritten: int = 0,
                   skipped_runs: dict[str, int] | None = None, aggregated: int = 0) -> dict[str, Any]:
    """counts: events emitted (after user-space filters and --max-rate); exact: every event the BPF
    programs saw, counted in the kernel, whether or not its record was delivered (uncounted: events
    that found the count map full, so exact_counts misses them; unwritten: records still in the ring
    buffer when the exit drain gave up; skipped_runs: program runs the kernel skipped, by attach
    point — their events are in neither)."""
    rec = base("summary")
    rec.update({"duration_s": round(duration_s, 3), "events": counts, "exact_counts": exact,
                "delivered": submitted, "lost": lost, "aggregated": aggregated, "suppressed": suppressed,
                "uncounted": uncounted,
                "unwritten": unwritten, "skipped_runs": skipped_runs or {},
                "kernel_counters": kernel_counters, "reconciliation": reconciliation})
    return rec


def storm_record(phase: str, since_start: dict[str, int], seconds: float, high_bytes: int,
                 pending_bytes: int) -> dict[str, Any]:
    """A storm starts (more than high_bytes of the ring buffer waited to be read: events are counted
    per shape in the kernel from now on) or ends; `since_start`: events written, aggregated, lost."""
    rec = base("storm")
    rec.update({"phase": phase, "duration_s": round(seconds, 3), "written": since_start["submitted"],
                "aggregated": since_start["aggregated"], "lost": since_start["lost"],
                "ring_unread_bytes": pending_bytes, "threshold_bytes": high_bytes})
    return rec


def aggregate_record(start: float, end: float, kind: str, reason: str, netns: dict[str, Any], port: int,
                     process: dict[str, Any] | None, count: int, samples: int) -> dict[str, Any]:
    """During a storm: `count` events of one shape in one window, counted in the kernel and not
    written one by one (`samples` of them were)."""
    rec = base("aggregate")
    rec.update({"window": {"from": rfc3339(int(start * 1e9)), "to": rfc3339(int(end * 1e9))}, "event": kind,
                "reason": reason,
                "netns": netns, "port": port, "process": process, "count": count, "samples": samples})
    return rec


def listeners_record(rows: list[dict]) -> dict[str, Any]:
    """Listeners on the traced ports with their queues, as inet_diag reports them now."""
    rec = base("listeners")
    rec["listeners"] = rows
    return rec


def reconciliation_record(per_netns: list[dict]) -> dict[str, Any]:
    """rsttrace's counts per netns beside the kernel's counter deltas since rsttrace started."""
    rec = base("reconciliation")
    rec["netns"] = per_netns
    rec["note"] = ("kernel counters cover every port of the netns: with --port filters coverage below 100% "
                   "is expected; a netns first met in an event is counted from that moment")
    return rec


# Syslog severities (RFC 5424 §6.2.1); ECS's event.severity uses the same numbers.
SYSLOG_SEVERITY = {"error": 3, "warning": 4, "notice": 5, "info": 6}


def severity_of(rec: dict[str, Any]) -> str:
    """error / warning / notice / info: an event's from the reason catalog; losses are warnings."""
    kind = rec["type"]
    if kind in ("event", "connection"):
        from ..enrich.reasons import CATALOG
        reason = CATALOG.get(rec["reason"] if kind == "event" else rec["outcome"])
        return reason.severity if reason and reason.severity in SYSLOG_SEVERITY else "warning"
    return {"lost": "warning", "suppressed": "notice", "storm": "warning", "aggregate": "notice"}.get(kind, "info")


def _total(counts: dict[str, dict[str, int]]) -> int:
    return sum(sum(by_reason.values()) for by_reason in counts.values())


def one_line(rec: dict[str, Any]) -> str:
    """A human sentence for any record (the message of a syslog line or an ECS document)."""
    kind = rec["type"]
    if kind in ("event", "connection"):
        return rec["explanation"]
    if kind == "lost":
        return (f"{rec['lost']} events lost (total {rec['total_lost']}): the ring buffer was full; "
                "the kernel's exact counts still include them")
    if kind == "suppressed":
        exact = ", ".join(f"{k} {_total({k: v})}" for k, v in sorted(rec["exact_counts"].items()))
        return (f"--max-rate {rec['max_rate']}/s held back {rec['suppressed']} event records in "
                f"{rec['window_s']:.1f} s ({rec['total_suppressed']} since start); counted in the kernel: {exact}")
    if kind == "coverage":
        hooks = ", ".join(f"{k}: {v['hook'] or 'not visible'}" for k, v in rec["hooks"].items())
        return f"rsttrace attached on Linux {rec['kernel']} in {rec['startup_ms']:.0f} ms — {hooks}"
    if kind == "summary":
        return (f"rsttrace stopped after {rec['duration_s']:.1f} s: {_total(rec['events'])} events written, "
                f"{_total(rec['exact_counts'])} counted in the kernel, {rec['lost']} lost, "
                f"{rec.get('suppressed', 0)} suppressed")
    if kind == "listeners":
        full = sum(1 for row in rec["listeners"] if row["accept_qmax"] and row["accept_qlen"] > row["accept_qmax"])
        return f"{len(rec['listeners'])} listeners on traced ports, {full} with a full accept queue"
    if kind == "reconciliation":
        return f"rsttrace's counts beside the kernel's counters in {len(rec['netns'])} network namespaces"
    if kind == "storm":
        if rec["phase"] == "start":
            return (f"storm: {rec['ring_unread_bytes']} bytes of events waiting to be written; from now on the "
                    f"kernel counts events per shape and rsttrace writes samples and `aggregate` records")
        return (f"storm over after {rec['duration_s']:.1f} s: {rec['written']} events written, {rec['aggregated']} "
                f"aggregated, {rec['lost']} lost")
    if kind == "aggregate":
        who = f" by {rec['process']['comm']} (pid {rec['process']['pid']})" if rec.get("process") else ""
        return (f"{rec['count']} × {rec['event']} {rec['reason']} on port {rec['port']}{who} in "
                f"netns {rec['netns']['name'] or rec['netns']['inode']} (aggregated during a storm)")
    return kind
