"""Compile and attach rsttrace's BPF programs with bcc — header-free, offsets from BTF.

The loader turns the capability probe and the user's filters into feature macros, compiles
bpf/*.bpf.c against bpf/kernel-headers (never /lib/modules), attaches, and hands the ring
buffer to the caller. It never formats output. A start after the first of a boot loads what that
first start compiled, without bcc (progcache.py).
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import mmap
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from ..errors import BPFRefusedError, UnsupportedKernelError
from . import layout
from ..paths import BPF_DIR, KERNEL_HEADERS_DIR
from .capabilities import Capabilities
from .hooks import STATE_HOOK_ENV, HookPlan
from . import bpfsys, progcache
from .bootcache import BootCache
from .kallsyms import KernelSymbols
from .ringbuf import DIRECT_READ, CallbackRingReader, RingReader

LEARN_CPU_OFFSET = progcache.ON_CPU_PREFIX + "learn_cpu_offset"     # bpf/netstat.bpf.c
NETSTAT_FLUSH = progcache.ON_CPU_PREFIX + "netstat_flush"

# 32 MiB (--ring-mb): about a hundred and fifty thousand records waiting before anything is lost,
# more than the fastest reset storm of a 2-core machine (scripts/bench/capacity) gets ahead of the
# reader in a couple of seconds: a burst is absorbed, then written. Resident once mapped (ringbuf.py).
DEFAULT_RING_MB = 32


def ring_pages(ring_mb: int) -> int:
    return (ring_mb << 20) // mmap.PAGESIZE


@dataclass
class Filters:
    ports: list[int] = field(default_factory=list)
    pid: int | None = None
    family: int | None = None          # socket.AF_INET / AF_INET6
    netns: list[int] = field(default_factory=list)   # network namespace inodes
    comms: list[str] = field(default_factory=list)   # process names: the failed syscalls kept (app.bpf.c)
    cgroups: list[str] = field(default_factory=list) # cgroup v2 directories (on its mount): the same


# How long before an RST a failed syscall of its process still explains it (--app-errors-window).
DEFAULT_APP_WINDOW_S = 5.0


def build_cflags(caps: Capabilities, filters: Filters, offsets: dict[str, int], plan: HookPlan,
                 ring_mb: int = DEFAULT_RING_MB, app_window_s: float = DEFAULT_APP_WINDOW_S) -> list[str]:
    flags = [f"-I{BPF_DIR}", f"-DRINGBUF_PAGES={ring_pages(ring_mb)}", *plan.cflags()]
    if plan.app_errors:
        flags.append(f"-DAPP_WINDOW_NS={int(app_window_s * 1e9)}ULL")
        if filters.comms:
            flags.append("-DFILTER_COMM")
        if filters.cgroups:
            flags.append(f"-DFILTER_CGROUP={len(filters.cgroups)}")
    flags += [f"-D{k}={v}" for k, v in offsets.items()]
    # Fields the per-packet hooks read together, in one read where they sit close
    # (bpf/sock.bpf.c: read_skb_offsets) ...
    flags += span_macros("SKB_SPAN", offsets, (("OFF_SKB_HEAD", 8), ("OFF_SKB_NETWORK_HEADER", 2),
                                               ("OFF_SKB_TRANSPORT_HEADER", 2)))
    # ... and the per-SYN verdict (read_queues): the accept queue's length and limit, the two sysctls
    flags += span_macros("SK_BACKLOG_SPAN", offsets, (("OFF_SOCK_ACK_BACKLOG", 4), ("OFF_SOCK_MAX_ACK_BACKLOG", 4)))
    flags += span_macros("NET_SYN_SPAN", offsets, (("OFF_NET_SYNCOOKIES", 1), ("OFF_NET_MAX_SYN_BACKLOG", 4)), most=128)
    if caps.rst_reason:
        flags.append("-DHAVE_RST_REASON")
    if caps.receive_reset is not None and caps.receive_reset.has("sock_cookie"):
        flags.append("-DHAVE_RECEIVE_RESET_COOKIE")
    if filters.ports:
        flags.append("-DFILTER_PORTS")
    if filters.netns:
        flags.append("-DFILTER_NETNS")
    if filters.pid is not None:
        flags.append(f"-DFILTER_PID={filters.pid}")
    if filters.family is not None:
        flags.append(f"-DFILTER_FAMILY={filters.family}")
    ranges = sorted(caps.softirq_ranges.values())
    for i in range(2):
        lo, hi = ranges[i] if i < len(ranges) else (0, 0)
        flags += [f"-DSOFTIRQ_LO{i}={lo}ULL", f"-DSOFTIRQ_HI{i}={hi}ULL"]
    return flags


def span_macros(name: str, offsets: dict[str, int], fields: tuple[tuple[str, int], ...], most: int = 32) -> list[str]:
    """-D{name}_LO/_LEN for one read that covers these (offset macro, size) fields, if they all sit
    within `most` bytes of each other on this kernel."""
    if not all(macro in offsets for macro, _ in fields):
        return []
    lo = min(offsets[macro] for macro, _ in fields)
    hi = max(offsets[macro] + size for macro, size in fields)
    return [f"-D{name}_LO={lo}", f"-D{name}_LEN={hi - lo}"] if hi - lo <= most else []


@contextlib.contextmanager
def _quiet_stderr():
    """bcc/clang print warnings straight to fd 2; keep them for the error message instead."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull, io.StringIO():
        try:
            tmp = os.open("/tmp", os.O_TMPFILE | os.O_RDWR, 0o600)
        except OSError:
            tmp = os.dup(devnull.fileno())
        os.dup2(tmp, 2)
        captured = {"text": ""}
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            try:
                os.lseek(tmp, 0, os.SEEK_SET)
                captured["text"] = os.read(tmp, 65536).decode(errors="replace")
            except OSError:
                pass
            os.close(tmp)


# bpf/'s subject files, pasted before the hook files in this order: each uses only those before it.
# maps.bpf.c comes first because `events` must be the first map declared (its EVENTS_MAP).
SUBJECT_FILES = ("maps.bpf.c", "sock.bpf.c", "syn_verdict.bpf.c", "owners.bpf.c", "story.bpf.c", "app.bpf.c",
                 "origin.bpf.c")
# The subject files each hook file uses (a hook file not named here gets them all). Every event
# passes emit(), which feeds connections' stories and asks for the application's failed syscalls:
# story.bpf.c and app.bpf.c go with every hook file (they compile to nothing without STORIES,
# APP_ERRORS).
HOOK_SUBJECTS = {
    "rst.bpf.c": ("maps.bpf.c", "sock.bpf.c", "owners.bpf.c", "story.bpf.c", "app.bpf.c", "origin.bpf.c"),
    "netstat.bpf.c": SUBJECT_FILES,
    "listen.bpf.c": SUBJECT_FILES,
    "kprobe.bpf.c": SUBJECT_FILES,
}


def compose_source(hook_files: list[str]) -> str:
    """One compilation unit: the subject files the hook files use (SUBJECT_FILES order), then each
    hook file.

    bcc rewrites its syntax (TRACEPOINT_PROBE args, `map.lookup()` methods) only in the main
    source, never in #included files, so the files are pasted together — without #line markers,
    which would hide them from the rewriter too. Only plain C (rsttrace.h) is #included.
    """
    needed = {SUBJECT_FILES[0]}.union(*(HOOK_SUBJECTS.get(name, SUBJECT_FILES) for name in hook_files))
    parts = []
    for name in [*(s for s in SUBJECT_FILES if s in needed), *hook_files]:
        parts.append(f"/* ---- {name} ---- */\n")
        parts.append((BPF_DIR / name).read_text())
    return "".join(parts)


class RstProgram:
    """The loaded and attached BPF programs: the plan's hook files and the subject files they use."""


    def __init__(self, caps: Capabilities, filters: Filters, plan: HookPlan, ring_mb: int = DEFAULT_RING_MB,
                 app_window_s: float = DEFAULT_APP_WINDOW_S):
        if caps.send_reset is None or caps.receive_reset is None:
            raise UnsupportedKernelError("tracepoints tcp:tcp_send_reset/tcp_receive_reset are missing",
                                         "rsttrace needs Linux 4.16+ with CONFIG_TRACEPOINTS")
        if not caps.offsets:
            raise UnsupportedKernelError(caps.btf_error or "kernel BTF lacks a field rsttrace reads",
                                         "rsttrace needs a kernel with CONFIG_DEBUG_INFO_BTF=y")
        self.offsets = caps.offsets
        self.plan = plan
        self.counts_handshakes = plan.stories and bool(filters.ports)    # bpf/story.bpf.c, FILTER_PORTS
        self.ring_bytes = ring_pages(ring_mb) * mmap.PAGESIZE
        self.cflags = build_cflags(caps, filters, self.offsets, plan, ring_mb, app_window_s)
        self.files = plan.files
        os.environ["BCC_KERNEL_SOURCE"] = str(KERNEL_HEADERS_DIR)
        self._ksyms: dict[int, str] = {}
        self._symbols: KernelSymbols | None = None     # read on first use (kallsyms.py)
        self._boot_cache = caps.boot_cache
        source = compose_source(self.files)
        cache = progcache.cache_path(source, self.cflags, caps.bcc_version,
                                     includes=progcache.tree_digest(BPF_DIR))
        # A start after the first of this boot loads what the first compiled (progcache.py).
        cacheable = progcache.enabled() and _direct_ring()
        self.cached = progcache.load(cache, caps.tracefs) if cacheable else None
        self.compiled = self.cached is None
        if self.cached is None and cacheable and self._compile_apart(source, cache):
            self.cached = progcache.load(cache, caps.tracefs)
        self.bpf = self.cached
        if self.cached is None:
            self._compile(source, cache)
        # Kernel enum numbering differs between kernels: names come from the tracepoint formats.
        self.reason_names = {
            "rst_sent": caps.send_reset.symbols("reason") if caps.rst_reason else {},
            "ack_dropped": caps.kfree_skb.symbols("reason") if caps.kfree_skb else {},
            # an RST that found no socket (bpf/origin.bpf.c) carries the drop reason NO_SOCKET
            "rst_received": caps.kfree_skb.symbols("reason") if caps.kfree_skb and plan.origins else {},
        }
        if filters.ports:
            table = self.bpf["port_filter"]
            for port in filters.ports:
                table[ctypes.c_int(port)] = ctypes.c_uint8(1)
        if filters.netns:
            table = self.bpf["netns_filter"]
            for inode in filters.netns:
                table[ctypes.c_uint32(inode)] = ctypes.c_uint8(1)
        if filters.comms and plan.app_errors:
            table = self.bpf["comm_filter"]
            for comm in filters.comms:
                key = table.Key()
                key.comm = comm.encode()[:15]
                table[key] = ctypes.c_uint8(1)
        if filters.cgroups and plan.app_errors:
            self._fill_cgroup_filter(filters.cgroups)

    def _fill_cgroup_filter(self, directories: list[str]) -> None:
        """bpf/app.bpf.c's cgroup_filter: each --cgroup's directory on the cgroup v2 mount. One that is
        not there keeps no slot (nothing in it can be kept: it does not exist)."""
        table = self.bpf["cgroup_filter"]
        for i, directory in enumerate(directories):
            try:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:    # bcc's CgroupArray takes the fd itself; the cache's maps take the value's bytes
                table[ctypes.c_int(i)] = fd if self.cached is None else ctypes.c_uint32(fd)
            finally:
                os.close(fd)

    def _compile_apart(self, source: str, cache: str) -> bool:
        """A boot's first start compiles in a child process, which keeps the programs in the cache
        and exits; this process then loads them from there as any later start does, and the
        compiler (LLVM: most of a compiling process's memory) never stays in the tracer. Only for
        plans the cache takes, and while this process has one thread (fork copies only the
        caller). True if the child kept the programs; otherwise the caller compiles here, and
        reports a failure in its own words."""
        if self.plan.function_hooks or threading.active_count() > 1:
            return False
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            kept = False
            try:
                kept = self._compile(source, cache)
                self.bpf.cleanup()
            except BaseException:     # noqa: BLE001 — the parent compiles again and says why
                pass
            finally:
                # A forked child leaves without the parent's exit handlers and buffered output.
                os._exit(0 if kept else 1)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) == 0

    def _compile(self, source: str, cache: str) -> bool:
        """Compile, load and attach with bcc; True if the programs were kept in the cache."""
        from bcc import BPF   # imported late: `rsttrace --help`/`explain` must work without bcc
        _return_freed_memory()
        failure = None
        with _quiet_stderr() as captured:
            try:
                self.bpf = BPF(text=source.encode(), cflags=self.cflags)
                if self.plan.counted:       # loaded, not attached: run on a CPU on demand
                    for name in (LEARN_CPU_OFFSET, NETSTAT_FLUSH):
                        self.bpf.load_func(name, BPF.RAW_TRACEPOINT)
            except Exception as err:   # bcc raises bare Exception for compile, load and attach failures
                failure = err
        if failure is not None:
            log = captured["text"]
            if "error:" in log and "bpf: " not in log.lower():
                # A compile error is rsttrace's bug on this kernel, not a refusal: show clang's words.
                raise RuntimeError(f"compiling {' + '.join(self.files)} failed:\n{log}") from failure
            if os.environ.get("RSTTRACE_DEBUG"):
                sys.stderr.write(log)
            raise BPFRefusedError(
                f"the kernel refused rsttrace's BPF programs: {_first_error(log) or failure}",
                "see `rsttrace doctor`; RSTTRACE_DEBUG=1 prints the verifier log") from failure
        self._load_btf_tracepoints()
        _release_compiler_memory()
        return progcache.enabled() and progcache.save(self.bpf, cache, self.plan.btf_types)

    def _load_btf_tracepoints(self) -> None:
        """Load and attach the plan's BTF tracepoint programs: bcc compiles them but has no tp_btf. They
        go into bcc's own tables (funcs, raw_tracepoint_fds), so that detaching, the program cache and
        cleanup treat them like the rest."""
        from bcc import BPF, lib
        license = lib.bpf_module_license(self.bpf.module)
        kern_version = lib.bpf_module_kern_version(self.bpf.module)
        for name, type_id in self.plan.btf_types.items():
            tracepoint = name.split("__", 1)[1]
            try:
                fd = bpfsys.prog_load(bpfsys.PROG_TYPE_TRACING, self.bpf.dump_func(name), license, kern_version,
                                      tracepoint, bpfsys.BPF_TRACE_RAW_TP, type_id)
                self.bpf.funcs[name.encode()] = BPF.Function(self.bpf, name.encode(), fd)
                self.bpf.raw_tracepoint_fds[tracepoint.encode()] = bpfsys.raw_tracepoint_open(None, fd)
            except OSError as err:
                self.bpf.cleanup()
                if os.environ.get("RSTTRACE_DEBUG"):
                    sys.stderr.write(f"{err.strerror}\n")
                raise BPFRefusedError(
                    f"the kernel refused rsttrace's BPF tracepoint program on {tracepoint}: "
                    f"{_first_error(err.strerror or '') or os.strerror(err.errno or 0)}",
                    f"see `rsttrace doctor`; RSTTRACE_DEBUG=1 prints the verifier log; "
                    f"{STATE_HOOK_ENV}=raw uses a raw tracepoint instead") from err

    def _on_cpu_program(self, name: str):
        return self.bpf.funcs.get(name.encode()) or self.bpf.funcs.get(name)

    def learn_cpu_offsets(self) -> tuple[int, int]:
        """Run bpf/netstat.bpf.c's offset finder once on every online CPU, so that a netns's counters can
        be read on every CPU from its first listener on: (CPUs whose offset was found, CPUs online)."""
        fn = self._on_cpu_program(LEARN_CPU_OFFSET)
        online = bpfsys.online_cpus()
        if fn is None:
            return 0, len(online)
        for cpu in online:
            bpfsys.prog_test_run_on_cpu(fn.fd, cpu)
        table = self.bpf["cpu_offsets"]
        found = sum(1 for cpu in online if table[ctypes.c_int(cpu)].value > 1)
        return found, len(online)

    def flush_netstat(self, alive: set[int]) -> None:
        """With the hooks detached: read the listen counters of each watched netns still alive (by inode)
        once more on each CPU, so that what the kernel counted after the last hook there is kept, as
        counted by no hook (bpf/netstat.bpf.c). A netns that is gone is not read: its memory may be
        another's now."""
        fn = self._on_cpu_program(NETSTAT_FLUSH)
        if fn is None:
            return
        for key, val in self.bpf["netstat_seen"].items():
            if val.netns in alive:
                bpfsys.prog_test_run_on_cpu(fn.fd, key.cpu, (key.net,))

    def netstat_reads(self) -> list[tuple[int, list[int], list[int], list[int]]]:
        """bpf/netstat.bpf.c's reads, one per (netns, CPU): the netns inode, its listen counters as last
        read on that CPU, and what moved there for untraced ports or with no hook to explain it."""
        if not self.plan.counted:
            return []
        return [(val.netns, list(val.count), list(val.other_ports), list(val.unexplained))
                for _, val in self.bpf["netstat_seen"].items()]

    def storm_control(self) -> tuple[int, int, int]:
        """(high_bytes, epoch, aggregating) of bpf/maps.bpf.c's storm_ctl."""
        ctl = self.bpf["storm_ctl"][ctypes.c_int(0)]
        return ctl.high_bytes, ctl.epoch, ctl.aggregating

    def set_storm_control(self, high_bytes: int, epoch: int, aggregating: int) -> None:
        table = self.bpf["storm_ctl"]
        ctl = table.Leaf()
        ctl.high_bytes, ctl.epoch, ctl.aggregating = high_bytes, epoch, aggregating
        table[ctypes.c_int(0)] = ctl

    def take_storm_shapes(self, through_epoch: int | None) -> list[tuple[object, int, int]]:
        """The storm counts of every window up to `through_epoch` (None: all), removed from the map:
        (key: shape, epoch, tgid, comm; aggregated; samples), the CPUs summed."""
        table = self.bpf["storm_shapes"]
        out = []
        for key, per_cpu in table.items():
            if through_epoch is not None and key.epoch > through_epoch:
                continue
            out.append((key, sum(c.aggregated for c in per_cpu), sum(c.samples for c in per_cpu)))
            try:
                del table[key]
            except KeyError:
                pass
        return out

    def open_ring(self):
        """The reader of the events ring buffer (tracer/kernel/ringbuf.py): direct from its memory
        mapping where the machine allows it, else through bcc's callback consumer."""
        if _direct_ring():
            return RingReader(self.bpf["events"].map_fd, self.ring_bytes, layout.EVENT_SIZE)
        return CallbackRingReader(self.bpf, "events", layout.EVENT_SIZE)

    def known_listeners(self) -> dict[tuple[int, int], tuple[int, str]]:
        """Every listener the BPF programs know (bpf/maps.bpf.c, listeners): (netns inode, port) →
        (pid, comm) of the process seen calling listen(), (0, "") for one that predates rsttrace."""
        return {(val.netns, key.port): (val.owner_tgid, val.owner_comm.decode(errors="replace"))
                for key, val in self.bpf["listeners"].items()}

    def stop_learning_listeners(self) -> bool:
        """Detach sock:sk_data_ready, which runs for every socket that receives data on the host and is
        needed only to learn listeners that predate rsttrace (bpf/listen.bpf.c). True if it was attached."""
        return self._detach_raw(b"sk_data_ready")

    def stop_poke_hook(self) -> bool:
        """Detach sock:sock_recv_length, attached only while user space pokes the listeners that
        predate rsttrace (bpf/listen.bpf.c). True if it was attached."""
        return self._detach_raw(b"sock_recv_length")

    def _detach_raw(self, tracepoint: bytes) -> bool:
        try:
            self.bpf.detach_raw_tracepoint(tp=tracepoint)
        except Exception:      # not attached (bcc: Exception; the cache: KeyError)
            return False
        return True

    def take_stories(self, idle_ns: int | None) -> list[tuple[bytes, bytes]]:
        """Connections' stories out of the kernel's map (bpf/story.bpf.c): those nothing happened to
        for `idle_ns`, or all (None). (key, value) bytes; a story the kernel ends meanwhile is its."""
        if not self.plan.stories:
            return []
        table = self.bpf["stories"]
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        taken = []
        for key, val in table.items():
            if idle_ns is not None and now - val.last_ns < idle_ns:
                continue
            try:
                del table[key]
            except KeyError:
                continue
            taken.append((bytes(key), bytes(val)))
        if taken:
            counts = self.bpf["story_count"]
            slot = ctypes.c_int(1)
            counts[slot] = ctypes.c_int64(counts[slot].value + len(taken))
        return taken

    def app_failures(self, tgid: int):
        """The failed syscalls bpf/app.bpf.c keeps for process `tgid` (its struct app_failures), or None."""
        if not self.plan.app_errors:
            return None
        table = self.bpf["app_failures"]
        try:
            return table[ctypes.c_uint32(tgid)]
        except KeyError:
            return None

    def listen_activity_of(self, netns: int, port: int) -> list | None:
        """A traced listener's accept() calls and SYNs (bpf/app.bpf.c: struct listen_activity), one per
        CPU, or None."""
        if not self.plan.app_errors or self.bpf is None:
            return None
        table = self.bpf["listen_activity"]
        key = table.Key()
        key.netns, key.port = netns, port
        try:
            return table[key]
        except KeyError:
            return None

    def _flow_lookup(self, name: str, netns: int, family: int, lport: int, rport: int, laddr: bytes, raddr: bytes):
        table = self.bpf[name]
        key = table.Key()
        key.netns, key.family, key.lport, key.rport = netns, family, lport, rport
        ctypes.memmove(key.laddr, laddr, len(laddr))
        ctypes.memmove(key.raddr, raddr, len(raddr))
        try:
            return table[key]
        except KeyError:
            return None

    def rst_look(self, netns: int, family: int, lport: int, rport: int, laddr: bytes, raddr: bytes):
        """A received RST's TTL and timestamp option against its flow's handshake (bpf/origin.bpf.c:
        struct rst_look), or None."""
        if not self.plan.origin_packets or self.bpf is None:
            return None
        return self._flow_lookup("rst_looks", netns, family, lport, rport, laddr, raddr)

    def made_rst(self, family: int, lport: int, rport: int, laddr: bytes, raddr: bytes):
        """An RST made outside TCP on this host for the flow its receiver sees so (struct made_rst:
        where and when), or None."""
        if not self.plan.origin_packets or self.bpf is None:
            return None
        return self._flow_lookup("made_rsts", 0, family, lport, rport, laddr, raddr)

    def device_rsts(self) -> dict[int, dict[str, int]]:
        """RSTs that left through a device, per netns inode: made by TCP, not, forwarded; and TCP's freed
        before a device (summed over CPUs)."""
        if not self.plan.origin_packets or self.bpf is None:
            return {}
        out: dict[int, dict[str, int]] = {}
        for key, per_cpu in self.bpf["device_rsts"].items():
            out[key.value] = {name: sum(getattr(v, name) for v in per_cpu)
                              for name in ("by_tcp", "not_by_tcp", "forwarded", "tcp_dropped")}
        return out

    def handshakes(self) -> dict[tuple[int, int], int]:
        """Handshakes completed per listener (netns inode, port) of a traced port (bpf/story.bpf.c);
        empty without --port or stories."""
        if not self.counts_handshakes:
            return {}
        return {(key.netns, key.port): val.value for key, val in self.bpf["handshakes"].items()}

    def stats(self) -> dict[str, int]:
        table = self.bpf["stats"]
        out = {}
        for name, slot in (("submitted", layout.STAT_SUBMITTED), ("lost", layout.STAT_LOST),
                           ("uncounted", layout.STAT_UNCOUNTED), ("aggregated", layout.STAT_AGGREGATED),
                           ("storm_full", layout.STAT_STORM_FULL), ("stories_full", layout.STAT_STORIES_FULL),
                           ("app_paths_unread", layout.STAT_APP_PATHS_UNREAD)):
            out[name] = sum(table[ctypes.c_int(slot)])
        return out

    def skipped_runs(self) -> dict[str, int]:
        """Runs of rsttrace's programs the kernel skipped, by attach point (only those with some): an
        event fired while a BPF program was already running on that CPU — the same program (raw
        tracepoints, fentry), or any kprobe/tracepoint program (classic tracepoints and kprobes share
        one per-CPU guard) — typically a softirq interrupting a program run in process context. The
        events of those runs are in no record and no count."""
        bpf = getattr(self, "bpf", None)
        if bpf is None:
            return {}
        out = {}
        for name, fn in bpf.funcs.items():
            n = bpfsys.recursion_misses(fn.fd)
            if n:
                label = attach_point(name.decode() if isinstance(name, bytes) else name)
                out[label] = out.get(label, 0) + n
        return out

    def exact_counts(self) -> list[tuple[layout.CountKey, int]]:
        """The kernel's exact per-key counts (every event that passed the filters, delivered or not)."""
        table = self.bpf["counts"]
        out = []
        for key, per_cpu in table.items():
            k = layout.CountKey.from_buffer_copy(bytes(key))
            out.append((k, sum(per_cpu)))
        return out

    def ksym(self, addr: int) -> str:
        name = self._ksyms.get(addr)
        if name is None:
            if self._symbols is None:
                self._symbols = KernelSymbols(cache=self._boot_cache or BootCache())
            name = self._symbols.name(addr)
            if len(self._ksyms) < 65536:       # kernel text addresses: a small set in practice
                self._ksyms[addr] = name
        return name

    def detach(self) -> None:
        """Detach every program; the maps stay, so that what is in the ring buffer and the counts can
        still be read — and nothing new arrives while they are (idempotent)."""
        bpf = getattr(self, "bpf", None)
        if bpf is None:
            return
        if self.cached is not None:
            self.cached.detach()
            return
        for detach, fds in ((bpf.detach_kprobe_event, bpf.kprobe_fds), (bpf.detach_tracepoint, bpf.tracepoint_fds),
                            (bpf.detach_raw_tracepoint, bpf.raw_tracepoint_fds),
                            (bpf.detach_kfunc, bpf.kfunc_entry_fds), (bpf.detach_kretfunc, bpf.kfunc_exit_fds)):
            for name in list(fds):
                detach(name)

    def close(self) -> None:
        """Detach every program and free every map (idempotent), and wait — up to 2 s — until the
        kernel has let go of the programs too: a detached program is freed an RCU grace period after
        its last reference, and after rsttrace exits `bpftool prog show` must list none of it."""
        if getattr(self, "_symbols", None) is not None:
            self._symbols.save()
        bpf, self.bpf = getattr(self, "bpf", None), None
        if bpf is None:
            return
        ours = bpfsys.prog_ids_of_fds(fn.fd for fn in bpf.funcs.values())
        bpf.cleanup()
        deadline = time.monotonic() + 2.0
        while ours & bpfsys.loaded_prog_ids() and time.monotonic() < deadline:
            time.sleep(0.005)


def attach_point(program: str) -> str:
    """bcc's name of a program → where it is attached: tracepoint__tcp__tcp_send_reset →
    tracepoint:tcp:tcp_send_reset, raw_tracepoint__kfree_skb → raw_tracepoint:kfree_skb,
    tp_btf__inet_sock_set_state → tp_btf:inet_sock_set_state,
    kfunc__vmlinux__tcp_conn_request → fentry:tcp_conn_request, kprobe__tcp_v4_send_reset →
    kprobe:tcp_v4_send_reset."""
    for prefix, kind in (("tracepoint__", "tracepoint"), ("raw_tracepoint__", "raw_tracepoint"), ("tp_btf__", "tp_btf"),
                         ("kfunc__vmlinux__", "fentry"), ("kfunc__", "fentry"), ("kprobe__", "kprobe")):
        if program.startswith(prefix):
            return f"{kind}:{program[len(prefix):].replace('__', ':')}"
    return program


def _direct_ring() -> bool:
    """Read the ring from its mapping (ringbuf.py), not through bcc's callbacks — which only a
    program bcc loaded has."""
    return DIRECT_READ and os.environ.get("RSTTRACE_RING_READER") != "callback"


def _return_freed_memory() -> None:
    """clang's compile is rsttrace's memory peak: have glibc hand large and trailing free blocks
    back to the kernel instead of keeping them."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 128 * 1024)    # M_TRIM_THRESHOLD
        libc.mallopt(-3, 128 * 1024)    # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _release_compiler_memory() -> None:
    """Once the programs are loaded, bcc's compiler is not needed again: glibc returns clang's freed
    heap. Then malloc keeps freed memory longer than during the compile (_return_freed_memory), so
    that the event loop does not brk() up and down on every batch."""
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
        libc.mallopt(-1, 8 << 20)    # M_TRIM_THRESHOLD
        libc.mallopt(-3, 1 << 20)    # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error" in line.lower() or "failed" in line.lower() or "permission" in line.lower():
            return line.strip()
    return text.strip().splitlines()[0] if text.strip() else ""


AF = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
