"""Connect bursts in which every client records its own fate (run it inside a private netns).

Each client gets one record, so that a test can compare, client by client, what a tracer saw with
what the client itself measured. Every wait is bounded; each command prints JSON lines of facts.

    python3 story.py burst ADDR PORT BACKLOG FILL N TIMEOUT_S [HOLD_S]
        fork a server that never accepts; FILL clients connect one after another and stay open,
        then N clients connect at once; each gives up TIMEOUT_S after its own start; connected
        ones are watched for a RST or FIN for HOLD_S (default 0.5) once none is still connecting
    python3 story.py slow ADDR PORT BACKLOG N ACCEPT_EVERY_S TIMEOUT_S [HOLD_S]
        the same without FILL, against a server that accepts (and closes at once) one connection
        every ACCEPT_EVERY_S; HOLD_S defaults to 0
    python3 story.py stuck ADDR PORT N FIRST_PORT
        N clients from ports FIRST_PORT.. whose final ACK the netns must drop (see tests); print
        the records, wait for a line on stdin (60 s at most), then each sends b"hello", waits 2 s
        for one byte and closes; print the records again

A record: group (fill, burst, stuck), local_port, start_ns (just before connect), connected_ns
(null if never), outcome, errno (name or null), end_ns (when the outcome was decided), close_begin_ns
and close_end_ns (around close()). Outcomes: connected | error | gave_up | reset | eof, and for stuck
after "go": data | eof | timeout | reset | error. For gave_up the close is the outcome: end_ns is
taken after close(). stuck records also carry send_ns. All times are time.monotonic_ns(), i.e.
CLOCK_MONOTONIC, the clock of the kernel's bpf_ktime_get_ns().
"""
from __future__ import annotations

import errno
import json
import os
import select
import selectors
import signal
import socket
import sys
import time
import traceback
from collections import Counter

now = time.monotonic_ns


def family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def decide(rec: dict, outcome: str, err: int | None = None) -> None:
    rec["end_ns"] = now()
    rec["outcome"] = outcome
    rec["errno"] = errname(err) if err else None
    if outcome == "connected":
        rec["connected_ns"] = rec["end_ns"]


def close(s: socket.socket, rec: dict) -> None:
    rec["close_begin_ns"] = now()
    s.close()
    rec["close_end_ns"] = now()


def fork_server(addr: str, port: int, backlog: int, accept_every: float | None) -> int:
    """Listen in a child (accepting one connection per tick, or never); return once it listens."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:                                   # the child must never fall back into the parent's code
            os.close(r)
            srv = socket.socket(family(addr), socket.SOCK_STREAM)
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((addr, port))
            srv.listen(backlog)
            srv.setblocking(False)
            os.write(w, b"1")
            deadline = time.monotonic() + 60.0  # the parent SIGTERMs us long before
            while time.monotonic() < deadline:
                time.sleep(0.2 if accept_every is None else accept_every)
                if accept_every is not None:
                    try:
                        srv.accept()[0].close()
                    except BlockingIOError:
                        pass
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    os.close(w)
    ready = os.read(r, 1)                      # b"" if the child died before listening
    os.close(r)
    if ready != b"1":
        os.waitpid(pid, 0)
        sys.exit("server failed to listen")
    return pid


def stop_server(pid: int) -> int:
    t = now()
    os.kill(pid, signal.SIGTERM)
    os.waitpid(pid, 0)
    return t


def start(addr: str, port: int, socks: list[socket.socket], group: str) -> list[tuple[socket.socket, dict]]:
    """Non-blocking connects, one per socket, in a row (the sockets exist already: no time between)."""
    clients = []
    for s in socks:
        rec = {"group": group, "local_port": None, "start_ns": now(), "connected_ns": None,
               "outcome": None, "errno": None, "end_ns": None, "close_begin_ns": None, "close_end_ns": None}
        rc = s.connect_ex((addr, port))
        rec["local_port"] = s.getsockname()[1]  # the port is chosen at connect time
        if rc not in (0, errno.EINPROGRESS):
            decide(rec, "error", rc)
        clients.append((s, rec))
    return clients


def new_sockets(addr: str, n: int) -> list[socket.socket]:
    socks = [socket.socket(family(addr), socket.SOCK_STREAM) for _ in range(n)]
    for s in socks:
        s.setblocking(False)
    return socks


def settle(clients: list[tuple[socket.socket, dict]], timeout_s: float, hold_s: float) -> None:
    """Wait for every connecting client to connect, fail, or be given up (closed) at start + timeout_s.
    Connected ones are watched for a RST or FIN from the moment they connect until hold_s after
    the last one settled."""
    sel = selectors.DefaultSelector()
    connecting = {}
    for s, rec in clients:
        if rec["outcome"] is None:
            sel.register(s, selectors.EVENT_WRITE, rec)
            connecting[s] = rec
        elif rec["outcome"] == "connected":
            sel.register(s, selectors.EVENT_READ, rec)
    timeout_ns, hold_until = int(timeout_s * 1e9), None
    while True:
        for s, rec in list(connecting.items()):
            if now() >= rec["start_ns"] + timeout_ns:
                sel.unregister(s)
                del connecting[s]
                close(s, rec)                   # the application gives up: this close is the outcome
                decide(rec, "gave_up")
        if connecting:
            wake = min(rec["start_ns"] for rec in connecting.values()) + timeout_ns
        else:
            hold_until = hold_until or now() + int(hold_s * 1e9)
            wake = hold_until
            if now() >= hold_until:
                break
        for key, events in sel.select(timeout=max(0, wake - now()) / 1e9):
            s, rec = key.fileobj, key.data
            if events & selectors.EVENT_WRITE:
                del connecting[s]
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                decide(rec, "error" if err else "connected", err)
                if err:
                    sel.unregister(s)
                else:
                    sel.modify(s, selectors.EVENT_READ, rec)
                continue
            sel.unregister(s)                   # readable: a connected client heard from the server
            try:
                if s.recv(1) == b"":
                    decide(rec, "eof")
            except OSError as exc:
                decide(rec, "reset" if exc.errno == errno.ECONNRESET else "error", exc.errno)
    sel.close()


def close_all(clients: list[tuple[socket.socket, dict]]) -> None:
    for s, rec in clients:
        if rec["close_end_ns"] is None:
            close(s, rec)


def story(addr: str, port: int, backlog: int, fill: int, n: int, timeout_s: float, hold_s: float,
          accept_every: float | None) -> dict:
    server = fork_server(addr, port, backlog, accept_every)
    clients = []
    for _ in range(fill):                      # one at a time, each fully settled: they fill the queue
        one = start(addr, port, new_sockets(addr, 1), "fill")
        settle(one, 5.0, 0.0)
        clients += one
    burst = start(addr, port, new_sockets(addr, n), "burst")
    settle(clients + burst, timeout_s, hold_s)
    clients += burst
    close_all(clients)
    server_term_ns = stop_server(server)       # after the clients: its own resets come last
    records = [rec for _, rec in clients]
    return {"server_pid": server, "client_pid": os.getpid(), "backlog": backlog,
            "server_term_ns": server_term_ns, "clients": records,
            "outcome": dict(Counter(rec["outcome"] for rec in records))}


def stuck(addr: str, port: int, n: int, first_port: int) -> None:
    clients = []
    for i in range(n):
        s = new_sockets(addr, 1)[0]
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, first_port + i))
        one = start(addr, port, [s], "stuck")
        settle(one, 5.0, 0.0)                  # connected on the client side: its SYN-ACK arrived
        clients += one
    records = [rec for _, rec in clients]
    print(json.dumps({"stuck_pid": os.getpid(), "clients": records}), flush=True)
    if select.select([sys.stdin], [], [], 60.0)[0]:   # the test fills the queue and lifts the rule
        sys.stdin.readline()
    for s, rec in clients:
        if rec["outcome"] != "connected":
            close_all([(s, rec)])
            continue
        s.settimeout(2.0)
        rec["send_ns"] = now()
        try:                                   # the listener meets this data as the 3rd ACK
            s.send(b"hello")
            decide(rec, "data" if s.recv(1) else "eof")
        except socket.timeout:
            decide(rec, "timeout")
        except OSError as exc:
            decide(rec, "reset" if exc.errno == errno.ECONNRESET else "error", exc.errno)
        close(s, rec)
    print(json.dumps({"stuck_pid": os.getpid(), "clients": records}), flush=True)


if __name__ == "__main__":
    cmd, addr, port, rest = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    if cmd == "burst":
        backlog, fill, n, timeout_s = int(rest[0]), int(rest[1]), int(rest[2]), float(rest[3])
        hold_s = float(rest[4]) if len(rest) > 4 else 0.5
        print(json.dumps(story(addr, port, backlog, fill, n, timeout_s, hold_s, None)), flush=True)
    elif cmd == "slow":
        backlog, n, every, timeout_s = int(rest[0]), int(rest[1]), float(rest[2]), float(rest[3])
        hold_s = float(rest[4]) if len(rest) > 4 else 0.0
        print(json.dumps(story(addr, port, backlog, 0, n, timeout_s, hold_s, every)), flush=True)
    elif cmd == "stuck":
        stuck(addr, port, int(rest[0]), int(rest[1]))
    else:
        sys.exit(__doc__)
