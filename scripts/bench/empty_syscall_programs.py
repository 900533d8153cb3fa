#!/usr/bin/python3
"""An empty BPF program on the syscall exit tracepoint rsttrace --app-errors uses (raw_syscalls:sys_exit,
as a raw tracepoint): it returns at once. Attaching any syscall tracepoint sends every syscall of every
task through the kernel's slower tracing path, and this one runs a program at every syscall's exit;
what it costs is the floor any tracer of failed syscalls pays there, and rsttrace's cost above it is
its own work (scripts/bench/syscalls).

    /usr/bin/python3 scripts/bench/empty_syscall_programs.py

Compiled against rsttrace's own tiny header tree (bpf/kernel-headers: no kernel headers needed).
Prints "attached: empty programs on raw_syscalls:sys_exit" on stderr once attached; exits on SIGINT
or SIGTERM.
"""
import os
import signal
import sys
from pathlib import Path

from bcc import BPF


def main() -> int:
    os.environ["BCC_KERNEL_SOURCE"] = str(Path(__file__).resolve().parents[2] / "bpf" / "kernel-headers")
    bpf = BPF(text="RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }\n")
    print("attached: empty programs on raw_syscalls:sys_exit", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
