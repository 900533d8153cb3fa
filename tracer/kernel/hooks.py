"""Which hook reports each kind of event on this kernel: the best honest one, chosen per capability.

    rst_sent      tcp:tcp_send_reset with `reason` (6.10+)  >  kprobes on tcp_send_active_reset /
                  tcp_v4/v6_send_reset (reason inferred)  >  tcp:tcp_send_reset without reason
    rst_received  tcp:tcp_receive_reset (4.15+)
    syn_dropped,  kprobe on tcp_conn_request (the decision point)  >  raw tracepoint skb:consume_skb
    syn_cookie    where tcp_rcv_state_process() consumes the SYN it decided on (6.3+: the queues after the
                  decision)  >  raw tracepoint net:netif_receive_skb replaying tcp_conn_request's tests on
                  the queues before it (every packet of the host passes there)
    ack_dropped   skb:kfree_skb reason TCP_LISTEN_OVERFLOW (6.3+, the kernel's own word)  >  kprobe on
                  tcp_v4/v6_syn_recv_sock
    connection    a connection's story (bpf/story.bpf.c): sock:inet_sock_set_state for its end,
                  tcp:tcp_retransmit_skb / tcp_retransmit_synack for retransmits (off: --no-stories)
    app_errors    the application's failed syscalls and its listeners' accept() calls (bpf/app.bpf.c):
                  raw_syscalls:sys_exit, for APP_SYSCALLS (on: --app-errors)
    origins       who really sent a reset (bpf/origin.bpf.c): icmp:icmp_send for REJECTs answering with
                  ICMP, skb:kfree_skb NO_SOCKET for RSTs that find no connection; with --origins (off by
                  default: every packet of the host pays) net:net_dev_queue for RSTs made outside TCP
                  (netfilter REJECTs) and net:netif_receive_skb for received RSTs' TTL against the peer's
                  handshake

Function hooks enter through fentry where the kernel allows BPF_PROG_TYPE_TRACING (cheaper than a
kprobe's breakpoint), through kprobes otherwise. `--backend tracepoint|kprobe|fentry` forces one
family where it can run (for tests and comparisons).

`plan_hooks()` decides, one small function per event kind; the result is a `HookPlan` of typed
choices, which `HookPlan.cflags()` alone turns into the macros bpf/*.c test.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from enum import Enum

from ..errors import UnsupportedKernelError
from . import bpfsys
from .capabilities import Capabilities, Coverage
from .kallsyms import COOKIE_CHECKERS, SYN_CONSUMER, TCP_V6_REPLY
from .offsets import SYSCALL_NUMBERS

BACKENDS = ("auto", "tracepoint", "kprobe", "fentry")

SYN_INFERRED = ("inferred: the listener's queues and the netns sysctls are read as the SYN arrives and "
                "tcp_conn_request()'s own tests are replayed (the kernel drops these SYNs without a tracepoint)")
SYN_DECIDED = ("inferred: the listener's queues and the netns sysctls are read where tcp_rcv_state_process() "
               "consumes the SYN it decided on, and tcp_conn_request()'s tests are applied to what the SYN met "
               "(the kernel drops these SYNs without a tracepoint)")
SYN_COUNTED = ("as the kernel counted it: where tcp_rcv_state_process() consumes the SYN it decided on, what "
               "tcp_conn_request() added on that CPU to the netns's ListenOverflows, ListenDrops, TCPReqQFullDrop "
               "and SyncookiesSent (the kernel drops these SYNs without a tracepoint)")
ACK_COUNTED = ("kernel drop reason TCP_LISTEN_OVERFLOW (a SYN cookie's ACK: NO_SOCKET freed in cookie_v4/v6_check()), "
               "and what the kernel added on that CPU to ListenOverflows and ListenDrops")
# `RSTTRACE_SYN_VERDICTS=inferred` keeps the verdicts told from the queues where the kernel's counters
# could be read: for comparing the two (tests, benchmarks), not for users.
SYN_VERDICTS_ENV = "RSTTRACE_SYN_VERDICTS"
# `RSTTRACE_SYN_HOOK=netif_receive_skb` keeps the per-packet replay where the consume_skb hook would run:
# for comparing the two (tests, benchmarks), not for users.
SYN_HOOK_ENV = "RSTTRACE_SYN_HOOK"
# `RSTTRACE_STATE_HOOK=raw` keeps sock:inet_sock_set_state (and --app-errors' raw_syscalls:sys_exit) a
# raw tracepoint where a BTF one would run (what kernels that refuse tp_btf get): for tests and
# benchmarks, not for users.
STATE_HOOK_ENV = "RSTTRACE_STATE_HOOK"

RST_FUNCTIONS = ("tcp_send_active_reset", "tcp_v4_send_reset", "tcp_v6_send_reset")
SYN_FUNCTIONS = ("tcp_conn_request",)
ACK_FUNCTIONS = ("tcp_v4_syn_recv_sock", "tcp_v6_syn_recv_sock")


# The syscalls whose failures bpf/app.bpf.c keeps (which argument tells about each, a path or a file
# descriptor, is said there, APP_CASE). A syscall's id is its place here, from 1 (APP_SYS_<name>=<id>):
# what the kernel's records carry. Their numbers per machine: offsets.SYSCALL_NUMBERS (NR_<name>).
APP_SYSCALLS = ("open", "openat", "openat2", "creat", "mkdir", "mkdirat", "rename", "renameat", "renameat2",
                "unlink", "unlinkat", "write", "pwrite64", "writev", "fsync", "connect", "accept", "accept4",
                "socket", "sendfile64", "splice",
                "listen")   # listen(): also where a listener's accept() history starts
APP_SYSCALL_IDS = {name: i for i, name in enumerate(APP_SYSCALLS, start=1)}
APP_ERRORS_OFF = ("off: --app-errors hooks the syscalls whose failures explain an abort, and the accept() calls "
                  "that tell why an accept queue is full (every syscall of the host then takes the slower tracing entry)")
ORIGINS_OFF = ("without --origins: a REJECT's RSTs, RSTs forged on the path and the RSTs leaving each device are "
               "not told (two programs would run on every packet of the host)")
IO_URING_BLIND_SPOT = ("io_uring's accept and openat never pass through the syscalls: a server that accepts "
                       "through io_uring shows no accept() calls, and its failed opens no app_errors")


class Hook(Enum):
    """What catches a kind of event."""
    TRACEPOINT = "tracepoint"               # the event's own tracepoint (tcp:tcp_send_reset, tcp_receive_reset)
    KPROBE = "kprobe"                       # the kernel function that decides, through a kprobe
    FENTRY = "fentry"                       # the same function, through a BPF trampoline
    CONSUME_SKB = "consume_skb"             # raw tracepoint skb:consume_skb, after tcp_conn_request() decided
    NETIF_RECEIVE_SKB = "netif_receive_skb"  # raw tracepoint net:netif_receive_skb, before it decides
    KFREE_SKB = "kfree_skb"                 # raw tracepoint skb:kfree_skb, with the kernel's drop reason


FUNCTION_HOOKS = (Hook.KPROBE, Hook.FENTRY)     # bpf/kprobe.bpf.c


@dataclass
class HookPlan:
    """What is hooked how on this kernel; `cflags()` renders it for bpf/*.c."""
    rst_sent: Hook | None = None            # TRACEPOINT, KPROBE or FENTRY
    rst_received: Hook | None = None        # TRACEPOINT
    syn_verdicts: Hook | None = None        # syn_dropped and syn_cookie: KPROBE, FENTRY, CONSUME_SKB, NETIF_RECEIVE_SKB
    ack_dropped: Hook | None = None         # KFREE_SKB, KPROBE or FENTRY
    # Listen-queue verdicts from the kernel's own per-CPU counters (bpf/netstat.bpf.c) ...
    counted: bool = False
    netstat_cpus: int = 0                   # ... in a table per possible CPU
    netstat_offsets: dict[str, int] = field(default_factory=dict)   # ... read there (Capabilities.netstat)
    # Kernel text [start, end) that tells where a packet was freed: tcp_rcv_state_process() for
    # CONSUME_SKB, cookie_v4/v6_check() for a SYN cookie's ACK under KFREE_SKB
    syn_consumer: tuple[int, int] | None = None
    cookie_checks: list[tuple[int, int]] = field(default_factory=list)
    listen_overflow_reason: int | None = None     # skb_drop_reason TCP_LISTEN_OVERFLOW (KFREE_SKB)
    cookie_no_socket_reason: int | None = None    # skb_drop_reason NO_SOCKET, of a SYN cookie's ACK
    # The listener table (bpf/listen.bpf.c): sock:inet_sock_set_state as a BTF tracepoint (the
    # btf_trace_* typedef id the loader loads it for; bcc has no tp_btf), else as a raw one
    state_hook_type: int | None = None
    backlog_from_regs: bool = False         # listen()'s backlog, from the syscall's registers
    learns_older_listeners: bool = False    # sock:sk_data_ready: a listener that predates rsttrace, at its next connection
    pokes_listeners: bool = False           # sock:sock_recv_length: the same, at once, from a recv() on its fd
    ipv6_reset: bool = False                # the function hooks take the IPv6 functions too
    synq_full_gt: bool = False              # Capabilities.synq_full_gt
    # Connections' stories (bpf/story.bpf.c); their state hook is listen.bpf.c's where that runs
    stories: bool = False
    # The application's failed syscalls and listeners' accept() calls (bpf/app.bpf.c): the
    # syscalls kept (name → (APP_SYSCALL_IDS id, number)), and the offsets read
    app_syscalls: dict[str, tuple[int, int]] = field(default_factory=dict)   # name → (id, number)
    app_offsets: dict[str, int] = field(default_factory=dict)
    app_hook_type: int | None = None        # raw_syscalls:sys_exit as tp_btf (its btf_trace_* id), else raw
    # Who really sent a reset (bpf/origin.bpf.c): the tracepoints it attaches itself (listen.bpf.c's
    # programs call it where they run on the same tracepoint)
    origins: bool = False                   # the file is in (what costs nothing until it happens)
    origin_packets: bool = False            # --origins: the per-packet hooks too
    origin_icmp: bool = False               # icmp:icmp_send (Linux 6.12+)
    origin_receive_hook: bool = False       # net:netif_receive_skb, where listen.bpf.c does not hook it
    origin_no_socket: int | None = None     # skb_drop_reason NO_SOCKET: RSTs that find no connection
    origin_free_hook: bool = False          # skb:kfree_skb, where listen.bpf.c does not hook it
    tcp_v6_reply: tuple[int, int] | None = None   # tcp_v6_send_response()'s text: its RSTs carry no socket
    # Hook files the loader pastes after the subject files (loader.SUBJECT_FILES), in this order
    files: list[str] = field(default_factory=list)
    coverage: Coverage = field(default_factory=Coverage)

    @property
    def listen_hooks(self) -> bool:
        """bpf/listen.bpf.c runs: a SYN or ACK raw tracepoint needs its listener table."""
        return (self.syn_verdicts in (Hook.CONSUME_SKB, Hook.NETIF_RECEIVE_SKB)
                or self.ack_dropped is Hook.KFREE_SKB)

    @property
    def function_hooks(self) -> bool:
        """bpf/kprobe.bpf.c runs."""
        return any(hook in FUNCTION_HOOKS for hook in (self.rst_sent, self.syn_verdicts, self.ack_dropped))

    @property
    def story_state_hook(self) -> bool:
        """bpf/story.bpf.c attaches sock:inet_sock_set_state itself (listen.bpf.c does not run)."""
        return self.stories and not self.listen_hooks

    @property
    def app_errors(self) -> bool:
        return bool(self.app_syscalls)

    @property
    def btf_types(self) -> dict[str, int]:
        """BTF tracepoint programs → the btf_trace_* typedef id each is loaded for."""
        out = {"tp_btf__inet_sock_set_state": self.state_hook_type} if self.state_hook_type else {}
        if self.app_hook_type:
            out["tp_btf__sys_exit"] = self.app_hook_type
        return out

    def cflags(self) -> list[str]:
        """The macros bpf/*.c test, for these choices (the loader adds offsets and filters)."""
        out: list[str] = []
        if self.rst_sent in FUNCTION_HOOKS:
            out += _fentry(self.rst_sent, "RST") + ["-DRST_SENT_BY_KPROBE", "-DKPROBE_RST"]
        if self.syn_verdicts in FUNCTION_HOOKS:
            out += _fentry(self.syn_verdicts, "SYN") + ["-DKPROBE_LISTEN_SYN"]
        elif self.syn_verdicts is Hook.CONSUME_SKB:
            lo, hi = self.syn_consumer
            out += ["-DLISTEN_SYN_CONSUMED", f"-DSYN_CONSUMER_LO={lo:#x}ULL", f"-DSYN_CONSUMER_HI={hi:#x}ULL"]
        elif self.syn_verdicts is Hook.NETIF_RECEIVE_SKB:
            out.append("-DLISTEN_SYN_TRACEPOINT")
        if self.ack_dropped is Hook.KFREE_SKB:
            out.append(f"-DLISTEN_OVERFLOW_REASON={self.listen_overflow_reason}")
            if self.cookie_no_socket_reason is not None:
                out.append(f"-DCOOKIE_NO_SOCKET_REASON={self.cookie_no_socket_reason}")
                for i, (lo, hi) in enumerate(self.cookie_checks):
                    out += [f"-DCOOKIE_CHECK{i}_LO={lo:#x}ULL", f"-DCOOKIE_CHECK{i}_HI={hi:#x}ULL"]
        elif self.ack_dropped in FUNCTION_HOOKS:
            out += _fentry(self.ack_dropped, "ACK") + ["-DKPROBE_LISTEN_ACK"]
        if self.listen_hooks:
            if self.counted:
                out += ["-DNETSTAT_PERCPU", f"-DNETSTAT_CPUS={self.netstat_cpus}"]
                out += [f"-D{name}={value}" for name, value in sorted(self.netstat_offsets.items())]
            out.append("-DCONNECT_OWNERS")
            flags = ((self.state_hook_type, "-DSTATE_HOOK_BTF"), (self.backlog_from_regs, "-DLISTEN_BACKLOG_FROM_REGS"),
                     (self.learns_older_listeners, "-DHAVE_SK_DATA_READY"),
                     (self.pokes_listeners, "-DHAVE_SOCK_RECV_LENGTH"))
            out += [macro for chosen, macro in flags if chosen]
        if self.stories:
            out.append("-DSTORIES")
            if self.story_state_hook:
                out.append("-DSTORY_STATE_HOOK")
                if self.state_hook_type:
                    out.append("-DSTATE_HOOK_BTF")
        if self.app_errors:
            out.append("-DAPP_ERRORS")
            if self.app_hook_type:
                out.append("-DAPP_HOOK_BTF")
            for name, (i, nr) in self.app_syscalls.items():
                out += [f"-DAPP_SYS_{name}={i}", f"-DNR_{name}={nr}"]
            out += [f"-D{name}={value}" for name, value in sorted(self.app_offsets.items())]
        if self.origins:
            out.append("-DORIGINS")
            if self.tcp_v6_reply:
                out += [f"-DTCP_V6_REPLY_LO={self.tcp_v6_reply[0]:#x}ULL", f"-DTCP_V6_REPLY_HI={self.tcp_v6_reply[1]:#x}ULL"]
            flags = ((self.origin_packets, "-DORIGIN_PACKETS"), (self.origin_icmp, "-DORIGIN_ICMP"),
                     (self.origin_receive_hook, "-DORIGIN_RECEIVE_HOOK"), (self.origin_free_hook, "-DORIGIN_FREE_HOOK"))
            out += [macro for chosen, macro in flags if chosen]
            if self.origin_no_socket is not None:
                out.append(f"-DORIGIN_NO_SOCKET={self.origin_no_socket}")
        if self.ipv6_reset:
            out.append("-DHAVE_IPV6_RESET")
        if self.synq_full_gt:
            out.append("-DSYNQ_FULL_GT")
        return out


def _fentry(hook: Hook, group: str) -> list[str]:
    return [f"-DFENTRY_{group}"] if hook is Hook.FENTRY else []


def plan_hooks(caps: Capabilities, backend: str = "auto", stories: bool = True, app_errors: bool = False,
               origins: bool = False) -> HookPlan:
    """stories: follow connections hurt by drops and resets (off: --no-stories). app_errors: keep the
    application's failed syscalls and its accept() calls (--app-errors; off by default, for what it
    costs every syscall of the host: scripts/bench/README.md). origins: also hook every packet to tell
    who really sent a reset (--origins; off by default, for what it costs every packet)."""
    if backend == "kprobe" and not caps.kprobes:
        raise UnsupportedKernelError("--backend kprobe: this kernel has no kprobes",
                                     "use --backend auto (see `rsttrace doctor`)")
    if backend == "fentry" and not caps.fentry:
        raise UnsupportedKernelError("--backend fentry: this kernel refuses fentry programs",
                                     "use --backend auto (see `rsttrace doctor`)")
    plan = HookPlan()
    _plan_rst_sent(plan, caps, backend)
    _plan_rst_received(plan, caps)
    _plan_syn_verdicts(plan, caps, backend)
    _plan_ack_dropped(plan, caps, backend)
    if plan.listen_hooks:
        _plan_listeners(plan, caps)
    if stories:
        _plan_stories(plan, caps)
    if app_errors:
        _plan_app(plan, caps)
    else:
        plan.coverage.hooks["app_errors"] = None
        plan.coverage.notes["app_errors"] = APP_ERRORS_OFF
    _plan_origins(plan, caps, origins)
    plan.ipv6_reset = plan.function_hooks and caps.has_function("tcp_v6_send_reset")
    plan.synq_full_gt = caps.synq_full_gt
    if not caps.softirq_ranges:
        plan.coverage.blind_spots.append(
            "softirq context cannot be detected: process attribution falls back to socket owners")
    plan.files = ["rst.bpf.c"]
    if plan.counted:
        plan.files.append("netstat.bpf.c")
    if plan.listen_hooks:
        plan.files.append("listen.bpf.c")
    if plan.function_hooks:
        plan.files.append("kprobe.bpf.c")
    return plan


def _function_hooks(caps: Capabilities, backend: str) -> bool:
    return (caps.fentry or caps.kprobes) and backend != "tracepoint"


def _entry(caps: Capabilities, backend: str, functions: tuple[str, ...]) -> Hook:
    """fentry where it attaches to every one of `functions` this kernel has (auto, fentry), else kprobes."""
    if backend in ("auto", "fentry") and all(f in caps.fentry_functions for f in functions if f in caps.functions):
        return Hook.FENTRY
    if backend == "fentry":
        raise UnsupportedKernelError(f"--backend fentry: fentry cannot attach to {', '.join(functions)}",
                                     "use --backend auto (see `rsttrace doctor`)")
    return Hook.KPROBE


def _plan_rst_sent(plan: HookPlan, caps: Capabilities, backend: str) -> None:
    cov = plan.coverage
    if caps.rst_reason and backend not in ("kprobe", "fentry"):
        plan.rst_sent = Hook.TRACEPOINT
        cov.hooks["rst_sent"] = "tracepoint:tcp:tcp_send_reset"
        cov.notes["rst_sent"] = "kernel reason from the tracepoint"
    elif _function_hooks(caps, backend):
        plan.rst_sent = _entry(caps, backend, RST_FUNCTIONS)
        cov.hooks["rst_sent"] = f"{plan.rst_sent.value}:{','.join(RST_FUNCTIONS)}"
        cov.notes["rst_sent"] = "reason inferred from the kernel callers and the socket's state"
    elif caps.send_reset is not None:
        plan.rst_sent = Hook.TRACEPOINT
        cov.hooks["rst_sent"] = "tracepoint:tcp:tcp_send_reset"
        cov.notes["rst_sent"] = "no kernel reason on this kernel: reason inferred from callers and socket state"
        cov.blind_spots.append("RSTs sent with no socket (closed port) do not reach tcp_send_reset before 6.10")
    else:
        cov.hooks["rst_sent"] = None
        cov.notes["rst_sent"] = "neither tcp:tcp_send_reset nor kprobes"


def _plan_rst_received(plan: HookPlan, caps: Capabilities) -> None:
    cov = plan.coverage
    if caps.receive_reset is not None:
        plan.rst_received = Hook.TRACEPOINT
        cov.hooks["rst_received"] = "tracepoint:tcp:tcp_receive_reset"
        cov.notes["rst_received"] = ""
    else:
        cov.hooks["rst_received"] = None
        cov.notes["rst_received"] = "tracepoint tcp:tcp_receive_reset missing"


def _plan_syn_verdicts(plan: HookPlan, caps: Capabilities, backend: str) -> None:
    """syn_dropped and syn_cookie: where a listener's verdict on a SYN is read, and how it is told."""
    cov = plan.coverage
    if _function_hooks(caps, backend):
        plan.syn_verdicts = _entry(caps, backend, SYN_FUNCTIONS)
        hook = f"{plan.syn_verdicts.value}:tcp_conn_request"
        note = "inferred at the decision point: tcp_conn_request()'s tests replayed on the queues it is about to read"
    elif caps.listen_hooks and caps.syn_after_decision and os.environ.get(SYN_HOOK_ENV) != "netif_receive_skb":
        plan.syn_verdicts = Hook.CONSUME_SKB
        plan.syn_consumer = caps.text_ranges[SYN_CONSUMER]
        hook = "raw_tracepoint:skb:consume_skb"
        if caps.counted_verdicts and os.environ.get(SYN_VERDICTS_ENV) != "inferred":
            plan.counted = True
            plan.netstat_cpus = bpfsys.possible_cpus()
            plan.netstat_offsets = dict(caps.netstat)
            note = SYN_COUNTED
            cov.blind_spots.append(
                "ListenDrops alone at a SYN (no overflow, no full SYN queue) is this SYN only where tcp_max_syn_backlog's "
                "reserve explains it (syncookies off); else it is counted as `unexplained` in the reconciliation: an ICMP "
                "error that removed a half-open connection counts the same. A CPU whose per-CPU offset could not be found "
                "has its SYN verdicts inferred (inferred: true)")
        else:
            note = SYN_DECIDED
            cov.blind_spots.append(
                "SYNs at a queue's edge: whether a SYN that found the SYN queue one short of its limit took the last "
                "place is told from the queue length at the listener's previous SYN, less the connections completed "
                "since; a SYN that added no request while the accept queue is one short of full is taken to have met "
                "it full (an accept() in between). A request that expired unanswered, or a connection completed from "
                "a SYN cookie, in between can make one such SYN be reported the wrong way")
            if not caps.counted_verdicts:
                cov.blind_spots.append("the kernel's own listen counters cannot be read per CPU here: "
                                       + (caps.netstat_missing or "no BPF_PROG_TEST_RUN on a chosen CPU"))
    elif caps.listen_hooks:
        plan.syn_verdicts = Hook.NETIF_RECEIVE_SKB
        hook, note = "raw_tracepoint:net:netif_receive_skb", SYN_INFERRED
        if caps.recv_length is not None and caps.data_ready is not None:
            cov.blind_spots.append(
                "a listener that existed before rsttrace started is known a moment after start, from a recv() "
                "on a copy of its fd (with --port); one whose fd no process holds, from its next queued "
                "connection (sk_data_ready) or 3rd-ACK overflow — SYN drops before that are only counted by the kernel")
        else:
            cov.blind_spots.append(
                "a listener that existed before rsttrace started is known from its next queued connection "
                "(sk_data_ready) or 3rd-ACK overflow; SYN drops before that are only counted by the kernel"
                if caps.data_ready is not None else
                "listeners that existed before rsttrace started are known only after an ACK-time overflow")
    else:
        hook, note = None, "needs kprobes, or sock:inet_sock_set_state + net:netif_receive_skb raw tracepoints"
    for kind in ("syn_dropped", "syn_cookie"):
        cov.hooks[kind], cov.notes[kind] = hook, note


def _plan_ack_dropped(plan: HookPlan, caps: Capabilities, backend: str) -> None:
    """ack_dropped: a handshake's final ACK that met a full accept queue."""
    cov = plan.coverage
    if caps.listen_hooks and caps.listen_overflow_reason is not None and backend not in ("kprobe", "fentry"):
        plan.ack_dropped = Hook.KFREE_SKB
        plan.listen_overflow_reason = caps.listen_overflow_reason
        cov.hooks["ack_dropped"] = "raw_tracepoint:skb:kfree_skb"
        cov.notes["ack_dropped"] = "kernel drop reason TCP_LISTEN_OVERFLOW"
        cookie_ranges = [caps.text_ranges[f] for f in COOKIE_CHECKERS if f in caps.text_ranges]
        if caps.no_socket_reason is not None and cookie_ranges:
            # A SYN cookie's ACK that meets a full accept queue is dropped by cookie_v4/v6_check() with
            # reason NO_SOCKET: told from the other NO_SOCKET drops by where it was freed.
            plan.cookie_no_socket_reason = caps.no_socket_reason
            plan.cookie_checks = cookie_ranges
            cov.notes["ack_dropped"] += "; a SYN cookie's ACK: reason NO_SOCKET freed in cookie_v4/v6_check()"
            if plan.counted:
                cov.notes["ack_dropped"] = ACK_COUNTED
            else:
                cov.blind_spots.append("a SYN cookie's ACK dropped because memory ran out is reported as "
                                       "accept_queue_full: the kernel gives it the same reason and place")
    elif _function_hooks(caps, backend):
        plan.ack_dropped = _entry(caps, backend, ACK_FUNCTIONS)
        cov.hooks["ack_dropped"] = f"{plan.ack_dropped.value}:{','.join(ACK_FUNCTIONS)}"
        cov.notes["ack_dropped"] = "inferred: sk_acceptq_is_full(), the function's first test, replayed on entry"
    else:
        cov.hooks["ack_dropped"] = None
        cov.notes["ack_dropped"] = "no TCP_LISTEN_OVERFLOW drop reason in skb:kfree_skb (6.3+), no kprobes or fentry"


def _state_hook_type(caps: Capabilities) -> int | None:
    """sock:inet_sock_set_state as a BTF tracepoint (its btf_trace_* typedef id) where the kernel
    allows one and STATE_HOOK_ENV does not ask for the raw one; None: a raw tracepoint."""
    state_type = caps.btf_tracepoints.get("inet_sock_set_state")
    return state_type if state_type and os.environ.get(STATE_HOOK_ENV) != "raw" else None


def _plan_listeners(plan: HookPlan, caps: Capabilities) -> None:
    """The listener table the SYN and ACK raw tracepoints look listeners up in (bpf/listen.bpf.c)."""
    plan.state_hook_type = _state_hook_type(caps)
    plan.backlog_from_regs = "NR_LISTEN" in (caps.offsets or {})
    plan.learns_older_listeners = caps.data_ready is not None
    plan.pokes_listeners = caps.recv_length is not None
    if not plan.backlog_from_regs:
        plan.coverage.blind_spots.append("the backlog passed to listen() is unknown (no bpf_task_pt_regs(), "
                                         "Linux 5.15+); only min(backlog, somaxconn) is")


def _plan_stories(plan: HookPlan, caps: Capabilities) -> None:
    """Connections' stories: their ends at sock:inet_sock_set_state (listen.bpf.c's program where it
    runs), their retransmits at tcp:tcp_retransmit_skb/synack (4.15+)."""
    cov = plan.coverage
    if caps.retransmit_skb is None or caps.retransmit_synack is None or caps.set_state is None:
        cov.hooks["connection"] = None
        cov.notes["connection"] = "needs tracepoints sock:inet_sock_set_state, tcp:tcp_retransmit_skb (with `state`) and tcp_retransmit_synack"
        return
    plan.stories = True
    if not plan.listen_hooks:
        plan.state_hook_type = _state_hook_type(caps)
    kind = "tp_btf" if plan.state_hook_type else "raw_tracepoint"
    cov.hooks["connection"] = f"{kind}:sock:inet_sock_set_state,tracepoint:tcp:tcp_retransmit_skb,tcp_retransmit_synack"
    cov.notes["connection"] = ("each connection hurt by a drop (or a client's SYN retransmit) followed until it is "
                               "established, fails or is reset; one `connection` record when it ends")
    cov.blind_spots.append(
        "connections are followed by addresses and ports, not by netns: across a NAT the two ends are two "
        "stories, and a remote client that gives up silently is ended by rsttrace after a while (open)")


def _plan_origins(plan: HookPlan, caps: Capabilities, per_packet: bool) -> None:
    """Resets TCP did not make, and received ones that do not look like the peer's. What runs only when it
    happens (ICMP REJECTs, RSTs for no socket) always; the per-packet hooks with --origins."""
    cov = plan.coverage
    plan.origin_icmp = caps.icmp_send
    if caps.kfree_skb is not None and caps.kfree_skb.has("reason"):
        plan.origin_no_socket = caps.drop_reason("NO_SOCKET")
        plan.origin_free_hook = plan.ack_dropped is not Hook.KFREE_SKB
    packets = per_packet and caps.net_dev_queue and caps.netif_receive_skb and "OFF_SKB_SK" in caps.offsets
    plan.origin_packets = bool(packets)
    plan.origins = plan.origin_packets or plan.origin_icmp or plan.origin_no_socket is not None
    if not plan.origins:
        cov.hooks["origins"] = None
        cov.notes["origins"] = "no icmp:icmp_send, no drop reasons in skb:kfree_skb" + ("" if per_packet else
                                                                                          "; " + ORIGINS_OFF)
        return
    plan.origin_receive_hook = plan.origin_packets and plan.syn_verdicts is not Hook.NETIF_RECEIVE_SKB
    plan.tcp_v6_reply = caps.text_ranges.get(TCP_V6_REPLY) if plan.origin_packets else None
    hooks = ["net_dev_queue", "netif_receive_skb"] if plan.origin_packets else []
    if plan.origin_icmp:
        hooks.append("icmp_send")
    if plan.origin_no_socket is not None:
        hooks.append("kfree_skb")
    cov.hooks["origins"] = "raw_tracepoint:" + ",".join(hooks)
    told = ["REJECTs answering with ICMP" if plan.origin_icmp else "",
            "RSTs that find no connection" if plan.origin_no_socket is not None else ""]
    if plan.origin_packets:
        told += ["RSTs made outside TCP (netfilter REJECT) as they leave a device",
                 "received RSTs' TTL against the peer's handshake"]
    cov.notes["origins"] = "; ".join(t for t in told if t)
    if not plan.origin_packets:
        cov.notes["origins"] += "; " + (ORIGINS_OFF if not per_packet else
                                       "no net:net_dev_queue / net:netif_receive_skb, or no BTF for sk_buff: "
                                       "a REJECT's RSTs and forged RSTs are not told")
    if not plan.origin_icmp:
        cov.blind_spots.append("REJECTs that answer with ICMP are not seen: no icmp:icmp_send tracepoint "
                               "(Linux 6.12+)")
    cov.blind_spots.append("REJECTs answering IPv6 with ICMPv6, or IPv4 with net/host unreachable, are not seen "
                           "(icmpv6_send has no tracepoint; routing failures send those codes too)")
    if plan.origin_no_socket is None:
        cov.blind_spots.append("RSTs that find no connection are not seen: skb:kfree_skb has no drop reason")
    if plan.origin_packets and plan.tcp_v6_reply is None:
        cov.blind_spots.append("IPv6 RSTs without a socket cannot be told from TCP's own: "
                               "tcp_v6_send_response not in /proc/kallsyms")


def _plan_app(plan: HookPlan, caps: Capabilities) -> None:
    """The application's side: raw_syscalls:sys_exit (a BTF tracepoint where the kernel allows one,
    STATE_HOOK_ENV=raw aside), the arguments from the registers the syscall saved."""
    cov = plan.coverage
    numbers = SYSCALL_NUMBERS.get(platform.machine(), {})
    missing = (caps.app_missing or ("" if caps.app_offsets else "no kernel BTF to read the fd table with") or
               ("" if caps.raw_sys_exit else "no raw_syscalls:sys_exit tracepoint (CONFIG_FTRACE_SYSCALLS)") or
               ("" if numbers else f"syscall numbers are known on x86-64 only (this is {platform.machine()})") or
               ("" if "OFF_PT_REGS_ARG1" in caps.offsets else "kernel BTF has no saved registers of a syscall's arguments"))
    if missing:
        cov.hooks["app_errors"] = None
        cov.notes["app_errors"] = missing
        return
    plan.app_syscalls = {name: (APP_SYSCALL_IDS[name], numbers[name]) for name in APP_SYSCALLS if name in numbers}
    plan.app_offsets = dict(caps.app_offsets)
    btf_type = caps.btf_tracepoints.get("sys_exit")
    plan.app_hook_type = btf_type if btf_type and os.environ.get(STATE_HOOK_ENV) != "raw" else None
    kind = "tp_btf" if plan.app_hook_type else "raw_tracepoint"
    cov.hooks["app_errors"] = f"{kind}:raw_syscalls:sys_exit ({','.join(plan.app_syscalls)})"
    cov.notes["app_errors"] = ("failed syscalls kept per process (the last few, path or fd), attached to the RSTs it "
                               "sends or gets in the window after; each traced listener's accept() calls and SYNs")
    cov.blind_spots.append(IO_URING_BLIND_SPOT)
