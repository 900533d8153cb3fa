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

BPF_MAP_CREATE, BPF_PROG_LOAD, BPF_PROG_TEST_RUN, BPF_PROG_GET_NEXT_ID, BPF_RAW_TRACEPOINT_OPEN = 0, 5, 10, 11, 17
BPF_F_TEST_RUN_ON_CPU = 1
PROG_TYPE_SOCKET_FILTER, PROG_TYPE_KPROBE, PROG_TYPE_SCHED_CLS = 1, 2, 3
PROG_TYPE_TRACEPOINT, PROG_TYPE_RAW_TRACEPOINT, PROG_TYPE_TRACING = 5, 17, 26
BPF_TRACE_RAW_TP, BPF_TRACE_FENTRY = 23, 24     # expected_attach_type of PROG_TYPE_TRACING (tp_btf, fentry)
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


def _load_trivial(prog_type: int, expected_attach_type: int = 0, attach_btf_id: int = 0) -> tuple[int, int]:
    """Load "r0 = 0; exit" as a program of this type: (fd, 0), or (-1, errno)."""
    insns = ctypes.create_string_buffer(_RETURN_ZERO, len(_RETURN_ZERO))
    license = ctypes.create_string_buffer(b"GPL")
    attr = (ctypes.c_uint8 * 128)()       # union bpf_attr, PROG_LOAD part; unused tail stays zero
    _put(attr, 0, 4, prog_type)
    _put(attr, 4, 4, 2)                                   # insn_cnt
    _put(attr, 8, 8, ctypes.addressof(insns))
    _put(attr, 16, 8, ctypes.addressof(license))
    _put(attr, 68, 4, expected_attach_type)
    _put(attr, 108, 4, attach_btf_id)
    return _bpf(BPF_PROG_LOAD, attr)


def probe_prog_load(prog_type: int, expected_attach_type: int = 0, attach_btf_id: int = 0) -> int:
    """0 if a trivial program of this type loads, else the errno."""
    fd, err = _load_trivial(prog_type, expected_attach_type, attach_btf_id)
    if fd >= 0:
        os.close(fd)
        return 0
    return err


def probe_fentry_attach(attach_btf_id: int) -> int:
    """0 if a trivial fentry program on this BTF function loads *and attaches* (some functions load
    but cannot be attached to), else the errno."""
    return probe_tracing_attach(BPF_TRACE_FENTRY, attach_btf_id)


def probe_tracing_attach(attach_type: int, attach_btf_id: int) -> int:
    """0 if a trivial PROG_TYPE_TRACING program of `attach_type` (fentry: a BTF function; tp_btf: a
    tracepoint's btf_trace_* typedef) loads and attaches, else the errno."""
    prog_fd, err = _load_trivial(PROG_TYPE_TRACING, attach_type, attach_btf_id)
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


def prog_test_run_on_cpu(prog_fd: int, cpu: int, args: tuple[int, ...] = ()) -> int:
    """Run a raw tracepoint program once on `cpu` (BPF_PROG_TEST_RUN, Linux 5.10+: an IPI to that CPU,
    or right here when it is this one), with `args` as its u64 arguments; 0 or the errno."""
    ctx = (ctypes.c_uint64 * max(len(args), 1))(*args)
    attr = (ctypes.c_uint8 * 80)()
    _put(attr, 0, 4, prog_fd)
    if args:
        _put(attr, 40, 4, 8 * len(args))                  # ctx_size_in
        _put(attr, 48, 8, ctypes.addressof(ctx))          # ctx_in
    _put(attr, 64, 4, BPF_F_TEST_RUN_ON_CPU)
    _put(attr, 68, 4, cpu)
    rc, err = _bpf(BPF_PROG_TEST_RUN, attr)
    return 0 if rc == 0 else err


def probe_test_run_on_cpu() -> int:
    """0 if a trivial raw tracepoint program can be run on CPU 0 on demand, else the errno."""
    fd, err = _load_trivial(PROG_TYPE_RAW_TRACEPOINT)
    if fd < 0:
        return err
    try:
        return prog_test_run_on_cpu(fd, 0)
    finally:
        os.close(fd)


def _cpu_list(name: str) -> list[int]:
    """The CPUs of /sys/devices/system/cpu/NAME ("0-3,6"), or all os.cpu_count() where unreadable."""
    try:
        with open(f"/sys/devices/system/cpu/{name}") as f:
            text = f.read().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def online_cpus() -> list[int]:
    """The CPUs online now."""
    return _cpu_list("online")


def probe_ringbuf() -> int:
    try:
        os.close(map_create(MAP_TYPE_RINGBUF, 0, 0, 4096, 0, ""))     # max_entries: one page
    except OSError as err:
        return err.errno
    return 0


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


# --- Maps and programs straight through bpf(2): what the program cache (progcache.py) loads with. ---

BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 1, 2, 3, 4
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "s390x": 331, "ppc64le": 319, "riscv64": 241}.get(
    platform.machine())
PERF_TYPE_TRACEPOINT, PERF_SAMPLE_RAW, PERF_FLAG_FD_CLOEXEC = 2, 1 << 10, 1 << 3
PERF_EVENT_IOC_ENABLE, PERF_EVENT_IOC_SET_BPF = 0x2400, 0x40042408


def _checked(fd: int, err: int, what: str) -> int:
    if fd < 0:
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return fd


def _name16(name: str) -> bytes:
    return name.encode()[:15]


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int, name: str) -> int:
    attr = (ctypes.c_uint8 * 72)()
    for offset, value in ((0, map_type), (4, key_size), (8, value_size), (12, max_entries), (16, flags)):
        _put(attr, offset, 4, value)
    ctypes.memmove(ctypes.addressof(attr) + 28, _name16(name), len(_name16(name)))
    return _checked(*_bpf(BPF_MAP_CREATE, attr), f"creating map {name}")


def _elem_attr(fd: int, key, value, flags: int = 0) -> ctypes.Array:
    attr = (ctypes.c_uint8 * 32)()
    _put(attr, 0, 4, fd)
    _put(attr, 8, 8, ctypes.addressof(key) if key is not None else 0)
    _put(attr, 16, 8, ctypes.addressof(value))
    _put(attr, 24, 8, flags)
    return attr


def map_update(fd: int, key: bytes, value: bytes) -> None:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value, len(value))
    _checked(*_bpf(BPF_MAP_UPDATE_ELEM, _elem_attr(fd, k, v)), "updating a map")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value_size)
    rc, _ = _bpf(BPF_MAP_LOOKUP_ELEM, _elem_attr(fd, k, v))
    return v.raw if rc == 0 else None


def map_delete(fd: int, key: bytes) -> bool:
    """Remove `key`; False where it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    attr = (ctypes.c_uint8 * 32)()
    _put(attr, 0, 4, fd)
    _put(attr, 8, 8, ctypes.addressof(k))
    rc, _ = _bpf(BPF_MAP_DELETE_ELEM, attr)
    return rc == 0


def map_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """The key after `key` (the first with None), or None at the end."""
    k = ctypes.create_string_buffer(key, key_size) if key is not None else None
    nxt = ctypes.create_string_buffer(key_size)
    rc, _ = _bpf(BPF_MAP_GET_NEXT_KEY, _elem_attr(fd, k, nxt))
    return nxt.raw if rc == 0 else None


def prog_load(prog_type: int, insns: bytes, license: bytes, kern_version: int, name: str,
              attach_type: int = 0, attach_btf_id: int = 0) -> int:
    """Load a program; a refusal raises OSError with the verifier's log. `attach_type` and
    `attach_btf_id`: a PROG_TYPE_TRACING program's expected_attach_type and BTF target."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license)
    log = ctypes.create_string_buffer(1 << 16)
    attr = (ctypes.c_uint8 * 128)()
    _put(attr, 0, 4, prog_type)
    _put(attr, 4, 4, len(insns) // 8)
    _put(attr, 8, 8, ctypes.addressof(code))
    _put(attr, 16, 8, ctypes.addressof(lic))
    _put(attr, 40, 4, kern_version)
    ctypes.memmove(ctypes.addressof(attr) + 48, _name16(name), len(_name16(name)))
    _put(attr, 68, 4, attach_type)
    _put(attr, 108, 4, attach_btf_id)
    fd, err = _bpf(BPF_PROG_LOAD, attr)
    if fd < 0:       # again with the log: only a refused program pays for it
        _put(attr, 24, 4, 1)
        _put(attr, 28, 4, len(log))
        _put(attr, 32, 8, ctypes.addressof(log))
        fd, err = _bpf(BPF_PROG_LOAD, attr)
    if fd < 0:
        raise OSError(err, f"loading {name}: {os.strerror(err)}\n{log.value.decode(errors='replace')}")
    return fd


def raw_tracepoint_open(tracepoint: str | None, prog_fd: int) -> int:
    """Attach a raw tracepoint program to `tracepoint`, or (None) a BTF tracepoint program to the
    tracepoint it was loaded for; the link's fd (closing it detaches)."""
    name = ctypes.create_string_buffer(tracepoint.encode()) if tracepoint else None
    attr = (ctypes.c_uint8 * 16)()
    _put(attr, 0, 8, ctypes.addressof(name) if name else 0)
    _put(attr, 8, 4, prog_fd)
    return _checked(*_bpf(BPF_RAW_TRACEPOINT_OPEN, attr), f"attaching raw tracepoint {tracepoint or 'of a BTF program'}")


def tracepoint_attach(tracepoint_id: int, prog_fd: int) -> int:
    """A perf event on tracepoint `tracepoint_id` (tracefs events/<category>/<name>/id) running
    `prog_fd` on every CPU — what bcc's attach_tracepoint does: the event is opened on CPU 0 only, and
    the program runs wherever the tracepoint fires."""
    if _NR_PERF_EVENT_OPEN is None:
        raise OSError(errno.ENOSYS, "perf_event_open: unknown on this machine")
    attr = (ctypes.c_uint8 * 128)()
    _put(attr, 0, 4, PERF_TYPE_TRACEPOINT)
    _put(attr, 4, 4, 128)                     # size
    _put(attr, 8, 8, tracepoint_id)           # config
    _put(attr, 16, 8, 1)                      # sample_period
    _put(attr, 24, 8, PERF_SAMPLE_RAW)
    _put(attr, 48, 4, 1)                      # wakeup_events
    fd = _libc.syscall(_NR_PERF_EVENT_OPEN, ctypes.byref(attr), -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    fd = _checked(fd, ctypes.get_errno() if fd < 0 else 0, "perf_event_open on a tracepoint")
    try:
        for request, arg in ((PERF_EVENT_IOC_SET_BPF, prog_fd), (PERF_EVENT_IOC_ENABLE, 0)):
            if _libc.ioctl(fd, request, arg) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"attaching a program to a tracepoint: {os.strerror(err)}")
    except OSError:
        os.close(fd)
        raise
    return fd


def possible_cpus() -> int:
    """How many values a per-CPU map holds per key (the kernel's cpu_possible_mask)."""
    return max(_cpu_list("possible")) + 1
