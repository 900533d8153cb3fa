"""Where lines go: stdout or an append-only file, one whole line per write(2)."""
from __future__ import annotations

import os
import sys


class LineOutput:
    """Appends complete lines. Each line is a single write() on an O_APPEND descriptor, so
    concurrent writers and readers never see half a record; nothing is buffered in Python."""

    def __init__(self, path: str | None = None):
        self.path = path if path not in (None, "-") else None
        if self.path:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._owned = True
        else:
            self.fd = 1
            self._owned = False

    def write_line(self, text: str) -> None:
        data = (text + "\n").encode()
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    def reopen(self) -> None:
        """After log rotation (SIGHUP): start a new file at the configured path."""
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
        if self._owned:
            try:
                os.fsync(self.fd)
            except OSError:
                pass          # /dev/null, a pipe or a FIFO: nothing to flush to disk
            os.close(self.fd)
            self._owned = False
