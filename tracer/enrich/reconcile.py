"""Reconciliation: what rsttrace's hooks saw in each network namespace, beside what the kernel counted.

Two readings of the kernel's counters meet here:
  - the sampler's (listeners.py): /proc/net/{snmp,netstat} of each netns it can enter, every few
    seconds — every counter, as of its last pass;
  - the per-CPU reads of the BPF programs (bpf/netstat.bpf.c): the listen-queue counters of each netns
    that has a listener on a traced port, read at every listener SYN and final-ACK drop there — exact
    up to the last packet, and kept after the netns is gone.
A counter neither could read is None, never 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import counters
from .listeners import CREATED_AFTER_START, LATE, START, NetnsState

# bpf/netstat.bpf.c's NS_* slots, by nstat name.
PERCPU_COUNTERS = ("TcpExtSyncookiesSent", "TcpExtListenOverflows", "TcpExtListenDrops",
                   "TcpExtTCPReqQFullDoCookies", "TcpExtTCPReqQFullDrop")
UNKNOWN = "unknown"     # a netns only the BPF programs read, existing at start but never read then


@dataclass
class PercpuTotals:
    """One netns's listen counters as the BPF programs last read them, summed over CPUs."""
    count: dict[str, int] = field(default_factory=dict)
    other_ports: dict[str, int] = field(default_factory=dict)    # moved by untraced ports' listeners
    unexplained: dict[str, int] = field(default_factory=dict)    # moved where no hook saw a decision


def percpu_totals(reads: list[tuple[int, list[int], list[int], list[int]]]) -> dict[int, PercpuTotals]:
    """The BPF programs' per-(netns, CPU) reads (loader.RstProgram.netstat_reads), summed per netns."""
    out: dict[int, PercpuTotals] = {}
    for inode, *parts in reads:
        totals = out.setdefault(inode, PercpuTotals())
        for into, values in zip((totals.count, totals.other_ports, totals.unexplained), parts):
            for name, n in zip(PERCPU_COUNTERS, values):
                into[name] = into.get(name, 0) + n
    return out


def reconcile(states: list[NetnsState], counted: dict[int, dict[str, int]], written: dict[int, dict[str, int]],
              percpu: dict[int, PercpuTotals], at_start: dict[int, int | None],
              start_counters: dict[int, dict[str, int]], device: dict[int, dict[str, int]] | None = None) -> list[dict]:
    """One row per netns: `rsttrace` (events written), `counted` (every event the hooks saw, written
    or not: the kernel-side exact counts), `kernel` (counter deltas over the same span), where the
    baseline came from, and coverage. `device`: RSTs that left through a device per netns
    (bpf/origin.bpf.c), a third count beside TcpOutRsts and rst_sent."""
    rows = []
    for st in states:
        rows.append(_row(st.inode, st.name, st.origin, st.gone, st.baseline, st.latest, st.seen_before,
                         counted.get(st.inode, {}), written.get(st.inode, {}), percpu.get(st.inode)))
    if device is not None:
        for row in rows:
            at_device = dict(device.get(row["inode"]) or {"by_tcp": 0, "not_by_tcp": 0, "forwarded": 0,
                                                          "tcp_dropped": 0})
            out_rsts = row["kernel"].get("TcpOutRsts")
            # What TCP counted that neither left through a device nor was seen dropped on the way: sent
            # before rsttrace's hooks were in (a late baseline), or a path rsttrace does not know.
            at_device["unexplained"] = (None if out_rsts is None
                                        else out_rsts - at_device["by_tcp"] - at_device["tcp_dropped"])
            row["device_rsts"] = at_device
    sampled = {st.inode for st in states}
    for inode, totals in percpu.items():
        if inode in sampled:
            continue
        if inode not in at_start:
            origin, baseline = CREATED_AFTER_START, {}
        elif inode in start_counters:
            origin, baseline = START, start_counters[inode]
        else:
            origin, baseline = UNKNOWN, None
        rows.append(_row(inode, None, origin, None, baseline, {}, {}, counted.get(inode, {}), written.get(inode, {}),
                         totals))
    return rows


def _row(inode: int, name: str | None, origin: str, gone: bool | None, baseline: dict[str, int] | None,
         latest: dict[str, int], seen_before: dict[str, int], counted: dict[str, int], written: dict[str, int],
         totals: PercpuTotals | None) -> dict:
    kernel: dict[str, int | None] = {}
    for name_ in counters.INTERESTING:
        now = latest.get(name_)
        if totals is not None and name_ in totals.count:
            # Both are readings of the same counter: the later one is the larger.
            now = max(now or 0, totals.count[name_])
        # A netns made after start counted from 0; any other baseline holds every counter it had.
        then = (baseline or {}).get(name_, 0 if origin == CREATED_AFTER_START else None)
        kernel[name_] = None if now is None or then is None else now - then
    written = {k: v - seen_before.get(k, 0) for k, v in written.items()}
    # The hooks' exact counts cover rsttrace's whole run: after a late baseline only the records
    # written since can be set against the kernel's deltas.
    seen = written if origin == LATE else (counted or written)
    listen = seen.get("syn_dropped", 0) + seen.get("ack_dropped", 0)
    row = {
        "inode": inode,
        "name": name,
        "baseline": origin,
        "gone": gone,
        "rsttrace": written,
        "counted": counted,
        "kernel": kernel,
        "events_before_baseline": sum(seen_before.values()),
        "coverage_pct": {
            "rst_sent": _pct(seen.get("rst_sent", 0), kernel.get("TcpOutRsts")),
            "listen_drops": _pct(listen, kernel.get("TcpExtListenDrops")),
            "syn_cookie": _pct(seen.get("syn_cookie", 0), kernel.get("TcpExtSyncookiesSent")),
        },
    }
    if totals is not None:
        row["other_ports"] = {k: v for k, v in totals.other_ports.items() if v}
        row["unexplained"] = {k: v for k, v in totals.unexplained.items() if v}
    return row


def _pct(ours: int, kernel: int | None) -> float | None:
    return round(100.0 * ours / kernel, 1) if kernel else None
