"""Kernel text symbols from /proc/kallsyms: the address ranges of the softirq entry functions, and
the names of the functions on the stacks BPF programs saw.

A BPF program tells softirq context from process context by looking for one of these functions on
its kernel stack (see walk_stack() in bpf/maps.bpf.c). Addresses are hidden (all zero) unless
kptr_restrict allows root to see them; then context detection is reported as unavailable.
"""
from __future__ import annotations

import bisect
import re

from .bootcache import BootCache

# Every softirq runs through handle_softirqs() since Linux 6.8 (__do_softirq and ksoftirqd call it);
# before that __do_softirq() itself was the entry. Either one on the stack means softirq context.
SOFTIRQ_ENTRY_FUNCTIONS = ("handle_softirqs", "__do_softirq")
# The function whose LISTEN branch consume_skb()s every SYN a listener has decided on (accepted, cookie or
# dropped): a consume_skb tracepoint whose `location` lies in it is a SYN verdict (bpf/listen.bpf.c).
SYN_CONSUMER = "tcp_rcv_state_process"
# The functions that drop a SYN cookie's ACK with reason NO_SOCKET when tcp_v4/v6_syn_recv_sock() refuses
# the child — in practice, a full accept queue (bpf/listen.bpf.c, kfree_skb).
COOKIE_CHECKERS = ("cookie_v4_check", "cookie_v6_check")
# TCP's IPv6 replies (RSTs for no socket, ACKs for TIME_WAIT) leave through it without a socket on the
# skb, unlike IPv4's: an RST with it on the stack is TCP's own (bpf/origin.bpf.c).
TCP_V6_REPLY = "tcp_v6_send_response"
# The kernel functions whose text ranges BPF programs compare a tracepoint's `location` (or a stack
# frame) with.
LOCATED_FUNCTIONS = (SYN_CONSUMER, *COOKIE_CHECKERS, TCP_V6_REPLY)
_CHUNK = 1 << 16


def function_ranges(names: tuple[str, ...], path: str = "/proc/kallsyms",
                    every: bool = False) -> dict[str, tuple[int, int]]:
    """[start, end) of the first of `names` found (end = the next symbol's address), or with `every`,
    of each of them that exists.

    /proc/kallsyms is generated symbol by symbol and reading all of it costs ~70 ms, so read in
    chunks and stop as soon as what is asked for is found: handle_softirqs sits early in the
    address-ordered list.
    """
    wanted = {f" t {n}": n for n in names} | {f" T {n}": n for n in names}
    found: dict[str, tuple[int, int]] = {}
    pending: tuple[str, int] | None = None
    tail = ""
    with open(path) as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            lines = (tail + chunk).split("\n")
            tail = lines.pop()
            for line in lines:
                addr_text, _, rest = line.partition(" ")
                if pending:
                    addr = int(addr_text, 16)
                    if addr <= pending[1]:
                        continue        # an alias at the same address
                    found[pending[0]] = (pending[1], addr)
                    pending = None
                    if not every or len(found) == len(names):
                        return found
                name = wanted.get(" " + rest.split("\t", 1)[0])
                if name and name not in found:
                    start = int(addr_text, 16)
                    if start == 0:
                        return {}   # addresses hidden by kptr_restrict
                    pending = (name, start)
    return found


class KernelSymbols:
    """Kernel text address → function name, for the callers a BPF program saw on the stack.

    /proc/kallsyms lists the kernel's symbols by address (over a hundred thousand). The kernel
    formats every line it is asked for, so reading all of it costs noticeable system time, and bcc's
    symbolizer reads it 1 KB per syscall. This one reads large chunks, only as far as the
    highest address asked for (the stacks rsttrace sees are in the core kernel's TCP code), and
    parses only the chunks it looks into. If the listing is out of address order (modules between
    core symbols), it reads the rest and sorts everything."""

    CHUNK = 1 << 20

    def __init__(self, path: str = "/proc/kallsyms", cache: BootCache | None = None):
        self.path = path
        self.cache = cache                        # names met in earlier runs of this boot (bootcache.py)
        self._known: dict[str, str] = (cache.get("kernel_symbols") or {}) if cache else {}
        self._new = False
        self._chunks: list[bytes] = []            # whole lines, in address order
        self._firsts: list[int] = []              # address of each chunk's first line
        self._parsed: dict[int, tuple[list[int], list[int]]] = {}   # chunk → (line offsets, addresses)
        self._last = -1                           # highest address read so far
        self._file = None
        self._tail = b""
        self._done = False

    def name(self, addr: int) -> str:
        known = self._known.get(f"{addr:x}")
        if known is not None:
            return known
        name, core = self._lookup(addr)
        if core and len(self._known) < 65536:     # a module's symbol may move: never kept
            self._known[f"{addr:x}"] = name
            self._new = True
        return name

    def save(self) -> None:
        if self.cache is not None and self._new:
            self.cache.put("kernel_symbols", self._known)
            self.cache.save()
            self._new = False

    def _lookup(self, addr: int) -> tuple[str, bool]:
        """The name, and whether it is the core kernel's (a module's line ends with [module])."""
        while not self._done and addr > self._last:
            self._read_chunk()
        i = bisect.bisect_right(self._firsts, addr) - 1
        if i < 0 and not self._done:       # below all read so far: only the rest can tell (or sort it)
            while not self._done:
                self._read_chunk()
            i = bisect.bisect_right(self._firsts, addr) - 1
        if i < 0:
            return "[unknown]", False
        offsets, addrs = self._lines(i)
        start = offsets[bisect.bisect_right(addrs, addr) - 1]
        chunk = self._chunks[i]
        end = chunk.find(b"\n", start)
        name, _, module = chunk[start + 19:end if end >= 0 else len(chunk)].partition(b"\t")
        return name.decode(errors="replace"), not module

    def _lines(self, i: int) -> tuple[list[int], list[int]]:
        parsed = self._parsed.get(i)
        if parsed is None:
            chunk = self._chunks[i]
            offsets = [0] + [m.end() for m in re.finditer(b"\n", chunk)]
            parsed = self._parsed[i] = (offsets, [int(chunk[o:o + 16], 16) for o in offsets])
        return parsed

    def _read_chunk(self) -> None:
        if self._file is None:
            self._file = open(self.path, "rb")
        data = self._file.read(self.CHUNK)
        if not data:
            self._add(self._tail)
            self._file.close()
            self._done = True
            return
        data, _, self._tail = (self._tail + data).rpartition(b"\n")
        if data and not self._add(data):
            self._sort_all(data + b"\n" + self._tail + self._file.read())

    def _add(self, data: bytes) -> bool:
        """Keep a chunk of whole lines; False if it breaks address order."""
        if not data.strip():
            return True
        last_line = data.rfind(b"\n") + 1
        first, last = int(data[:16], 16), int(data[last_line:last_line + 16], 16)
        if first < self._last or last < first:
            return False
        self._chunks.append(data)
        self._firsts.append(first)
        self._last = last
        return True

    def _sort_all(self, rest: bytes) -> None:
        lines = [line for line in b"\n".join(self._chunks + [rest]).split(b"\n") if len(line) > 19]
        lines.sort(key=lambda line: int(line[:16], 16))
        self._file.close()
        self._done = True
        self._chunks, self._firsts, self._parsed = [], [], {}
        self._last = -1
        for at in range(0, len(lines), 8192):
            self._add(b"\n".join(lines[at:at + 8192]))

