"""Compile and attach rsttrace's BPF programs with bcc — header-free, offsets from BTF.

The loader turns the capability probe and the user's filters into feature macros, compiles
bpf/common.bpf.c + bpf/*.bpf.c against bpf/kernel-headers (never /lib/modules), attaches, and hands the ring
buffer to the caller. It never formats output.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Callable

from ..errors import BPFRefusedError, UnsupportedKernelError
from ..events import record
from ..paths import BPF_DIR, KERNEL_HEADERS_DIR
from .capabilities import Capabilities
from .hooks import HookPlan

RINGBUF_PAGES = 256    # 1 MiB: ~6000 records of 168 bytes in flight before anything is lost


@dataclass
class Filters:
    ports: list[int] = field(default_factory=list)
    pid: int | None = None
    family: int | None = None          # socket.AF_INET / AF_INET6
    netns: list[int] = field(default_factory=list)   # network namespace inodes


def build_cflags(caps: Capabilities, filters: Filters, offsets: dict[str, int], plan: HookPlan) -> list[str]:
    flags = [f"-I{BPF_DIR}", f"-DRINGBUF_PAGES={RINGBUF_PAGES}", *plan.macros]
    flags += [f"-D{k}={v}" for k, v in offsets.items()]
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


def compose_source(hook_files: list[str]) -> str:
    """One compilation unit: the shared maps/helpers (common.bpf.c), then each hook file.

    bcc rewrites its syntax (TRACEPOINT_PROBE args, `map.lookup()` methods) only in the main
    source, never in #included files, so the files are pasted together — without #line markers,
    which would hide them from the rewriter too. Only plain C (rsttrace.h) is #included.
    """
    parts = []
    for name in ["common.bpf.c", *hook_files]:
        parts.append(f"/* ---- {name} ---- */\n")
        parts.append((BPF_DIR / name).read_text())
    return "".join(parts)


class RstProgram:
    """The loaded and attached BPF programs: bpf/common.bpf.c + the hook files."""


    def __init__(self, caps: Capabilities, filters: Filters, plan: HookPlan):
        if caps.send_reset is None or caps.receive_reset is None:
            raise UnsupportedKernelError("tracepoints tcp:tcp_send_reset/tcp_receive_reset are missing",
                                         "rsttrace needs Linux 4.16+ with CONFIG_TRACEPOINTS")
        if not caps.offsets:
            raise UnsupportedKernelError(caps.btf_error or "kernel BTF lacks a field rsttrace reads",
                                         "rsttrace needs a kernel with CONFIG_DEBUG_INFO_BTF=y")
        self.offsets = caps.offsets
        self.plan = plan
        self.cflags = build_cflags(caps, filters, self.offsets, plan)
        self.files = plan.files
        os.environ["BCC_KERNEL_SOURCE"] = str(KERNEL_HEADERS_DIR)
        from bcc import BPF   # imported late: `rsttrace --help`/`explain` must work without bcc
        self._BPF = BPF
        self._ksyms: dict[int, str] = {}
        _return_freed_memory()
        failure = None
        with _quiet_stderr() as captured:
            try:
                self.bpf = BPF(text=compose_source(self.files).encode(), cflags=self.cflags)
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
        # Kernel enum numbering differs between kernels: names come from the tracepoint formats.
        self.reason_names = {
            "rst_sent": caps.send_reset.symbols("reason") if caps.rst_reason else {},
            "ack_dropped": caps.kfree_skb.symbols("reason") if caps.kfree_skb else {},
        }
        if filters.ports:
            table = self.bpf["port_filter"]
            for port in filters.ports:
                table[ctypes.c_uint16(port)] = ctypes.c_uint8(1)
        if filters.netns:
            table = self.bpf["netns_filter"]
            for inode in filters.netns:
                table[ctypes.c_uint32(inode)] = ctypes.c_uint8(1)

    def open_events(self, callback: Callable[[int, int], bool]) -> None:
        """callback(data_pointer, size) for every record, during poll(); it returns False to end the
        poll early (a full batch). libbpf then leaves that record in the ring for the next poll:
        without this a storm keeps one poll() calling back forever, user space never gets control
        back to write anything, and decoded records pile up in memory."""
        def _cb(ctx, data, size):
            return 0 if callback(data, size) else -1
        self.bpf["events"].open_ring_buffer(_cb)

    def poll(self, timeout_ms: int) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def drain(self) -> None:
        self.bpf.ring_buffer_consume()

    def stats(self) -> dict[str, int]:
        table = self.bpf["stats"]
        out = {}
        for name, slot in (("submitted", record.STAT_SUBMITTED), ("lost", record.STAT_LOST),
                           ("uncounted", record.STAT_UNCOUNTED)):
            out[name] = sum(table[ctypes.c_int(slot)])
        return out

    def exact_counts(self) -> list[tuple[record.CountKey, int]]:
        """The kernel's exact per-key counts (every event that passed the filters, delivered or not)."""
        table = self.bpf["counts"]
        out = []
        for key, per_cpu in table.items():
            k = record.CountKey.from_buffer_copy(bytes(key))
            out.append((k, sum(per_cpu)))
        return out

    def ksym(self, addr: int) -> str:
        name = self._ksyms.get(addr)
        if name is None:
            name = self._BPF.ksym(addr, show_offset=False).decode(errors="replace")
            if len(self._ksyms) < 65536:       # kernel text addresses: a small set in practice
                self._ksyms[addr] = name
        return name

    def close(self) -> None:
        """Detach every program and free every map (idempotent)."""
        bpf, self.bpf = getattr(self, "bpf", None), None
        if bpf is not None:
            bpf.cleanup()


def _return_freed_memory() -> None:
    """clang's compile is rsttrace's memory peak: have glibc hand large and trailing free blocks
    back to the kernel instead of keeping them (measured: about -1.7 MB of peak RSS)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 128 * 1024)    # M_TRIM_THRESHOLD
        libc.mallopt(-3, 128 * 1024)    # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error" in line.lower() or "failed" in line.lower() or "permission" in line.lower():
            return line.strip()
    return text.strip().splitlines()[0] if text.strip() else ""


AF = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
