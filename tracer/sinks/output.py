"""Where lines go: stdout or an append-only file, whole lines per write(2)."""
from __future__ import annotations

import os
import sys


class LineOutput:
    """Appends complete lines on an O_APPEND descriptor. Lines wait in memory only until the end of
    the batch of events they belong to (flush(), called by the session after every poll), then go
    out in one write(): a reader never sees half a record, and a storm costs one syscall per batch
    instead of one per record."""

    MAX_PENDING = 1 << 20      # bytes: flush early rather than hold more than this

    def __init__(self, path: str | None = None):
        self.path = path if path not in (None, "-") else None
        if self.path:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._owned = True
        else:
            self.fd = 1
            self._owned = False
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def write_line(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_bytes(self, line: bytes) -> None:
        """One line, UTF-8, without its newline."""
        self._pending.append(line)
        self._pending_bytes += len(line) + 1
        if self._pending_bytes >= self.MAX_PENDING:
            self.flush()

    def write_lines(self, lines: list[bytes]) -> None:
        """Many lines at once (the fast path's batch), as write_bytes() each."""
        self._pending += lines
        self._pending_bytes += sum(map(len, lines)) + len(lines)
        if self._pending_bytes >= self.MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        self._pending.append(b"")
        data = memoryview(b"\n".join(self._pending))
        self._pending, self._pending_bytes = [], 0
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    def reopen(self) -> None:
        """After log rotation (SIGHUP): start a new file at the configured path."""
        self.flush()                 # what was written before the rotation belongs to the old file
        if self._owned:
            try:
                new_fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            except OSError as err:
                # Keep writing to the old (rotated) file rather than lose records; say so once.
                print(f"rsttrace: cannot reopen {self.path} ({err.strerror}); still writing to the old file",
                      file=sys.stderr, flush=True)
                return
            os.close(self.fd)
            self.fd = new_fd

    def close(self) -> None:
        self.flush()
        if self._owned:
            try:
                os.fsync(self.fd)
            except OSError:
                pass          # /dev/null, a pipe or a FIFO: nothing to flush to disk
            os.close(self.fd)
            self._owned = False
