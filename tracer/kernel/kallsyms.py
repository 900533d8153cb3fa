"""Kernel text symbols from /proc/kallsyms: the address ranges of the softirq entry functions.

A BPF program tells softirq context from process context by looking for one of these functions on
its kernel stack (see walk_stack() in bpf/common.bpf.c). Addresses are hidden (all zero) unless
kptr_restrict allows root to see them; then context detection is reported as unavailable.
"""
from __future__ import annotations

# Every softirq runs through handle_softirqs() since Linux 6.8 (__do_softirq and ksoftirqd call it);
# before that __do_softirq() itself was the entry. Either one on the stack means softirq context.
SOFTIRQ_ENTRY_FUNCTIONS = ("handle_softirqs", "__do_softirq")
_CHUNK = 1 << 16


def function_ranges(names: tuple[str, ...], path: str = "/proc/kallsyms") -> dict[str, tuple[int, int]]:
    """[start, end) of the first of `names` found (end = the next symbol's address).

    /proc/kallsyms is generated symbol by symbol and reading all of it costs ~70 ms, so read in
    chunks and stop at the first match: handle_softirqs sits early in the address-ordered list.
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
                    if addr > pending[1]:
                        found[pending[0]] = (pending[1], addr)
                        return found
                    continue
                name = wanted.get(" " + rest.split("\t", 1)[0])
                if name:
                    start = int(addr_text, 16)
                    if start == 0:
                        return {}   # addresses hidden by kptr_restrict
                    pending = (name, start)
    return found
