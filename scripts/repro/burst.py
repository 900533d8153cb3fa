"""The burst that overflowed the accept queue, reproduced (run it inside a private netns).

A server listens with a small backlog and accepts slowly or never; a client fires hundreds of
concurrent connects. Every wait is bounded; the script prints one JSON line of facts.

    python3 burst.py server ADDR PORT BACKLOG [SECONDS]   listen, never accept, exit after SECONDS
    python3 burst.py accepting ADDR PORT BACKLOG [SECONDS]  listen, accept and close as fast as it can
    python3 burst.py clients ADDR PORT N [SECONDS]        N concurrent connects, then report outcomes
    python3 burst.py burst ADDR PORT BACKLOG N            both of the above (server forked)
    python3 burst.py synflood ADDR PORT N                 N raw SYNs from distinct source ports
    python3 burst.py stuck ADDR PORT N [SECONDS]          N clients whose final ACK the netns must drop
                                                          (see tests); they then send data and report

With sysctl net.ipv4.tcp_abort_on_overflow=1 in the netns, overflowing clients get ECONNRESET.
"""
from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import struct
import sys
import time


def family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def listen_on(addr: str, port: int, backlog: int) -> socket.socket:
    srv = socket.socket(family(addr), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(backlog)
    return srv


def serve(addr: str, port: int, backlog: int, seconds: float, ready_fd: int | None = None) -> None:
    srv = listen_on(addr, port, backlog)     # never accept(): the accept queue fills up
    if ready_fd is not None:
        os.write(ready_fd, b"1")
    else:
        print(json.dumps({"server_pid": os.getpid(), "backlog": backlog}), flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    srv.close()


def serve_accepting(addr: str, port: int, backlog: int, seconds: float) -> None:
    """A server that keeps up as well as one thread can: its queues fill only at the moment of a burst."""
    srv = listen_on(addr, port, backlog)
    srv.settimeout(0.2)
    print(json.dumps({"server_pid": os.getpid(), "backlog": backlog}), flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            continue
        conn.close()
    srv.close()


def connect_many(addr: str, port: int, n: int, seconds: float) -> dict:
    """N non-blocking connects at once; wait (bounded) for each to connect, fail or time out."""
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(n):
        s = socket.socket(family(addr), socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((addr, port))
        sel.register(s, selectors.EVENT_WRITE)
        socks.append(s)
    outcome: dict[str, int] = {}
    pending = set(socks)
    deadline = time.monotonic() + seconds
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.1):
            s = key.fileobj
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            name = "connected" if err == 0 else errno.errorcode.get(err, str(err))
            outcome[name] = outcome.get(name, 0) + 1
            sel.unregister(s)
            pending.discard(s)
    outcome["pending"] = len(pending)
    for s in socks:
        s.close()
    return {"client_pid": os.getpid(), "clients": n, "outcome": outcome}


def burst(addr: str, port: int, backlog: int, n: int) -> dict:
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        serve(addr, port, backlog, 6.0, ready_fd=w)
        os._exit(0)
    os.close(w)
    os.read(r, 1)
    facts = connect_many(addr, port, n, 3.0)
    os.kill(child, 15)
    os.waitpid(child, 0)
    return {"server_pid": child, "backlog": backlog, **facts}


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def synflood(addr: str, port: int, n: int) -> dict:
    """Raw IPv4 SYNs, never completed (the test drops the SYN-ACKs so that no RST clears them)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    src = socket.inet_aton(addr)
    dst = socket.inet_aton(addr)
    for i in range(n):
        sport = 20000 + i
        # sport, dport, seq, ack, data offset 5 words, flags SYN, window, checksum, urgent
        hdr = struct.pack("!HHIIBBHHH", sport, port, 1000 + i, 0, 5 << 4, 0x02, 65535, 0, 0)
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(hdr))
        hdr = hdr[:16] + struct.pack("!H", checksum(pseudo + hdr)) + hdr[18:]
        s.sendto(hdr, (addr, 0))
    s.close()
    return {"sent": n, "first_sport": 20000}


def stuck(addr: str, port: int, n: int, seconds: float) -> dict:
    """Connect N clients from ports 40000.. (their final ACK is dropped by the caller's firewall rule),
    wait for a signal on stdin that the queue is full and the rule is gone, then send data: the
    listener meets the data as the 3rd ACK at a full accept queue."""
    socks = []
    for i in range(n):
        s = socket.socket(family(addr), socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, 40000 + i))
        s.settimeout(seconds)
        s.connect((addr, port))        # completes on the client side: its SYN-ACK arrived
        socks.append(s)
    print(json.dumps({"stuck_pid": os.getpid(), "connected": len(socks)}), flush=True)
    sys.stdin.readline()               # the test fills the queue and lifts the rule
    outcome: dict[str, int] = {}
    for s in socks:
        try:
            s.send(b"hello")
            s.settimeout(2.0)
            data = s.recv(1)
            name = "data" if data else "eof"
        except socket.timeout:
            name = "timeout"
        except OSError as exc:
            name = errno.errorcode.get(exc.errno, str(exc.errno))
        outcome[name] = outcome.get(name, 0) + 1
        s.close()
    return {"stuck_pid": os.getpid(), "outcome": outcome}


if __name__ == "__main__":
    cmd, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rest = [float(a) for a in sys.argv[4:]]
    if cmd == "server":
        serve(addr, port, int(rest[0]), rest[1] if len(rest) > 1 else 30.0)
        sys.exit(0)
    if cmd == "accepting":
        serve_accepting(addr, port, int(rest[0]), rest[1] if len(rest) > 1 else 30.0)
        sys.exit(0)
    if cmd == "clients":
        result = connect_many(addr, port, int(rest[0]), rest[1] if len(rest) > 1 else 3.0)
    elif cmd == "burst":
        result = burst(addr, port, int(rest[0]), int(rest[1]))
    elif cmd == "synflood":
        result = synflood(addr, port, int(rest[0]))
    elif cmd == "stuck":
        result = stuck(addr, port, int(rest[0]), rest[1] if len(rest) > 1 else 10.0)
    else:
        sys.exit(f"unknown command {cmd}")
    print(json.dumps(result), flush=True)
