"""Every kernel struct field rsttrace's BPF programs read, resolved from BTF into OFF_* macros."""
from __future__ import annotations

import platform

from .btf import BTFError, KernelBTF

# (macro, struct, member path) — every kernel field the programs read.
OFFSETS = (
    ("OFF_SOCK_NET", "sock", "__sk_common.skc_net"),
    ("OFF_SOCK_STATE", "sock", "__sk_common.skc_state"),
    ("OFF_SOCK_FLAGS", "sock", "__sk_common.skc_flags"),
    ("OFF_SOCK_SOCKET", "sock", "sk_socket"),
    ("OFF_SOCK_LINGERTIME", "sock", "sk_lingertime"),
    ("OFF_NET_NS_INUM", "net", "ns.inum"),
    ("OFF_SKB_DEV", "sk_buff", "dev"),
    ("OFF_SKB_HEAD", "sk_buff", "head"),
    ("OFF_SKB_TRANSPORT_HEADER", "sk_buff", "transport_header"),
    ("OFF_NETDEV_NET", "net_device", "nd_net"),
    ("OFF_SKB_REFDST", "sk_buff", "_skb_refdst"),
    ("OFF_DST_DEV", "dst_entry", "dev"),
    ("OFF_SOCKET_ALLOC_INODE", "socket_alloc", "vfs_inode"),
    ("OFF_INODE_INO", "inode", "i_ino"),
    ("OFF_TCP_RCV_NXT", "tcp_sock", "rcv_nxt"),
    ("OFF_TCP_COPIED_SEQ", "tcp_sock", "copied_seq"),
    ("OFF_SOCK_NUM", "sock", "__sk_common.skc_num"),
    ("OFF_SOCK_ACK_BACKLOG", "sock", "sk_ack_backlog"),
    ("OFF_SOCK_MAX_ACK_BACKLOG", "sock", "sk_max_ack_backlog"),
    ("OFF_ICSK_SYN_QLEN", "inet_connection_sock", "icsk_accept_queue.qlen"),
    ("OFF_NET_SOMAXCONN", "net", "core.sysctl_somaxconn"),
    ("OFF_NET_MAX_SYN_BACKLOG", "net", "ipv4.sysctl_max_syn_backlog"),
    ("OFF_NET_SYNCOOKIES", "net", "ipv4.sysctl_tcp_syncookies"),
    ("OFF_NET_ABORT_ON_OVERFLOW", "net", "ipv4.sysctl_tcp_abort_on_overflow"),
    ("OFF_SKB_NETWORK_HEADER", "sk_buff", "network_header"),
    ("OFF_SOCK_FAMILY", "sock", "__sk_common.skc_family"),
    ("OFF_SOCK_DPORT", "sock", "__sk_common.skc_dport"),
    ("OFF_SOCK_RCV_SADDR", "sock", "__sk_common.skc_rcv_saddr"),
    ("OFF_SOCK_DADDR", "sock", "__sk_common.skc_daddr"),
    ("OFF_SOCK_V6_RCV_SADDR", "sock", "__sk_common.skc_v6_rcv_saddr"),
    ("OFF_SOCK_V6_DADDR", "sock", "__sk_common.skc_v6_daddr"),
    ("OFF_INET_SPORT", "inet_sock", "inet_sport"),
    ("OFF_SOCK_PROTOCOL", "sock", "sk_protocol"),
    ("OFF_SOCK_ERR", "sock", "sk_err"),
    ("OFF_SKB_SK", "sk_buff", "sk"),
    ("OFF_SKB_IIF", "sk_buff", "skb_iif"),
    ("OFF_SKB_DATA", "sk_buff", "data"),
)

# Fields read with a fixed width in the C code: a kernel that changed their type must be refused,
# not read wrongly.
SIZES = {"OFF_SOCK_ACK_BACKLOG": 4, "OFF_SOCK_MAX_ACK_BACKLOG": 4, "OFF_ICSK_SYN_QLEN": 4, "OFF_NET_SOMAXCONN": 4,
         "OFF_NET_MAX_SYN_BACKLOG": 4, "OFF_NET_SYNCOOKIES": 1, "OFF_NET_ABORT_ON_OVERFLOW": 1, "OFF_SOCK_NUM": 2,
         "OFF_SKB_NETWORK_HEADER": 2, "OFF_SKB_TRANSPORT_HEADER": 2, "OFF_SOCK_FAMILY": 2, "OFF_SOCK_DPORT": 2, "OFF_INET_SPORT": 2, "OFF_TCP_RCV_NXT": 4, "OFF_TCP_COPIED_SEQ": 4,
         "OFF_SOCK_PROTOCOL": 2, "OFF_SOCK_ERR": 4, "OFF_SKB_IIF": 4}     # sk_protocol: a u16 since Linux 5.6 (a bitfield before)


def resolve_offsets(btf: KernelBTF) -> dict[str, int]:
    macros = {}
    for macro, struct, path in OFFSETS:
        member = btf.member(struct, path)
        want = SIZES.get(macro)
        if want is not None and member.size != want:
            raise BTFError(f"{struct}.{path} is {member.size} bytes on this kernel, rsttrace reads {want}")
        macros[macro] = member.offset
    macros["SOCK_LINGER_BIT"] = btf.enum("sock_flags")["SOCK_LINGER"]
    macros.update(syscall_register_offsets(btf))
    return macros


# The numbers, per machine, of the syscalls rsttrace reads: listen() (listen.bpf.c, inside it) and
# those --app-errors keeps (bpf/app.bpf.c at their exit: tracer/kernel/hooks.py APP_SYSCALLS).
SYSCALL_NUMBERS = {"x86_64": {
    "open": 2, "openat": 257, "openat2": 437, "creat": 85, "mkdir": 83, "mkdirat": 258, "rename": 82,
    "renameat": 264, "renameat2": 316, "unlink": 87, "unlinkat": 263, "write": 1, "pwrite64": 18, "writev": 20,
    "fsync": 74, "connect": 42, "accept": 43, "accept4": 288, "socket": 41, "sendfile64": 40, "splice": 275,
    "listen": 50,
}}
# The saved user registers holding a syscall's number, 1st and 2nd argument, per machine.
SYSCALL_REGISTERS = {"x86_64": ("orig_ax", "di", "si")}


def syscall_register_offsets(btf: KernelBTF) -> dict[str, int]:
    """Where a syscall's number and first two arguments sit in its saved user registers (struct
    pt_regs): what bpf/app.bpf.c reads at a syscall's exit (the tracepoint passes the registers), and
    listen.bpf.c inside listen() at the LISTEN state change, through bpf_task_pt_regs() (Linux
    5.15+): NR_LISTEN only where that helper exists, else the backlog is a blind spot. Empty where
    this machine's layout is unknown."""
    machine = platform.machine()
    if machine not in SYSCALL_REGISTERS:
        return {}
    try:
        nr_reg, arg1_reg, arg2_reg = SYSCALL_REGISTERS[machine]
        macros = {"OFF_PT_REGS_SYSCALL_NR": btf.member("pt_regs", nr_reg).offset,
                  "OFF_PT_REGS_ARG1": btf.member("pt_regs", arg1_reg).offset,
                  "OFF_PT_REGS_ARG2": btf.member("pt_regs", arg2_reg).offset}
        if "BPF_FUNC_task_pt_regs" in btf.enum("bpf_func_id"):
            macros["NR_LISTEN"] = SYSCALL_NUMBERS[machine]["listen"]
        return macros
    except BTFError:
        return {}


# What bpf/app.bpf.c reads besides the syscall's registers (syscall_register_offsets): the fd table
# down to a listening socket, RLIMIT_NOFILE, the task's netns.
APP_OFFSETS = (
    ("OFF_TASK_FILES", "task_struct", "files"),
    ("OFF_FILES_FDT", "files_struct", "fdt"),
    ("OFF_FDTABLE_MAX_FDS", "fdtable", "max_fds"),
    ("OFF_FDTABLE_FD", "fdtable", "fd"),
    ("OFF_FDTABLE_OPEN_FDS", "fdtable", "open_fds"),
    ("OFF_FILE_PRIVATE_DATA", "file", "private_data"),
    ("OFF_SOCKET_FILE", "socket", "file"),
    ("OFF_SOCKET_SK", "socket", "sk"),
    ("OFF_TASK_SIGNAL", "task_struct", "signal"),
    ("OFF_SIGNAL_RLIM", "signal_struct", "rlim"),
    ("OFF_TASK_NSPROXY", "task_struct", "nsproxy"),
    ("OFF_NSPROXY_NET_NS", "nsproxy", "net_ns"),
)


def app_offsets(btf: KernelBTF) -> tuple[dict[str, int], str]:
    """bpf/app.bpf.c's offsets, and ""; or {} and what is missing."""
    macros = {}
    try:
        for macro, struct, path in APP_OFFSETS:
            macros[macro] = btf.member(struct, path).offset
        if btf.member("fdtable", "max_fds").size != 4:
            return {}, "fdtable.max_fds is not 4 bytes on this kernel"
    except BTFError as err:
        return {}, f"kernel BTF lacks what it needs: {err}"
    return macros, ""


# The kernel's listen-queue counters, read per CPU by bpf/netstat.bpf.c: (macro, LINUX_MIB_* name).
NETSTAT_COUNTERS = (
    ("MIB_SYNCOOKIESSENT", "LINUX_MIB_SYNCOOKIESSENT"),
    ("MIB_LISTENOVERFLOWS", "LINUX_MIB_LISTENOVERFLOWS"),
    ("MIB_LISTENDROPS", "LINUX_MIB_LISTENDROPS"),
    ("MIB_TCPREQQFULLDOCOOKIES", "LINUX_MIB_TCPREQQFULLDOCOOKIES"),
    ("MIB_TCPREQQFULLDROP", "LINUX_MIB_TCPREQQFULLDROP"),
)
# Per-CPU variables that lead from a CPU's runqueue to its per-CPU offset (x86-64: this_cpu_off holds
# __per_cpu_offset[cpu]; cpu_number checks the way there).
PERCPU_VARIABLES = (("PERCPU_RUNQUEUES", "runqueues"), ("PERCPU_THIS_CPU_OFF", "this_cpu_off"),
                    ("PERCPU_CPU_NUMBER", "cpu_number"))


def netstat_offsets(btf: KernelBTF) -> tuple[dict[str, int], str]:
    """What bpf/netstat.bpf.c needs to read a netns's SNMP counters on the CPU it runs on, and ""; or
    {} and what is missing. x86-64 only: elsewhere no per-CPU variable holds the CPU's offset."""
    if platform.machine() != "x86_64":
        return {}, f"per-CPU counters are read on x86-64 only (this is {platform.machine()})"
    try:
        macros = {"OFF_TASK_SE_CFS_RQ": btf.member("task_struct", "se.cfs_rq").offset,
                  "OFF_NET_MIB_NET_STATISTICS": btf.member("net", "mib.net_statistics").offset,
                  "OFF_NET_COOKIE": btf.member("net", "net_cookie").offset,
                  "OFF_SOCK_DROPS": btf.member("sock", "sk_drops").offset}
        try:
            macros["OFF_CFS_RQ_RQ"] = btf.member("cfs_rq", "rq").offset
        except BTFError:
            return {}, "no cfs_rq.rq in BTF: the kernel is built without CONFIG_FAIR_GROUP_SCHED"
        mib = btf.anonymous_enum("LINUX_MIB_NUM")
        for macro, name in NETSTAT_COUNTERS:
            macros[macro] = mib[name]
    except (BTFError, KeyError) as err:
        return {}, f"kernel BTF lacks what the per-CPU counters need: {err}"
    percpu = btf.percpu_offsets(tuple(var for _, var in PERCPU_VARIABLES))
    for macro, var in PERCPU_VARIABLES:
        if var not in percpu:
            return {}, f"no per-CPU variable {var} in BTF"
        macros[macro] = percpu[var]
    return macros, ""
