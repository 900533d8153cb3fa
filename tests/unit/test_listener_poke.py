"""The listener poke (tracer/kernel/listener_poke.py) on real sockets held by another process: it
must reach a listener through a copy of its fd, and never take a byte from anything else."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

from tracer.kernel import listener_poke

HOLDER = textwrap.dedent("""
    import os, socket, sys
    kind = sys.argv[1]
    if kind == "listener":
        s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(4)
        print(os.fstat(s.fileno()).st_ino, s.getsockname()[1], flush=True)
        sys.stdin.readline()
        s.settimeout(5); c, _ = s.accept()             # still a working listener after the poke
        print("accepted", flush=True)
    else:                                               # a connected socket with 5 unread bytes
        a, b = socket.socketpair()
        b.sendall(b"hello")
        print(os.fstat(a.fileno()).st_ino, 0, flush=True)
        sys.stdin.readline()
        a.settimeout(5)
        print(a.recv(100).decode(), flush=True)
""")


def holder(kind: str) -> tuple[subprocess.Popen, int, int]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    inode, port = map(int, proc.stdout.readline().split())
    return proc, inode, port


def finish(proc: subprocess.Popen) -> str:
    proc.stdin.write("\n")
    proc.stdin.flush()
    out = proc.stdout.readline().strip()
    proc.wait(timeout=10)
    return out


def test_a_listener_is_reached_through_a_copy_of_its_fd_and_keeps_working():
    proc, inode, port = holder("listener")
    try:
        assert listener_poke.fd_of_socket(proc.pid, inode) is not None
        assert listener_poke.poke(proc.pid, inode) is True
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            assert finish(proc) == "accepted"
    finally:
        proc.kill()


def test_a_socket_that_is_not_listening_is_left_alone_with_every_byte():
    proc, inode, _ = holder("connected")
    try:
        assert listener_poke.poke(proc.pid, inode) is False
        assert finish(proc) == "hello"
    finally:
        proc.kill()


def test_a_process_without_that_socket_or_gone_is_refused():
    proc, inode, _ = holder("listener")
    proc.kill()
    proc.wait()
    assert listener_poke.poke(proc.pid, inode) is False
    assert listener_poke.poke(os.getpid(), inode) is False     # this process holds no such socket
