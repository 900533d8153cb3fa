"""The kernel's exact counts (every event past the kernel's filters, written or not), classified as
the events themselves would be: per kind and rsttrace reason, per netns, as metric rows.

A count key keeps the few fields the classification needs (bpf/rsttrace.h, rsttrace_count_key), so
a storm's aggregated events, held back or lost records are still counted under their reason.
"""
from __future__ import annotations

from typing import Callable

from ..events.decode import TCP_STATES
from ..kernel.layout import (F_HAVE_SOCKET, F_ORPHAN, F_UNREAD, HOOK_NAMES, KIND_NAMES, NO_REASON, OUTCOME_NAMES,
                             VERDICT_NAMES)
from . import reasons
from .stacks import Symbolizer


NOT_BY_TCP = {value for value, name in HOOK_NAMES.items() if name in ("net_dev_queue", "icmp_send")}


def kind_name(kind: int) -> str:
    return KIND_NAMES.get(kind, f"kind_{kind}")


class ExactCounts:
    def __init__(self, reason_names: dict[str, dict[int, str]], stacks: Symbolizer,
                 netns_name: Callable[[int], str | None]):
        """stacks: the event path's (Pipeline.stacks), so that a stack is looked up once for both."""
        self.reason_names = reason_names
        self.stacks = stacks
        self.netns_name = netns_name
        self._reasons: dict[tuple, str] = {}

    def reason_of(self, key) -> str:
        """rsttrace's reason for one count key (cached: a storm has many keys but few distinct
        classifications)."""
        memo = (key.kind, key.kernel_reason, key.tcp_flags, key.linger_zero, key.verdict, key.queue_full,
                key.flags, key.state, key.hook, key.callers[0], key.callers[1])
        reason = self._reasons.get(memo)
        if reason is None:
            kind = kind_name(key.kind)
            names = self.reason_names.get(kind, {})
            kernel_reason = None if key.kernel_reason == NO_REASON else names.get(key.kernel_reason)
            callers = (self.stacks.names(HOOK_NAMES.get(key.hook), [a for a in key.callers if a])
                       if kernel_reason is None else [])
            reason = reasons.classify_fields(
                kind, kernel_reason=kernel_reason, tcp_flags=key.tcp_flags, linger_zero=bool(key.linger_zero),
                verdict=(OUTCOME_NAMES if kind == "connection" else VERDICT_NAMES).get(key.verdict, "none"),
                queue_full=bool(key.queue_full),
                orphan=bool(key.flags & F_ORPHAN), callers=callers, state=TCP_STATES.get(key.state),
                unread=1 if key.flags & F_UNREAD else 0, has_socket=bool(key.flags & F_HAVE_SOCKET),
                hook=HOOK_NAMES.get(key.hook))
            self._reasons[memo] = reason
        return reason

    def rows(self, exact) -> list[dict]:
        """As rows: event, reason, netns (inode, name), service port, count."""
        return [{"event": kind_name(key.kind), "reason": self.reason_of(key), "netns": key.netns,
                 "netns_name": self.netns_name(key.netns), "port": key.service_port, "count": n}
                for key, n in exact]

    def by_kind(self, exact) -> dict[str, dict[str, int]]:
        """Per event kind and rsttrace reason (the summary's and `suppressed` records' exact_counts)."""
        out: dict[str, dict[str, int]] = {}
        for row in self.rows(exact):
            by_reason = out.setdefault(row["event"], {})
            by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + row["count"]
        return out

    @staticmethod
    def per_netns(exact) -> dict[int, dict[str, int]]:
        """Per netns inode and event kind (what reconciliation sets beside the kernel's counters)."""
        counted: dict[int, dict[str, int]] = {}
        for key, n in exact:
            by_kind = counted.setdefault(key.netns, {})
            # A REJECT's RST or ICMP error (bpf/origin.bpf.c) is not TCP's: apart from TcpOutRsts' rst_sent
            kind = "firewall_reject" if key.hook in NOT_BY_TCP else kind_name(key.kind)
            by_kind[kind] = by_kind.get(kind, 0) + n
        return counted
