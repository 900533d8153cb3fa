"""Facts about the running kernel that hold until the next boot, kept for the next run.

Start-up reads the kernel's BTF (megabytes to read and search) for struct offsets and
function ids, and /proc/kallsyms (the kernel formats every line it is asked for) for the softirq
entry functions and, at the first event, the names of the functions on the stacks. None of that
changes until the next boot: core kernel text stays where KASLR put it at boot, and vmlinux's BTF
with it. So each run keeps what it learned in /run/rsttrace/boot-<boot id>.json (tmpfs: gone at
reboot; a root-only directory, checked as kernel/rootfiles.py says), and the next run starts from it. Module symbols are never kept
(modules can be unloaded and loaded elsewhere). A section carries a key saying what produced it
(rsttrace's field list, for offsets): a different key means "not cached". Unreadable or
unwritable, the cache is simply not used.
"""
from __future__ import annotations

import os

from . import rootfiles

DIRECTORY = "/run/rsttrace"


class BootCache:
    def __init__(self, directory: str = DIRECTORY):
        self.directory = directory
        self.path: str | None = None
        self._data: dict = {}
        self._dirty = False
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
            self.path = os.path.join(directory, f"boot-{boot}.json")
        except OSError:
            return
        self._data = rootfiles.read_json(self.path) or {}

    def get(self, section: str, key: str | None = None):
        """A section's value, or None (absent, or made for another key)."""
        entry = self._data.get(section)
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        return entry.get("value")

    def put(self, section: str, value, key: str | None = None) -> None:
        self._data[section] = {"key": key, "value": value}
        self._dirty = True

    def save(self) -> None:
        """Write it out if anything changed (atomically: a concurrent run reads the old or the new)."""
        if self._dirty and self.path and rootfiles.write_json(self.path, self._data):
            self._dirty = False
