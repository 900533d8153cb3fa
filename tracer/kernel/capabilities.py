"""What this kernel offers rsttrace, found out by looking and by trying (never by version numbers).

`probe()` is run at every start-up and by `rsttrace doctor`. It decides, per thing
rsttrace wants to see, which hook will deliver it — the "coverage" that is printed at start and
recorded in the JSON stream — and what this kernel cannot show.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from . import bpfsys, offsets, progcache
from .bootcache import BootCache
from .btf import VMLINUX_BTF, BTFError, KernelBTF
from .offsets import app_offsets, netstat_offsets, resolve_offsets
from .kallsyms import LOCATED_FUNCTIONS, SOFTIRQ_ENTRY_FUNCTIONS, SYN_CONSUMER, function_ranges
from .tracefs import TracefsError, TracepointFormat, read_format, tracefs_root

KPROBE_FUNCTIONS = ("tcp_send_active_reset", "tcp_v4_send_reset", "tcp_v6_send_reset", "tcp_conn_request",
                    "tcp_v4_syn_recv_sock", "tcp_v6_syn_recv_sock")
# What cached BTF facts were made from (bootcache.py): another rsttrace (other fields, other
# functions) must not take them. Changes with every edit of offsets.py or of the list above.
# The BTF tracepoints (tp_btf) rsttrace may load a program for: their btf_trace_* typedef ids are kept.
BTF_TRACEPOINTS = ("inet_sock_set_state", "sys_exit")
BTF_FACTS_KEY = hashlib.sha1(Path(offsets.__file__).read_bytes() + repr((KPROBE_FUNCTIONS, BTF_TRACEPOINTS)).encode()).hexdigest()

# Capability bits (include/uapi/linux/capability.h)
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39


@dataclass
class Check:
    name: str          # what was checked
    ok: bool
    detail: str        # what was found
    uses: str = ""     # what rsttrace does with it / instead


@dataclass
class Coverage:
    """Which hook rsttrace uses for each kind of event, and what it cannot see."""
    hooks: dict[str, str | None] = field(default_factory=dict)      # event kind -> hook or None
    notes: dict[str, str] = field(default_factory=dict)             # event kind -> how / why not
    blind_spots: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "hooks": {kind: {"hook": hook, "note": self.notes.get(kind, "")} for kind, hook in self.hooks.items()},
            "blind_spots": list(self.blind_spots),
        }


@dataclass
class Capabilities:
    kernel: str
    euid: int
    effective_caps: int
    btf: bool = False
    btf_error: str = ""
    tracefs: str | None = None
    tracefs_error: str = ""
    send_reset: TracepointFormat | None = None
    receive_reset: TracepointFormat | None = None
    set_state: TracepointFormat | None = None        # sock:inet_sock_set_state
    retransmit_skb: TracepointFormat | None = None   # tcp:tcp_retransmit_skb, with `state` (5.2+)
    retransmit_synack: TracepointFormat | None = None  # tcp:tcp_retransmit_synack
    data_ready: TracepointFormat | None = None       # sock:sk_data_ready
    recv_length: TracepointFormat | None = None      # sock:sock_recv_length (Linux 6.3+)
    kfree_skb: TracepointFormat | None = None        # skb:kfree_skb
    netif_receive_skb: bool = False                  # net:netif_receive_skb (raw tracepoint)
    net_dev_queue: bool = False                      # net:net_dev_queue (raw tracepoint)
    icmp_send: bool = False                          # icmp:icmp_send (Linux 6.12+)
    consume_skb: TracepointFormat | None = None      # skb:consume_skb (its `location` since Linux 6.3)
    text_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)   # LOCATED_FUNCTIONS' [start, end)
    prog_load: dict[str, int] = field(default_factory=dict)   # program type -> errno (0 = loads)
    kprobe_pmu: bool = False
    ringbuf: bool = False
    offsets: dict[str, int] = field(default_factory=dict)   # OFF_* macros from BTF
    # What bpf/netstat.bpf.c needs to read the kernel's listen counters per CPU (offsets.py), or why not
    netstat: dict[str, int] = field(default_factory=dict)
    netstat_missing: str = ""
    # What bpf/app.bpf.c needs (offsets.py), or why not; whether raw_syscalls:sys_exit is there
    app_offsets: dict[str, int] = field(default_factory=dict)
    app_missing: str = ""
    raw_sys_exit: bool = False
    # Whether a program can be run on a chosen CPU (BPF_PROG_TEST_RUN on a raw tracepoint program, 5.10+)
    test_run_on_cpu: bool = False
    softirq_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    lockdown: str | None = None
    bcc_version: str | None = None
    kernel_headers: bool = False
    checks: list[Check] = field(default_factory=list)
    kernel_version: tuple[int, int, int] | None = None   # upstream x.y.z (see kernel_upstream_version)
    functions: set[str] = field(default_factory=set)   # kernel functions rsttrace may kprobe, present in BTF
    fentry_functions: set[str] = field(default_factory=set)   # of those, the ones fentry can attach to
    # BTF tracepoint → its btf_trace_* typedef id, for those where a tp_btf program loads and attaches
    btf_tracepoints: dict[str, int] = field(default_factory=dict)
    boot_cache: BootCache | None = field(default=None, repr=False)   # read once here; the loader adds symbols

    def has_cap(self, bit: int) -> bool:
        return bool(self.effective_caps >> bit & 1)

    @property
    def can_bpf(self) -> bool:
        return self.has_cap(CAP_SYS_ADMIN) or (self.has_cap(CAP_BPF) and self.has_cap(CAP_PERFMON))

    @property
    def rst_reason(self) -> bool:
        return bool(self.send_reset and self.send_reset.has("reason"))

    @property
    def listen_overflow_reason(self) -> int | None:
        """skb_drop_reason value of TCP_LISTEN_OVERFLOW, if kfree_skb can report it (6.3+)."""
        if not self.kfree_skb or not self.kfree_skb.has("rx_sk"):
            return None
        return self._drop_reason("TCP_LISTEN_OVERFLOW")

    def drop_reason(self, wanted: str) -> int | None:
        return self._drop_reason(wanted) if self.kfree_skb is not None else None

    def _drop_reason(self, wanted: str) -> int | None:
        return next((v for v, name in self.kfree_skb.symbols("reason").items() if name == wanted), None)

    @property
    def no_socket_reason(self) -> int | None:
        """skb_drop_reason value of NO_SOCKET: what cookie_v4/v6_check() give a cookie's ACK that found
        the accept queue full (Linux 6.9+; before, the drop had no reason)."""
        if self.listen_overflow_reason is None:
            return None
        return self._drop_reason("NO_SOCKET")

    @property
    def listen_hooks(self) -> bool:
        """Can the listen-queue hooks (bpf/listen.bpf.c) run here?"""
        return (self.set_state is not None and self.netif_receive_skb
                and self.prog_load.get("raw_tracepoint") == 0 and "OFF_ICSK_SYN_QLEN" in self.offsets)

    @property
    def syn_after_decision(self) -> bool:
        """Can SYN verdicts be read after tcp_conn_request() took them (skb:consume_skb called from
        tcp_rcv_state_process(), bpf/listen.bpf.c), instead of replayed at every received packet?"""
        return (self.listen_hooks and SYN_CONSUMER in self.text_ranges
                and bool(self.consume_skb and self.consume_skb.has("location")))

    @property
    def counted_verdicts(self) -> bool:
        """Can the listen-queue verdicts be read from the kernel's own per-CPU counters
        (bpf/netstat.bpf.c), where the SYN and final-ACK hooks run right after the kernel counted them?"""
        return self.syn_after_decision and bool(self.netstat) and self.test_run_on_cpu

    @property
    def synq_full_gt(self) -> bool:
        """inet_csk_reqsk_queue_is_full() compares qlen > max since "tcp/dccp: allow a connection when
        sk_max_ack_backlog is zero" (6.13, backported to the stable series in January 2025); >= before.
        Nothing in BTF or tracefs shows it, so this one decision follows the version (the upstream
        sublevel, which distribution kernels print in /proc/version). Checked by the tests on 6.18 and
        on Debian's 6.1.192 against TCPReqQFullDrop / SyncookiesSent."""
        version = self.kernel_version
        if version is None:
            return True
        fixed_in = {(6, 12): 10, (6, 6): 72, (6, 1): 125, (5, 15): 177, (5, 10): 234, (5, 4): 290}
        if version[:2] >= (6, 13):
            return True
        return version[2] >= fixed_in.get(version[:2], 1 << 30)

    @property
    def kprobes(self) -> bool:
        return self.kprobe_pmu and self.prog_load.get("kprobe") == 0

    def has_function(self, name: str) -> bool:
        return name in self.functions

    @property
    def fentry(self) -> bool:
        return self.prog_load.get("fentry") == 0

    @property
    def tracepoints(self) -> bool:
        return self.prog_load.get("tracepoint") == 0


def kernel_upstream_version(release: str, proc_version: str, signature: str = "") -> tuple[int, int, int] | None:
    """Upstream x.y.z: Debian prints it in /proc/version ("Debian 6.1.192-2"), Ubuntu last in
    /proc/version_signature ("Ubuntu 5.15.0-91.101-generic 5.15.131"); their release strings say
    only 6.1.0-56-amd64 / 5.15.0-91-generic."""
    m = re.search(r"(\d+)\.(\d+)\.(\d+)\s*$", signature.strip()) if signature.strip() else None
    if not m:
        m = re.search(r"Debian\s+(\d+)\.(\d+)\.(\d+)", proc_version)
    if not m:
        m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _load_bcc() -> None:
    try:
        import bcc  # noqa: F401  (maps libbcc and LLVM)
    except Exception:
        pass


def _bcc_version() -> str | None:
    """bcc's version, read from its package without importing it: importing maps libbcc and LLVM
    (time, and most of rsttrace's memory), which a start from the program cache never needs."""
    try:
        spec = importlib.util.find_spec("bcc")
        if spec is None or not spec.submodule_search_locations:
            return None
        with open(os.path.join(list(spec.submodule_search_locations)[0], "version.py")) as f:
            found = re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", f.read())
        return found.group(1) if found else None
    except (OSError, ImportError, ValueError):
        return None


def _lockdown() -> str | None:
    try:
        with open("/sys/kernel/security/lockdown") as f:
            text = f.read()
        return text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return None


def _text_ranges(cache: BootCache, section: str, names: tuple[str, ...], every: bool) -> dict[str, tuple[int, int]]:
    """function_ranges() of `names`, kept in the boot cache (kernel text does not move until reboot)."""
    key = ",".join(names)
    ranges = cache.get(section, key)
    if ranges is None:
        try:
            ranges = function_ranges(names, every=every)
            if ranges:        # hidden addresses (kptr_restrict) may be shown later: not kept
                cache.put(section, ranges, key)
        except OSError:
            ranges = {}
    return {name: tuple(span) for name, span in ranges.items()}


def probe(mount_tracefs: bool = True) -> Capabilities:
    caps = Capabilities(kernel=platform.release(), euid=os.geteuid(), effective_caps=effective_caps())
    # Where the program cache is off, this process compiles: loading bcc maps LLVM (mostly in
    # dlopen, which lets other threads run), so it happens while this thread reads BTF, tracefs and
    # kallsyms, joined before returning. With the cache on, a boot's first start compiles in a
    # child process (loader.py), which loads bcc itself: the tracer never maps the compiler.
    loading = threading.Thread(target=_load_bcc, name="rsttrace-load-bcc", daemon=True)
    if not progcache.enabled():
        loading.start()
    texts = []
    for path in ("/proc/version", "/proc/version_signature"):
        try:
            with open(path) as f:
                texts.append(f.read())
        except OSError:
            texts.append("")
    caps.kernel_version = kernel_upstream_version(caps.kernel, *texts)
    caps.lockdown = _lockdown()
    caps.kernel_headers = os.path.isdir(f"/lib/modules/{caps.kernel}/build/include")

    # What BTF and kallsyms say does not change until the next boot: kept from an earlier run
    # (bootcache.py), else read and kept for the next one.
    cache = caps.boot_cache = BootCache()
    try:      # the BTF file as it is now is part of the key: hidden or emptied, it is read (and fails)
        btf_key = f"{BTF_FACTS_KEY}:{os.stat(VMLINUX_BTF).st_size}"
    except OSError:
        btf_key = None
    btf_facts = cache.get("btf", btf_key) if btf_key else None
    if btf_facts is None:
        try:
            with KernelBTF() as btf:
                btf_facts = {"functions": {f: btf.find_function(f) for f in (*KPROBE_FUNCTIONS, "tcp_conn_request")},
                             "tracepoint_types": {t: btf.tracepoint_type(t) for t in BTF_TRACEPOINTS},
                             "offsets": resolve_offsets(btf), "netstat": netstat_offsets(btf),
                             "app": app_offsets(btf)}
            if btf_key:
                cache.put("btf", btf_facts, btf_key)
        except BTFError as err:
            caps.btf_error = str(err)
    function_ids: dict[str, int] = {}
    fentry_target = 0
    tracepoint_types: dict[str, int] = {}
    if btf_facts is not None:
        tracepoint_types = btf_facts["tracepoint_types"]
        caps.btf = True
        function_ids = {f: btf_facts["functions"][f] for f in KPROBE_FUNCTIONS}
        fentry_target = btf_facts["functions"]["tcp_conn_request"]
        caps.functions = {f for f, fid in function_ids.items() if fid}
        caps.offsets = btf_facts["offsets"]
        caps.netstat, caps.netstat_missing = btf_facts["netstat"]
        caps.app_offsets, caps.app_missing = btf_facts["app"]

    try:
        caps.tracefs = tracefs_root(mount=mount_tracefs and caps.euid == 0)
        caps.send_reset = read_format(caps.tracefs, "tcp", "tcp_send_reset")
        caps.receive_reset = read_format(caps.tracefs, "tcp", "tcp_receive_reset")
        caps.set_state = read_format(caps.tracefs, "sock", "inet_sock_set_state")
        retransmit = read_format(caps.tracefs, "tcp", "tcp_retransmit_skb")
        caps.retransmit_skb = retransmit if retransmit is not None and retransmit.has("state") else None
        caps.retransmit_synack = read_format(caps.tracefs, "tcp", "tcp_retransmit_synack")
        caps.data_ready = read_format(caps.tracefs, "sock", "sk_data_ready")
        caps.recv_length = read_format(caps.tracefs, "sock", "sock_recv_length")
        caps.kfree_skb = read_format(caps.tracefs, "skb", "kfree_skb")
        caps.netif_receive_skb = os.path.isdir(os.path.join(caps.tracefs, "events", "net", "netif_receive_skb"))
        caps.net_dev_queue = os.path.isdir(os.path.join(caps.tracefs, "events", "net", "net_dev_queue"))
        caps.icmp_send = os.path.isdir(os.path.join(caps.tracefs, "events", "icmp", "icmp_send"))
        caps.consume_skb = read_format(caps.tracefs, "skb", "consume_skb")
        caps.raw_sys_exit = os.path.isdir(os.path.join(caps.tracefs, "events", "raw_syscalls", "sys_exit"))
        caps.kprobe_pmu = os.path.exists("/sys/bus/event_source/devices/kprobe/type") or \
            os.path.exists(os.path.join(caps.tracefs, "kprobe_events"))
    except TracefsError as err:
        caps.tracefs_error = str(err)
        caps.kprobe_pmu = os.path.exists("/sys/bus/event_source/devices/kprobe/type")

    caps.prog_load["tracepoint"] = bpfsys.probe_prog_load(bpfsys.PROG_TYPE_TRACEPOINT)
    caps.prog_load["raw_tracepoint"] = bpfsys.probe_prog_load(bpfsys.PROG_TYPE_RAW_TRACEPOINT)
    caps.prog_load["kprobe"] = bpfsys.probe_prog_load(bpfsys.PROG_TYPE_KPROBE)
    caps.prog_load["tc"] = bpfsys.probe_prog_load(bpfsys.PROG_TYPE_SCHED_CLS)
    if fentry_target > 0:
        caps.prog_load["fentry"] = bpfsys.probe_prog_load(
            bpfsys.PROG_TYPE_TRACING, bpfsys.BPF_TRACE_FENTRY, fentry_target)
    caps.ringbuf = bpfsys.probe_ringbuf() == 0
    caps.test_run_on_cpu = caps.prog_load["raw_tracepoint"] == 0 and bpfsys.probe_test_run_on_cpu() == 0
    if caps.prog_load.get("fentry") == 0:
        # Loading is not attaching: some functions refuse a trampoline (seen: tcp_v4_syn_recv_sock on 6.1).
        caps.fentry_functions = {f for f, fid in function_ids.items()
                                 if fid and bpfsys.probe_fentry_attach(fid) == 0}
    # tp_btf is PROG_TYPE_TRACING too, but needs no trampoline: it loads where fentry is refused (seen: 6.18
    # with a BPF LSM). Tried by attaching a trivial program for a moment.
    caps.btf_tracepoints = {t: tid for t, tid in tracepoint_types.items()
                            if tid and bpfsys.probe_tracing_attach(bpfsys.BPF_TRACE_RAW_TP, tid) == 0}
    caps.softirq_ranges = _text_ranges(cache, "softirq_ranges", SOFTIRQ_ENTRY_FUNCTIONS, every=False)
    caps.text_ranges = _text_ranges(cache, "text_ranges", LOCATED_FUNCTIONS, every=True)
    cache.save()

    if loading.is_alive():
        loading.join()
    caps.bcc_version = _bcc_version()
    _fill_checks(caps)
    return caps


def _fill_checks(caps: Capabilities) -> None:
    c = caps.checks
    priv = "root" if caps.euid == 0 else f"uid {caps.euid}"
    c.append(Check("privileges", caps.can_bpf, f"{priv}, CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN: "
                   f"{'yes' if caps.can_bpf else 'no'}", "needed to load BPF programs"))
    c.append(Check("BTF", caps.btf, VMLINUX_BTF if caps.btf else caps.btf_error,
                   "struct offsets for every kernel field read"))
    c.append(Check("kernel headers", True,
                   "present (unused)" if caps.kernel_headers else "none installed",
                   "not needed: bcc compiles against rsttrace's own header-free tree"))
    c.append(Check("tracefs", caps.tracefs is not None, caps.tracefs or caps.tracefs_error,
                   "tracepoint formats (fields, enum names)"))
    sr = caps.send_reset
    c.append(Check("tracepoint tcp:tcp_send_reset", sr is not None,
                   ("with reason (Linux 6.10+)" if caps.rst_reason else "present, no reason field") if sr else "missing",
                   "RSTs sent"))
    c.append(Check("tracepoint tcp:tcp_receive_reset", caps.receive_reset is not None,
                   "present" if caps.receive_reset else "missing", "RSTs received"))
    for name, what in (("tracepoint", "tracepoint programs"), ("raw_tracepoint", "raw tracepoint programs"),
                       ("tc", "tc (SCHED_CLS) programs")):
        err = caps.prog_load.get(name, -1)
        c.append(Check(what, err == 0, bpfsys.describe(err) if err >= 0 else "not tried"))
    kp_err = caps.prog_load.get("kprobe", -1)
    kprobes = caps.kprobe_pmu and kp_err == 0
    c.append(Check("kprobes", kprobes,
                   "available" if kprobes else ("not built into this kernel (no kprobe PMU, no kprobe_events)"
                                                if not caps.kprobe_pmu else f"load: {bpfsys.describe(kp_err)}")))
    fe = caps.prog_load.get("fentry")
    c.append(Check("fentry/fexit", fe == 0, "not tried (no BTF)" if fe is None else
                   ("loads" if fe == 0 else f"load refused: {bpfsys.describe(fe)}")))
    c.append(Check("BTF tracepoints (tp_btf)", True,
                   ", ".join(sorted(caps.btf_tracepoints)) or "none: raw tracepoints instead (a probe read per field)",
                   "the per-connection hook reads the socket without a probe read"))
    counted = caps.counted_verdicts
    why_not = (caps.netstat_missing or ("no SYN hook after the decision (skb:consume_skb location, 6.3+)"
                                        if not caps.syn_after_decision else
                                        "a program cannot be run on a chosen CPU (BPF_PROG_TEST_RUN, 5.10+)"))
    c.append(Check("kernel's listen counters per CPU", counted,
                   "readable: ListenOverflows, ListenDrops, TCPReqQFullDrop, SyncookiesSent on the CPU that counted them"
                   if counted else why_not,
                   "listen-queue verdicts as the kernel counted them" if counted else
                   "listen-queue verdicts inferred from the queues (inferred: true)"))
    c.append(Check("BPF ring buffer", caps.ringbuf, "available" if caps.ringbuf else "missing (Linux < 5.8)",
                   "event transport with loss counting"))
    c.append(Check("softirq context detection", bool(caps.softirq_ranges),
                   ", ".join(sorted(caps.softirq_ranges)) or "kernel symbols hidden (kptr_restrict)",
                   "never blame the task a softirq interrupted"))
    c.append(Check("lockdown", caps.lockdown in (None, "none", "integrity"), caps.lockdown or "unknown",
                   "bpf_probe_read_kernel needs lockdown below 'confidentiality'"))
    c.append(Check("bcc", caps.bcc_version is not None, caps.bcc_version or "python3-bpfcc not installed"))
