"""Run a command with the bpf(2) syscall refused (EPERM) by a seccomp filter, as container runtimes
do (Docker's default profile blocks bpf). Root and all capabilities stay: only the kernel says no.

    python3 deny_bpf.py COMMAND [ARGS...]
"""
import ctypes
import errno
import os
import struct
import sys

NR_BPF = 321                     # x86_64
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06


def insn(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)


program = b"".join([
    insn(BPF_LD_W_ABS, 0, 0, 0),                                   # A = seccomp_data.nr
    insn(BPF_JEQ_K, 0, 1, NR_BPF),                                 # if A == bpf
    insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM),        #   return EPERM
    insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),                      # else allow
])
buf = ctypes.create_string_buffer(program, len(program))


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


prog = SockFprog(len(program) // 8, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
        libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
    sys.exit(f"seccomp: {os.strerror(ctypes.get_errno())}")
os.execvp(sys.argv[1], sys.argv[1:])
