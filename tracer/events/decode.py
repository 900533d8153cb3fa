"""Decode: raw ring-buffer bytes → Event (plain Python values, no BPF types past this point)."""
from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from . import record

TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV",
}
TCP_FLAG_NAMES = ((0x01, "FIN"), (0x02, "SYN"), (0x04, "RST"), (0x08, "PSH"), (0x10, "ACK"), (0x20, "URG"))


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@dataclass
class Event:
    kind: str                      # rst_sent, rst_received, syn_dropped, ack_dropped, syn_cookie
    ktime_ns: int
    time_ns: int                   # wall clock (ns since the epoch), derived from ktime_ns
    family: str                    # "ipv4" / "ipv6"
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    state: str | None
    netns: int
    kernel_reason: str | None      # the kernel's own name (e.g. TCP_ABORT_ON_CLOSE), None if not given
    softirq: bool
    task_pid: int                  # the task on the CPU (the culprit only when not softirq)
    task_comm: str
    task_uid: int
    skaddr: int
    sock_cookie: int
    sock_ino: int
    unread_bytes: int | None
    linger: bool
    linger_jiffies: int
    orphan: bool                   # full socket without a struct socket: never accepted, or already closed
    tcp_flags: int
    callers: list[int]
    caller_names: list[str] = field(default_factory=list)   # symbolized `callers` (filled by the session)
    queues: dict[str, Any] | None = None
    owner_pid: int = 0             # listener events: who called listen(), as the kernel saw it (0: unknown)
    owner_comm: str = ""
    inferred: bool = False
    verdict: str = "none"          # listener's decision on a SYN (rsttrace_verdict), "none" otherwise
    # Filled by enrichment:
    reason: str = "unknown"
    process: dict[str, Any] | None = None
    netns_name: str | None = None
    explanation: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def local(self) -> str:
        return endpoint(self.local_addr, self.local_port)

    @property
    def remote(self) -> str:
        return endpoint(self.remote_addr, self.remote_port)

    @property
    def tcp_flag_names(self) -> list[str]:
        return [name for bit, name in TCP_FLAG_NAMES if self.tcp_flags & bit]


class Decoder:
    """Turns RawEvent bytes into Events. Kernel enum numbering comes from the running kernel."""

    def __init__(self, reason_names: dict[str, dict[int, str]]):
        self.reason_names = reason_names      # event kind -> kernel enum value -> kernel name
        self._resync_clock()

    def _resync_clock(self) -> None:
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC; wall = mono + offset (re-read to follow NTP steps).
        self._mono_to_wall = time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        self._synced_at = time.monotonic()

    def decode(self, data: bytes) -> Event:
        raw = record.RawEvent.from_buffer_copy(data)
        return self.from_raw(raw)

    def from_raw(self, raw: record.RawEvent) -> Event:
        if time.monotonic() - self._synced_at > 10:
            self._resync_clock()
        if raw.family == socket.AF_INET6:
            family = "ipv6"
            laddr = str(ipaddress.IPv6Address(bytes(raw.laddr)))
            raddr = str(ipaddress.IPv6Address(bytes(raw.raddr)))
        else:
            family = "ipv4"
            laddr = str(ipaddress.IPv4Address(bytes(raw.laddr[:4])))
            raddr = str(ipaddress.IPv4Address(bytes(raw.raddr[:4])))
        kind = record.KIND_NAMES.get(raw.kind, f"kind_{raw.kind}")
        if raw.kernel_reason == record.NO_REASON:
            kreason = None
        else:
            kreason = self.reason_names.get(kind, {}).get(raw.kernel_reason, f"REASON_{raw.kernel_reason}")
        fullsock = bool(raw.flags & record.F_FULLSOCK)
        return Event(
            kind=kind,
            ktime_ns=raw.ktime_ns,
            time_ns=raw.ktime_ns + self._mono_to_wall,
            family=family,
            local_addr=laddr,
            local_port=raw.lport,
            remote_addr=raddr,
            remote_port=raw.rport,
            state=TCP_STATES.get(raw.state) if raw.state else None,
            netns=raw.netns,
            kernel_reason=kreason,
            softirq=bool(raw.flags & record.F_SOFTIRQ),
            task_pid=raw.tgid,
            task_comm=raw.comm.decode(errors="replace"),
            task_uid=raw.uid,
            owner_pid=raw.owner_tgid,
            owner_comm=raw.owner_comm.decode(errors="replace"),
            skaddr=raw.skaddr,
            sock_cookie=raw.sock_cookie,
            sock_ino=raw.sock_ino,
            unread_bytes=raw.unread_bytes if fullsock else None,
            linger=bool(raw.flags & record.F_LINGER),
            linger_jiffies=raw.linger_jiffies,
            orphan=bool(raw.flags & record.F_ORPHAN),
            tcp_flags=raw.tcp_flags,
            callers=[a for a in raw.callers if a],
            inferred=bool(raw.flags & record.F_INFERRED),
            queues=queues_of(raw) if raw.flags & record.F_QUEUES else None,
            verdict=record.VERDICT_NAMES.get(raw.verdict, "none"),
        )


def queues_of(raw: record.RawEvent) -> dict[str, Any]:
    """The listener's queues and the netns sysctls at the moment of the event."""
    backlog = raw.listen_backlog if raw.listen_backlog >= 0 else None
    if backlog is not None:
        binding = "somaxconn" if backlog > raw.somaxconn else "listen_backlog"
    else:   # only min(backlog, somaxconn) is known: equal to somaxconn means somaxconn capped it (or tied)
        binding = "somaxconn" if raw.accept_qmax == raw.somaxconn else "listen_backlog"
    return {
        "accept_qlen": raw.accept_qlen,
        "accept_qmax": raw.accept_qmax,
        "syn_qlen": raw.syn_qlen,
        # The request (SYN) queue is full at the accept-queue limit; tcp_max_syn_backlog adds a reserve
        # rule when syncookies are off.
        "syn_qmax": raw.accept_qmax,
        "backlog": backlog,
        "binding_limit": binding,
        "sysctls": {
            "somaxconn": raw.somaxconn,
            "tcp_max_syn_backlog": raw.max_syn_backlog,
            "tcp_syncookies": raw.syncookies,
            "tcp_abort_on_overflow": raw.abort_on_overflow,
        },
    }
