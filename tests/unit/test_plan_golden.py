"""The hook plan, rendered to the compiler's flags, for each kernel and backend: the exact cflags, hook
files and coverage recorded in tests/data/golden/cflags/ (a kernel that gets other flags gets other
programs). RSTTRACE_UPDATE_GOLDEN=1 rewrites the recordings — after a change meant to change them.

The kernels are written out here, not probed: this machine's 6.18 (tracepoints only: no kprobes, no
fentry), Debian 12's 6.1 (kprobes and fentry; tcp_v*_syn_recv_sock refuse a trampoline), and variants
that reach the planner's other branches."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import replace

import pytest

from tests_paths import DATA
from tracer.errors import UnsupportedKernelError
from tracer.kernel import bpfsys, loader
from tracer.kernel.capabilities import Capabilities
from tracer.kernel.hooks import BACKENDS, STATE_HOOK_ENV, SYN_HOOK_ENV, SYN_VERDICTS_ENV, plan_hooks
from tracer.kernel.tracefs import TracepointFormat, parse_format

GOLDEN = DATA / "golden" / "cflags"
UPDATE = os.environ.get("RSTTRACE_UPDATE_GOLDEN") == "1"
FILTERS = loader.Filters(ports=[8100, 8443], pid=4242, family=socket.AF_INET6, netns=[4026532301])
POSSIBLE_CPUS = 4
PAGE_SIZE = 4096

FUNCTIONS = {"tcp_send_active_reset", "tcp_v4_send_reset", "tcp_v6_send_reset", "tcp_conn_request",
             "tcp_v4_syn_recv_sock", "tcp_v6_syn_recv_sock"}
# BTF offsets as this machine's 6.18 has them (the loader passes each as -D<name>=<value>)
OFFSETS = {
    "OFF_SOCK_NET": 48, "OFF_SOCK_STATE": 18, "OFF_SOCK_FLAGS": 96, "OFF_SOCK_SOCKET": 288, "OFF_SOCK_LINGERTIME": 576,
    "OFF_NET_NS_INUM": 176, "OFF_SKB_DEV": 16, "OFF_SKB_HEAD": 192, "OFF_SKB_TRANSPORT_HEADER": 178,
    "OFF_NETDEV_NET": 264, "OFF_SKB_REFDST": 88, "OFF_DST_DEV": 0, "OFF_SOCKET_ALLOC_INODE": 128, "OFF_INODE_INO": 64,
    "OFF_TCP_RCV_NXT": 1664, "OFF_TCP_COPIED_SEQ": 1464, "OFF_SOCK_NUM": 14, "OFF_SOCK_ACK_BACKLOG": 600,
    "OFF_SOCK_MAX_ACK_BACKLOG": 604, "OFF_ICSK_SYN_QLEN": 1024, "OFF_NET_SOMAXCONN": 472,
    "OFF_NET_MAX_SYN_BACKLOG": 1440, "OFF_NET_SYNCOOKIES": 1343, "OFF_NET_ABORT_ON_OVERFLOW": 1378,
    "OFF_SKB_NETWORK_HEADER": 180, "OFF_SOCK_FAMILY": 16, "OFF_SOCK_DPORT": 12, "OFF_SOCK_RCV_SADDR": 4,
    "OFF_SOCK_DADDR": 0, "OFF_SOCK_V6_RCV_SADDR": 72, "OFF_SOCK_V6_DADDR": 56, "OFF_INET_SPORT": 814,
    "OFF_SOCK_PROTOCOL": 532, "SOCK_LINGER_BIT": 4, "OFF_PT_REGS_SYSCALL_NR": 120, "OFF_PT_REGS_ARG1": 112,
    "OFF_PT_REGS_ARG2": 104, "NR_LISTEN": 50, "OFF_SKB_SK": 24, "OFF_SKB_IIF": 144, "OFF_SKB_DATA": 200,
}
NETSTAT = {
    "OFF_TASK_SE_CFS_RQ": 296, "OFF_NET_MIB_NET_STATISTICS": 528, "OFF_NET_COOKIE": 4096, "OFF_SOCK_DROPS": 136,
    "OFF_CFS_RQ_RQ": 312, "MIB_SYNCOOKIESSENT": 1, "MIB_LISTENOVERFLOWS": 23, "MIB_LISTENDROPS": 24,
    "MIB_TCPREQQFULLDOCOOKIES": 78, "MIB_TCPREQQFULLDROP": 79, "PERCPU_RUNQUEUES": 195456,
    "PERCPU_THIS_CPU_OFF": 86056, "PERCPU_CPU_NUMBER": 86068,
}
# bpf/app.bpf.c's offsets as this machine's 6.18 has them
APP = {
    "OFF_TASK_FILES": 1824, "OFF_FILES_FDT": 32, "OFF_FDTABLE_MAX_FDS": 0, "OFF_FDTABLE_FD": 8,
    "OFF_FDTABLE_OPEN_FDS": 24, "OFF_FILE_PRIVATE_DATA": 24, "OFF_SOCKET_FILE": 16, "OFF_SOCKET_SK": 24,
    "OFF_TASK_SIGNAL": 1848, "OFF_SIGNAL_RLIM": 688, "OFF_TASK_NSPROXY": 1840, "OFF_NSPROXY_NET_NS": 40,
}


def tracepoint(category: str, name: str, *fields: str) -> TracepointFormat:
    return TracepointFormat(category, name, fields=dict.fromkeys(fields, "int"))


def recorded(category: str, name: str) -> TracepointFormat:
    return parse_format(category, name, (DATA / f"{name}-6.18.format").read_text())


def kernel_6_18() -> Capabilities:
    """This machine: tracepoints, raw tracepoints and tp_btf; no kprobes (not built), fentry refused."""
    return Capabilities(
        kernel="6.18.44-fc-v1252", euid=0, effective_caps=(1 << 41) - 1, btf=True, tracefs="/sys/kernel/tracing",
        send_reset=recorded("tcp", "tcp_send_reset"), receive_reset=recorded("tcp", "tcp_receive_reset"),
        set_state=tracepoint("sock", "inet_sock_set_state", "skaddr", "oldstate", "newstate", "sport", "dport",
                             "family", "protocol", "saddr", "daddr", "saddr_v6", "daddr_v6"),
        data_ready=tracepoint("sock", "sk_data_ready", "skaddr", "family", "protocol", "ip"),
        recv_length=tracepoint("sock", "sock_recv_length", "sk", "family", "protocol", "ret", "flags"),
        kfree_skb=recorded("skb", "kfree_skb"), netif_receive_skb=True, net_dev_queue=True, icmp_send=True,
        consume_skb=tracepoint("skb", "consume_skb", "skbaddr", "location"),
        text_ranges={"tcp_rcv_state_process": (0xffffffff82075ec0, 0xffffffff82077470),
                     "cookie_v4_check": (0xffffffff820da800, 0xffffffff820daf80),
                     "cookie_v6_check": (0xffffffff82180910, 0xffffffff82180fe0),
                     "tcp_v6_send_response": (0xffffffff8216cbb0, 0xffffffff8216d550)},
        prog_load={"tracepoint": 0, "raw_tracepoint": 0, "kprobe": 0, "tc": 0, "fentry": 1},
        kprobe_pmu=False, ringbuf=True, offsets=dict(OFFSETS), netstat=dict(NETSTAT), test_run_on_cpu=True,
        softirq_ranges={"handle_softirqs": (0xffffffff810b1840, 0xffffffff810b1ad0)}, lockdown="integrity",
        bcc_version="0.26.0", kernel_version=(6, 18, 44), functions=set(FUNCTIONS), fentry_functions=set(),
        btf_tracepoints={"inet_sock_set_state": 38149, "sys_exit": 11321}, app_offsets=dict(APP), raw_sys_exit=True)


def kernel_6_1(sublevel: int = 192) -> Capabilities:
    """Debian 12's 6.1: kprobes and fentry, but tcp_v4/v6_syn_recv_sock refuse a trampoline; no reason
    in tcp:tcp_send_reset, no rx_sk in skb:kfree_skb, no location in skb:consume_skb, no
    sock:sk_data_ready or sock:sock_recv_length."""
    return Capabilities(
        kernel="6.1.0-57-amd64", euid=0, effective_caps=(1 << 41) - 1, btf=True, tracefs="/sys/kernel/tracing",
        send_reset=tracepoint("tcp", "tcp_send_reset", "skbaddr", "skaddr", "state", "sport", "dport", "family",
                              "saddr", "daddr", "saddr_v6", "daddr_v6"),
        receive_reset=tracepoint("tcp", "tcp_receive_reset", "skaddr", "sport", "dport", "family", "saddr", "daddr",
                                 "saddr_v6", "daddr_v6", "sock_cookie"),
        set_state=tracepoint("sock", "inet_sock_set_state", "skaddr", "oldstate", "newstate", "sport", "dport",
                             "family", "protocol", "saddr", "daddr", "saddr_v6", "daddr_v6"),
        kfree_skb=tracepoint("skb", "kfree_skb", "skbaddr", "location", "protocol", "reason"), netif_receive_skb=True,
        net_dev_queue=True,
        consume_skb=tracepoint("skb", "consume_skb", "skbaddr"),
        text_ranges={"tcp_rcv_state_process": (0xffffffff81a1c2a0, 0xffffffff81a1d8f0),
                     "cookie_v4_check": (0xffffffff81a3b110, 0xffffffff81a3b7c0),
                     "cookie_v6_check": (0xffffffff81b0e4d0, 0xffffffff81b0eb50)},
        prog_load={"tracepoint": 0, "raw_tracepoint": 0, "kprobe": 0, "tc": 0, "fentry": 0},
        kprobe_pmu=True, ringbuf=True, offsets=dict(OFFSETS), netstat=dict(NETSTAT), test_run_on_cpu=True,
        softirq_ranges={"__do_softirq": (0xffffffff82000000, 0xffffffff820002e5)}, lockdown="none",
        bcc_version="0.26.0", kernel_version=(6, 1, sublevel), functions=set(FUNCTIONS),
        fentry_functions=FUNCTIONS - {"tcp_v4_syn_recv_sock", "tcp_v6_syn_recv_sock"},
        btf_tracepoints={"inet_sock_set_state": 41211, "sys_exit": 10204}, app_offsets=dict(APP), raw_sys_exit=True)


def uncounted_6_18() -> Capabilities:
    """6.18 where no program can be run on a chosen CPU: verdicts told from the queues."""
    return replace(kernel_6_18(), test_run_on_cpu=False)


def sparse_6_18() -> Capabilities:
    """6.18 with kernel symbols hidden, no syscall registers in BTF, no sock:sock_recv_length, only IPv4's
    cookie check and no tp_btf."""
    caps = replace(kernel_6_18(), softirq_ranges={}, recv_length=None, btf_tracepoints={},
                   offsets={k: v for k, v in OFFSETS.items() if not k.startswith("OFF_PT_REGS") and k != "NR_LISTEN"})
    caps.text_ranges = {k: v for k, v in caps.text_ranges.items() if k != "cookie_v6_check"}
    return caps


def no_data_ready_6_18() -> Capabilities:
    """6.18 with neither sock:sk_data_ready nor sock:sock_recv_length."""
    return replace(sparse_6_18(), data_ready=None)


def no_raw_tracepoints_6_18() -> Capabilities:
    """6.18 refusing raw tracepoint programs: only the reset tracepoints."""
    return replace(kernel_6_18(), prog_load={"tracepoint": 0, "raw_tracepoint": 1, "kprobe": 0, "tc": 0, "fentry": 1})


def kprobes_only_6_1() -> Capabilities:
    """6.1 refusing fentry programs: kprobes for every function hook."""
    return replace(kernel_6_1(), prog_load={"tracepoint": 0, "raw_tracepoint": 0, "kprobe": 0, "tc": 0, "fentry": 1},
                   fentry_functions=set(), btf_tracepoints={})


def tracepoints_only_5_4() -> Capabilities:
    """An old kernel without BTF tracepoints, kprobes, or the listen hooks' raw tracepoints."""
    return replace(kernel_6_1(), kernel="5.4.0", kernel_version=(5, 4, 100), kprobe_pmu=False, set_state=None,
                   netif_receive_skb=False, text_ranges={}, btf_tracepoints={}, fentry_functions=set(),
                   prog_load={"tracepoint": 0, "raw_tracepoint": 0, "kprobe": 1, "tc": 0, "fentry": 1})


KERNELS = {"6.18": kernel_6_18, "6.1": kernel_6_1, "6.1.100": lambda: kernel_6_1(100),
           "6.18-uncounted": uncounted_6_18, "6.18-sparse": sparse_6_18, "6.18-no-data-ready": no_data_ready_6_18,
           "6.18-no-raw-tp": no_raw_tracepoints_6_18, "6.1-kprobes-only": kprobes_only_6_1,
           "5.4-tracepoints-only": tracepoints_only_5_4}
VARIANTS = {"syn-verdicts-inferred": {SYN_VERDICTS_ENV: "inferred"}, "syn-hook-netif": {SYN_HOOK_ENV: "netif_receive_skb"},
            "state-hook-raw": {STATE_HOOK_ENV: "raw"}}


APP_ERRORS = "app-errors"
ORIGINS = "origins"


def cases() -> dict[str, tuple[str, str, dict[str, str]]]:
    """name → (kernel, backend, environment)"""
    out = {}
    for kernel in ("6.18", "6.1"):
        for backend in BACKENDS:
            out[f"{kernel}-{backend}"] = (kernel, backend, {})
        for backend in ("auto", "tracepoint"):
            for variant, env in VARIANTS.items():
                out[f"{kernel}-{backend}-{variant}"] = (kernel, backend, env)
    out["6.18-auto-syn-hook-netif-state-hook-raw"] = ("6.18", "auto", {**VARIANTS["syn-hook-netif"],
                                                                       **VARIANTS["state-hook-raw"]})
    out["6.1.100-auto"] = ("6.1.100", "auto", {})
    out["6.18-uncounted-auto"] = ("6.18-uncounted", "auto", {})
    for kernel in ("6.18-sparse", "6.18-no-data-ready"):
        out[f"{kernel}-auto"] = (kernel, "auto", {})
        out[f"{kernel}-auto-syn-hook-netif"] = (kernel, "auto", VARIANTS["syn-hook-netif"])
    out["6.18-no-raw-tp-auto"] = ("6.18-no-raw-tp", "auto", {})
    for backend in BACKENDS:
        out[f"6.1-kprobes-only-{backend}"] = ("6.1-kprobes-only", backend, {})
    out["5.4-tracepoints-only-auto"] = ("5.4-tracepoints-only", "auto", {})
    # --app-errors (off by default): where the kernel has what it needs, and where it does not
    for kernel, backend in (("6.18", "auto"), ("6.1", "auto"), ("6.1", "kprobe"), ("6.18-sparse", "auto"),
                            ("5.4-tracepoints-only", "auto")):
        out[f"{kernel}-{backend}-{APP_ERRORS}"] = (kernel, backend, {})
    # --origins (off by default): the per-packet hooks, beside listen.bpf.c's own on the same tracepoints or not
    for kernel, backend, env in (("6.18", "auto", {}), ("6.18", "auto", VARIANTS["syn-hook-netif"]),
                                 ("6.1", "auto", {}), ("6.1", "tracepoint", VARIANTS["syn-hook-netif"]),
                                 ("5.4-tracepoints-only", "auto", {})):
        variant = "-syn-hook-netif" if env else ""
        out[f"{kernel}-{backend}{variant}-{ORIGINS}"] = (kernel, backend, env)
    return out


CASES = cases()


def render(name: str, monkeypatch) -> dict:
    kernel, backend, env = CASES[name]
    for var in (SYN_VERDICTS_ENV, SYN_HOOK_ENV, STATE_HOOK_ENV):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    # What would differ between hosts of the same kernel: CPUs, page size, where the checkout lives
    monkeypatch.setattr(bpfsys, "possible_cpus", lambda: POSSIBLE_CPUS)
    monkeypatch.setattr(loader, "ring_pages", lambda ring_mb: (ring_mb << 20) // PAGE_SIZE)
    caps = KERNELS[kernel]()
    out: dict = {"kernel": kernel, "backend": backend, "env": env}
    try:
        plan = plan_hooks(caps, backend, app_errors=name.endswith(APP_ERRORS), origins=name.endswith(ORIGINS))
    except UnsupportedKernelError as err:
        return {**out, "error": err.one_line()}
    cflags = loader.build_cflags(caps, FILTERS, caps.offsets, plan)
    bpf_dir = f"-I{loader.BPF_DIR}"
    assert cflags[0] == bpf_dir
    return {**out, "files": list(plan.files), "cflags": ["-I<bpf>", *cflags[1:]], "btf_types": dict(plan.btf_types),
            "counted": plan.counted, "coverage": plan.coverage.as_dict()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_plan_renders_the_recorded_cflags(name, monkeypatch):
    got = render(name, monkeypatch)
    text = json.dumps(got, indent=1, ensure_ascii=False) + "\n"
    path = GOLDEN / f"{name}.json"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no recording for {name}: RSTTRACE_UPDATE_GOLDEN=1 makes it"
    assert json.loads(path.read_text()) == got
    assert path.read_text() == text        # the order of flags and coverage entries too


def test_every_recording_is_a_case():
    assert sorted(p.stem for p in GOLDEN.glob("*.json")) == sorted(CASES)
