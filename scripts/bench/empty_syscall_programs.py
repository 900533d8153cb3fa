#!/usr/bin/python3
"""Empty BPF programs on the syscall exit tracepoints rsttrace's failed-syscall records use
(syscalls:sys_exit_NAME for the NAMEs given, or those below, that this kernel has): each returns at once. Attaching
any syscall tracepoint sends every syscall of every task through the kernel's slower tracing path;
what these cost is that price plus running an empty program at the exit of the traced syscalls,
the floor any tracer of failed syscalls pays, and rsttrace's cost above it is its own work
(scripts/bench/syscalls).

    /usr/bin/python3 scripts/bench/empty_syscall_programs.py [NAME ...]

(scripts/bench/syscalls passes rsttrace's own list, tracer.kernel.hooks.APP_SYSCALLS.)

Compiled against rsttrace's own tiny header tree (bpf/kernel-headers: no kernel headers needed).
Prints "attached: empty programs on N syscall exit tracepoints" on stderr once attached; exits on
SIGINT or SIGTERM.
"""
import os
import signal
import sys
from pathlib import Path

from bcc import BPF

# the syscalls rsttrace hooks (tracer.kernel.hooks.APP_SYSCALLS), where none are given
SYSCALLS = ("open", "openat", "openat2", "creat", "mkdir", "mkdirat", "rename", "renameat", "renameat2",
            "unlink", "unlinkat", "write", "pwrite64", "writev", "fsync", "connect", "accept", "accept4",
            "socket", "sendfile64", "splice", "listen")
EVENTS = Path("/sys/kernel/tracing/events/syscalls")


def present(names) -> list[str]:
    return [name for name in names if (EVENTS / f"sys_exit_{name}").is_dir()]


def main() -> int:
    os.environ["BCC_KERNEL_SOURCE"] = str(Path(__file__).resolve().parents[2] / "bpf" / "kernel-headers")
    names = present(sys.argv[1:] or SYSCALLS)
    if not names:
        print(f"empty_syscall_programs: no syscall exit tracepoints under {EVENTS}", file=sys.stderr)
        return 1
    bpf = BPF(text="".join(f"TRACEPOINT_PROBE(syscalls, sys_exit_{n}) {{ return 0; }}\n" for n in names))
    print(f"attached: empty programs on {len(names)} syscall exit tracepoints ({' '.join(names)})",
          file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
