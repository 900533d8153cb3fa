"""Kernel call stacks by name: the frames an event's hook recorded, innermost first."""
from __future__ import annotations

from typing import Callable

TRACING_FRAMES = ("bpf_prog_", "bpf_trace_run", "__bpf_trace_", "__traceiter_")
MAX_STACKS = 65536


def with_hook(hook: str | None, callers: list[str]) -> list[str]:
    """Kernel frames innermost first, starting with the hooked function: an fentry program runs
    before that function's frame exists, so its stack starts at the caller. Frames of the tracing
    machinery itself (the BPF program, the tracepoint's dispatch) are left out."""
    callers = [name for name in callers if not name.startswith(TRACING_FRAMES)]
    if hook and (not callers or callers[0] != hook):
        return [hook, *callers]
    return callers


class Symbolizer:
    """One lookup per distinct stack (a storm has few). The lists are shared between events:
    nothing downstream changes them."""

    def __init__(self, ksym: Callable[[int], str]):
        self.ksym = ksym
        self._stacks: dict[tuple, list[str]] = {}

    def names(self, hook: str | None, callers) -> list[str]:
        key = (hook, *callers)
        names = self._stacks.get(key)
        if names is None:
            names = with_hook(hook, [self.ksym(a) for a in callers if a])
            if len(self._stacks) >= MAX_STACKS:
                self._stacks.clear()
            self._stacks[key] = names
        return names
