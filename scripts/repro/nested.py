"""Two kinds of event at once on one CPU, so that one hook's program interrupts another's (run it
inside a private netns whose lo steers every packet to CPU 0 with RPS: see tests/kernel/test_nesting.py).

On CPU 0 a client opens connections to RESET_PORT and closes each with SO_LINGER {1, 0}: an RST
sent in process context (tcp:tcp_send_reset). On CPU 1 another process connects to FULL_PORT,
whose accept queue is full, and closes at once: each SYN is dropped in a softirq on CPU 0 (raised by
an RPS IPI), often while CPU 0 is inside the RST program. Every loop is bounded by SECONDS; the
script prints one JSON line of facts.

    python3 nested.py ADDR FULL_PORT RESET_PORT SECONDS
"""
from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time

LINGER_ZERO = struct.pack("ii", 1, 0)


def listener(addr: str, port: int, backlog: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(backlog)
    return s


def flood_syns(addr: str, port: int, seconds: float) -> int:
    """Non-blocking connects closed at once: one SYN each, never retransmitted."""
    os.sched_setaffinity(0, {1})
    deadline, syns = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((addr, port))
        s.close()
        syns += 1
    return syns


def main() -> None:
    addr, full_port, reset_port, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    full = listener(addr, full_port, 0)
    queued = socket.create_connection((addr, full_port))     # never accepted: qlen 1 > backlog 0
    resets = listener(addr, reset_port, 4096)
    read_end, write_end = os.pipe()
    flooder = os.fork()
    if flooder == 0:
        os.close(read_end)
        os.write(write_end, b"%d" % flood_syns(addr, full_port, seconds))
        os._exit(0)
    os.close(write_end)

    def accept_and_close() -> None:
        while True:
            try:
                conn, _ = resets.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=accept_and_close, daemon=True).start()
    os.sched_setaffinity(0, {0})
    deadline, closed = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        c = socket.create_connection((addr, reset_port), timeout=5)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
        c.close()                     # tcp_send_active_reset(), in this process
        closed += 1
    os.waitpid(flooder, 0)
    syns = int(os.read(read_end, 32) or b"0")
    time.sleep(0.2)                   # the last softirqs on CPU 0
    print(json.dumps({"linger_closes": closed, "syns": syns}), flush=True)
    queued.close()
    resets.close()
    full.close()


if __name__ == "__main__":
    main()
