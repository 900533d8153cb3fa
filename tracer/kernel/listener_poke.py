"""Make a listener that predates rsttrace pass through a hook, so that its SYN drops are seen at once.

A listener created before rsttrace started never went through listen() while traced, and the BPF
side knows a listener only by its `struct sock *` (bpf/maps.bpf.c, listeners). The hooks that name
one (sock:sk_data_ready on a queued child, skb:kfree_skb's rx_sk) may never fire for it: an
application stuck with a full accept queue queues no child, and its SYNs are dropped without a trace.
So rsttrace pokes it: it takes a copy of the listener's file descriptor from a process that holds it
(pidfd_getfd, Linux 5.6+, root) and calls recv(MSG_DONTWAIT | MSG_PEEK) on the copy. On a listening TCP socket
that fails with ENOTCONN and changes nothing — no data, no state, no wakeup of the owner — but it runs
sock:sock_recv_length with the listener's socket, where bpf/listen.bpf.c learns it.
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket

SYS_PIDFD_GETFD = 438          # the same number on every architecture (unified syscall table, 5.6)

_libc = ctypes.CDLL(None, use_errno=True)


def fd_of_socket(pid: int, inode: int) -> int | None:
    """The number of a file descriptor of process `pid` that is socket `inode`, if it has one."""
    target = f"socket:[{inode}]"
    try:
        with os.scandir(f"/proc/{pid}/fd") as fds:
            for entry in fds:
                try:
                    if os.readlink(entry.path) == target:
                        return int(entry.name)
                except OSError:
                    continue
    except OSError:
        pass
    return None


def poke(pid: int, inode: int) -> bool:
    """recv() once on a copy of the listener's fd taken from `pid`. True if the recv ran (it answers
    ENOTCONN); False if the process, its fd or the copy could not be had (it exited, another ptrace
    policy, a kernel before 5.6) — the listener is then learned the slower way."""
    target = fd_of_socket(pid, inode)
    if target is None:
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        fd = _libc.syscall(SYS_PIDFD_GETFD, pidfd, target, 0)
        if fd < 0:
            return False
        sock = socket.socket(fileno=fd)     # closing it closes the copy only; the owner's fd stays
        try:
            # Still that listener (the owner may have reused the fd number meanwhile)? MSG_PEEK as
            # well: even a socket that stopped listening a moment ago loses no byte to this.
            if os.fstat(fd).st_ino != inode or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                return False
            sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except OSError as err:
            return err.errno == errno.ENOTCONN
        finally:
            sock.close()
        return False
    finally:
        os.close(pidfd)
