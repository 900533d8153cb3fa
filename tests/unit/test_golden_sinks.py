"""Every sink writes what it wrote before, for one recorded run: JSON lines, ECS, plain lines (and the
exit summary printed with them), syslog datagrams, the Prometheus exposition and the terminal UI,
compared byte for byte with tests/data/golden/sinks/.

The run: ring records built as the BPF programs build them (layout.RawEvent, as in test_fastpath.py)
— every event kind, every reason the catalog has, IPv4 and IPv6, process and softirq context,
kernel reasons and reasons inferred from callers (older kernels, fentry hooks), listener queues
with each binding limit and verdict — go through the session's real path (decode, classify,
attribute, explain: run() below), beside the records a run writes around them (coverage, lost,
suppressed, storm and aggregate, listeners, reconciliation, summary) built with
tracer/sinks/records.py. --json is checked on the normal path and on the fast path (fastpath.py):
both must write the golden file.

Deterministic and host-independent:
  - time: the monotonic → wall offset of the decoder is fixed (and never re-read), records that are
    not events carry fixed times, and the UI's clock is a fixed one;
  - the host as attribution sees it is fixed (HOST below): the processes in /proc (pid, name, uid,
    cgroup, container), the sockets they hold, the listeners of each netns and the `ip netns`
    names; so pids, uids, netns inodes, cgroup paths and container ids are fixed values, not
    placeholders; kernel symbols come from a fixed table (FakeProgram);
  - durations (startup, storm, summary) are given, not measured.
What the sinks read from the machine itself is replaced in the captured text by a placeholder,
only where it stands (normalise()): the host name (ECS host.hostname/host.name, syslog HOSTNAME)
→ <hostname>, the kernel release (ECS host.os.kernel) → <kernel-release>, rsttrace's own pid
(syslog PROCID) → <pid>, and the time of the last metrics update → <timestamp>. The UI is given
its host name (golden-host) and draws on a recording rich Console of UI_SIZE, without colour.

RSTTRACE_UPDATE_GOLDEN=1 rewrites the files from the current code (tests/unit/golden.py); review
their diff like any other change.
"""
from __future__ import annotations

import io
import json
import os
import platform
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable

import pytest
from rich.console import Console

from golden import GOLDEN, UPDATE, assert_golden, stale
from replay import replay
from tracer.enrich.cgroups import container_of_paths, parse_proc_cgroup
from tracer.enrich.counters import INTERESTING
from tracer.enrich.listeners import NetnsState
from tracer.enrich.reasons import CATALOG
from tracer.enrich.reconcile import PercpuTotals, reconcile
from tracer.enrich.stories import STORY
from tracer.kernel import layout
from tracer.events.decode import RING_RECORD, TCP_STATES
from tracer.sinks import records, ui
from tracer.sinks.jsonl import JsonSink
from tracer.sinks.metrics import MetricsSink
from tracer.sinks.output import LineOutput
from tracer.sinks.plain import PlainSink
from tracer.sinks.syslog import SyslogSink, SyslogTarget


# -- the pipeline: the one place that knows its entry points ---------------------------------------

def run(sinks: list, chunks: list[bytes], exact: list, fast: bool = False) -> "Run":
    """Ring chunks through the event path (tracer/pipeline.py) into `sinks` (decode, classify,
    attribute, explain, emit; with `fast`, the per-shape cache where it applies), on the fixed HOST;
    and what the session makes of the kernel's exact counts `exact` ((CountKey, n) pairs) at exit."""
    from tracer.enrich.attribution import Attributor
    from tracer.enrich.exact import ExactCounts
    from tracer.session import Options
    from tracer.sinks.summary import print_summary

    attributor = Attributor(context_known=True)
    attributor.sockets, attributor.netns = HOST.sockets(), HOST.netns()
    attributor.listeners, attributor.cgroups = HOST.listeners(), HOST.cgroups()
    ksym = FakeProgram().ksym
    p = replay(chunks, Options(ports=[9, 443, 8080, 8100], fast_path=fast), sinks, REASONS, ksym, attributor,
               MONO_TO_WALL)
    counts = ExactCounts(REASONS, p.stacks, attributor.netns.name)
    return Run(dict(p.counts), {inode: dict(c) for inode, c in p.netns_counts.items()}, counts.by_kind(exact),
               counts.rows(exact), print_summary, p)


@dataclass
class Run:
    counts: dict[tuple[str, str], int]          # event records written, by (kind, reason)
    netns_counts: dict[int, dict[str, int]]     # events seen per netns and kind
    kernel_counts: dict[str, dict[str, int]]    # the exact counts by kind and reason
    count_rows: list[dict]                      # the exact counts as the metrics sink takes them
    print_summary: Callable                     # the exit summary on stderr, beside plain lines
    pipeline: object                            # for what the session asks of it at exit (stories)


# -- the kernel as the records describe it --------------------------------------------------------

MONO_TO_WALL = 1_764_000_000_000_000_000      # 2025-11-24T16:00:00Z at monotonic 0
T0 = 1_000_000_000_000                        # monotonic ns of the first record
WALL0 = MONO_TO_WALL + T0                     # the first record's wall time
NO_REASON = layout.NO_REASON

# The running kernel's enum values → names, as RstProgram.reason_names reads them from its BTF.
REASONS = {
    "rst_sent": {0: "NOT_SPECIFIED", 1: "NO_SOCKET", 2: "TCP_INVALID_ACK_SEQUENCE", 5: "TCP_ABORT_ON_DATA",
                 6: "TCP_TIMEWAIT_SOCKET", 7: "TCP_STATE", 8: "TCP_KEEPALIVE_TIMEOUT", 9: "TCP_ABORT_ON_MEMORY",
                 10: "TCP_ABORT_ON_LINGER", 11: "TCP_ABORT_ON_CLOSE", 12: "TCP_DISCONNECT_WITH_DATA",
                 13: "INVALID_SYN", 14: "MPTCP_RST_EMPTCP", 15: "TCP_FLAGS"},
    "ack_dropped": {2: "NO_SOCKET", 77: "TCP_LISTEN_OVERFLOW"},
    "rst_received": {2: "NO_SOCKET", 77: "TCP_LISTEN_OVERFLOW"},
}

# Kernel text addresses of the callers the records carry, and the names kallsyms gives them.
KSYMS = {
    0xffffffff81a00010: "tcp_send_active_reset", 0xffffffff81a00020: "__tcp_close",
    0xffffffff81a00030: "tcp_v4_send_reset", 0xffffffff81a00040: "tcp_v6_send_reset",
    0xffffffff81a00050: "tcp_reset", 0xffffffff81a00060: "tcp_disconnect",
    0xffffffff81a00070: "tcp_keepalive_timer", 0xffffffff81a00080: "inet_csk_listen_stop",
    0xffffffff81a00090: "tcp_rcv_state_process", 0xffffffff81a000a0: "bpf_prog_6deef7357e7b4530_rst",
    0xffffffff81a000b0: "tcp_v4_rcv", 0xffffffff81a000c0: "tcp_close", 0xffffffff81a000d0: "tcp_v4_do_rcv",
    0xffffffff81a000e0: "tcp_check_req", 0xffffffff81a000f0: "tcp_write_timeout",
    0xffffffff81a00100: "ip_output", 0xffffffff81a00110: "nf_send_reset", 0xffffffff81a00120: "__icmp_send",
    0xffffffff81a00130: "nft_reject_inet_eval",
}
K = {name: addr for addr, name in KSYMS.items()}


class FakeProgram:
    reason_names = REASONS

    def ksym(self, addr: int) -> str:
        return KSYMS.get(addr, f"0x{addr:x}")


# -- the host as attribution sees it --------------------------------------------------------------

HOST_NS, BLUE_NS, ANON_NS = 4026531840, 4026532001, 4026532999      # the last: no `ip netns` name
DOCKER_ID = "3f2a9c0d5e1b47a8b6c2d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4"
POD_UID = "8e1d0c6a-2b3f-4c5d-9e8f-7a6b5c4d3e2f"
POD_CONTAINER = "b7c6d5e4f3a291807f6e5d4c3b2a1908f7e6d5c4b3a29180f7e6d5c4b3a2918f"


@dataclass
class Host:
    procs: dict[int, tuple[str, int, str]]       # pid → name, uid, text of /proc/PID/cgroup
    fds: dict[int, list[int]]                    # socket inode → pids holding it
    port_listeners: dict[tuple[int, int], list[int]]   # (netns, port) → listening socket inodes
    netns_names: dict[int, str] = field(default_factory=dict)

    def sockets(self) -> "HostSockets":
        return HostSockets(self)

    def netns(self) -> "HostNetns":
        return HostNetns(self)

    def listeners(self) -> "HostListeners":
        return HostListeners(self)

    def cgroups(self) -> "HostCgroups":
        return HostCgroups(self)


class HostSockets:
    """attribution.SocketOwners on HOST: /proc/*/fd links and /proc/PID/status."""

    def __init__(self, host: Host):
        self.host = host

    def refresh_for(self, inodes_and_times) -> None:
        pass

    def known(self, inode: int) -> bool:
        return inode in self.host.fds

    def owners(self, inode: int) -> list[int]:
        return sorted(self.host.fds.get(inode, []))

    def info(self, pid: int) -> dict | None:
        if pid not in self.host.procs:
            return None              # exited
        name, uid, _ = self.host.procs[pid]
        return {"pid": pid, "comm": name, "uid": uid}


class HostNetns:
    """attribution.NetnsNames on HOST: the /run/netns names."""
    host_netns = HOST_NS

    def __init__(self, host: Host):
        self.host = host

    def name(self, inode: int) -> str | None:
        return self.host.netns_names.get(inode)


class HostListeners:
    """attribution.PortListeners on HOST: the listeners an inet_diag dump of each netns finds."""

    def __init__(self, host: Host):
        self.host = host

    def inodes(self, netns: int, addr: str, port: int, pid_hint: int = 0) -> list[int]:
        return list(self.host.port_listeners.get((netns, port), []))


class HostCgroups:
    """cgroups.Cgroups on HOST: its own parsing of /proc/PID/cgroup, with a fixed cgroup id."""
    ttl = 5.0

    def __init__(self, host: Host):
        self.host = host

    def of(self, pid: int) -> tuple[dict | None, dict | None]:
        if pid not in self.host.procs:
            return None, None
        v2, paths = parse_proc_cgroup(self.host.procs[pid][2])
        cgroup = {"id": 10_000 + pid, "path": v2} if v2 is not None else None
        return cgroup, container_of_paths(v2, paths)


HOST = Host(
    procs={
        4242: ("nginx", 33, "0::/system.slice/nginx.service\n"),
        5151: ("java", 1000, f"0::/system.slice/docker-{DOCKER_ID}.scope\n"),
        6161: ("burst-server", 0, f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                                  f"{POD_UID.replace('-', '_')}.slice/cri-containerd-{POD_CONTAINER}.scope\n"),
        7171: ("curl", 1000, "0::/user.slice/user-1000.slice/session-3.scope\n"),
        8181: ("envoy", 101, "0::/system.slice/envoy.service\n"),
        9191: ("new-name", 0, "0::/system.slice/app.service\n"),     # exec'd since it called listen()
    },
    fds={7001: [5151], 7002: [7171], 9001: [8181], 9002: [4242]},
    port_listeners={(BLUE_NS, 8080): [9001], (HOST_NS, 443): [9002]},
    netns_names={HOST_NS: "host", BLUE_NS: "blue"},
)


# -- the recorded events --------------------------------------------------------------------------

FULL = layout.F_HAVE_SOCKET | layout.F_FULLSOCK
SOFT = layout.F_SOFTIRQ
LISTENER = SOFT | FULL | layout.F_QUEUES
KIND = {name: value for value, name in layout.KIND_NAMES.items()}
VERDICT = {name: value for value, name in layout.VERDICT_NAMES.items()}
HOOK = {name: value for value, name in layout.HOOK_NAMES.items()}
STATE = {name: value for value, name in TCP_STATES.items()}
SYN, ACK, PSH = 0x02, 0x10, 0x08
OUTCOME = {name: value for value, name in layout.OUTCOME_NAMES.items()}
STORY_F = {name: layout.DEFINES[f"RSTTRACE_STORY_F_{name}"] for name in ("CONNECT_SEEN", "SERVER_SEEN", "BY_CLIENT")}
STORIES_TO_FIX: list[tuple] = []


def raw(kind: str, local: str, lport: int, remote: str, rport: int, *, netns: int = HOST_NS, state: str | None = None,
        kernel_reason: int = NO_REASON, pid: int = 0, comm: str = "swapper/3", uid: int = 0, callers=(),
        owner: tuple[int, str] = (0, ""), queues: dict | None = None, verdict: str = "none",
        hook: str | None = None, **fields) -> layout.RawEvent:
    """One record as the BPF programs fill it (unset fields stay 0, as in the ring)."""
    r = layout.RawEvent()
    r.kind, r.netns, r.kernel_reason = KIND[kind], netns, kernel_reason
    r.tgid, r.uid, r.comm = pid, uid, comm.encode()[:15]
    r.owner_tgid, r.owner_comm = owner[0], owner[1].encode()[:15]
    v6 = ":" in local
    r.family = socket.AF_INET6 if v6 else socket.AF_INET
    family = socket.AF_INET6 if v6 else socket.AF_INET
    r.laddr[:16 if v6 else 4] = list(socket.inet_pton(family, local))
    r.raddr[:16 if v6 else 4] = list(socket.inet_pton(family, remote))
    r.lport, r.rport = lport, rport
    r.state = STATE[state] if state else 0
    r.callers[:len(callers)] = [K[c] for c in callers]
    r.verdict = VERDICT[verdict]
    r.hook = HOOK[hook] if hook else 0
    r.listen_backlog = -1
    if queues:
        for name, value in queues.items():
            setattr(r, name, value)
    for name, value in fields.items():
        setattr(r, name, value)
    return r


def story(client: str, cport: int, server: str, sport: int, outcome: str, *, by_client: bool, old: str, new: str,
          start_ago_ns: int, err: int = 0, server_tgid: int = 0, connect_seen: bool = True, netns: int = HOST_NS,
          flags: int = 0, pid: int = 0, comm: str = "swapper/3", owner: tuple[int, str] = (0, ""),
          **counts: int) -> layout.RawEvent:
    """A `connection` event as story.bpf.c ends it: the ending socket's side, its story in the bytes of
    linger_jiffies and callers (start time relative to the event's, fixed once the ktimes are)."""
    local, lport, remote, rport = (client, cport, server, sport) if by_client else (server, sport, client, cport)
    r = raw("connection", local, lport, remote, rport, netns=netns, state=new, pid=pid, comm=comm, owner=owner,
            flags=flags | layout.F_HAVE_SOCKET)
    r.verdict = OUTCOME[outcome]
    story_flags = ((STORY_F["CONNECT_SEEN"] if connect_seen and by_client else 0) | STORY_F["SERVER_SEEN"]
                   | (STORY_F["BY_CLIENT"] if by_client else 0))
    fields = dict(syn_drops=0, syn_cookies=0, ack_drops=0, syn_retrans=0, synack_retrans=0, data_retrans=0, rsts=0)
    fields.update(counts)
    server_netns, client_netns = (HOST_NS, netns) if by_client else (netns, 0)
    STORIES_TO_FIX.append((r, start_ago_ns, fields, STATE[old], story_flags, server_netns, server_tgid, err,
                           client_netns))
    return r


def fix_stories() -> None:
    """The stories' bytes, once the events have their ktimes."""
    for r, ago, fields, old, story_flags, server_netns, server_tgid, err, client_netns in STORIES_TO_FIX:
        raw_story = STORY.pack(r.ktime_ns - ago, *fields.values(), old, story_flags, server_netns, server_tgid, err,
                               client_netns)
        words = struct.unpack("<5Q", raw_story)
        r.linger_jiffies = words[0]
        r.callers[:4] = list(words[1:])
    STORIES_TO_FIX.clear()


def queues(qlen: int, qmax: int, synq: int = 0, somaxconn: int = 4096, backlog: int = -1, max_syn: int = 2048,
           cookies: int = 1, abort: int = 0) -> dict:
    return {"accept_qlen": qlen, "accept_qmax": qmax, "syn_qlen": synq, "somaxconn": somaxconn,
            "listen_backlog": backlog, "max_syn_backlog": max_syn, "syncookies": cookies, "abort_on_overflow": abort}


def events() -> list[layout.RawEvent]:
    """The incidents rsttrace was built for, and every other reason and shape, in ring order."""
    out = [
        # -- RSTs sent, with the kernel's reason (6.10+) --
        # a proxy closing its upstream with unread data (the nginx incident), IPv4 and IPv6
        raw("rst_sent", "127.0.0.1", 41000, "127.0.0.1", 8080, state="CLOSE", kernel_reason=11, pid=4242, comm="nginx",
            uid=33, flags=FULL | layout.F_UNREAD, unread_bytes=4096, skaddr=0xffff8880a1000000, sock_ino=6001,
            callers=["tcp_send_active_reset", "__tcp_close"]),
        raw("rst_sent", "2001:db8::1", 41001, "2001:db8::80", 8080, state="CLOSE", kernel_reason=11, pid=4242,
            comm="nginx", uid=33, flags=FULL | layout.F_UNREAD, unread_bytes=17, skaddr=0xffff8880a1000100,
            sock_ino=6002, callers=["tcp_send_active_reset", "__tcp_close"]),
        # connect() to a closed port: RST with no socket, in softirq; and the client's side of it
        raw("rst_sent", "127.0.0.1", 9, "127.0.0.1", 52000, kernel_reason=1, tcp_flags=SYN, flags=SOFT,
            callers=["tcp_v4_send_reset", "tcp_v4_rcv"]),
        raw("rst_received", "127.0.0.1", 52000, "127.0.0.1", 9, state="SYN_SENT", flags=SOFT | FULL,
            skaddr=0xffff8880a1000200, sock_ino=7002, sock_cookie=5001, owner=(7171, "curl"), callers=["tcp_reset"]),
        # a segment for a connection this host forgot
        raw("rst_sent", "10.0.0.5", 443, "10.0.0.9", 53000, kernel_reason=1, tcp_flags=ACK | PSH, flags=SOFT,
            callers=["tcp_v4_send_reset"]),
        # SO_LINGER {1, 0}, by a process whose name needs escaping in JSON, syslog SD and %-formats
        raw("rst_sent", "127.0.0.1", 54000, "127.0.0.1", 8080, state="CLOSE", kernel_reason=7, pid=7171,
            comm='we"ird]%s\\é', uid=1000, flags=FULL | layout.F_LINGER, linger_jiffies=0,
            skaddr=0xffff8880a1000300, sock_ino=6003, callers=["tcp_disconnect"]),
        # ss -K: aborted, not lingering, not orphaned
        raw("rst_sent", "127.0.0.1", 8080, "127.0.0.1", 54100, netns=BLUE_NS, state="ESTABLISHED", kernel_reason=7,
            pid=8181, comm="envoy", uid=101, flags=FULL, skaddr=0xffff8880a1000400, sock_ino=6004,
            callers=["tcp_disconnect"]),
        # a listener closed with a connection in its accept queue (an orphan child)
        raw("rst_sent", "127.0.0.1", 8100, "127.0.0.1", 54200, state="ESTABLISHED", kernel_reason=7, pid=6161,
            comm="burst-server", flags=FULL | layout.F_ORPHAN, skaddr=0xffff8880a1000500,
            callers=["tcp_disconnect", "inet_csk_listen_stop"]),
        # TIME_WAIT answering: a minisocket, no unread bytes
        raw("rst_sent", "127.0.0.1", 8080, "127.0.0.1", 54300, netns=BLUE_NS, state="TIME_WAIT", kernel_reason=6,
            tcp_flags=ACK, flags=SOFT | layout.F_HAVE_SOCKET, skaddr=0xffff8880a1000600,
            callers=["tcp_v4_send_reset"]),
        # data after close, the socket's owner found by its fd; IPv6
        raw("rst_sent", "2001:db8::1", 8443, "2001:db8::7", 54400, state="FIN_WAIT1", kernel_reason=5,
            flags=SOFT | FULL, skaddr=0xffff8880a1000700, sock_ino=7001, callers=["tcp_v6_send_reset"]),
        # keepalive timeout on a socket already closed: named after the listener of its local port
        raw("rst_sent", "10.0.0.5", 443, "10.0.0.9", 54500, state="ESTABLISHED", kernel_reason=8, flags=SOFT | FULL,
            skaddr=0xffff8880a1000800, sock_ino=123456789, callers=["tcp_send_active_reset", "tcp_keepalive_timer"]),
        raw("rst_sent", "127.0.0.1", 8080, "127.0.0.1", 54600, netns=ANON_NS, state="CLOSE", kernel_reason=9,
            pid=4242, comm="nginx", uid=33, flags=FULL | layout.F_ORPHAN, skaddr=0xffff8880a1000900),
        raw("rst_sent", "127.0.0.1", 8080, "127.0.0.1", 54700, state="FIN_WAIT2", kernel_reason=10, flags=SOFT | FULL,
            skaddr=0xffff8880a1000a00, sock_ino=123456790),
        raw("rst_sent", "127.0.0.1", 8080, "127.0.0.1", 54800, state="LAST_ACK", kernel_reason=12, pid=4242,
            comm="nginx", uid=33, flags=FULL, skaddr=0xffff8880a1000b00, sock_ino=6005),
        raw("rst_sent", "127.0.0.1", 8080, "127.0.0.1", 54900, state="ESTABLISHED", kernel_reason=2, tcp_flags=ACK,
            flags=SOFT | FULL, skaddr=0xffff8880a1000c00, sock_ino=123456791),
        raw("rst_sent", "127.0.0.1", 8080, "127.0.0.1", 55000, state="ESTABLISHED", kernel_reason=14,
            flags=SOFT | FULL, skaddr=0xffff8880a1000d00, sock_ino=123456792),
        raw("rst_sent", "127.0.0.1", 8080, "127.0.0.1", 55100, state="ESTABLISHED", kernel_reason=0, pid=4242,
            comm="nginx", uid=33, flags=FULL, skaddr=0xffff8880a1000e00, sock_ino=6006),
        # a kernel reason this build has no name for
        raw("rst_sent", "127.0.0.1", 8080, "127.0.0.1", 55200, state="ESTABLISHED", kernel_reason=99, pid=4242,
            comm="nginx", uid=33, flags=FULL, skaddr=0xffff8880a1000f00, sock_ino=6007),
        # tcp_abort_on_overflow=1: the listener answers the final ACK with RST (kernel reason INVALID_SYN)
        raw("rst_sent", "127.0.0.1", 8100, "127.0.0.1", 55300, state="LISTEN", kernel_reason=13, tcp_flags=ACK,
            flags=LISTENER, skaddr=0xffff8880a1001000, owner=(6161, "burst-server"),
            queues=queues(6, 5, somaxconn=4096, backlog=5, abort=1), callers=["tcp_v4_send_reset", "tcp_check_req"]),
        raw("rst_sent", "127.0.0.1", 8100, "127.0.0.1", 55400, state="NEW_SYN_RECV", kernel_reason=13, tcp_flags=ACK,
            flags=SOFT | layout.F_HAVE_SOCKET, skaddr=0xffff8880a1001100, callers=["tcp_v4_send_reset"]),

        # -- RSTs sent on kernels without a reason (< 6.10): told from the callers and the socket --
        raw("rst_sent", "127.0.0.1", 41100, "127.0.0.1", 8080, state="CLOSE", pid=4242, comm="nginx", uid=33,
            flags=FULL | layout.F_UNREAD, unread_bytes=65536, skaddr=0xffff8880a1001200, sock_ino=6008,
            callers=["bpf_prog_6deef7357e7b4530_rst", "tcp_send_active_reset", "__tcp_close", "tcp_close"]),
        raw("rst_sent", "127.0.0.1", 9, "127.0.0.1", 55500, tcp_flags=SYN, flags=SOFT,
            callers=["tcp_v4_send_reset", "tcp_v4_rcv"]),
        raw("rst_sent", "127.0.0.1", 8080, "127.0.0.1", 55600, state="ESTABLISHED", flags=SOFT | FULL,
            skaddr=0xffff8880a1001300, sock_ino=123456793, callers=["tcp_send_active_reset", "tcp_keepalive_timer"]),
        raw("rst_sent", "127.0.0.1", 8080, "127.0.0.1", 55700, state="FIN_WAIT2", flags=SOFT | FULL,
            skaddr=0xffff8880a1001400, callers=["tcp_send_active_reset", "tcp_keepalive_timer"]),
        raw("rst_sent", "127.0.0.1", 8080, "127.0.0.1", 55800, state="FIN_WAIT1", tcp_flags=ACK | PSH,
            flags=SOFT | FULL, skaddr=0xffff8880a1001500, callers=["tcp_v4_send_reset", "tcp_rcv_state_process"]),
        raw("rst_sent", "127.0.0.1", 8080, "127.0.0.1", 55900, state="ESTABLISHED", flags=SOFT | FULL,
            skaddr=0xffff8880a1001600, callers=["tcp_send_active_reset", "tcp_write_timeout"]),
        # an fentry program: the stack starts at the caller, the hooked function comes from `hook`
        raw("rst_sent", "127.0.0.1", 56000, "127.0.0.1", 8080, state="CLOSE", pid=7171, comm="curl", uid=1000,
            flags=FULL | layout.F_LINGER, linger_jiffies=0, skaddr=0xffff8880a1001700, sock_ino=6009,
            hook="tcp_send_active_reset", callers=["tcp_disconnect", "tcp_close"]),
        raw("rst_sent", "127.0.0.1", 8080, "127.0.0.1", 56100, state="ESTABLISHED", flags=SOFT | FULL,
            skaddr=0xffff8880a1001800, callers=["tcp_v4_rcv"]),

        # -- who really sent them (bpf/origin.bpf.c) --
        # a REJECT rule's RST, seen leaving the device; one's ICMP port unreachable
        raw("rst_sent", "10.0.0.5", 8443, "10.0.0.9", 56500, hook="net_dev_queue", tcp_flags=SYN, flags=SOFT,
            callers=["ip_output", "nf_send_reset", "nft_reject_inet_eval"]),
        raw("rst_sent", "10.0.0.5", 8443, "10.0.0.9", 56600, hook="icmp_send", kernel_reason=3, tcp_flags=SYN,
            flags=SOFT, callers=["__icmp_send", "nft_reject_inet_eval"]),
        # a segment of a connection the listener's port no longer has (TCP_FLAGS, from the listener)
        raw("rst_sent", "127.0.0.1", 8100, "127.0.0.1", 56700, state="LISTEN", kernel_reason=15, tcp_flags=ACK | PSH,
            flags=SOFT | FULL | 0x02, skaddr=0xffff8880a1001d00, callers=["tcp_v4_send_reset", "tcp_v4_do_rcv"]),
        # an RST whose TTL is not the peer's; one that found no connection here
        raw("rst_received", "10.0.0.9", 56800, "10.0.0.5", 443, state="ESTABLISHED", flags=SOFT | FULL,
            verdict="rst_not_from_peer", skaddr=0xffff8880a1001e00, sock_ino=7003, sock_cookie=5006,
            callers=["tcp_reset"]),
        raw("rst_received", "10.0.0.9", 56900, "10.0.0.5", 443, kernel_reason=2, flags=SOFT, callers=["tcp_v4_rcv"]),

        # -- RSTs received --
        raw("rst_received", "127.0.0.1", 41000, "127.0.0.1", 8080, state="ESTABLISHED", flags=SOFT | FULL,
            skaddr=0xffff8880a1001900, sock_ino=7001, sock_cookie=5002, callers=["tcp_reset"]),
        raw("rst_received", "2001:db8::1", 8080, "2001:db8::9", 56200, netns=BLUE_NS, state="ESTABLISHED",
            flags=SOFT | FULL, skaddr=0xffff8880a1001a00, sock_ino=123456794, sock_cookie=5003, callers=["tcp_reset"]),
        raw("rst_received", "127.0.0.1", 56300, "127.0.0.1", 9999, state="SYN_SENT", flags=SOFT | FULL,
            skaddr=0xffff8880a1001b00, sock_ino=123456795, sock_cookie=5004, owner=(3131, "gone-client"),
            callers=["tcp_reset"]),
        raw("rst_received", "127.0.0.1", 56400, "127.0.0.1", 8080, state="ESTABLISHED", pid=5151, comm="java",
            uid=1000, flags=FULL, skaddr=0xffff8880a1001c00, sock_ino=7001, sock_cookie=5005, callers=["tcp_reset"]),

        # -- the listen queues --
        # the burst incident: accept queue full, the listen() backlog binds (the kernel's own count)
        raw("syn_dropped", "127.0.0.1", 8100, "127.0.0.1", 57000, state="LISTEN", flags=LISTENER,
            owner=(6161, "burst-server"), verdict="accept_queue_full",
            queues=queues(6, 5, synq=3, somaxconn=4096, backlog=5)),
        # somaxconn binds; inferred (replayed on the queues); IPv6; in a named netns
        raw("syn_dropped", "2001:db8::1", 8080, "2001:db8::a", 57100, netns=BLUE_NS, state="LISTEN",
            flags=LISTENER | layout.F_INFERRED, owner=(8181, "envoy"), verdict="accept_queue_full",
            queues=queues(129, 128, synq=10, somaxconn=128, backlog=4096)),
        # the backlog listen() got is unknown (the listener predates rsttrace)
        raw("syn_dropped", "0.0.0.0", 8080, "10.0.0.9", 57200, state="LISTEN", flags=LISTENER,
            owner=(9191, "old-name"), verdict="accept_queue_full", queues=queues(129, 128, somaxconn=128)),
        raw("syn_dropped", "127.0.0.1", 8100, "127.0.0.1", 57300, state="LISTEN", flags=LISTENER,
            owner=(6161, "burst-server"), verdict="syn_queue_full", queues=queues(2, 256, synq=256, cookies=0, backlog=256)),
        raw("syn_dropped", "127.0.0.1", 8100, "127.0.0.1", 57400, state="LISTEN", flags=LISTENER,
            owner=(6161, "burst-server"), verdict="syn_backlog_reserve",
            queues=queues(2, 256, synq=200, max_syn=256, cookies=0, backlog=256)),
        raw("syn_cookie", "127.0.0.1", 8100, "127.0.0.1", 57500, state="LISTEN", flags=LISTENER,
            owner=(6161, "burst-server"), verdict="syn_cookie", queues=queues(2, 256, synq=256, backlog=256)),
        # no owner recorded: the listener's owner from its fd, or nobody
        raw("syn_cookie", "2001:db8::1", 443, "2001:db8::b", 57600, state="LISTEN", flags=LISTENER,
            skaddr=0xffff8880a1001d00,
            sock_ino=9002, verdict="syn_cookie", queues=queues(0, 4096, synq=4096, somaxconn=4096, backlog=4096)),
        raw("ack_dropped", "127.0.0.1", 8100, "127.0.0.1", 57700, state="LISTEN", kernel_reason=77, flags=LISTENER,
            owner=(6161, "burst-server"), verdict="accept_queue_full", queues=queues(6, 5, synq=1, backlog=5)),
        # a SYN cookie's final ACK, the queue read a moment later
        raw("ack_dropped", "127.0.0.1", 8100, "127.0.0.1", 57800, state="LISTEN", kernel_reason=2,
            flags=LISTENER | layout.F_INFERRED, owner=(6161, "burst-server"), queues=queues(4, 5, backlog=5)),
        raw("ack_dropped", "127.0.0.1", 8100, "127.0.0.1", 57900, state="LISTEN", kernel_reason=77, flags=LISTENER,
            owner=(6161, "burst-server"), verdict="listen_drop_other", queues=queues(1, 5, backlog=5)),
        raw("ack_dropped", "127.0.0.1", 8080, "127.0.0.1", 58000, netns=ANON_NS, state="LISTEN", kernel_reason=77,
            flags=LISTENER, sock_ino=123456796, queues=queues(11, 10, somaxconn=10, abort=0)),
    ]
    # -- connections' stories, ended in the kernel (bpf/story.bpf.c): one per outcome --
    out += [
        # the burst's client gave up (closed while connecting) after 2 dropped SYNs
        story("127.0.0.1", 57000, "127.0.0.1", 8100, "never_established", by_client=True, old="SYN_SENT", new="CLOSE",
              pid=7171, comm="curl", start_ago_ns=1_502_000_000, syn_drops=2, syn_retrans=1, server_tgid=6161),
        # a client whose connect() timed out: ETIMEDOUT, in softirq
        story("127.0.0.1", 57050, "127.0.0.1", 8100, "never_established", by_client=True, old="SYN_SENT", new="CLOSE",
              flags=SOFT, owner=(7171, "curl"), start_ago_ns=127_000_000_000, syn_drops=7, syn_retrans=6, err=110,
              server_tgid=6161),
        # established 1 s late, ended by the server's child (a remote client: IPv6, no client netns)
        story("2001:db8::a", 57100, "2001:db8::1", 8080, "established", by_client=False, old="SYN_RECV",
              new="ESTABLISHED", netns=BLUE_NS, flags=SOFT, start_ago_ns=1_003_000_000, syn_drops=1,
              server_tgid=8181, connect_seen=False),
        # its final ACK dropped: the client closed a connection the server never had
        story("127.0.0.1", 57700, "127.0.0.1", 8100, "client_only", by_client=True, old="ESTABLISHED",
              new="FIN_WAIT1", pid=7171, comm="curl", start_ago_ns=3_200_000_000, ack_drops=3, synack_retrans=2,
              data_retrans=2, server_tgid=6161),
        # tcp_abort_on_overflow=1: reset by the listener
        story("127.0.0.1", 55300, "127.0.0.1", 8100, "reset", by_client=True, old="ESTABLISHED", new="CLOSE",
              flags=SOFT, owner=(7171, "curl"), start_ago_ns=40_000, ack_drops=1, rsts=1, err=104, server_tgid=6161),
    ]
    # The same shapes again, other connections: the fast path fills the templates the first ones made.
    for lport, rport, unread in ((41200, 8080, 512), (41201, 8080, 1)):
        out.append(raw("rst_sent", "127.0.0.1", lport, "127.0.0.1", rport, state="CLOSE", kernel_reason=11,
                       pid=4242, comm="nginx", uid=33, flags=FULL | layout.F_UNREAD, unread_bytes=unread,
                       skaddr=0xffff8880a1002000 + lport, sock_ino=6100 + lport % 100,
                       callers=["tcp_send_active_reset", "__tcp_close"]))
    out.append(raw("rst_sent", "127.0.0.1", 9, "127.0.0.1", 58100, kernel_reason=1, tcp_flags=SYN, flags=SOFT,
                   callers=["tcp_v4_send_reset", "tcp_v4_rcv"]))
    out.append(raw("rst_received", "127.0.0.1", 58100, "127.0.0.1", 9, state="SYN_SENT", flags=SOFT | FULL,
                   skaddr=0xffff8880a1002100, sock_ino=7003, sock_cookie=5006, owner=(7171, "curl"),
                   callers=["tcp_reset"]))
    for i, r in enumerate(out):
        r.ktime_ns = T0 + i * 37_000_001       # crosses whole seconds: the time's cached second changes
    fix_stories()
    return out


def count_key(r: layout.RawEvent) -> layout.CountKey:
    """The key the BPF programs count the event under (bpf/maps.bpf.c, emit)."""
    k = layout.CountKey()
    k.kind, k.kernel_reason, k.tcp_flags, k.verdict, k.state, k.hook, k.netns = (
        r.kind, r.kernel_reason, r.tcp_flags, r.verdict, r.state, r.hook, r.netns)
    listener = r.kind in (KIND["syn_dropped"], KIND["ack_dropped"], KIND["syn_cookie"])
    k.service_port = r.lport if listener else min(r.lport, r.rport)
    if r.kind == KIND["connection"]:        # the server's port
        k.service_port = r.rport if (r.callers[1] >> 56) & STORY_F["BY_CLIENT"] else r.lport   # story flags: byte 23
    k.flags = r.flags & (layout.F_LINGER | layout.F_INFERRED | layout.F_ORPHAN | layout.F_HAVE_SOCKET
                         | layout.F_UNREAD)
    k.linger_zero = int(bool(r.flags & layout.F_LINGER) and r.linger_jiffies == 0)
    k.queue_full = int(bool(r.flags & layout.F_QUEUES) and r.accept_qlen > r.accept_qmax)
    if r.kernel_reason == NO_REASON:
        k.callers[:2] = list(r.callers[:2])
    return k


def exact_counts(raws: list[layout.RawEvent]) -> list[tuple[layout.CountKey, int]]:
    """Every event once, and the ones that never became records (lost, held back by --max-rate,
    aggregated during the storm) on top, under the key of the event they repeat."""
    counted: dict[bytes, list] = {}
    for r in raws:
        k = count_key(r)
        counted.setdefault(bytes(k), [k, 0])[1] += 1
    unread = next(r for r in raws if r.kernel_reason == 11)
    refused = next(r for r in raws if r.lport == 9)
    burst = next(r for r in raws if r.kind == KIND["syn_dropped"])
    # as the suppressed, lost and aggregate records below say
    for r, n in ((unread, 3), (refused, 2 + STATS["lost"] + 2), (burst, 338)):
        counted[bytes(count_key(r))][1] += n
    return [(k, n) for k, n in counted.values()]


def chunks(raws: list[layout.RawEvent], per_chunk: int = 16) -> list[bytes]:
    pad = b"\0" * (RING_RECORD.size - 8 - layout.EVENT_SIZE)
    recs = [layout.EVENT_SIZE.to_bytes(4, "little") + b"\0" * 4 + bytes(r) + pad for r in raws]
    return [b"".join(recs[i:i + per_chunk]) for i in range(0, len(recs), per_chunk)]


# -- what a run writes around the events ------------------------------------------------------------

STATS = {"submitted": len(events()), "lost": 12, "suppressed": 5, "aggregated": 340, "uncounted": 1,
         "stories_full": 2, "skipped_runs": {"raw_tracepoint:skb:kfree_skb": 2, "tracepoint:tcp:tcp_send_reset": 1}}
KERNEL_COUNTERS = {"netns": "rsttrace's own", "delta": {"TcpOutRsts": 27, "TcpEstabResets": 4,
                                                        "TcpExtTCPAbortOnClose": 3, "TcpExtListenOverflows": 0}}


def at(rec: dict, seconds: float) -> dict:
    """A record written `seconds` after the first event (its own time is when it was built)."""
    rec["time"] = records.rfc3339(WALL0 + int(seconds * 1e9))
    return rec


def coverage() -> dict:
    cov = {"hooks": {
        "rst_sent": {"hook": "tracepoint:tcp:tcp_send_reset", "note": "kernel reason from the tracepoint"},
        "rst_received": {"hook": "tracepoint:tcp:tcp_receive_reset", "note": ""},
        "syn_dropped": {"hook": "raw_tracepoint:skb:consume_skb", "note": "as the kernel counted it"},
        "syn_cookie": {"hook": "raw_tracepoint:skb:consume_skb", "note": "as the kernel counted it"},
        "ack_dropped": {"hook": None, "note": "no TCP_LISTEN_OVERFLOW drop reason in skb:kfree_skb"}},
        "blind_spots": ["softirq context cannot be detected: process attribution falls back to socket owners"]}
    filters = {"ports": [9, 443, 8080, 8100], "pid": None, "family": None, "reasons": [], "netns": [],
               "comm": [], "cgroup": [], "container": []}
    return at(records.coverage_record(cov, "6.18.44-golden", filters, 301.4), -0.5)


def owner(pid: int) -> dict:
    """A listener's owner as the session names it (Session._listener_owner)."""
    cg = HOST.cgroups()
    name, uid, _ = HOST.procs[pid]
    cgroup, container = cg.of(pid)
    return {"pid": pid, "comm": name, "uid": uid, "source": "listener_owner", "cgroup": cgroup,
            "container": container}


def listeners() -> dict:
    rows = [
        {"netns": {"inode": HOST_NS, "name": "host"}, "local": {"addr": "127.0.0.1", "port": 8100},
         "process": owner(6161), "accept_qlen": 6, "accept_qmax": 5, "backlog": 5, "somaxconn": 4096,
         "binding_limit": "listen_backlog", "syn_qlen": None, "syn_qmax": 5, "drops": 48, "drops_per_s": 24.0},
        {"netns": {"inode": BLUE_NS, "name": "blue"}, "local": {"addr": "::", "port": 8080},
         "process": owner(8181), "accept_qlen": 3, "accept_qmax": 128, "backlog": 4096, "somaxconn": 128,
         "binding_limit": "somaxconn", "syn_qlen": None, "syn_qmax": 128, "drops": 1, "drops_per_s": 0.0},
        {"netns": {"inode": ANON_NS, "name": None}, "local": {"addr": "0.0.0.0", "port": 8080},
         "process": None, "accept_qlen": 0, "accept_qmax": 10, "backlog": None, "somaxconn": None,
         "binding_limit": None, "syn_qlen": None, "syn_qmax": 10, "drops": 0, "drops_per_s": 0.0},
    ]
    return at(records.listeners_record(rows), 3.5)


def netns_counters(**moved: int) -> dict[str, int]:
    return {name: 1000 + moved.get(name, 0) for name in INTERESTING}


def reconcile_inputs(counted: dict, written: dict) -> tuple:
    """reconcile()'s arguments: the sampler's netns (host, sampled from the start; blue, gone since),
    the hooks' exact counts, what was written, and the BPF programs' per-CPU reads (ANON_NS: made
    after start, read only by them). The kernel's counters moved with what the hooks counted, and
    a little more: listen drops no hook saw, RSTs of other ports."""
    def moved(inode: int, more_rsts: int, more_drops: int) -> dict[str, int]:
        seen = counted.get(inode, {})
        drops = seen.get("syn_dropped", 0) + seen.get("ack_dropped", 0)
        return netns_counters(TcpOutRsts=seen.get("rst_sent", 0) + more_rsts,
                              TcpEstabResets=seen.get("rst_received", 0), TcpExtTCPAbortOnClose=3,
                              TcpExtListenOverflows=drops, TcpExtListenDrops=drops + more_drops,
                              TcpExtSyncookiesSent=seen.get("syn_cookie", 0), TcpExtTCPReqQFullDrop=1)
    host = NetnsState(HOST_NS, "host", "/proc/1/ns/net", baseline=netns_counters(), latest=moved(HOST_NS, 6, 0))
    blue = NetnsState(BLUE_NS, "blue", "/run/netns/blue", baseline=netns_counters(), latest=moved(BLUE_NS, 0, 1),
                      gone=True)
    percpu = {ANON_NS: PercpuTotals(count={"TcpExtListenOverflows": 1, "TcpExtListenDrops": 3},
                                    unexplained={"TcpExtListenDrops": 2})}
    return [host, blue], counted, written, percpu, {HOST_NS: 1, BLUE_NS: 2}, {}


def at_exit(result: Run, exact: list) -> tuple[dict, dict]:
    """The reconciliation and summary records of the run's end, made as Session.finish makes them."""
    from tracer.enrich.exact import ExactCounts
    counted = ExactCounts.per_netns(exact)
    # RSTs seen leaving the devices (bpf/origin.bpf.c): host's TCP-made ones all, and the REJECT's
    device = {HOST_NS: {"by_tcp": counted[HOST_NS]["rst_sent"] + 5, "not_by_tcp": 1, "forwarded": 0, "tcp_dropped": 1}}
    reconciliation = records.reconciliation_record(reconcile(*reconcile_inputs(counted, result.netns_counts),
                                                             device))
    by_kind: dict[str, dict[str, int]] = {}
    for (kind, reason), n in sorted(result.counts.items()):
        by_kind.setdefault(kind, {})[reason] = n
    summary = records.summary_record(
        by_kind, STATS["lost"], STATS["submitted"], 14.5, KERNEL_COUNTERS, result.kernel_counts,
        reconciliation["netns"], suppressed=STATS["suppressed"], uncounted=STATS["uncounted"], unwritten=3,
        skipped_runs=STATS["skipped_runs"], aggregated=STATS["aggregated"])
    # what the kernel counted per listener of a traced port (RstProgram.handshakes), read at exit
    result.pipeline.stories.handshakes = {(HOST_NS, 8100): 6, (BLUE_NS, 8080): 1}
    summary["connections"] = result.pipeline.stories.summary(STATS["stories_full"])
    return at(reconciliation, 10.0), at(summary, 14.5)


def open_story(result: Run) -> dict:
    """A story still in the kernel's map at exit (a remote client that never came back), as
    Session._end_stories writes it: key (client, server addresses, ports, family) and value bytes."""
    key = socket.inet_pton(socket.AF_INET, "10.0.0.9").ljust(16, b"\0") + \
        socket.inet_pton(socket.AF_INET, "10.0.0.5").ljust(16, b"\0") + struct.pack("<HHHH", 58500, 443, 2, 0)
    value = STORY.pack(T0 + 1_000_000_000, 3, 0, 0, 0, 0, 0, 0, STATE["LISTEN"], STORY_F["SERVER_SEEN"], HOST_NS,
                       9191, 0, 0) + struct.pack("<Q", T0 + 5_000_000_000)
    story = result.pipeline.stories.open_story(key, value, T0 + 190_000_000_000, MONO_TO_WALL, "exit")
    result.pipeline.counts[("connection", "open")] += 1
    return records.connection_record(**story)


def after_events(result: Run, exact: list) -> list[dict]:
    """The records a run writes after these events, in order."""
    opened = open_story(result)
    reconciliation, summary = at_exit(result, exact)
    return [
        at(records.lost_record(STATS["lost"], STATS["lost"]), 2.2),
        at(records.suppressed_record(1.0, {"rst_sent": {"closed_with_unread_data": 3, "no_listener": 2}},
                                     STATS["suppressed"], 100, result.kernel_counts, STATS["uncounted"]), 2.3),
        at(records.storm_record("start", {"submitted": 0, "aggregated": 0, "lost": 0}, 0.0, 8 << 20, 9 << 20), 2.4),
        at(records.aggregate_record(WALL0 / 1e9 + 2.0, WALL0 / 1e9 + 2.5, "syn_dropped", "accept_queue_full",
                                    {"inode": HOST_NS, "name": "host"}, 8100, {"pid": 6161, "comm": "burst-server"},
                                    338, 1), 2.5),
        at(records.aggregate_record(WALL0 / 1e9 + 2.0, WALL0 / 1e9 + 2.5, "rst_sent", "no_listener",
                                    {"inode": ANON_NS, "name": None}, 9, None, 2, 1), 2.5),
        at(records.storm_record("end", {"submitted": 3, "aggregated": 340, "lost": 12}, 1.25, 8 << 20, 0), 3.0),
        listeners(),
        opened,
        reconciliation,
        summary,
    ]


# -- capturing each sink ----------------------------------------------------------------------------

UI_SIZE = (120, 48)
HOSTNAME, KERNEL_RELEASE, PID = socket.gethostname(), platform.release(), os.getpid()


def normalise(text: str) -> str:
    """Values the sinks read from this machine and process, as placeholders where they stand."""
    text = re.sub(r'"(hostname|name)":"' + re.escape(HOSTNAME) + '"', r'"\1":"<hostname>"', text)
    text = re.sub(r'"kernel":"' + re.escape(KERNEL_RELEASE) + r'","type":"linux"', '"kernel":"<kernel-release>",'
                  '"type":"linux"', text)
    text = re.sub(r"^(<\d+>1 \S+) " + re.escape(HOSTNAME[:255]) + rf" rsttrace {PID} ", r"\1 <hostname> rsttrace <pid> ",
                  text, flags=re.M)
    text = re.sub(r"^rsttrace_last_update_timestamp_seconds \S+$", "rsttrace_last_update_timestamp_seconds "
                  "<timestamp>", text, flags=re.M)
    return text


def emit_all(sinks: list, fast: bool = False) -> tuple[Run, dict]:
    """The whole run into `sinks`: coverage, the events, then what follows them; the session's
    view of it, and the summary record."""
    raws = events()
    exact = exact_counts(raws)
    cov = coverage()
    for sink in sinks:
        sink.emit(cov)
    result = run(sinks, chunks(raws), exact, fast=fast)
    after = after_events(result, exact)
    for rec in after:
        for sink in sinks:
            sink.emit(rec)
    return result, after[-1]


def capture_lines(tmp_path, make_sink, fast: bool = False) -> tuple[str, Run, dict]:
    path = tmp_path / "out"
    out = LineOutput(str(path))
    sink = make_sink(out)
    try:
        result, summary = emit_all([sink], fast=fast)
    finally:
        sink.close()
    return path.read_text(), result, summary


def capture_json(tmp_path, fast: bool = False) -> str:
    return capture_lines(tmp_path, JsonSink, fast=fast)[0]


def capture_ecs(tmp_path) -> str:
    return capture_lines(tmp_path, lambda out: JsonSink(out, "ecs"))[0]


def capture_plain(tmp_path) -> str:
    return capture_lines(tmp_path, PlainSink)[0]


def capture_plain_exit(tmp_path) -> str:
    _, result, summary = capture_lines(tmp_path, PlainSink)
    lines: list[str] = []
    result.print_summary(summary, lines.append)
    return "".join(line + "\n" for line in lines)


def capture_syslog(tmp_path) -> str:
    """The datagrams SyslogSink sends to a unix socket, one per line."""
    path = str(tmp_path / "log")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    got: list[bytes] = []
    done = b"-- end of run --"

    def read():
        while (data := receiver.recv(1 << 16)) != done:
            got.append(data)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sink = SyslogSink(SyslogTarget.parse(f"unix:{path}"), "local3")
    try:
        emit_all([sink])
        assert sink.failed == 0
    finally:
        sink.close()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as end:
            end.sendto(done, path)
        reader.join(10)
        receiver.close()
    assert not any(b"\n" in d for d in got)
    return "".join(d.decode() + "\n" for d in got)


def capture_metrics(tmp_path, openmetrics: bool = False) -> str:
    """The exposition a scrape gets after the run (the session hands the exact counts over as it
    does when a scrape asks: Session._refresh_metrics): the text format 0.0.4, or OpenMetrics."""
    sink = MetricsSink(("127.0.0.1", 0))
    try:
        result, _ = emit_all([sink])
        sink.update_counts(result.count_rows, STATS)
        return sink.render(openmetrics=openmetrics)
    finally:
        sink.close()


def capture_openmetrics(tmp_path) -> str:
    return capture_metrics(tmp_path, openmetrics=True)


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def capture_ui(tmp_path) -> str:
    """The screen as it stands when the run stops, then the final summary printed below it."""
    width, height = UI_SIZE
    console = Console(record=True, width=width, height=height, file=io.StringIO(), color_system=None,
                      force_terminal=False, legacy_windows=False)
    clock = Clock(1000.0)
    sink = ui.UiSink(console=console, host="golden-host", clock=clock)
    try:
        emit_all([sink])
        # One step only: the refresh thread may draw at any moment, and its rates hold still from then.
        clock.now += 14.5
        # What the refresh thread draws (UiSink._render): rich's Live shows it only on a terminal.
        console.print(ui.screen(sink.state, "golden-host", width))
    finally:
        sink.close()
    return console.export_text()


CAPTURES = {
    "json.jsonl": capture_json,
    "ecs.jsonl": capture_ecs,
    "plain.txt": capture_plain,
    "plain-exit.txt": capture_plain_exit,
    "syslog.txt": capture_syslog,
    "metrics.prom": capture_metrics,
    "metrics.openmetrics": capture_openmetrics,
    "ui.txt": capture_ui,
}
SINKS = GOLDEN / "sinks"


def test_the_recorded_run_has_every_event_kind_and_reason(tmp_path):
    seen = [json.loads(line) for line in capture_json(tmp_path).splitlines()]
    events_ = [rec for rec in seen if rec["type"] == "event"]
    stories = [rec for rec in seen if rec["type"] == "connection"]
    assert {rec["event"] for rec in events_} | {"connection"} == set(layout.KIND_NAMES.values())
    assert ({rec["reason"] for rec in events_} | {rec["outcome"] for rec in stories} == set(CATALOG)), \
        "a reason the golden run lacks: add its event"
    assert {rec["type"] for rec in seen} == {"coverage", "event", "lost", "suppressed", "storm", "aggregate",
                                             "listeners", "reconciliation", "summary", "connection"}


@pytest.mark.parametrize("name", list(CAPTURES))
def test_sink_writes_what_it_wrote_before(tmp_path, name):
    assert_golden(SINKS / name, normalise(CAPTURES[name](tmp_path)))


def test_json_fast_path_writes_the_golden_lines_too(tmp_path):
    if UPDATE:
        pytest.skip("compares with the golden file the normal path writes")
    assert_golden(SINKS / "json.jsonl", normalise(capture_json(tmp_path, fast=True)))


def test_every_golden_sink_file_has_a_sink():
    left = stale(SINKS, set(CAPTURES))
    if UPDATE:
        for name in left:
            (SINKS / name).unlink()
        return
    assert not left, f"golden files no sink writes: {left} (RSTTRACE_UPDATE_GOLDEN=1 removes them)"


@pytest.mark.parametrize("name,schema", [("json.jsonl", "rsttrace-v1.schema.json"),
                                         ("ecs.jsonl", "rsttrace-ecs-v1.schema.json")])
def test_every_golden_record_meets_its_published_schema(name, schema):
    import jsonschema
    from pathlib import Path
    repo = Path(__file__).resolve().parents[2]
    validator = jsonschema.Draft202012Validator(json.loads((repo / "schema" / schema).read_text()))
    lines = (GOLDEN / "sinks" / name).read_text().splitlines()
    bad = [(i, next(iter(validator.iter_errors(json.loads(line)))).message[:200])
           for i, line in enumerate(lines) if not validator.is_valid(json.loads(line))]
    assert lines and bad == []
