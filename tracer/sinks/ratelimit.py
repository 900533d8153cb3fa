"""--max-rate: at most N event records per second reach the sinks; the rest are counted, not written.

A fixed one-second window, not a token bucket: what an operator reads as "N per second", and the
`suppressed` record that closes each window says exactly what that window held back. The kernel's
exact counts are unaffected (every event is counted there before any record is made).
"""
from __future__ import annotations

from collections import Counter

WINDOW_S = 1.0


class RateLimit:
    def __init__(self, per_second: int):
        if per_second < 1:
            raise ValueError("--max-rate must be at least 1")
        self.per_second = per_second
        self.window_start: float | None = None
        self.passed = 0                                   # records let through in this window
        self.held_back: Counter[tuple[str, str]] = Counter()   # (event, reason) → held back in this window
        self.total_held_back = 0

    def allow(self, now: float, kind: str, reason: str) -> bool:
        if self.window_start is None:
            self.window_start = now
        if self.passed < self.per_second:
            self.passed += 1
            return True
        self.held_back[(kind, reason)] += 1
        self.total_held_back += 1
        return False

    def window_over(self, now: float) -> bool:
        return self.window_start is not None and now - self.window_start >= WINDOW_S

    def close_window(self, now: float) -> tuple[float, dict[str, dict[str, int]]] | None:
        """End the window: (its length, what it held back by event and reason), or None if it held
        nothing back. The next window starts now."""
        if self.window_start is None:
            return None
        length, held = now - self.window_start, self.held_back
        self.window_start, self.passed, self.held_back = now, 0, Counter()
        if not held:
            return None
        by_kind: dict[str, dict[str, int]] = {}
        for (kind, reason), n in sorted(held.items()):
            by_kind.setdefault(kind, {})[reason] = n
        return length, by_kind
