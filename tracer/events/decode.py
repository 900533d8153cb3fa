"""Decode: ring-buffer records → Events (plain Python values, no BPF types past this point)."""
from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from ..kernel.ringbuf import HEADER_SIZE, record_stride
from ..kernel import layout

TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV",
}
TCP_FLAG_NAMES = ((0x01, "FIN"), (0x02, "SYN"), (0x04, "RST"), (0x08, "PSH"), (0x10, "ACK"), (0x20, "URG"))
_FLAG_NAMES = [[name for bit, name in TCP_FLAG_NAMES if flags & bit] for flags in range(0x40)]


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@dataclass(slots=True)
class Event:
    # Decoded from the record (the decoder passes these positionally, in this order):
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
    hook: str | None = None        # kernel function a kprobe/fentry program hooked (None for tracepoints)
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
        """Shared between events with the same flags: nothing downstream changes it."""
        return _FLAG_NAMES[self.tcp_flags & 0x3f]


# A record as the ring reader hands it over: the ring's 8-byte header (length, page offset), the
# record, padding to the next record (tracer/kernel/ringbuf.py).
RING_RECORD = struct.Struct("<I4x" + layout.EVENT_FORMAT[1:] + "x" * (record_stride(layout.EVENT_SIZE)
                                                                      - HEADER_SIZE - layout.EVENT_SIZE))
_F = {name: (at + 1 if isinstance(at, int) else slice(at.start + 1, at.stop + 1))
      for name, at in layout.EVENT_FIELDS.items()}      # field → position in a RING_RECORD tuple
CACHE_MAX = 65536      # distinct addresses / task names remembered (cleared when full: bounded memory)
# Positions of the fields the decoder reads, as module constants (cheaper than a lookup per field).
(_KTIME, _SKADDR, _SOCK_COOKIE, _SOCK_INO, _LINGER_JIFFIES, _CALLERS, _KIND, _KERNEL_REASON, _TGID, _UID, _NETNS,
 _STATE, _UNREAD, _OWNER_TGID, _FAMILY, _LPORT, _RPORT, _FLAGS, _TCP_FLAGS, _VERDICT, _HOOK, _LADDR, _RADDR, _COMM,
 _OWNER_COMM, _APP_ERRORS) = (_F[name] for name in (
    "ktime_ns", "skaddr", "sock_cookie", "sock_ino", "linger_jiffies", "callers", "kind", "kernel_reason", "tgid",
    "uid", "netns", "state", "unread_bytes", "owner_tgid", "family", "lport", "rport", "flags", "tcp_flags",
    "verdict", "hook", "laddr", "raddr", "comm", "owner_comm", "app_errors"))
KIND_NAMES, VERDICT_NAMES, HOOK_NAMES, NO_REASON = layout.KIND_NAMES, layout.VERDICT_NAMES, layout.HOOK_NAMES, layout.NO_REASON
HOOK_ICMP_SEND = layout.ENUMS["rsttrace_hook"]["RSTTRACE_HOOK_ICMP_SEND"]
# ICMP destination-unreachable codes (RFC 792, 1812), as iptables' --reject-with and nft's `reject with
# icmp` name them: what a REJECT rule answered a TCP segment with (bpf/origin.bpf.c, icmp:icmp_send).
ICMP_UNREACH_CODES = {0: "NET_UNREACHABLE", 1: "HOST_UNREACHABLE", 2: "PROT_UNREACHABLE", 3: "PORT_UNREACHABLE",
                      9: "NET_PROHIBITED", 10: "HOST_PROHIBITED", 13: "ADMIN_PROHIBITED"}
OUTCOME_NAMES = layout.OUTCOME_NAMES
F_SOFTIRQ, F_LINGER, F_FULLSOCK, F_QUEUES, F_INFERRED, F_ORPHAN = (
    layout.F_SOFTIRQ, layout.F_LINGER, layout.F_FULLSOCK, layout.F_QUEUES, layout.F_INFERRED, layout.F_ORPHAN)
AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
CONNECTION = next(value for value, name in KIND_NAMES.items() if name == "connection")
STORY_BYTES = struct.Struct(f"<Q{layout.DEFINES['RSTTRACE_CALLERS']}Q")


class Decoder:
    """Turns ring-buffer records into Events. Kernel enum numbering comes from the running kernel.

    A storm repeats a few addresses and task names thousands of times: their text forms are cached."""

    def __init__(self, reason_names: dict[str, dict[int, str]], mono_to_wall: int | None = None):
        """mono_to_wall: a fixed clock offset, never re-read (replays of recorded rings); else the
        system's, followed."""
        self.reason_names = reason_names      # event kind -> kernel enum value -> kernel name
        self._addr: dict[bytes, str] = {}
        self._comm: dict[bytes, str] = {}
        if mono_to_wall is None:
            self._resync_clock()
        else:
            self.mono_to_wall, self._synced_at = mono_to_wall, float("inf")

    def _resync_clock(self) -> None:
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC; wall = mono + offset (re-read to follow NTP steps).
        self.mono_to_wall = time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        self._synced_at = time.monotonic()

    def decode(self, data: bytes) -> Event:
        """One record without its ring header (tests, tools)."""
        header = struct.pack("<II", layout.EVENT_SIZE, 0)
        return self.decode_batch(header + data + b"\0" * (RING_RECORD.size - HEADER_SIZE - len(data)))[0]

    def refresh(self) -> None:
        """Once per batch: follow the wall clock, keep the caches bounded."""
        if time.monotonic() - self._synced_at > 10:
            self._resync_clock()
        if len(self._addr) > CACHE_MAX or len(self._comm) > CACHE_MAX:
            self._addr.clear()
            self._comm.clear()

    def decode_batch(self, chunk: bytes) -> list[Event]:
        """Every record of a ring-reader chunk (discarded ones skipped)."""
        self.refresh()
        size = layout.EVENT_SIZE
        return [self.event(t) for t in RING_RECORD.iter_unpack(chunk) if t[0] == size]

    def text_addr(self, raw: bytes, family: int) -> str:
        text = self._addr.get(raw)
        if text is None:
            text = socket.inet_ntop(family, raw)
            self._addr[raw] = text
        return text

    def _text_comm(self, raw: bytes) -> str:
        text = self._comm.get(raw)
        if text is None:
            text = raw.split(b"\0", 1)[0].decode(errors="replace")
            self._comm[raw] = text
        return text

    def event(self, t: tuple) -> Event:
        kind_value = t[_KIND]
        kind = KIND_NAMES.get(kind_value) or f"kind_{kind_value}"
        if t[_FAMILY] == AF_INET6:
            family = "ipv6"
            laddr = self.text_addr(t[_LADDR], AF_INET6)
            raddr = self.text_addr(t[_RADDR], AF_INET6)
        else:
            family = "ipv4"
            laddr = self.text_addr(t[_LADDR][:4], AF_INET)
            raddr = self.text_addr(t[_RADDR][:4], AF_INET)
        kernel_reason = t[_KERNEL_REASON]
        if kernel_reason == NO_REASON:
            kreason = None
        else:
            kreason = self.reason_names.get(kind, {}).get(kernel_reason) or f"REASON_{kernel_reason}"
        flags = t[_FLAGS]
        state = t[_STATE]
        ktime = t[_KTIME]
        # Positional, in Event's field order: a keyword call costs more, for every event.
        ev = Event(
            kind, ktime, ktime + self.mono_to_wall, family,
            laddr, t[_LPORT], raddr, t[_RPORT],
            TCP_STATES.get(state) if state else None,
            t[_NETNS], kreason, bool(flags & F_SOFTIRQ),
            t[_TGID], self._text_comm(t[_COMM]), t[_UID],
            t[_SKADDR], t[_SOCK_COOKIE], t[_SOCK_INO],
            t[_UNREAD] if flags & F_FULLSOCK else None,
            bool(flags & F_LINGER), t[_LINGER_JIFFIES], bool(flags & F_ORPHAN),
            t[_TCP_FLAGS], [a for a in t[_CALLERS] if a],
            [],                                                         # caller_names
            queues_of(t) if flags & F_QUEUES else None,
            t[_OWNER_TGID], self._text_comm(t[_OWNER_COMM]),
            bool(flags & F_INFERRED),
            VERDICT_NAMES.get(t[_VERDICT], "none"),
            HOOK_NAMES.get(t[_HOOK]),
        )
        if t[_HOOK] == HOOK_ICMP_SEND:        # an ICMP error answering the segment: its code, by name
            ev.kernel_reason = ICMP_UNREACH_CODES.get(kernel_reason, f"CODE_{kernel_reason}")
        if t[_APP_ERRORS]:
            ev.extra["app_errors_kept"] = t[_APP_ERRORS]    # failed syscalls before it (enrich/app.py)
        if kind_value == CONNECTION:
            # A story (bpf/story.bpf.c) rides where other events have linger_jiffies and callers:
            # tracer/enrich/stories.py reads it, and the outcome from `verdict`.
            ev.callers = []
            ev.linger = False
            ev.extra["story_raw"] = STORY_BYTES.pack(t[_LINGER_JIFFIES], *t[_CALLERS])
            ev.verdict = OUTCOME_NAMES.get(t[_VERDICT], "unknown")
        return ev


def queues_of(t: tuple, F=_F) -> dict[str, Any]:
    """The listener's queues and the netns sysctls at the moment of the event."""
    backlog = t[F["listen_backlog"]] if t[F["listen_backlog"]] >= 0 else None
    somaxconn, accept_qmax = t[F["somaxconn"]], t[F["accept_qmax"]]
    if backlog is not None:
        binding = "somaxconn" if backlog > somaxconn else "listen_backlog"
    else:   # only min(backlog, somaxconn) is known: equal to somaxconn means somaxconn capped it (or tied)
        binding = "somaxconn" if accept_qmax == somaxconn else "listen_backlog"
    return {
        "accept_qlen": t[F["accept_qlen"]],
        "accept_qmax": accept_qmax,
        "syn_qlen": t[F["syn_qlen"]],
        # The request (SYN) queue is full at the accept-queue limit; tcp_max_syn_backlog adds a reserve
        # rule when syncookies are off.
        "syn_qmax": accept_qmax,
        "backlog": backlog,
        "binding_limit": binding,
        "sysctls": {
            "somaxconn": somaxconn,
            "tcp_max_syn_backlog": t[F["max_syn_backlog"]],
            "tcp_syncookies": t[F["syncookies"]],
            "tcp_abort_on_overflow": t[F["abort_on_overflow"]],
        },
    }
