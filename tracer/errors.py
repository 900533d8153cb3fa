"""Errors that end rsttrace with a one-line message and a distinct exit code."""
from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1       # a bug: a Python traceback is printed
EXIT_USAGE = 2          # bad command line (click's convention)
EXIT_NOT_ROOT = 3       # needs root (or CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN)
EXIT_BPF_REFUSED = 4    # the kernel refused to load or attach a BPF program
EXIT_UNSUPPORTED = 5    # the kernel lacks something rsttrace needs (BTF, tracefs, tracepoints)


class RsttraceError(Exception):
    """An error the user can act on: printed as `rsttrace: <message>` and exit with `exit_code`."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, remedy: str | None = None):
        super().__init__(message)
        self.remedy = remedy

    def one_line(self) -> str:
        text = str(self)
        return f"{text} — {self.remedy}" if self.remedy else text


class NotRootError(RsttraceError):
    exit_code = EXIT_NOT_ROOT


class BPFRefusedError(RsttraceError):
    exit_code = EXIT_BPF_REFUSED


class UnsupportedKernelError(RsttraceError):
    exit_code = EXIT_UNSUPPORTED
