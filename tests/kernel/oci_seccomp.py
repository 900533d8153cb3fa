"""Run a command under an OCI seccomp profile (the JSON a Kubernetes `Localhost` profile is), loaded
with libseccomp as runc loads it: every listed syscall allowed, anything else answered with the
profile's errno. No no_new_privs (a pod without allowPrivilegeEscalation: false has none).

    python3 oci_seccomp.py PROFILE.json COMMAND [ARGS...]
"""
import ctypes
import json
import os
import sys

SCMP_ACT_ALLOW, SCMP_ACT_ERRNO = 0x7FFF0000, 0x00050000
SCMP_FLTATR_CTL_NNP = 3

profile = json.load(open(sys.argv[1]))
assert profile["defaultAction"] == "SCMP_ACT_ERRNO", "only allow-lists are loaded here"
lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
ctx = ctypes.c_void_p(lib.seccomp_init(SCMP_ACT_ERRNO | profile.get("defaultErrnoRet", 1)))
if lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0) != 0:
    sys.exit("seccomp: cannot leave no_new_privs off")
for rule in profile["syscalls"]:
    assert rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args"), rule
    for name in rule["names"]:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:          # a syscall of another architecture has no number here
            if lib.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0) != 0:
                sys.exit(f"seccomp: cannot allow {name}")
if lib.seccomp_load(ctx) != 0:
    sys.exit(f"seccomp: load failed: {os.strerror(ctypes.get_errno())}")
os.execvp(sys.argv[2], sys.argv[2:])
