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

Function hooks enter through fentry where the kernel allows BPF_PROG_TYPE_TRACING (cheaper than a
kprobe's breakpoint), through kprobes otherwise. `--backend tracepoint|kprobe|fentry` forces one
family where it can run (for tests and comparisons).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import UnsupportedKernelError
from . import bpfsys
from .capabilities import Capabilities, Coverage
from .kallsyms import COOKIE_CHECKERS, SYN_CONSUMER

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
# `RSTTRACE_STATE_HOOK=raw` keeps sock:inet_sock_set_state a raw tracepoint where a BTF one would
# run (what kernels that refuse tp_btf get): for tests and benchmarks, not for users.
STATE_HOOK_ENV = "RSTTRACE_STATE_HOOK"


@dataclass
class HookPlan:
    files: list[str] = field(default_factory=list)
    macros: list[str] = field(default_factory=list)
    coverage: Coverage = field(default_factory=Coverage)
    # BTF tracepoint programs (tp_btf__<name>, bpf/common.bpf.c STATE_HOOK_PROBE) → the btf_trace_*
    # typedef id the loader loads each for (bcc has no tp_btf: tracer/kernel/loader.py loads them)
    btf_types: dict[str, int] = field(default_factory=dict)
    # Listen-queue verdicts from the kernel's own per-CPU counters (bpf/netstat.bpf.c)
    counted: bool = False


def plan_hooks(caps: Capabilities, backend: str = "auto") -> HookPlan:
    if backend == "kprobe" and not caps.kprobes:
        raise UnsupportedKernelError("--backend kprobe: this kernel has no kprobes",
                                     "use --backend auto (see `rsttrace doctor`)")
    if backend == "fentry" and not caps.fentry:
        raise UnsupportedKernelError("--backend fentry: this kernel refuses fentry programs",
                                     "use --backend auto (see `rsttrace doctor`)")
    plan = HookPlan(files=["rst.bpf.c"])
    cov = plan.coverage
    # Function hooks, per group: fentry where it attaches (auto/fentry), kprobes otherwise.
    def entry(functions: tuple[str, ...], macro: str) -> str:
        if backend in ("auto", "fentry") and all(f in caps.fentry_functions for f in functions
                                                 if f in caps.functions):
            plan.macros.append(macro)
            return "fentry"
        if backend == "fentry":
            raise UnsupportedKernelError(f"--backend fentry: fentry cannot attach to {', '.join(functions)}",
                                         "use --backend auto (see `rsttrace doctor`)")
        return "kprobe"
    use_kprobes = (caps.fentry or caps.kprobes) and backend != "tracepoint"
    kprobe_file = False

    # -- RSTs sent -----------------------------------------------------------------------------
    if caps.rst_reason and backend not in ("kprobe", "fentry"):
        cov.hooks["rst_sent"] = "tracepoint:tcp:tcp_send_reset"
        cov.notes["rst_sent"] = "kernel reason from the tracepoint"
    elif use_kprobes:
        fn = entry(("tcp_send_active_reset", "tcp_v4_send_reset", "tcp_v6_send_reset"), "-DFENTRY_RST")
        cov.hooks["rst_sent"] = f"{fn}:tcp_send_active_reset,tcp_v4_send_reset,tcp_v6_send_reset"
        cov.notes["rst_sent"] = "reason inferred from the kernel callers and the socket's state"
        plan.macros += ["-DRST_SENT_BY_KPROBE", "-DKPROBE_RST"]
        kprobe_file = True
    elif caps.send_reset is not None:
        cov.hooks["rst_sent"] = "tracepoint:tcp:tcp_send_reset"
        cov.notes["rst_sent"] = "no kernel reason on this kernel: reason inferred from callers and socket state"
        cov.blind_spots.append("RSTs sent with no socket (closed port) do not reach tcp_send_reset before 6.10")
    else:
        cov.hooks["rst_sent"] = None
        cov.notes["rst_sent"] = "neither tcp:tcp_send_reset nor kprobes"

    # -- RSTs received ---------------------------------------------------------------------------
    if caps.receive_reset is not None:
        cov.hooks["rst_received"] = "tracepoint:tcp:tcp_receive_reset"
        cov.notes["rst_received"] = ""
    else:
        cov.hooks["rst_received"] = None
        cov.notes["rst_received"] = "tracepoint tcp:tcp_receive_reset missing"

    # -- listen queue ----------------------------------------------------------------------------
    listen_tp = caps.listen_hooks
    if use_kprobes:
        fn = entry(("tcp_conn_request",), "-DFENTRY_SYN")
        cov.hooks["syn_dropped"] = cov.hooks["syn_cookie"] = f"{fn}:tcp_conn_request"
        cov.notes["syn_dropped"] = cov.notes["syn_cookie"] = (
            "inferred at the decision point: tcp_conn_request()'s tests replayed on the queues it is about to read")
        plan.macros.append("-DKPROBE_LISTEN_SYN")
        kprobe_file = True
    elif listen_tp and caps.syn_after_decision and os.environ.get(SYN_HOOK_ENV) != "netif_receive_skb":
        cov.hooks["syn_dropped"] = cov.hooks["syn_cookie"] = "raw_tracepoint:skb:consume_skb"
        lo, hi = caps.text_ranges[SYN_CONSUMER]
        plan.macros += ["-DLISTEN_SYN_CONSUMED", f"-DSYN_CONSUMER_LO={lo:#x}ULL", f"-DSYN_CONSUMER_HI={hi:#x}ULL"]
        if caps.counted_verdicts and os.environ.get(SYN_VERDICTS_ENV) != "inferred":
            cov.notes["syn_dropped"] = cov.notes["syn_cookie"] = SYN_COUNTED
            plan.counted = True
            cov.blind_spots.append(
                "ListenDrops alone at a SYN (no overflow, no full SYN queue) is this SYN only where tcp_max_syn_backlog's "
                "reserve explains it (syncookies off); else it is counted as `unexplained` in the reconciliation: an ICMP "
                "error that removed a half-open connection counts the same. A CPU whose per-CPU offset could not be found "
                "has its SYN verdicts inferred (inferred: true)")
        else:
            cov.notes["syn_dropped"] = cov.notes["syn_cookie"] = SYN_DECIDED
            cov.blind_spots.append(
                "SYNs at a queue's edge: whether a SYN that found the SYN queue one short of its limit took the last "
                "place is told from the queue length at the listener's previous SYN, less the connections completed "
                "since; a SYN that added no request while the accept queue is one short of full is taken to have met "
                "it full (an accept() in between). A request that expired unanswered, or a connection completed from "
                "a SYN cookie, in between can make one such SYN be reported the wrong way")
            if not caps.counted_verdicts:
                cov.blind_spots.append("the kernel's own listen counters cannot be read per CPU here: "
                                       + (caps.netstat_missing or "no BPF_PROG_TEST_RUN on a chosen CPU"))
    elif listen_tp:
        cov.hooks["syn_dropped"] = cov.hooks["syn_cookie"] = "raw_tracepoint:net:netif_receive_skb"
        cov.notes["syn_dropped"] = cov.notes["syn_cookie"] = SYN_INFERRED
        plan.macros.append("-DLISTEN_SYN_TRACEPOINT")
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
        for kind in ("syn_dropped", "syn_cookie"):
            cov.hooks[kind] = None
            cov.notes[kind] = "needs kprobes, or sock:inet_sock_set_state + net:netif_receive_skb raw tracepoints"

    if listen_tp and caps.listen_overflow_reason is not None and backend not in ("kprobe", "fentry"):
        cov.hooks["ack_dropped"] = "raw_tracepoint:skb:kfree_skb"
        cov.notes["ack_dropped"] = "kernel drop reason TCP_LISTEN_OVERFLOW"
        plan.macros.append(f"-DLISTEN_OVERFLOW_REASON={caps.listen_overflow_reason}")
        cookie_ranges = [caps.text_ranges[f] for f in COOKIE_CHECKERS if f in caps.text_ranges]
        if caps.no_socket_reason is not None and cookie_ranges:
            # A SYN cookie's ACK that meets a full accept queue is dropped by cookie_v4/v6_check() with
            # reason NO_SOCKET: told from the other NO_SOCKET drops by where it was freed.
            cov.notes["ack_dropped"] += "; a SYN cookie's ACK: reason NO_SOCKET freed in cookie_v4/v6_check()"
            if plan.counted:
                cov.notes["ack_dropped"] = ACK_COUNTED
            else:
                cov.blind_spots.append("a SYN cookie's ACK dropped because memory ran out is reported as "
                                       "accept_queue_full: the kernel gives it the same reason and place")
            plan.macros.append(f"-DCOOKIE_NO_SOCKET_REASON={caps.no_socket_reason}")
            for i, (lo, hi) in enumerate(cookie_ranges):
                plan.macros += [f"-DCOOKIE_CHECK{i}_LO={lo:#x}ULL", f"-DCOOKIE_CHECK{i}_HI={hi:#x}ULL"]
    elif use_kprobes:
        fn = entry(("tcp_v4_syn_recv_sock", "tcp_v6_syn_recv_sock"), "-DFENTRY_ACK")
        cov.hooks["ack_dropped"] = f"{fn}:tcp_v4_syn_recv_sock,tcp_v6_syn_recv_sock"
        cov.notes["ack_dropped"] = "inferred: sk_acceptq_is_full(), the function's first test, replayed on entry"
        plan.macros.append("-DKPROBE_LISTEN_ACK")
        kprobe_file = True
    else:
        cov.hooks["ack_dropped"] = None
        cov.notes["ack_dropped"] = "no TCP_LISTEN_OVERFLOW drop reason in skb:kfree_skb (6.3+), no kprobes or fentry"

    if listen_tp and ({"-DLISTEN_SYN_TRACEPOINT", "-DLISTEN_SYN_CONSUMED"} & set(plan.macros) or any(m.startswith("-DLISTEN_OVERFLOW_REASON")
                                                                      for m in plan.macros)):
        if plan.counted:
            plan.files.append("netstat.bpf.c")
            plan.macros += ["-DNETSTAT_PERCPU", f"-DNETSTAT_CPUS={bpfsys.possible_cpus()}"]
            plan.macros += [f"-D{name}={value}" for name, value in sorted(caps.netstat.items())]
        plan.files.append("listen.bpf.c")
        plan.macros.append("-DCONNECT_OWNERS")
        state_type = caps.btf_tracepoints.get("inet_sock_set_state")
        if state_type and os.environ.get(STATE_HOOK_ENV) != "raw":
            plan.macros.append("-DSTATE_HOOK_BTF")
            plan.btf_types["tp_btf__inet_sock_set_state"] = state_type
        if "OFF_PT_REGS_ARG2" in (caps.offsets or {}):
            plan.macros.append("-DLISTEN_BACKLOG_FROM_REGS")
        if caps.data_ready is not None:
            plan.macros.append("-DHAVE_SK_DATA_READY")
        if caps.recv_length is not None:
            plan.macros.append("-DHAVE_SOCK_RECV_LENGTH")
    if kprobe_file:
        plan.files.append("kprobe.bpf.c")
        if caps.has_function("tcp_v6_send_reset"):
            plan.macros.append("-DHAVE_IPV6_RESET")
    if caps.synq_full_gt:
        plan.macros.append("-DSYNQ_FULL_GT")
    if "-DLISTEN_BACKLOG_FROM_REGS" not in plan.macros and "listen.bpf.c" in plan.files:
        cov.blind_spots.append("the backlog passed to listen() is unknown (no bpf_task_pt_regs(), Linux 5.15+); "
                               "only min(backlog, somaxconn) is")
    if not caps.softirq_ranges:
        cov.blind_spots.append("softirq context cannot be detected: process attribution falls back to socket owners")
    return plan
