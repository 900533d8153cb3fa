"""Tiny bpf(2) probes: can this kernel, for this process, load a program of type X?

Each probe loads a two-instruction program ("r0 = 0; exit") straight through the syscall and
closes it at once, so `doctor` and start-up learn what is really allowed (an active BPF LSM, for
instance, refuses fentry with EPERM even to root) in about a millisecond, without bcc.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform

_NR_BPF = {"x86_64": 321, "aarch64": 280, "s390x": 351, "ppc64le": 361, "riscv64": 280}.get(platform.machine())

BPF_MAP_CREATE, BPF_PROG_LOAD, BPF_PROG_GET_NEXT_ID, BPF_RAW_TRACEPOINT_OPEN = 0, 5, 11, 17
PROG_TYPE_SOCKET_FILTER, PROG_TYPE_KPROBE, PROG_TYPE_SCHED_CLS = 1, 2, 3
PROG_TYPE_TRACEPOINT, PROG_TYPE_RAW_TRACEPOINT, PROG_TYPE_TRACING = 5, 17, 26
BPF_TRACE_FENTRY = 24
MAP_TYPE_RINGBUF = 27

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# r0 = 0 (BPF_ALU64 | BPF_MOV | BPF_K); exit (BPF_JMP | BPF_EXIT)
_RETURN_ZERO = bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])


def _bpf(cmd: int, attr: ctypes.Array) -> tuple[int, int]:
    if _NR_BPF is None:
        return -1, errno.ENOSYS
    fd = _libc.syscall(_NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    return fd, (ctypes.get_errno() if fd < 0 else 0)


def _put(buf: ctypes.Array, offset: int, fmt_size: int, value: int) -> None:
    ctypes.memmove(ctypes.addressof(buf) + offset, value.to_bytes(fmt_size, "little"), fmt_size)


def probe_prog_load(prog_type: int, expected_attach_type: int = 0, attach_btf_id: int = 0) -> int:
    """0 if a trivial program of this type loads, else the errno."""
    insns = ctypes.create_string_buffer(_RETURN_ZERO, len(_RETURN_ZERO))
    license = ctypes.create_string_buffer(b"GPL")
    attr = (ctypes.c_uint8 * 128)()       # union bpf_attr, PROG_LOAD part; unused tail stays zero
    _put(attr, 0, 4, prog_type)
    _put(attr, 4, 4, 2)                                   # insn_cnt
    _put(attr, 8, 8, ctypes.addressof(insns))
    _put(attr, 16, 8, ctypes.addressof(license))
    _put(attr, 68, 4, expected_attach_type)
    _put(attr, 108, 4, attach_btf_id)
    fd, err = _bpf(BPF_PROG_LOAD, attr)
    if fd >= 0:
        os.close(fd)
        return 0
    return err


def probe_fentry_attach(attach_btf_id: int) -> int:
    """0 if a trivial fentry program on this BTF function loads *and attaches* (some functions load
    but cannot be attached to), else the errno."""
    insns = ctypes.create_string_buffer(_RETURN_ZERO, len(_RETURN_ZERO))
    license = ctypes.create_string_buffer(b"GPL")
    attr = (ctypes.c_uint8 * 128)()
    _put(attr, 0, 4, PROG_TYPE_TRACING)
    _put(attr, 4, 4, 2)
    _put(attr, 8, 8, ctypes.addressof(insns))
    _put(attr, 16, 8, ctypes.addressof(license))
    _put(attr, 68, 4, BPF_TRACE_FENTRY)
    _put(attr, 108, 4, attach_btf_id)
    prog_fd, err = _bpf(BPF_PROG_LOAD, attr)
    if prog_fd < 0:
        return err
    try:
        open_attr = (ctypes.c_uint8 * 16)()        # raw_tracepoint: name = NULL, prog_fd
        _put(open_attr, 8, 4, prog_fd)
        link_fd, err = _bpf(BPF_RAW_TRACEPOINT_OPEN, open_attr)
        if link_fd < 0:
            return err
        os.close(link_fd)
        return 0
    finally:
        os.close(prog_fd)


def probe_ringbuf() -> int:
    attr = (ctypes.c_uint8 * 72)()
    _put(attr, 0, 4, MAP_TYPE_RINGBUF)
    _put(attr, 12, 4, 4096)                               # max_entries: one page
    fd, err = _bpf(BPF_MAP_CREATE, attr)
    if fd >= 0:
        os.close(fd)
        return 0
    return err


def describe(err: int) -> str:
    return "ok" if err == 0 else f"{errno.errorcode.get(err, err)} ({os.strerror(err)})"


def loaded_prog_ids() -> set[int]:
    """Ids of every BPF program the kernel has loaded (BPF_PROG_GET_NEXT_ID: takes no reference)."""
    ids: set[int] = set()
    attr = (ctypes.c_char * 16)()
    start = 0
    while len(ids) < 1_000_000:
        _put(attr, 0, 4, start)
        rc, err = _bpf(BPF_PROG_GET_NEXT_ID, attr)
        if rc < 0:
            break            # ENOENT: no more
        start = int.from_bytes(bytes(attr[4:8]), "little")
        ids.add(start)
    return ids


def fdinfo_value(fd: int, name: str) -> int | None:
    """A number the kernel shows for a BPF file descriptor of ours (/proc/self/fdinfo: prog_id,
    recursion_misses, ...), or None where it shows none."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def prog_ids_of_fds(fds) -> set[int]:
    """The program ids behind these file descriptors of ours."""
    return {pid for pid in (fdinfo_value(fd, "prog_id") for fd in fds) if pid is not None}


def recursion_misses(fd: int) -> int:
    """How often the kernel skipped the program behind `fd` because a program was already running on
    that CPU (fdinfo recursion_misses, Linux 5.12+; 0 where the kernel does not say)."""
    return fdinfo_value(fd, "recursion_misses") or 0
